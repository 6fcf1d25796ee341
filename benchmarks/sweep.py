"""The full sweep: every contender, op and layer level, forward and forward+backward, vs length.

    python -m benchmarks.sweep                       # CPU, fp32, 512 .. 64K, ~15 min here
    python -m benchmarks.sweep --device cuda --dtype bf16
    python -m benchmarks.sweep --lengths 1024 4096 --contenders sinkhorn dense_sdpa --repeats 1

Each (level, contender, length) runs in a fresh subprocess (``benchmarks.case``) under a wall
budget (``--budget``) and an address-space cap (``--mem-cap-mb``): a case that does not fit
becomes a "timeout" / "oom" cell, not a crash. Once a contender times out (or is predicted to:
its last time x (growth in L)^2, ^1.6 if sub-quadratic,
over the budget) or runs out of memory, its longer lengths
are marked the same without running. Results: ``sweep.csv``, ``sweep.json`` (with the machine,
torch version, dtype and sizes) and PNG plots under ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .contenders import CONTENDERS, PEER, QUADRATIC, Sizes, peer_available
from .machine import machine_info

RESULTS = Path(__file__).parent / "results"
LENGTHS = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
FIELDS = ["level", "contender", "mode", "length", "status", "time_s", "peak_mem_mb", "runs"]


def _mem_available_mb() -> float:
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
        return kb / 1024
    except (OSError, StopIteration):
        return 8192.0


def run_subprocess(spec: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
    """Run one case in a fresh interpreter; timeouts and crashes become status rows."""
    cmd = [sys.executable, "-m", "benchmarks.case", json.dumps(spec)]
    root = Path(__file__).resolve().parent.parent
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root)
    except subprocess.TimeoutExpired:
        return [{"mode": m, "status": "timeout"} for m in spec["modes"]]
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    status = "oom" if proc.returncode in (-9, 137) else "error"  # SIGKILL: the OOM killer
    note = (proc.stderr.strip().splitlines() or [""])[-1][:200]
    return [{"mode": m, "status": status, "note": note} for m in spec["modes"]]


def run_inprocess(spec: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
    """Same as `run_subprocess` without the fresh process (tests; memory less exact)."""
    from .case import run_case

    return run_case(spec)


def sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    runner = run_inprocess if args.in_process else run_subprocess
    sizes = Sizes(args.batch, args.heads, args.head_dim, args.block)
    rows: list[dict[str, Any]] = []
    for level in args.levels:
        for name in args.contenders:
            dead: str | None = None  # "oom" / "timeout" once a shorter length failed
            last: tuple[int, float] | None = None  # (length, slowest single run)
            for length in args.lengths:
                spec = dict(
                    level=level, contender=name, length=length, modes=args.modes,
                    device=args.device, dtype=args.dtype, sizes=sizes.__dict__,
                    warmup=args.warmup, repeats=args.repeats, budget_s=args.budget,
                    mem_cap_mb=args.mem_cap_mb,
                )  # fmt: skip
                if dead is None and last is not None:
                    growth = (length / last[0]) ** (2.0 if name in QUADRATIC else 1.6)
                    if last[1] * growth * (1 + args.warmup) > args.budget:
                        dead = "timeout"
                t0 = time.perf_counter()
                results = (
                    [{"mode": m, "status": dead, "note": "predicted"} for m in args.modes]
                    if dead
                    else runner(spec, args.budget + 30)
                )
                for r in results:
                    row = {"level": level, "contender": name, "length": length, **r}
                    row["runs"] = len(r.get("times_s", []))
                    rows.append(row)
                    _log(row, time.perf_counter() - t0)
                bad = [r["status"] for r in results if r["status"] in ("oom", "timeout")]
                if bad and dead is None:
                    dead = bad[0]
                ok = [max(r["times_s"]) for r in results if r["status"] == "ok"]
                if ok:
                    last = (length, max(ok))
    return rows


def _log(row: dict[str, Any], wall: float) -> None:
    t = row.get("time_s")
    cell = f"{t:.4f}s {row.get('peak_mem_mb', 0):.0f}MB" if t is not None else row["status"]
    print(
        f"{row['level']:5s} {row['contender']:18s} {row['mode']:6s} L={row['length']:6d} "
        f"{cell}  ({wall:.0f}s)",
        file=sys.stderr,
        flush=True,
    )


def write_results(rows: list[dict[str, Any]], args: argparse.Namespace, stem: str) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    meta = {
        "machine": machine_info(args.device),
        "dtype": args.dtype,
        "sizes": Sizes(args.batch, args.heads, args.head_dim, args.block).__dict__,
        "d_model": args.heads * args.head_dim,
        "lengths": args.lengths,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "budget_s": args.budget,
        "memory_method": (
            "CPU: VmHWM after the runs minus VmRSS after malloc_trim and a peak reset "
            "(/proc/self/clear_refs), per mode, in a fresh process; CUDA: max_memory_allocated"
        ),
        "peer": "sinkhorn-transformer 0.11.4, non_permutative=False, sinkhorn_iter=8, tau=0.75",
        "results": rows,
    }
    with open(out / f"{stem}.json", "w") as f:
        json.dump(meta, f, indent=1)
    return out


def parser(lengths: list[int], contenders: list[str], levels: list[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=lengths)
    p.add_argument("--contenders", nargs="+", default=contenders, choices=CONTENDERS)
    p.add_argument("--levels", nargs="+", default=levels, choices=["op", "layer"])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget", type=float, default=80.0, help="seconds per case (both modes)")
    p.add_argument("--mem-cap-mb", type=float, default=round(0.6 * _mem_available_mb()))
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--in-process", action="store_true", help="no fresh process per case")
    return p


def check_device(args: argparse.Namespace) -> None:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    if PEER in args.contenders and not peer_available():
        print("sinkhorn-transformer is not installed: skipping the peer", file=sys.stderr)
        args.contenders = [c for c in args.contenders if c != PEER]


def main(argv: list[str] | None = None) -> None:
    args = parser(LENGTHS, list(CONTENDERS), ["op", "layer"]).parse_args(argv)
    check_device(args)
    rows = sweep(args)
    out = write_results(rows, args, "sweep")
    if not args.no_plots:
        from .plots import plot_all

        plot_all(out / "sweep.json", out)
    print(f"wrote {out}/sweep.csv, sweep.json", file=sys.stderr)


if __name__ == "__main__":
    main()
