"""Run one benchmark case (one contender, level, length; forward and/or forward+backward).

``python -m benchmarks.case '<json spec>'`` runs it in a fresh process and prints one JSON line.

Timing: ``warmup`` untimed calls, then up to ``repeats`` timed calls (fewer if the time budget
would be exceeded), median reported; memory covers the timed calls. Forward runs under
``torch.no_grad()`` (inference); forward+backward calls ``torch.autograd.grad`` of the output
against a fixed random cotangent.

Peak memory (CPU), per mode: freed heap memory is returned to the system (``malloc_trim``),
the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``, "5"), and the reading is
``VmHWM`` after the runs minus ``VmRSS`` at the reset, so a small case is not hidden under the
high-water mark of imports and set-up. Where the counter cannot be reset it falls back to
``ru_maxrss`` after the runs minus ``ru_maxrss`` before them (which can under-count cases
whose peak stays under the import-time mark). (CUDA: ``torch.cuda.max_memory_allocated``
minus the memory allocated before the runs, after ``reset_peak_memory_stats``.)
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from .contenders import Sizes, build

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _status_mb(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MiB, or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Return freed heap memory to the system and reset the peak-RSS counter (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_mb("VmHWM") is not None


_PEAK_FIELD = "ru_maxrss"  # what _mem_peak reads on CPU: "VmHWM" once the counter resets
_FIRST_BASELINE: dict[str, float] = {}


def _mem_baseline(device: str) -> float:
    global _PEAK_FIELD
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    if _reset_peak_rss():
        _PEAK_FIELD = "VmHWM"
        rss = _status_mb("VmRSS")
        assert rss is not None
        return rss
    # ru_maxrss cannot be reset: every mode is measured against the first mode's baseline
    # (forward+backward needs at least the forward's memory, so its reading is its own).
    _FIRST_BASELINE.setdefault("cpu", _rss_mb())
    return _FIRST_BASELINE["cpu"]


def _mem_peak(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    peak = _status_mb("VmHWM") if _PEAK_FIELD == "VmHWM" else None
    return _rss_mb() if peak is None else peak


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
        base = _mem_baseline(device)  # the peak counter is reset per mode
        spent = time.perf_counter() - start
        t_med, times = _timed(
            step, device, 0, spec.get("repeats", 3), budget / 2 - spent, first=first
        )
        peak = _mem_peak(device) - base
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
