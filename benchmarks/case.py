"""Run one benchmark case (one contender, level, length; forward and/or forward+backward).

``python -m benchmarks.case '<json spec>'`` runs it in a fresh process and prints one JSON line.

Timing: ``warmup`` untimed calls, then up to ``repeats`` timed calls (fewer if the time budget
would be exceeded), median reported; memory covers the timed calls. Forward runs under
``torch.no_grad()`` (inference); forward+backward calls ``torch.autograd.grad`` of the output
against a fixed random cotangent.

Peak memory, per mode: `sparse_sinkhorn.train.memory` (CPU: ``VmHWM`` after the runs
minus ``VmRSS`` at a reset of the kernel's peak-RSS counter; CUDA:
``torch.cuda.max_memory_allocated`` minus the memory allocated before the runs).
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from sparse_sinkhorn.train import memory

from .contenders import Sizes, build

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(
    step: Callable[[], None],
    device: str,
    warmup: int,
    repeats: int,
    budget: float,
    first: float | None = None,
):
    """Median wall time of ``step`` over up to ``repeats`` runs that fit in ``budget`` s
    (``first``: the time of an earlier untimed run, the guess for the first timed one)."""
    start = time.perf_counter()
    for _ in range(max(warmup, 0)):
        t0 = time.perf_counter()
        step()
        _sync(device)
        first = time.perf_counter() - t0
    times: list[float] = []
    for _ in range(repeats):
        spent = time.perf_counter() - start
        guess = times[-1] if times else first
        if times and guess is not None and spent + guess > budget:
            break
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def run_case(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Measure one case; returns one result row per mode (``fwd``, ``fwdbwd``)."""
    device, dtype = spec.get("device", "cpu"), DTYPES[spec.get("dtype", "fp32")]
    sz = Sizes(**spec.get("sizes", {}))
    fn, inputs = build(spec["level"], spec["contender"], spec["length"], sz, device, dtype)
    cot = torch.randn_like(inputs[0])  # fixed cotangent; the output has the first input's shape
    budget = float(spec.get("budget_s", 60.0))
    rows = []
    for mode in spec.get("modes", ["fwd", "fwdbwd"]):

        def step(mode: str = mode) -> None:
            if mode == "fwd":
                with torch.no_grad():
                    fn()
            else:
                torch.autograd.grad(fn(), inputs, cot)

        # Warm-up first (it also brings the kernels' code pages in), then reset the peak
        # counter: the reading covers the timed runs only.
        start = time.perf_counter()
        first = None
        for _ in range(max(spec.get("warmup", 1), 0)):
            t0 = time.perf_counter()
            step()
            _sync(device)
            first = time.perf_counter() - t0
        base = memory.reset_peak(device)  # the peak counter is reset per mode
        spent = time.perf_counter() - start
        t_med, times = _timed(
            step, device, 0, spec.get("repeats", 3), budget / 2 - spent, first=first
        )
        peak = memory.peak(device) - base
        rows.append(
            {"mode": mode, "status": "ok", "time_s": t_med, "times_s": times,
             "peak_mem_mb": max(peak, 0.0)}
        )  # fmt: skip
    return rows


def cap_memory(mem_cap_mb: float | None) -> None:
    """Limit this process's address space to its current size + ``mem_cap_mb`` (CPU only), so
    an oversized case fails with an allocation error (reported "oom") instead of swapping
    or starving the machine."""
    if not mem_cap_mb:
        return
    with open("/proc/self/status") as f:
        vm_kb = next(int(line.split()[1]) for line in f if line.startswith("VmSize"))
    limit = int(vm_kb * 1024 + mem_cap_mb * 2**20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(int(spec.get("threads", torch.get_num_threads())))
    if spec.get("device", "cpu") == "cpu":
        cap_memory(spec.get("mem_cap_mb"))
    try:
        rows = run_case(spec)
    except (RuntimeError, MemoryError) as err:  # allocation failures under the memory cap
        msg = str(err)
        oom = isinstance(err, MemoryError) or "alloc" in msg.lower() or "memory" in msg.lower()
        status = "oom" if oom else "error"
        rows = [{"mode": m, "status": status, "note": msg[:200]} for m in spec["modes"]]
    print("RESULT " + json.dumps(rows), flush=True)


if __name__ == "__main__":
    main()
