"""The experiments' arithmetic on results: units, averages over seeds, table cells.

Rule: pure functions of numbers (and of which held-out items are scored); no files, no flags.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from torch.utils.data import Dataset, Subset

T = TypeVar("T")


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
    """One metric of a `summarize_seeds` record as ``"mean ± std"``."""
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
