"""The first benchmark: op-level forward+backward time and peak memory vs length.

    python -m benchmarks.attention [--lengths 1024 ... 65536] [--out DIR]

Sinkhorn vs dense (SDPA) vs local, B=1, H=8, D=64, b=64, float32, each case in a fresh
process (see `benchmarks.case` for the timing and memory method). Writes
``attention.csv`` / ``attention.json`` under ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import sys

from .sweep import check_device, parser, sweep, write_results

LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]


def main(argv: list[str] | None = None) -> None:
    p = parser(LENGTHS, ["sinkhorn", "dense_sdpa", "local"], ["op"])
    p.set_defaults(modes=["fwdbwd"])
    args = p.parse_args(argv)
    check_device(args)
    rows = sweep(args)
    out = write_results(rows, args, "attention")
    print(f"wrote {out}/attention.csv", file=sys.stderr)


if __name__ == "__main__":
    main()
