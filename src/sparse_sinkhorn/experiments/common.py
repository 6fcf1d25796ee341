"""What every experiment shares: attention-kind parsing, result tables, JSON, plots.

Experiments print a table of their results beside the paper's rows and write the same
figures to ``results.json`` in their output directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.utils.data import Dataset, Subset

from ..errors import UsageError
from ..nn import ATTENTION_KINDS
from ..train import read_metrics
from ..train.rundir import run_lock

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Files every run directory of `lm`, `image`, `classify` and `nli` may hold beside its checkpoints.
TASK_FILE = "run.json"  # what `generate` needs to know about a run directory
TOKENIZER_FILE = "tokenizer.json"  # the run's tokenizer (text tasks)

# The attention kinds of the LM and image tables, in table order, and how tables name them.
TABLE_KINDS = ("dense", "local", "sparse", "sinkhorn", "mixture")
KIND_NAMES = {
    "dense": "Transformer",
    "local": "Local Attention",
    "sparse": "Sparse Transformer",
    "sinkhorn": "Sinkhorn",
    "mixture": "Sinkhorn Mixture",
}


def parse_kinds(
    value: str,
    allowed: Sequence[str] = ATTENTION_KINDS,
    all_kinds: Sequence[str] | None = None,
    *,
    what: str = "attention kind",
) -> list[str]:
    """``"all"``, one name, or a comma-separated list -> list of names (validated)."""
    if value == "all":
        return list(all_kinds or allowed)
    kinds = [k.strip() for k in value.split(",") if k.strip()]
    bad = [k for k in kinds if k not in allowed]
    if bad or not kinds:
        raise UsageError(
            f"unknown {what} {', '.join(bad) or value!r}; choose from {', '.join(allowed)} or 'all'"
        )
    return kinds


def seed_arg(text: str) -> int:
    """An argparse ``type``: a seed in ``[0, 2**31)`` (derived seeds must fit every RNG)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value < 2**31:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**31), got {value}")
    return value


def out_dir_arg(text: str) -> str:
    """An argparse ``type``: ``--out`` names a directory (an empty one would write into the
    current directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            f"must name a directory, got {text!r}; pass --out . to write into the current one"
        )
    return text


def add_common_args(parser: argparse.ArgumentParser, *, default_out: str) -> None:
    """Flags every experiment takes."""
    parser.add_argument(
        "--preset",
        default="cpu",
        choices=("cpu", "paper"),
        help="cpu: minutes on a laptop-class CPU (default); paper: the paper's sizes",
    )
    parser.add_argument(
        "--out",
        type=out_dir_arg,
        default=default_out,
        help="output directory (default: %(default)s)",
    )
    parser.add_argument("--steps", type=int, default=None, help="override the preset's steps")
    parser.add_argument("--seed", type=seed_arg, default=0, help="random seed (default: 0)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--resume",
        action="store_true",
        help="continue each run from its latest checkpoint in --out",
    )
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="delete earlier runs of the same attention kinds in --out first",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def positive_overrides(args: argparse.Namespace, fields: Mapping[str, str]) -> dict[str, int]:
    """The preset fields the user overrode: ``{field: flag attribute}`` -> ``{field: value}``.

    Every override flag is an optional positive int; ``<= 0`` is a one-line error.
    """
    changes: dict[str, int] = {}
    for field, name in fields.items():
        value = getattr(args, name)
        if value is None:
            continue
        if value <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        changes[field] = value
    return changes


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


# Payload fields that must agree for two runs' results to share one results.json.
_SAME_RUN_FIELDS = ("experiment", "preset", "settings", "dataset", "level", "pair_encoding")


def _row_key(row: Any) -> tuple[Any, Any] | None:
    if not isinstance(row, dict):
        return None
    kind = row.get("kind", row.get("attention"))
    return None if kind is None else (str(kind), row.get("seed"))


def merge_results(old: Any, payload: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``payload`` plus the rows of ``old`` (an earlier ``results.json``) for kinds it did not
    re-run, when both come from the same experiment, preset and settings.

    Returns the merged payload and the kinds kept from ``old`` (empty when nothing was kept).
    Raises ``ValueError`` when ``old`` is from an incompatible run.
    """
    merged = dict(payload)
    if not isinstance(old, dict) or not isinstance(old.get("results"), list):
        raise ValueError("the earlier results.json is not a results file")
    differ = [k for k in _SAME_RUN_FIELDS if old.get(k) != payload.get(k)]
    if differ:
        raise ValueError(f"the earlier results.json differs in {', '.join(differ)}")
    new_rows = list(payload.get("results", []))
    rerun = {_row_key(r) for r in new_rows}
    kept = [r for r in old["results"] if _row_key(r) is not None and _row_key(r) not in rerun]
    merged["results"] = kept + new_rows
    return merged, sorted({str(r.get("kind", r.get("attention"))) for r in kept})


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


def write_results(out_dir: Path, payload: Mapping[str, Any], table: str) -> Path:
    """``results.json`` (with the machine) and ``results.md`` (the printed table).

    An existing ``results.json`` from the same experiment, preset and settings keeps the rows
    of the kinds this run did not re-run (``sort --attention dense`` into an ``--out`` with a
    sinkhorn run keeps the sinkhorn row); one from a different run is renamed to
    ``results.previous.json`` with a warning instead of being lost. Both files are replaced
    atomically under the directory's lock.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    with run_lock(out_dir):
        document = dict(payload)
        if path.is_file():
            try:
                old = json.loads(path.read_text(encoding="utf-8"))
                document, kept = merge_results(old, payload)
            except (ValueError, UnicodeDecodeError) as err:
                backup = out_dir / "results.previous.json"
                _atomic_write(backup, path.read_text(encoding="utf-8", errors="replace"))
                logger.warning("%s: %s; it is kept as %s", path, err, backup)
            else:
                if kept:
                    logger.info("results.json keeps the earlier rows of: %s", ", ".join(kept))
                    table += (
                        "\n\nKept from an earlier run with the same settings (see results.json): "
                        + ", ".join(kept)
                    )
        text = json.dumps({**document, "machine": machine_info()}, indent=2) + "\n"
        _atomic_write(path, text)
        _atomic_write(out_dir / "results.md", table + "\n")
    return path


def plot_sort_matrices(matrices: torch.Tensor, path: Path, title: str) -> Path:
    """Heat maps of ``(H, N, N)`` sort matrices, one panel per head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = matrices.shape[0]
    fig, axes = plt.subplots(1, heads, figsize=(3 * heads, 3.2), squeeze=False)
    for h, ax in enumerate(axes[0]):
        im = ax.imshow(matrices[h].float().cpu().numpy(), vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"head {h}")
        ax.set_xlabel("key block j")
        if h == 0:
            ax.set_ylabel("query block i")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="P[i, j]")
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")


def mean_and_std(evals: Sequence[Mapping[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Per-metric mean and sample standard deviation over seeds (std 0 for one seed).

    Every run must report the same metric names.
    """
    if not evals:
        raise ValueError("no runs to summarise")
    names = list(evals[0])
    if any(list(e) != names for e in evals):
        raise ValueError("runs report different metrics; cannot average them over seeds")
    mean = {k: statistics.fmean(e[k] for e in evals) for k in names}
    std = {k: statistics.stdev(e[k] for e in evals) if len(evals) > 1 else 0.0 for k in names}
    return mean, std


def mean_std_cell(mean: float | None, std: float | None, digits: int, n_seeds: int) -> str:
    """``"mean ± std"`` (just the mean for one seed; "–" when there is no value)."""
    if mean is None:
        return "–"
    if n_seeds > 1 and std is not None:
        return f"{mean:.{digits}f} ± {std:.{digits}f}"
    return f"{mean:.{digits}f}"


def seeds_cell(result: Mapping[str, Any], key: str, digits: int) -> str:
    """One metric of a :func:`~.driver.summarize_seeds` record as ``"mean ± std"``."""
    n_seeds = len(result.get("runs", [None]))
    std = result.get("eval_std", {}).get(key)
    return mean_std_cell(result["eval"].get(key), std, digits, n_seeds)


def bits_per_unit(total_nats: float, count: int) -> float:
    """Mean cross-entropy in bits: ``total_nats / count / ln 2`` (bits/char, bits/dim)."""
    if count <= 0:
        raise ValueError(f"count must be > 0, got {count}")
    return total_nats / count / math.log(2)


def perplexity(total_nats: float, count: int) -> float:
    """``exp(total_nats / count)``: perplexity per token."""
    if count <= 0:
        raise ValueError(f"count must be > 0, got {count}")
    return math.exp(total_nats / count)


def evenly_spaced(data: Dataset[T], limit: int) -> Subset[T]:
    """At most ``limit`` evenly spaced items of ``data`` (the held-out windows or images that
    are scored: the same ones for every kind and seed)."""
    n = len(data)  # type: ignore[arg-type]
    k = min(n, limit)
    return Subset(data, [i * n // k for i in range(k)])


def plot_loss_curves(results: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Training loss of every kind on one figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 3.6))
    ax = fig.subplots()
    for r in results:
        rows = [row for row in read_metrics(Path(r["run_dir"]) / "metrics.jsonl") if "loss" in row]
        ax.plot([row["step"] for row in rows], [row["loss"] for row in rows], label=r["kind"])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
