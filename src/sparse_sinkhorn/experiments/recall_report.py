"""The results of ``sparse-sinkhorn recall``: its table, its per-kind summary over seeds and
its two figures (accuracy against length and against training time per step)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .driver import summarize_seeds
from .results import format_table
from .stats import seeds_cell
from .variants import label

HARD = "accuracy_hard_routing"  # a soft-routing kind's weights scored with hard routing


def results_table(results: list[dict[str, Any]], lengths: tuple[int, ...], chance: str) -> str:
    kinds = list(dict.fromkeys(r["kind"] for r in results))
    has_hard = any(HARD in x["eval"] for x in results)
    rows = []
    for kind in kinds:
        row: list[Any] = [label(kind)]
        for length in lengths:
            r = next((x for x in results if x["kind"] == kind and x["length"] == length), None)
            if r is None:
                row += ["–"] * (4 if has_hard else 3)
                continue
            steps = [run["seconds_per_step"] for run in r["runs"]]
            hard = seeds_cell(r, HARD, 1) if HARD in r["eval"] else "–"
            peak = r.get("peak_mem_mb")
            row += [seeds_cell(r, "accuracy", 1), f"{sum(steps) / len(steps):.3f}"]
            row += ["–" if peak is None else f"{peak:,.0f}"]
            row += [hard] if has_hard else []
        rows.append(row)
    headers = ["attention"]
    for length in lengths:
        headers += [f"accuracy % at {length:,} (chance {chance})", f"s/step at {length:,}"]
        headers += [f"peak MiB at {length:,}"]
        if has_hard:
            headers += [f"hard routing at eval, % at {length:,}"]
    return format_table(headers, rows)


def summarize(name: str, runs: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
    """`summarize_seeds` keeping each run's training time per step; the record's own
    ``seconds_per_step`` is their mean (the table's figure)."""
    record = summarize_seeds(name, runs, seeds)
    for entry, run in zip(record["runs"], runs, strict=True):
        entry["seconds_per_step"] = run["seconds_per_step"]
    record["seconds_per_step"] = sum(r["seconds_per_step"] for r in runs) / len(runs)
    return record


def plot(results: list[dict[str, Any]], out: Path, title: str) -> tuple[Path, Path]:
    from matplotlib.figure import Figure

    kinds = list(dict.fromkeys(r["kind"] for r in results))
    paths = (out / "accuracy.png", out / "cost.png")
    for path, xkey in zip(paths, ("length", "seconds_per_step"), strict=True):
        fig = Figure(figsize=(6.5, 3.8))
        ax = fig.subplots()
        for kind in kinds:
            rs = sorted((r for r in results if r["kind"] == kind), key=lambda r: r["length"])
            xs = [
                r["length"]
                if xkey == "length"
                else sum(x["seconds_per_step"] for x in r["runs"]) / len(r["runs"])
                for r in rs
            ]
            ys = [r["eval"]["accuracy"] for r in rs]
            es = [r["eval_std"]["accuracy"] for r in rs]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=kind)
        ax.set_xscale("log", base=2 if xkey == "length" else 10)
        ax.set_xlabel("sequence length" if xkey == "length" else "training time per step (s)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    return paths
