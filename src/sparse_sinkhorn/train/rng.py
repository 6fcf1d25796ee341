"""Seeding and RNG-state capture in a form that ``torch.load(weights_only=True)`` accepts.

States hold only tensors, ints, floats, strings and ``None`` (no numpy arrays, no pickled
objects), so checkpoints never need unpickling of arbitrary code.
"""

from __future__ import annotations

import random
from typing import Any

import torch

try:  # numpy is optional: seeded and captured only when installed
    import numpy as np
except ImportError:  # pragma: no cover - numpy ships with the dev install
    np = None  # type: ignore[assignment]


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), Python's ``random`` and numpy."""
    torch.manual_seed(seed)
    random.seed(seed)
    if np is not None:
        np.random.seed(seed % 2**32)


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU, CUDA, python, numpy) as plain data + tensors."""
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {
            "version": version,
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if np is not None:
        raw: Any = np.random.get_state()  # ("MT19937", uint32 keys, pos, has_gauss, cached)
        state["numpy"] = {
            "name": str(raw[0]),
            "keys": torch.from_numpy(np.asarray(raw[1], dtype=np.int64)),
            "pos": int(raw[2]),
            "has_gauss": int(raw[3]),
            "cached_gaussian": float(raw[4]),
        }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state` (parts absent on this machine are skipped)."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    internal = tuple(int(v) for v in py["internal"].tolist())
    random.setstate((py["version"], internal, py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda_states)
    if "numpy" in state and np is not None:
        nps = state["numpy"]
        keys = nps["keys"].numpy().astype(np.uint32)
        np.random.set_state(
            (nps["name"], keys, nps["pos"], nps["has_gauss"], nps["cached_gaussian"])
        )
