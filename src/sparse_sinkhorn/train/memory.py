"""Peak memory of a stretch of code, in MiB: `reset_peak` before it, `peak` after.

CPU (Linux): freed heap memory is returned to the system (``malloc_trim``), the kernel's
peak-RSS counter is reset (``/proc/self/clear_refs``, "5"), and the peak is ``VmHWM``
afterwards; ``reset_peak`` returns ``VmRSS`` at the reset, so ``peak() - reset_peak()`` is
what the stretch added, not hidden under the high-water mark of imports and set-up. Where the
counter cannot be reset, the readings fall back to ``ru_maxrss`` against the process's first
baseline (which can under-count a stretch whose peak stays under the earlier mark). CUDA:
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, against the memory
allocated at the reset.
"""

from __future__ import annotations

import contextlib
import ctypes
import resource

import torch

_peak_field = "ru_maxrss"  # what peak() reads on CPU: "VmHWM" once the counter resets
_first_baseline: dict[str, float] = {}


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


def reset_peak(device: str) -> float:
    """Reset the peak counter of ``device`` (``"cpu"`` or ``"cuda"``); the memory in use
    now, in MiB: the baseline to subtract from `peak`."""
    global _peak_field
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    if _reset_peak_rss():
        _peak_field = "VmHWM"
        rss = _status_mb("VmRSS")
        assert rss is not None
        return rss
    # ru_maxrss cannot be reset: every stretch is measured against the first baseline
    _first_baseline.setdefault("cpu", _rss_mb())
    return _first_baseline["cpu"]


def peak(device: str) -> float:
    """The most memory in use on ``device`` since the last `reset_peak`, in MiB."""
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    high = _status_mb("VmHWM") if _peak_field == "VmHWM" else None
    return _rss_mb() if high is None else high


__all__ = ["peak", "reset_peak"]
