"""The short CUDA benchmark of ``make gpu-check``: forward+backward, bf16, op and layer level.

    python -m benchmarks.cuda                                  # the default grid, ~3 min (H200)
    python -m benchmarks.cuda --lengths 4096 16384 --head-dims 64 --time-limit 60

Contenders: Sinkhorn attention (soft, hard, causal, SortCut 2×b), causal per-token routing
(``topk``, Quest's bound, one block; the project's kernel and FlexAttention), SDPA forced
onto its flash kernel (``sdpa_kernel(FLASH_ATTENTION)``, non-causal and causal; a case
flash cannot run is an "error" row, never a silent fallback) and ``sinkhorn-transformer``
0.11.4 on its Gumbel-Sinkhorn path (``peer``, when importable). Op level: ``(B, H, L, D)`` tensors,
``B=1, H=8``, ``D`` = 64 and 128, block 64. Layer level: one self-attention layer of
``d_model = H·D`` in train mode (projections included); for SDPA our layer with
``kind="dense"``.

Method: one fresh process per (level, D) group, so a CUDA error cannot poison the others.
Inside it, lengths ascend (outer) over contenders (inner), so a time limit cuts the longest
lengths first. Per case: 1 warm-up, then up to 3 timed ``torch.autograd.grad`` calls
against a fixed cotangent (median; fewer when over ``--case-budget``); peak memory is
``torch.cuda.max_memory_allocated`` during the runs minus the memory allocated before them
(inputs, weights), so it counts activations, outputs and gradients. A case whose predicted
time (its time at the previous length × the growth in L squared for SDPA and ``topk``, whose
gate scores every block for every query, to the power 1.2 otherwise) exceeds the case budget or
the group's remaining time is "skipped". TFLOP/s: the op's own forward FLOP count × 3
(backward = 2 × forward; nothing recomputed counted; the ``topk`` gate once, as it has no
backward) over the median time.

Rows go to ``<out>/cuda.jsonl`` as they are measured (kept only if the driver dies);
``<out>/cuda.json`` gathers them with the device name, torch and CUDA versions
(``python -m benchmarks.cuda_report`` renders them).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "cuda"
LENGTHS = [4096, 16384, 65536, 262144]
HEAD_DIMS = [64, 128]
LEVELS = ["op", "layer"]
SINKHORN = ("sinkhorn", "sinkhorn_hard", "sinkhorn_causal", "sortcut")
TOPK = ("topk_causal", "topk_flex_causal")  # the project's kernel, FlexAttention's
FLASH = ("sdpa_flash", "sdpa_flash_causal")
PEER = "peer"
CONTENDERS = (*SINKHORN, *TOPK, *FLASH, PEER)
N_SORTCUT = 2


# ---- FLOP counts (forward; fwd+bwd = 3x) --------------------------------------------------------


def forward_flops(
    contender: str, length: int, heads: int, head_dim: int, block: int
) -> float | None:
    """The op's own forward FLOPs (batch 1): what its kernels compute, masked entries included.

    Sinkhorn: the sorting contractions ``P @ K``, ``P @ V`` (2 x 2·R·N·W·D, R = N rows, or n
    with SortCut; none with hard routing, which gathers one block per row) and the scores and
    values over each query's keys (2 x 2·L·S·D, S = 2W, or n·W with SortCut). ``topk``: the
    gate's bound (2 products per feature: 4·L·N·D) and the scores and values over the own and
    the picked block (2 x 2·L·2W·D; FlexAttention's tiles of 128 are not counted). SDPA:
    4·L²·D, half of it causal. The peer: not counted (None).
    """
    n = -(-length // block)
    d = head_dim
    if contender in ("sinkhorn", "sinkhorn_hard", "sinkhorn_causal"):
        sort = 0 if contender == "sinkhorn_hard" else 2 * (2 * n * n * block * d)
        per_head = sort + 2 * (2 * length * 2 * block * d)
    elif contender in TOPK:  # Quest's bound on every block, then own + 1 picked block
        per_head = _gate_flops(length, d, block) + 2 * (2 * length * 2 * block * d)
    elif contender == "sortcut":
        per_head = 2 * (2 * N_SORTCUT * n * block * d) + 2 * (2 * length * N_SORTCUT * block * d)
    elif contender == "sdpa_flash":
        per_head = 4 * length * length * d
    elif contender == "sdpa_flash_causal":
        per_head = 2 * length * length * d
    else:
        return None
    return float(heads * per_head)


def fwdbwd_flops(
    contender: str, length: int, heads: int, head_dim: int, block: int
) -> float | None:
    """Forward + backward: 3 × `forward_flops` (backward = 2 × forward; nothing recomputed
    counted), but the ``topk`` gate's bound once (its selection carries no gradient)."""
    forward = forward_flops(contender, length, heads, head_dim, block)
    if forward is None:
        return None
    gate = heads * _gate_flops(length, head_dim, block) if contender in TOPK else 0
    return 3 * forward - 2 * gate


def _gate_flops(length: int, head_dim: int, block: int) -> int:
    """One head's ``topk`` gate: Quest's bound, 2 products per feature, every query × block."""
    return 4 * length * -(-length // block) * head_dim


# ---- one group, in its own process --------------------------------------------------------------


def _build(level: str, name: str, length: int, heads: int, head_dim: int, block: int, dev: str):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from .contenders import Sizes, layer_case, op_case

    dt = torch.bfloat16
    sz = Sizes(batch=1, heads=heads, head_dim=head_dim, block=block)
    if name not in FLASH:
        builder = op_case if level == "op" else layer_case
        return builder(name, length, sz, dev, dt)
    causal = name == "sdpa_flash_causal"
    if level == "op":
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (
            torch.randn(
                1, heads, length, head_dim, generator=g, device=dev, dtype=dt
            ).requires_grad_()
            for _ in range(3)
        )
        inputs = [q, k, v]

        def inner() -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    else:
        from sparse_sinkhorn.nn import SinkhornSelfAttention

        torch.manual_seed(0)
        layer = SinkhornSelfAttention(heads * head_dim, heads, causal=causal, kind="dense")
        layer = layer.to(dev, dt).train()
        x = torch.randn(1, length, heads * head_dim, device=dev, dtype=dt, requires_grad=True)
        inputs = [x]

        def inner() -> torch.Tensor:
            out = layer(x)
            assert isinstance(out, torch.Tensor)
            return out

    def fn() -> torch.Tensor:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # flash or an error, no fallback
            return inner()

    return fn, inputs


def _measure(
    fn: Callable[[], Any], inputs: list[Any], warmup: int, repeats: int, budget: float, dev: str
) -> tuple[float, list[float], float]:
    import torch

    from sparse_sinkhorn.train import memory

    from .case import _timed

    with torch.no_grad():
        cot = torch.randn_like(fn())  # a fixed cotangent of the output's shape
    base = memory.reset_peak(dev)

    def step() -> None:
        torch.autograd.grad(fn(), inputs, cot)

    med, times = _timed(step, dev, warmup, repeats, budget)
    return med, times, memory.peak(dev) - base


def run_group(spec: dict[str, Any]) -> None:
    """Measure one (level, D) group; append one JSON row per case to ``spec['rows_path']``."""
    level, d, heads, block = spec["level"], spec["head_dim"], spec["heads"], spec["block"]
    deadline = time.monotonic() + spec["time_s"]
    last: dict[str, tuple[int, float]] = {}  # contender -> (length, one call's time)
    with open(spec["rows_path"], "a") as sink:
        for length in spec["lengths"]:
            for name in spec["contenders"]:
                row: dict[str, Any] = dict(
                    level=level, contender=name, mode="fwdbwd", length=length, head_dim=d
                )
                row.update(heads=heads, block=block)
                row["kv_mb"] = 2 * heads * length * d * 2 / 2**20  # one bf16 copy of K and V
                flops = fwdbwd_flops(name, length, heads, d, block) if level == "op" else None
                guess = None
                if name in last:
                    l0, t0 = last[name]
                    guess = t0 * (length / l0) ** (2.0 if name in (*FLASH, *TOPK) else 1.2)
                calls = 1 + spec["repeats"]
                left = deadline - time.monotonic()
                if guess is not None and guess * calls > min(spec["case_budget_s"], left):
                    row.update(status="skipped", note=f"predicted {guess * calls:.1f} s")
                elif left < 2:
                    row.update(status="skipped", note="group time limit")
                else:
                    row.update(_one_case(spec, level, name, length, heads, d, block, flops))
                    if row["status"] == "ok":
                        last[name] = (length, max(row["times_s"]))
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                print(_line(row), file=sys.stderr, flush=True)


def _one_case(
    spec: dict[str, Any], level: str, name: str, length: int, heads: int, d: int, block: int,
    flops: float | None,
) -> dict[str, Any]:  # fmt: skip
    import torch

    fn = inputs = None
    try:
        dev = spec.get("device", "cuda")  # "cpu": the tests' smoke run of this code
        fn, inputs = _build(level, name, length, heads, d, block, dev)
        med, times, peak = _measure(fn, inputs, 1, spec["repeats"], spec["case_budget_s"], dev)
        out: dict[str, Any] = {"status": "ok", "time_s": med, "times_s": times,
                               "peak_mem_mb": max(peak, 0.0)}  # fmt: skip
        if flops is not None:
            out["tflops"] = flops / med / 1e12
            out["flops_fwd"] = flops
        return out
    except torch.OutOfMemoryError as err:
        return {"status": "oom", "note": str(err).splitlines()[0][:200]}
    except Exception as err:  # a kernel that refuses the case (e.g. flash), a peer failure
        return {"status": "error", "note": f"{type(err).__name__}: {err}".splitlines()[0][:300]}
    finally:
        del fn, inputs
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _line(row: dict[str, Any]) -> str:
    if row["status"] == "ok":
        cell = f"{row['time_s'] * 1e3:9.2f} ms {row['peak_mem_mb']:9.0f} MiB"
        if "tflops" in row:
            cell += f" {row['tflops']:7.1f} TFLOP/s"
    else:
        cell = f"{row['status']} {row.get('note', '')}"
    where = f"{row['level']:5s} D={row['head_dim']:3d} {row['contender']:18s}"
    return f"{where} L={row['length']:7d} {cell}"


# ---- the driver ---------------------------------------------------------------------------------


def device_info() -> dict[str, Any]:
    import torch

    from .machine import machine_info

    info = machine_info("cuda")
    props = torch.cuda.get_device_properties(0)
    info.update(
        gpu=torch.cuda.get_device_name(0),
        cuda=torch.version.cuda,
        capability=".".join(map(str, torch.cuda.get_device_capability(0))),
        gpu_memory_gib=round(props.total_memory / 2**30, 1),
        cudnn=torch.backends.cudnn.version(),
    )
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def _peer_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sinkhorn-transformer")
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    p.add_argument("--head-dims", type=int, nargs="+", default=HEAD_DIMS)
    p.add_argument("--levels", nargs="+", default=LEVELS, choices=LEVELS)
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--case-budget", type=float, default=12.0, help="seconds per case")
    p.add_argument("--time-limit", type=float, default=200.0, help="seconds for everything")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: a smoke run of this script (the tests), not a benchmark")  # fmt: skip
    p.add_argument("--group", help=argparse.SUPPRESS)  # internal: run one group (JSON spec)
    args = p.parse_args(argv)
    if args.group:
        run_group(json.loads(args.group))
        return 0

    import torch

    from .machine import machine_info

    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks.cuda: no CUDA device; nothing measured", file=sys.stderr)
        return 0
    start = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "cuda.jsonl"
    rows_path.unlink(missing_ok=True)
    contenders = list(args.contenders)
    peer = _peer_version()
    if PEER in contenders and peer is None:
        print("sinkhorn-transformer is not importable: no peer rows", file=sys.stderr)
        contenders.remove(PEER)
    groups = [(level, d) for level in args.levels for d in args.head_dims]
    for i, (level, d) in enumerate(groups):
        left = args.time_limit - (time.monotonic() - start)
        share = left / (len(groups) - i)  # what an earlier group leaves over, a later one gets
        spec = dict(level=level, head_dim=d, heads=args.heads, block=args.block,
                    lengths=args.lengths, contenders=contenders, repeats=args.repeats,
                    case_budget_s=args.case_budget, time_s=max(share - 10, 1.0),
                    rows_path=str(rows_path), device=args.device)  # fmt: skip
        cmd = [sys.executable, "-m", "benchmarks.cuda", "--group", json.dumps(spec)]
        root = Path(__file__).resolve().parent.parent
        try:
            proc = subprocess.run(cmd, cwd=root, timeout=max(share, 10) + 5, check=False)
            if proc.returncode != 0:
                print(f"group {level} D={d} exited with {proc.returncode}", file=sys.stderr)
        except subprocess.TimeoutExpired:
            print(f"group {level} D={d} stopped at its time limit", file=sys.stderr)
    rows = _gather(rows_path, groups, args.lengths, contenders)
    meta = {
        "machine": device_info() if args.device == "cuda" else machine_info("cpu"),
        "device": args.device,
        "dtype": "bf16",
        "mode": "fwdbwd",
        "batch": 1,
        "heads": args.heads,
        "block": args.block,
        "head_dims": args.head_dims,
        "lengths": args.lengths,
        "repeats": args.repeats,
        "case_budget_s": args.case_budget,
        "time_limit_s": args.time_limit,
        "wall_s": round(time.monotonic() - start, 1),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "peer": None
        if peer is None
        else f"sinkhorn-transformer {peer}, non_permutative=False, "
        "sinkhorn_iter=8, temperature=0.75",
        "flop_rule": "forward FLOPs of the op's own kernels x 3 (backward = 2 x forward); "
        "the topk gate x 1 (no backward)",
        "memory_method": "torch.cuda.max_memory_allocated during the runs minus allocated before",
        "results": rows,
    }
    (out / "cuda.json").write_text(json.dumps(meta, indent=1) + "\n")
    rows_path.unlink(missing_ok=True)  # gathered into cuda.json
    print(f"wrote {out / 'cuda.json'} ({len(rows)} rows, {meta['wall_s']} s)", file=sys.stderr)
    return 0


def _gather(
    rows_path: Path, groups: list[tuple[str, int]], lengths: list[int], contenders: list[str]
) -> list[dict[str, Any]]:
    """The measured rows, plus a "not run" row for every case a stopped group never reached."""
    got: dict[tuple[str, int, str, int], dict[str, Any]] = {}
    if rows_path.exists():
        for line in rows_path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                got[(r["level"], r["head_dim"], r["contender"], r["length"])] = r
    rows = []
    for level, d in groups:
        for length in lengths:
            for name in contenders:
                rows.append(got.get((level, d, name, length)) or dict(
                    level=level, contender=name, mode="fwdbwd", length=length, head_dim=d,
                    status="not run", note="group stopped (time limit or crash)"))  # fmt: skip
    return rows


if __name__ == "__main__":
    sys.exit(main())
