"""Sequence metrics for generation tasks, defined as Tensor2Tensor's ``metrics.py`` defines them.

- ``edit_distance``: the Levenshtein distances of all predictions to their references, summed,
  divided by the summed reference lengths (a corpus-level rate, not a mean of per-sequence rates,
  so long sequences weigh more). Tensor2Tensor's ``sequence_edit_distance``.
- ``exact_match``: the percentage of predictions equal to their reference token for token.
  Tensor2Tensor's ``padded_sequence_accuracy``.
"""

from __future__ import annotations

from collections.abc import Sequence

from rapidfuzz.distance import Levenshtein


def levenshtein(prediction: Sequence[int], target: Sequence[int]) -> int:
    """Insertions + deletions + substitutions turning ``prediction`` into ``target``."""
    return int(Levenshtein.distance(list(prediction), list(target)))


def sequence_metrics(
    predictions: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]
) -> dict[str, float]:
    """Corpus edit-distance rate (lower is better) and exact match in % (higher is better)."""
    if len(predictions) != len(targets) or not targets:
        raise ValueError(
            f"need as many predictions as targets (> 0): {len(predictions)} vs {len(targets)}"
        )
    ref_length = sum(len(t) for t in targets)
    if ref_length == 0:
        raise ValueError("targets are all empty; the edit distance has nothing to normalise by")
    pairs = list(zip(predictions, targets, strict=True))
    distance = sum(levenshtein(p, t) for p, t in pairs)
    exact = sum(list(p) == list(t) for p, t in pairs)
    return {"edit_distance": distance / ref_length, "exact_match": 100.0 * exact / len(pairs)}
