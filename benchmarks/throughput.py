"""How close the Sinkhorn op gets to this machine's float32 matmul throughput, and how its
time and memory scale against its FLOP and byte counts.

    python -m benchmarks.throughput [--lengths 4096 16384 65536] [--repeats 3]

FLOPs of one forward (per batch x head, N = L/b blocks, W = b, D head dim), counted
analytically: the two sorting contractions ``P @ K``, ``P @ V`` (2 x 2*N^2*W*D) plus the two
score and two value contractions of ``L x 2W x D`` (4 x 2*L*W*D); forward+backward ~3x.
Bytes: the tensors the fwd+bwd keeps alive, ~4*(12*L*D + 18*N^2) per batch x head (Q, K, V,
their grads, the [local; sorted] K/V buffers, output and cotangent; the Sinkhorn states).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from .machine import machine_info
from .sweep import run_subprocess


def matmul_gflops(n: int = 4096, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def op_flops(length: int, heads: int = 8, d: int = 64, w: int = 64, batch: int = 1) -> float:
    """Forward FLOPs of sinkhorn_attention (non-causal, no SortCut)."""
    n = -(-length // w)
    sort = 2 * (2 * n * n * w * d)
    attend = 4 * (2 * length * w * d)
    return batch * heads * float(sort + attend)


def op_bytes(length: int, heads: int = 8, d: int = 64, w: int = 64, batch: int = 1) -> float:
    n = -(-length // w)
    return batch * heads * 4.0 * (12 * length * d + 18 * n * n)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    peak = matmul_gflops()
    print(f"machine: {json.dumps(machine_info())}")
    print(f"fp32 matmul (4096^3): {peak:.1f} GFLOP/s")
    rows = []
    for length in args.lengths:
        spec = dict(level="op", contender="sinkhorn", length=length, modes=["fwdbwd"],
                    repeats=args.repeats, budget_s=600)  # fmt: skip
        r = run_subprocess(spec, timeout=900)[0]  # fresh process: its own memory peak
        if r["status"] != "ok":
            print(f"L={length}: {r['status']} {r.get('note', '')}")
            continue
        flops = 3 * op_flops(length)
        rate = flops / r["time_s"] / 1e9
        rows.append((length, r["time_s"], r["peak_mem_mb"], flops, op_bytes(length)))
        print(
            f"L={length:6d} fwd+bwd {r['time_s']:.3f}s  {flops / 1e9:.1f} GFLOP -> "
            f"{rate:.1f} GFLOP/s = {100 * rate / peak:.0f}% of matmul; "
            f"peak mem {r['peak_mem_mb']:.0f} MiB (byte model {op_bytes(length) / 2**20:.0f} MiB)"
        )
    if len(rows) > 1:
        (l0, t0, m0, f0, b0), (l1, t1, m1, f1, b1) = rows[0], rows[-1]
        print(
            f"L {l0} -> {l1}: time x{t1 / t0:.1f} (FLOPs x{f1 / f0:.1f}), "
            f"memory x{m1 / max(m0, 1e-9):.1f} (bytes x{b1 / b0:.1f})"
        )


if __name__ == "__main__":
    main()
