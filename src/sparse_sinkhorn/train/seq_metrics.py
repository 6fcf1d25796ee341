"""Sequence metrics for generation tasks, defined as Tensor2Tensor's ``metrics.py`` defines them.

- ``edit_distance``: the Levenshtein distances of all predictions to their references, summed,
  divided by the summed reference lengths (a corpus-level rate, not a mean of per-sequence rates,
  so long sequences weigh more). Tensor2Tensor's ``sequence_edit_distance``.
- ``exact_match``: the percentage of predictions equal to their reference token for token.
  Tensor2Tensor's ``padded_sequence_accuracy``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

_distance: Callable[[list[int], list[int]], int] | None
try:  # the ``train`` extra; a pure-Python fallback keeps runs working where it is missing
    from rapidfuzz.distance import Levenshtein

    _distance = Levenshtein.distance
except ImportError:  # e.g. an offline GPU machine with only torch preinstalled
    _distance = None


def levenshtein(prediction: Sequence[int], target: Sequence[int]) -> int:
    """Insertions + deletions + substitutions turning ``prediction`` into ``target``."""
    a, b = list(prediction), list(target)
    if _distance is not None:
        return int(_distance(a, b))
    return levenshtein_python(a, b)


def levenshtein_python(a: Sequence[int], b: Sequence[int]) -> int:
    """The same distance by the textbook dynamic programme, O(len(a) * len(b))."""
    row = list(range(len(b) + 1))  # distances from a[:0] to every prefix of b
    for i, x in enumerate(a, start=1):
        diag, row[0] = row[0], i
        for j, y in enumerate(b, start=1):
            diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diag + (x != y))
    return row[-1]


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
