"""What every experiment shares: attention-kind parsing, result tables, JSON, plots.

Experiments print a table of their results beside the paper's rows and write the same
figures to ``results.json`` in their output directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..nn import ATTENTION_KINDS

logger = logging.getLogger(__name__)


def parse_kinds(
    value: str, allowed: Sequence[str] = ATTENTION_KINDS, all_kinds: Sequence[str] | None = None
) -> list[str]:
    """``"all"``, one kind, or a comma-separated list -> list of kinds (validated)."""
    if value == "all":
        return list(all_kinds or allowed)
    kinds = [k.strip() for k in value.split(",") if k.strip()]
    bad = [k for k in kinds if k not in allowed]
    if bad or not kinds:
        raise SystemExit(
            f"error: unknown attention kind {', '.join(bad) or value!r}; "
            f"choose from {', '.join(allowed)} or 'all'"
        )
    return kinds


def add_common_args(parser: argparse.ArgumentParser, *, default_out: str) -> None:
    """Flags every experiment takes."""
    parser.add_argument(
        "--preset",
        default="cpu",
        choices=("cpu", "paper"),
        help="cpu: minutes on a laptop-class CPU (default); paper: the paper's sizes",
    )
    parser.add_argument(
        "--out", default=default_out, help="output directory (default: %(default)s)"
    )
    parser.add_argument("--steps", type=int, default=None, help="override the preset's steps")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
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
            raise SystemExit(f"error: --{name.replace('_', '-')} must be > 0, got {value}")
        changes[field] = value
    return changes


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool, is_main: bool = True) -> None:
    """Check (or clear) one training run's directory before :func:`train` uses it.

    Every rank checks (so all raise the same error); only the main rank deletes.
    """
    has_run = (run_dir / "checkpoints").is_dir()
    if resume and not has_run:
        raise SystemExit(
            f"error: --resume: no checkpoints in {run_dir}; start without --resume, or pass "
            "the --out of an earlier run"
        )
    if has_run and not resume:
        if not overwrite:
            raise SystemExit(
                f"error: {run_dir} already holds a run; pass --resume to continue it, "
                "--overwrite to start over, or another --out"
            )
        if is_main:
            shutil.rmtree(run_dir)


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


def write_results(out_dir: Path, payload: Mapping[str, Any], table: str) -> Path:
    """``results.json`` (with the machine) and ``results.md`` (the printed table)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    path.write_text(json.dumps({**payload, "machine": machine_info()}, indent=2) + "\n")
    (out_dir / "results.md").write_text(table + "\n")
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
