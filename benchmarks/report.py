"""Markdown tables of a sweep's JSON (for the README): one table per level and mode.

python -m benchmarks.report [benchmarks/results/perf_sweep.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "–"
    if row["status"] != "ok":
        return row["status"]
    return f"{row['time_s']:.3g} s / {row['peak_mem_mb']:.0f} MiB"


def tables(meta: dict[str, Any]) -> str:
    rows = meta["results"]
    lengths = sorted({r["length"] for r in rows})
    names = list(dict.fromkeys(r["contender"] for r in rows))
    out = []
    for level in ("op", "layer"):
        for mode in ("fwd", "fwdbwd"):
            sel = {(r["contender"], r["length"]): r for r in rows
                   if r["level"] == level and r["mode"] == mode}  # fmt: skip
            if not sel:
                continue
            title = "forward" if mode == "fwd" else "forward + backward"
            out.append(f"**{level} level, {title}** (median time / peak memory)\n")
            out.append("| contender | " + " | ".join(f"{x:,}" for x in lengths) + " |")
            out.append("|---" * (len(lengths) + 1) + "|")
            for name in names:
                cells = [_cell(sel.get((name, x))) for x in lengths]
                out.append(f"| {name} | " + " | ".join(cells) + " |")
            out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/perf_sweep.json")
    print(tables(json.loads(path.read_text())))
