"""Block routing beyond the paper's balancing: rows only, causal column targets, and the
paper's causal balancing taken literally (a labelled, non-causal comparison).

Axes as in `sparse_sinkhorn.ops.sinkhorn`: ``(..., N, M)`` routing logits, rows are query
blocks, columns key blocks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sinkhorn import _balance_rounds, _masked_scores

# Values of the ``balance`` option. "sinkhorn-leaky" is a measured comparison, not causal.
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


def causal_log_targets(allowed: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``log t(i, j)``: the column targets of prefix-causal balancing towards reachable sums.

    With ``n(i, j) = #{r <= i : allowed[r, j]}`` (the rows of prefix ``i`` that can read
    column ``j``) and ``R(i) = #{r <= i : row r has an allowed entry}`` (the prefix's mass)::

        t(i, j) = R(i) * n(i, j) / sum_k n(i, k)

    Without padding ``t(i, j) = 2 (i - j) / (i + 1)`` for ``j < i``. Each prefix's targets
    sum to its rows' mass, and a set of columns never gets more than the rows that can reach
    it. Depends on rows ``<= i`` of ``allowed`` only. 0 where ``t`` is 0 (never an allowed
    entry). ``allowed``: bool ``(..., N, M)``; returns ``dtype``, of the same shape.
    """
    reach = allowed.to(dtype).cumsum(dim=-2)  # n(i, j)
    mass = allowed.any(dim=-1, keepdim=True).to(dtype).cumsum(dim=-2)  # R(i)
    t = mass * reach / reach.sum(dim=-1, keepdim=True).clamp_min(1.0)
    return torch.where(t > 0, t, torch.ones_like(t)).log()


def target_sinkhorn_balance(
    logits: Tensor,
    *,
    n_iters: int = 8,
    temperature: float = 0.75,
    causal: bool = False,
    gumbel_noise: bool = False,
    generator: torch.Generator | None = None,
    allowed: Tensor | None = None,
) -> Tensor:
    """Prefix-causal Sinkhorn balancing towards column targets a causal matrix can meet.

    The paper's causal balancing asks every column of a strictly lower-triangular matrix to
    sum to 1: the only such matrix with unit rows is the shift "block ``i`` reads block
    ``i - 1``", whatever the logits. Here the prefix column step of
    [`sinkhorn_balance`][sparse_sinkhorn.ops.sinkhorn_balance] (``causal=True``) moves column
    ``j`` of the prefix of rows ``<= i`` to the target `causal_log_targets` gives,
    proportional to the rows of the prefix that can read it (``2 (i - j) / (i + 1)``
    without padding), then each round ends with the row step::

        column step:  S[i, j] -= log sum_{r <= i} exp(S[r, j]) - log t(i, j)
        row step:     S[i, j] -= log sum_k exp(S[i, k])

    Row ``i`` depends on logits rows ``<= i`` only (exactly causal, cache-exact in decoding)
    and sums to 1 (a convex combination of earlier blocks); no key block is read by much
    more than its share, and an entry reaches at most about its target before the row step
    (a row cannot take all of a recent block that earlier rows already read).
    Without ``causal`` this is [`sinkhorn_balance`][sparse_sinkhorn.ops.sinkhorn_balance]
    (every target is 1).

    Args and returns: as [`sinkhorn_balance`][sparse_sinkhorn.ops.sinkhorn_balance].
    """
    s, allowed = _masked_scores(
        logits, n_iters, temperature, causal, gumbel_noise, generator, allowed
    )
    if not causal:
        return _balance_rounds(s, allowed, n_iters, False)  # every target is 1
    assert allowed is not None
    log_t = causal_log_targets(allowed, s.dtype)
    return _balance_rounds(s, allowed, n_iters, True, log_targets=log_t)


def leaky_sinkhorn_balance(
    logits: Tensor,
    *,
    n_iters: int = 8,
    temperature: float = 0.75,
    causal: bool = False,
    gumbel_noise: bool = False,
    generator: torch.Generator | None = None,
    allowed: Tensor | None = None,
) -> Tensor:
    """The paper's causal balancing taken literally: **not causal**, a comparison only.

    Ordinary Sinkhorn rounds (rows, then columns over *all* rows) on the causally masked
    matrix (``j < i``): a column's normalisation sums over later rows too, so row ``i``
    depends on the logits of later blocks, and a causal layer using it sees the future
    (``examples/causal_leak.py`` measures how much). Never a default; incremental decoding
    refuses it. Without ``causal`` this is
    [`sinkhorn_balance`][sparse_sinkhorn.ops.sinkhorn_balance].

    Args and returns: as [`sinkhorn_balance`][sparse_sinkhorn.ops.sinkhorn_balance].
    """
    s, allowed = _masked_scores(
        logits, n_iters, temperature, causal, gumbel_noise, generator, allowed
    )
    return _balance_rounds(s, allowed, n_iters, False)  # columns over all rows: the leak


__all__ = [
    "BALANCES",
    "NOT_CAUSAL",
    "causal_log_targets",
    "leaky_sinkhorn_balance",
    "softmax_routing",
    "target_sinkhorn_balance",
]
