"""Sequence metrics for generation tasks: normalised edit distance and exact match."""

from __future__ import annotations

from collections.abc import Sequence

from rapidfuzz.distance import Levenshtein


def edit_distance(prediction: Sequence[int], target: Sequence[int]) -> float:
    """Levenshtein distance between token sequences divided by the target length."""
    if len(target) == 0:
        raise ValueError("target must be non-empty to normalise the edit distance")
    return Levenshtein.distance(list(prediction), list(target)) / len(target)


def sequence_metrics(
    predictions: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]
) -> dict[str, float]:
    """Mean normalised edit distance (lower is better) and exact match in % (higher)."""
    if len(predictions) != len(targets) or not targets:
        raise ValueError(
            f"need as many predictions as targets (> 0): {len(predictions)} vs {len(targets)}"
        )
    dists = [edit_distance(p, t) for p, t in zip(predictions, targets, strict=True)]
    exact = [list(p) == list(t) for p, t in zip(predictions, targets, strict=True)]
    return {
        "edit_distance": sum(dists) / len(dists),
        "exact_match": 100.0 * sum(exact) / len(exact),
    }
