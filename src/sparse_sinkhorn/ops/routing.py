"""Block routing beyond the paper's balancing: rows only, and the names of the ``balance``
option (causal column targets and the paper's causal balancing taken literally, a labelled,
non-causal comparison, are `sinkhorn_balance`'s ``columns``).

Axes as in `sparse_sinkhorn.ops.sinkhorn`: ``(..., N, M)`` routing logits, rows are query
blocks, columns key blocks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sinkhorn import _masked_scores

# The ``balance`` options that run Sinkhorn rounds, and the ``columns`` of
# `sinkhorn_balance` each one runs with. "sinkhorn-leaky" is a measured comparison, not causal.
SINKHORN_COLUMNS = {
    "sinkhorn": "unit",
    "sinkhorn-targets": "reachable",
    "sinkhorn-leaky": "all-rows",
}
# Values of the ``balance`` option ("softmax": rows only, `softmax_routing`).
BALANCES = ("sinkhorn", "softmax", "sinkhorn-targets", "sinkhorn-leaky")
# Balancings whose causal row ``i`` depends on later blocks (refused by incremental decoding).
NOT_CAUSAL = ("sinkhorn-leaky",)


def softmax_routing(
    logits: Tensor,
    *,
    temperature: float = 0.75,
    causal: bool = False,
    gumbel_noise: bool = False,
    generator: torch.Generator | None = None,
    allowed: Tensor | None = None,
) -> Tensor:
    """Routing without balancing: each row a softmax over its allowed columns.

    ``P = softmax((logits + gumbel) / temperature)`` per row, in float32 (float64 for float64
    logits), exactly 0 where not allowed; a row with no allowed entry (causal row 0, a
    padding-only block) is all zero. Unlike
    [`sinkhorn_balance`][sparse_sinkhorn.ops.sinkhorn_balance], columns are not
    normalised: many rows may take the same key block (a block every later query needs, such
    as the one holding a passkey, is not shared out). Row ``i`` depends on logits row ``i``
    only, so causal routing stays exactly causal.

    Args: as [`sinkhorn_balance`][sparse_sinkhorn.ops.sinkhorn_balance] (there is no ``n_iters``).
    """
    s, allowed = _masked_scores(logits, 0, temperature, causal, gumbel_noise, generator, allowed)
    p = s.softmax(dim=-1)  # a masked row holds finite scores, so it stays finite
    return p if allowed is None else p.masked_fill(~allowed, 0.0)


__all__ = [
    "BALANCES",
    "NOT_CAUSAL",
    "SINKHORN_COLUMNS",
    "softmax_routing",
]
