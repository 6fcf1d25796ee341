"""Every figure of the README's performance section, in one command.

    python -m benchmarks.perf             # ~20 min on this project's idle 2-core machine
    python -m benchmarks.perf --quick     # 4K only, no model level (a smoke run)

1. ``perf_sweep``: op and layer level, forward + backward, b = 64, 4K / 16K / 64K tokens:
   Sinkhorn (soft, hard, causal), local, dense SDPA and the peer (``benchmarks.sweep``).
2. ``perf_blocks``: soft vs hard routing at b = 64 / 128 / 256 (op level), where the soft
   plan's ``N x N`` mix shows.
3. ``model``: the causal language models (``benchmarks.model``).

Results (csv, json, markdown) go to ``benchmarks/results/``; the load average before each
part is printed and stored, since only figures from an idle machine are comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from . import model, sweep

RESULTS = Path(__file__).parent / "results"


def _load() -> float:
    return os.getloadavg()[0]


def _run_sweep(stem: str, argv: list[str]) -> list[dict[str, Any]]:
    args = sweep.parser(sweep.LENGTHS, list(sweep.CONTENDERS), ["op", "layer"]).parse_args(argv)
    sweep.check_device(args)
    print(f"[{stem}] load average {_load():.2f}", file=sys.stderr, flush=True)
    rows = sweep.sweep(args)
    sweep.write_results(rows, args, stem)
    return rows


def table(rows: list[dict[str, Any]], level: str, mode: str = "fwdbwd") -> str:
    """Markdown: contender x length cells ``time / peak memory``."""
    lengths = sorted({r["length"] for r in rows})
    names = list(dict.fromkeys(r["contender"] for r in rows if r["level"] == level))
    lines = ["| contender | " + " | ".join(f"{n:,}" for n in lengths) + " |"]
    lines.append("|---" * (len(lengths) + 1) + "|")
    for name in names:
        cells = []
        for n in lengths:
            r = next(
                (x for x in rows if (x["level"], x["contender"], x["length"], x["mode"])
                 == (level, name, n, mode)), None,
            )  # fmt: skip
            if r is None:
                cells.append("–")
            elif r.get("time_s") is None:
                cells.append(r["status"])
            else:
                cells.append(f"{r['time_s']:.3g} s / {r['peak_mem_mb']:.0f} MiB")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    lengths = ["4096"] if args.quick else ["4096", "16384", "65536"]
    common = ["--modes", "fwdbwd", "--out", args.out, "--no-plots"]
    loads = {"start": _load()}
    main_rows = _run_sweep(
        "perf_sweep",
        ["--lengths", *lengths, "--levels", "op", "layer", "--contenders", "sinkhorn",
         "sinkhorn_hard", "sinkhorn_causal", "local", "dense_sdpa", "peer", *common],
    )  # fmt: skip
    loads["after_sweep"] = _load()
    block_rows: list[dict[str, Any]] = []
    for block in ("64", "128", "256"):
        rows = _run_sweep(
            f"perf_blocks_b{block}",
            ["--lengths", *lengths, "--levels", "op", "--contenders", "sinkhorn",
             "sinkhorn_hard", "--block", block, *common],
        )  # fmt: skip
        block_rows += [{**r, "contender": f"{r['contender']} b={block}"} for r in rows]
    loads["after_blocks"] = _load()
    out = Path(args.out)
    md = "## op level, fwd+bwd\n\n" + table(main_rows, "op")
    md += "\n## layer level, fwd+bwd\n\n" + table(main_rows, "layer")
    md += "\n## soft vs hard routing by block size (op, fwd+bwd)\n\n" + table(block_rows, "op")
    if not args.quick:
        model.main(["--out", args.out])
        loads["after_model"] = _load()
        md += "\n## causal LM training\n\n" + (out / "model.md").read_text()
    md += f"\nload averages: {json.dumps({k: round(v, 2) for k, v in loads.items()})}\n"
    (out / "perf.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
