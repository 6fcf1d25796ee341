"""Figures more than one experiment draws: training-loss curves and sort-matrix heat maps.

Rule: each function draws one figure from finished results into one PNG and returns its path;
matplotlib is imported inside the function (the library does not need it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..train import read_metrics


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
