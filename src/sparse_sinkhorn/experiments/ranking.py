"""The ranking of a results table's names by its headline metric, and whether that ranking
holds when the training budget doubles.

An experiment names its headline metric (`Ranking`); ``results.json`` then holds
``"ranking"``: the metric, its direction and the names best first, by the mean over seeds
(`rank`). `compare` reads two such files, one trained with budget ``B`` and one with ``2B``
(``--steps``), and says whether the order is the same, with each name's mean ± std interval at
both budgets and whether neighbours of the ``2B`` order overlap (a tie the seeds do not
resolve)::

    python examples/compare_budgets.py runs/lm-B/results.json runs/lm-2B/results.json

Rule: pure functions of the results' rows (dicts with ``kind``, ``eval`` and ``eval_std``);
reading the files is `load`'s only.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Ranking:
    """How an experiment ranks its rows: by ``eval[metric]``, best first."""

    metric: str
    higher_is_better: bool

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "higher_is_better": self.higher_is_better}


def rank(rows: Sequence[Mapping[str, Any]], ranking: Ranking) -> list[str]:
    """The names (``kind``) of the rows that report ``ranking.metric``, best mean first (ties
    keep the rows' order)."""
    scored = [(str(r["kind"]), r["eval"][ranking.metric]) for r in rows if _has(r, ranking)]
    sign = -1.0 if ranking.higher_is_better else 1.0
    return [name for name, _ in sorted(scored, key=lambda item: sign * item[1])]


def _has(row: Mapping[str, Any], ranking: Ranking) -> bool:
    value = row.get("eval", {}).get(ranking.metric) if isinstance(row, Mapping) else None
    return isinstance(value, (int, float)) and "kind" in row


def ranking_record(rows: Sequence[Mapping[str, Any]], ranking: Ranking) -> dict[str, Any]:
    """``results.json``'s ``"ranking"``: the metric, its direction and the names best first."""
    return {**ranking.to_dict(), "order": rank(rows, ranking)}


def ranking_line(record: Mapping[str, Any]) -> str:
    """The line under a results table: ``Ranking by <metric> (higher is better): a > b``."""
    better = "higher" if record["higher_is_better"] else "lower"
    order = " > ".join(record["order"]) or "–"
    return f"Ranking by {record['metric']} ({better} is better), best first: {order}"


def interval(row: Mapping[str, Any], metric: str) -> tuple[float, float]:
    """``(mean - std, mean + std)`` of ``metric`` over the row's seeds (std 0 for one seed)."""
    mean = float(row["eval"][metric])
    std = float(row.get("eval_std", {}).get(metric) or 0.0)
    return mean - std, mean + std


def overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    """The length of the intersection of two intervals (0 when they are disjoint; a point
    where they touch, or two equal points, also counts as overlapping: see `overlaps`)."""
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether two closed intervals share a point."""
    return max(a[0], b[0]) <= min(a[1], b[1])


@dataclass(frozen=True)
class Comparison:
    """Two results of one experiment at budgets ``B`` and ``2B``."""

    metric: str
    higher_is_better: bool
    order_b: list[str]
    order_2b: list[str]
    intervals: dict[str, tuple[tuple[float, float], tuple[float, float]]]  # name -> (B, 2B)

    @property
    def same_ranking(self) -> bool:
        """The names both files rank are in the same order (names only one file has are
        left out of the order, and listed by `report`)."""
        both = set(self.order_b) & set(self.order_2b)
        return [n for n in self.order_b if n in both] == [n for n in self.order_2b if n in both]

    def tied_neighbours(self) -> list[tuple[str, str]]:
        """Neighbours of the ``2B`` order whose mean ± std intervals overlap."""
        order = [n for n in self.order_2b if n in self.intervals]
        pairs = itertools.pairwise(order)
        return [(a, b) for a, b in pairs if overlaps(self.intervals[a][1], self.intervals[b][1])]

    def report(self) -> str:
        """The verdict, each name's intervals at both budgets, and the unresolved ties."""

        def show(span: tuple[float, float]) -> str:
            mid, half = (span[0] + span[1]) / 2, (span[1] - span[0]) / 2
            return f"{mid:.4g} ± {half:.2g}"

        better = "higher" if self.higher_is_better else "lower"
        lines = [
            f"metric: {self.metric} ({better} is better)",
            f"ranking at B:  {' > '.join(self.order_b)}",
            f"ranking at 2B: {' > '.join(self.order_2b)}",
            f"same ranking: {'yes' if self.same_ranking else 'NO'}",
            "",
            "| name | B: mean ± std | 2B: mean ± std | B and 2B overlap |",
            "|---|---|---|---|",
        ]
        for name in self.order_2b:
            if name in self.intervals:
                at_b, at_2b = self.intervals[name]
                width = overlap(at_b, at_2b)
                shared = f"yes ({width:.3g})" if overlaps(at_b, at_2b) else "no"
                lines.append(f"| {name} | {show(at_b)} | {show(at_2b)} | {shared} |")
        ties = self.tied_neighbours()
        lines.append("")
        lines.append(
            "neighbours at 2B whose intervals overlap (order not resolved by the seeds): "
            + (", ".join(f"{a} ~ {b}" for a, b in ties) or "none")
        )
        only = sorted(set(self.order_b) ^ set(self.order_2b))
        if only:
            lines.append(f"in one file only (not compared): {', '.join(only)}")
        return "\n".join(lines)


def compare(b: Mapping[str, Any], b2: Mapping[str, Any]) -> Comparison:
    """Compare the ``results.json`` documents ``b`` (budget B) and ``b2`` (budget 2B) of one
    experiment by the ranking ``b2`` records (``b``'s must name the same metric)."""
    spec = [doc.get("ranking") for doc in (b, b2)]
    if not all(isinstance(s, Mapping) for s in spec):
        raise ValueError("a results.json without a ranking (written before rankings were kept)")
    assert isinstance(spec[0], Mapping) and isinstance(spec[1], Mapping)
    if spec[0]["metric"] != spec[1]["metric"] or b.get("experiment") != b2.get("experiment"):
        raise ValueError("the two results rank different experiments or metrics")
    ranking = Ranking(str(spec[1]["metric"]), bool(spec[1]["higher_is_better"]))
    rows_b = {str(r["kind"]): r for r in b["results"] if _has(r, ranking)}
    rows_2b = {str(r["kind"]): r for r in b2["results"] if _has(r, ranking)}
    intervals = {
        name: (interval(rows_b[name], ranking.metric), interval(rows_2b[name], ranking.metric))
        for name in rows_2b
        if name in rows_b
    }
    return Comparison(
        ranking.metric,
        ranking.higher_is_better,
        rank(b["results"], ranking),
        rank(b2["results"], ranking),
        intervals,
    )


def load(path: str | Path) -> dict[str, Any]:
    """A ``results.json`` (``path`` may also be its directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    document = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(document, dict):
        raise ValueError(f"{path} is not a results file")
    return document
