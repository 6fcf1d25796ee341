"""What an experiment leaves in ``--out``: ``results.json``, ``results.md`` and the printed table.

Rule: every experiment reports through `report` (print the table, write both files), and
``results.json`` is only ever written by `write_results`, atomically and under the
directory's lock. The names of the files a run directory holds beside its checkpoints live here.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..train.rundir import run_lock
from .provenance import provenance
from .ranking import Ranking, ranking_line, ranking_record
from .variants import NOT_CAUSAL_LABEL

logger = logging.getLogger(__name__)

# Files every run directory of `lm`, `image`, `classify` and `nli` may hold beside its checkpoints.
TASK_FILE = "run.json"  # what `generate` needs to know about a run directory
TOKENIZER_FILE = "tokenizer.json"  # the run's tokenizer (text tasks)

# The attention kinds of the LM and image tables, in table order, and how tables name them
# (and the named variants those experiments take too, `variants.PAPER_VARIANTS`).
TABLE_KINDS = ("dense", "local", "sparse", "sinkhorn", "mixture")
KIND_NAMES = {
    "dense": "Transformer",
    "local": "Local Attention",
    "sparse": "Sparse Transformer",
    "sinkhorn": "Sinkhorn",
    "mixture": "Sinkhorn Mixture",
    "sinkhorn-targets": "Sinkhorn, column targets (sinkhorn-targets)",
    "sinkhorn-leaky": f"Sinkhorn, leaky (sinkhorn-leaky, {NOT_CAUSAL_LABEL})",
    "softmax-max": "Softmax routing, max pooling (softmax-max)",
}

# Payload fields that must agree for two runs' results to share one results.json.
_SAME_RUN_FIELDS = ("experiment", "preset", "settings", "dataset", "level", "pair_encoding")
# Preset fields an earlier results.json may hold under a former name: former -> current.
_RENAMED_SETTINGS = {"max_len": "max_tokens"}  # classify, nli: tokens kept per text
# Preset fields added later, with the value an earlier results.json that lacks them ran with.
_ADDED_SETTINGS = {"token_conv": 0}  # recall: no convolution over the embeddings


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table (floats with 4 significant decimals)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
        return "–" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """Where a result came from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _row_key(row: Any) -> tuple[Any, Any, Any] | None:
    if not isinstance(row, dict):
        return None
    kind = row.get("kind", row.get("attention"))
    return None if kind is None else (str(kind), row.get("seed"), row.get("length"))


def _as_saved(value: Any) -> Any:
    """``value`` as ``results.json`` holds it once written and read back (tuples become
    lists): settings compare equal whether they come from a preset or from the file."""
    return json.loads(json.dumps(value))


def _current_names(settings: Any) -> Any:
    """``settings`` with each field of `_RENAMED_SETTINGS` under its current name."""
    if not isinstance(settings, dict):
        return settings
    return {_RENAMED_SETTINGS.get(k, k): v for k, v in settings.items()}


def merge_results(old: Any, payload: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``payload`` plus the rows of ``old`` (an earlier ``results.json``) for kinds it did not
    re-run, when both come from the same experiment, preset and settings.

    Returns the merged payload and the kinds kept from ``old`` (empty when nothing was kept).
    Raises ``ValueError`` when ``old`` is from an incompatible run.
    """
    merged = dict(payload)
    if not isinstance(old, dict) or not isinstance(old.get("results"), list):
        raise ValueError("the earlier results.json is not a results file")
    old = {**old, "settings": _current_names(old.get("settings"))}
    settings, current = old["settings"], payload.get("settings")
    if isinstance(settings, dict) and isinstance(current, dict):
        added = {k: v for k, v in _ADDED_SETTINGS.items() if k in current and k not in settings}
        old["settings"] = {**settings, **added}
    differ = [k for k in _SAME_RUN_FIELDS if _as_saved(old.get(k)) != _as_saved(payload.get(k))]
    if differ:
        raise ValueError(f"the earlier results.json differs in {', '.join(differ)}")
    new_rows = list(payload.get("results", []))
    rerun = {_row_key(r) for r in new_rows}
    kept = [r for r in old["results"] if _row_key(r) is not None and _row_key(r) not in rerun]
    merged["results"] = kept + new_rows
    return merged, sorted({str(r.get("kind", r.get("attention"))) for r in kept})


def _seeds(row: Any) -> set[Any]:
    runs = row.get("runs") if isinstance(row, dict) else None
    return {r.get("seed") for r in runs if isinstance(r, dict)} if isinstance(runs, list) else set()


def lost_seeds(old: Any, payload: Mapping[str, Any]) -> list[str]:
    """The kinds whose row in ``old`` has seeds the new row of ``payload`` that replaces it
    lacks (a second grid on one ``--out`` with other seeds of a kind): merging would drop them."""
    new = {_row_key(r): _seeds(r) for r in payload.get("results", [])}
    lost = [
        r
        for r in old.get("results", [])
        if _row_key(r) in new and not _seeds(r) <= new[_row_key(r)]
    ]
    return sorted({str(r.get("kind", r.get("attention"))) for r in lost})


def _free_backup(out_dir: Path) -> Path:
    """``results.previous.json``, or ``results.previous-<n>.json`` with the first free ``n``
    when earlier ones exist: a set-aside results file is never overwritten."""
    path, n = out_dir / "results.previous.json", 1
    while path.exists():
        n += 1
        path = out_dir / f"results.previous-{n}.json"
    return path


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``: a failure (full
    disk, read-only directory) leaves the previous file intact."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def earlier_provenance(old: Mapping[str, Any]) -> list[Any]:
    """The provenance of the invocations behind the rows an earlier ``results.json`` holds,
    oldest first: its own ``earlier`` list, then its ``provenance`` (``None`` for a file
    written before results recorded theirs)."""
    made = old.get("provenance")
    if not isinstance(made, dict):
        return [None]
    earlier = made.get("earlier")
    own = {k: v for k, v in made.items() if k != "earlier"}
    return [*(earlier if isinstance(earlier, list) else []), own]


def write_results(out_dir: Path, payload: Mapping[str, Any], table: str) -> Path:
    """``results.json`` (with the machine and the `provenance`) and ``results.md`` (the
    printed table). When rows of an earlier file are kept, ``provenance["earlier"]`` holds
    the provenance of the invocations that made them (`earlier_provenance`).

    An existing ``results.json`` from the same experiment, preset and settings keeps the rows
    of the kinds this run did not re-run (``sort --attention dense`` into an ``--out`` with a
    sinkhorn run keeps the sinkhorn row; settings compare as the file holds them, so a tuple
    and the list it was saved as are the same); one from a different run is copied to
    ``results.previous.json``, or ``results.previous-<n>.json`` when that exists (a file set
    aside is never overwritten), with a warning instead of being lost. A payload with a
    ``"ranking"`` (`ranking.Ranking.to_dict`) gets the order of every row the file then holds,
    and ``results.md`` its line. Both files are replaced atomically under the directory's lock.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    with run_lock(out_dir):
        document = dict(payload)
        made = provenance()
        if path.is_file():
            try:
                old = json.loads(path.read_text(encoding="utf-8"))
                document, kept = merge_results(old, payload)
            except (ValueError, UnicodeDecodeError) as err:
                backup = _free_backup(out_dir)
                _atomic_write(backup, path.read_text(encoding="utf-8", errors="replace"))
                logger.warning("%s: %s; it is kept as %s", path, err, backup)
            else:
                dropped = lost_seeds(old, payload)
                if dropped:  # the merge replaces their rows: the earlier file is kept whole
                    backup = _free_backup(out_dir)
                    _atomic_write(backup, path.read_text(encoding="utf-8"))
                    logger.warning(
                        "%s: the rows of %s held other seeds; the earlier file is kept as %s "
                        "(--resume with every seed re-scores them all)",
                        path, ", ".join(dropped), backup,
                    )  # fmt: skip
                    table += (
                        f"\n\nRows of {', '.join(dropped)} held other seeds too: the earlier "
                        f"results are kept in {backup.name}"
                    )
                if kept:
                    made["earlier"] = earlier_provenance(old)
                    logger.info("results.json keeps the earlier rows of: %s", ", ".join(kept))
                    table += (
                        "\n\nKept from an earlier run with the same settings (see results.json): "
                        + ", ".join(kept)
                    )
        if isinstance(document.get("ranking"), dict):  # over every row the file now holds
            spec = document["ranking"]
            ranking = Ranking(spec["metric"], spec["higher_is_better"])
            document["ranking"] = ranking_record(document["results"], ranking)
            table += "\n\n" + ranking_line(document["ranking"])
        record = {**document, "machine": machine_info(), "provenance": made}
        text = json.dumps(record, indent=2) + "\n"
        _atomic_write(path, text)
        _atomic_write(out_dir / "results.md", table + "\n")
    return path


def report(
    out_dir: Path,
    title: str,
    table: str,
    payload: Mapping[str, Any],
    files: Sequence[tuple[str, Any]] = (),
    *,
    note: str | None = None,
) -> Path:
    """Print ``title``, ``table`` and ``note`` (a line under the table, when given), write
    ``results.json`` and ``results.md`` (`write_results`), then print where the results
    and ``files`` (``(what, path)`` pairs, e.g. ``("loss curves", path)``) are. Returns the
    ``results.json`` path."""
    print(f"\n{title}\n")
    print(table)
    if note:
        print(f"\n{note}")
    path = write_results(out_dir, payload, table)
    if "ranking" in payload:  # the order of every row results.json now holds
        print("\n" + ranking_line(json.loads(path.read_text(encoding="utf-8"))["ranking"]))
    print(f"\nresults: {path}")
    for what, where in files:
        print(f"{what}: {where}")
    return path
