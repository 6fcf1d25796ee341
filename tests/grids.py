"""Test grids: the op's modes as the product of independent axes (flash-attn's style).

``op_modes()`` crosses causal x SortCut x hard routing x Mixture x balance (Sinkhorn,
rows-only ``"softmax"``, or causal column targets ``"sinkhorn-targets"``) and leaves out what
the op rejects (causal SortCut: SortCut is for encoders) and what repeats another mode
(``"sinkhorn-targets"`` without causality is Sinkhorn); ``mode_id`` names a mode for pytest ids
(``causal-hard``, ``encoder-sortcut2-soft-mixture``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any


def op_modes(
    *,
    causal: Sequence[bool] = (False, True),
    sortcut: Sequence[int | None] = (None, 2),
    hard: Sequence[bool] = (False, True),
    mix_dense: Sequence[bool] = (False,),
    balance: Sequence[str] = ("sinkhorn", "softmax", "sinkhorn-targets"),
) -> list[dict[str, Any]]:
    """Keyword arguments of `sinkhorn_attention` for every valid combination
    (``balance`` appears only when it is not the default, Sinkhorn balancing)."""
    modes = []
    for is_causal, n_sortcut, is_hard, is_mix, how in itertools.product(
        causal, sortcut, hard, mix_dense, balance
    ):
        if is_causal and n_sortcut is not None:
            continue  # SortCut is for encoders only
        if how == "sinkhorn-targets" and not is_causal:
            continue  # every target is 1: the paper's balancing
        mode = dict(is_causal=is_causal, n_sortcut=n_sortcut, hard=is_hard, mix_dense=is_mix)
        if how != "sinkhorn":
            mode["balance"] = how
        modes.append(mode)
    return modes


def mode_id(mode: dict[str, Any]) -> str:
    parts = ["causal" if mode.get("is_causal") else "encoder"]
    if mode.get("n_sortcut"):
        parts.append(f"sortcut{mode['n_sortcut']}")
    parts.append("hard" if mode.get("hard") else "soft")
    if mode.get("mix_dense"):
        parts.append("mixture")
    if mode.get("balance", "sinkhorn") != "sinkhorn":
        parts.append(mode["balance"])
    return "-".join(parts)
