"""Metrics as JSON lines (always), TensorBoard events (when installed), and loss-curve plots."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .checkpoint import writing

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` file (a torn last line from a crash is skipped)."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("skipping unreadable line in %s: %r", path, line[:80])
    return rows


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop rows with ``step > last_step`` (logged by a run that is being resumed earlier)."""
    if not path.is_file():
        return
    kept = [row for row in read_metrics(path) if int(row.get("step", 0)) <= last_step]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for row in kept:
            handle.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def _open_tensorboard(log_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(log_dir))


class MetricsWriter:
    """Appends one JSON object per call to ``out_dir/metrics.jsonl`` (+ TensorBoard scalars)."""

    def __init__(self, out_dir: Path, *, resume_step: int | None) -> None:
        self.path = out_dir / METRICS_FILE
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        else:
            truncate_metrics(self.path, resume_step)
        self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._tb = _open_tensorboard(out_dir / "tensorboard")

    def write(self, row: dict[str, Any]) -> None:
        with writing(self.path):  # a full disk: OSError naming metrics.jsonl
            self._handle.write(json.dumps(row) + "\n")
            self._handle.flush()
        if self._tb is not None:
            step = int(row["step"])
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key if "/" in key else f"train/{key}", value, step)

    def close(self) -> None:
        with writing(self.path):
            self._handle.close()
        if self._tb is not None:
            self._tb.close()


def plot_metrics(
    jsonl_path: str | Path, png_path: str | Path, keys: Sequence[str] = ("loss",)
) -> Path:
    """Plot ``keys`` against ``step`` from a metrics.jsonl file into a PNG (needs matplotlib)."""
    from matplotlib.figure import Figure  # lazy: matplotlib is an optional dependency

    rows = read_metrics(jsonl_path)
    missing = [k for k in keys if not any(k in row for row in rows)]
    if missing:
        available = sorted({k for row in rows for k in row})
        raise ValueError(f"keys {missing} not found in {jsonl_path}; available: {available}")
    fig = Figure(figsize=(6, 2.6 * len(keys)))
    axes = fig.subplots(len(keys), 1, squeeze=False)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        points = [(row["step"], row[key]) for row in rows if key in row]
        marker = "." if len(points) < 50 else ""
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out
