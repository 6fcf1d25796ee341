"""Log-domain Gumbel-Sinkhorn balancing (docs/method.md §4) and its prefix-causal variant (§5).

Axes: B batch, H heads, N query blocks (rows), M key blocks (columns; M == N unless SortCut
keeps fewer rows downstream).

All balancing runs in float32 whatever the input dtype. Entries that are not allowed (a
padding block, or ``j >= i`` under causal masking) are held at a large negative *finite*
value after every half-step, so that fully masked rows never produce NaN and never leak into
the normalisation of allowed entries; ``P`` is exactly 0 there.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import validate
from ._balance_backward import _SinkhornRounds
from ._balance_steps import _BIG, _NEG, _exp, _run_steps

# What causal balancing's column step aims at (`sinkhorn_balance`'s ``columns``).
COLUMNS = ("unit", "reachable", "all-rows")


def sample_gumbel(
    shape: torch.Size | tuple[int, ...],
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Standard Gumbel noise ``-log(-log u)``, ``u ~ U(0, 1)``, in float32."""
    u = torch.rand(shape, device=device, dtype=torch.float32, generator=generator)
    tiny = torch.finfo(torch.float32).tiny
    neg_log_u = (-torch.log(u.clamp_min(tiny))).clamp_min(tiny)  # in (0, inf)
    return -torch.log(neg_log_u)


def causal_block_mask(n: int, *, device: torch.device | str | None = None) -> Tensor:
    """``(N, N)`` bool: row i may receive column j iff ``j < i`` (strictly earlier blocks)."""
    idx = torch.arange(n, device=device)
    return idx[None, :] < idx[:, None]


def allowed_entries(
    n_rows: int,
    n_cols: int,
    *,
    causal: bool,
    block_valid: Tensor | None = None,
    device: torch.device | str | None = None,
) -> Tensor | None:
    """Which entries of the ``(N, M)`` sort matrix may be non-zero.

    Args:
        block_valid: ``(B, N)`` bool, True where a block holds at least one real token.
            Padding-only blocks are removed from both rows and columns, so a sequence padded
            with whole blocks gets exactly the plan of the unpadded sequence.

    Returns:
        ``None`` (everything allowed) or a bool tensor broadcastable to ``(B, H, N, M)``.
    """
    allowed: Tensor | None = None
    if causal:
        allowed = causal_block_mask(n_rows, device=device)[None, None]  # (1, 1, N, N)
    if block_valid is not None:
        valid = block_valid[:, None, :, None] & block_valid[:, None, None, :]  # (B, 1, N, N)
        allowed = valid if allowed is None else allowed & valid
    return allowed


def sinkhorn_balance(
    logits: Tensor,
    *,
    n_iters: int = 8,
    temperature: float = 0.75,
    causal: bool = False,
    columns: str = "unit",
    gumbel_noise: bool = False,
    generator: torch.Generator | None = None,
    allowed: Tensor | None = None,
) -> Tensor:
    """Turn block-routing scores into a (soft) block permutation matrix.

    ``S = (logits + gumbel) / temperature``, then ``n_iters`` rounds of log-domain
    normalisation, ``P = exp(S)``, computed in float32 even for half-precision logits.

    * Non-causal: each round normalises rows, then columns (the paper's order); ``P`` tends to
      a doubly stochastic matrix, exactly column-stochastic after the last round.
    * ``causal=True``: entries ``j >= i`` are masked (row 0 is all zero), columns are normalised
      with a *prefix* log-sum-exp over rows ``<= i`` (`prefix_logsumexp`) and each round
      ends with the row step, so row ``i`` depends on logits rows ``<= i`` only and every row
      ``i >= 1`` is a convex combination of earlier blocks (sums to 1 exactly).

    A causal matrix whose rows and columns all sum to 1 can only be the shift "block ``i``
    reads block ``i - 1``", so ``columns`` (causal only) says what the column step aims at:

    * ``"unit"``: every prefix column sums to 1 (the paper's targets, made exactly causal);
      it converges to that shift whatever the logits.
    * ``"reachable"``: column ``j`` of the prefix of rows ``<= i`` moves to the target
      `causal_log_targets` gives, proportional to the rows of the prefix that can read it
      (``2 (i - j) / (i + 1)`` without padding)::

          column step:  S[i, j] -= log sum_{r <= i} exp(S[r, j]) - log t(i, j)

      so a row follows its logits while no key block is read by much more than its share.
      Still exactly causal and cache-exact in decoding.
    * ``"all-rows"``: the paper's causal balancing taken literally, ordinary rounds (rows,
      then columns over *all* rows) on the masked matrix: row ``i`` then depends on the
      logits of later blocks, and a causal layer using it sees the future
      (``examples/causal_leak.py`` measures how much). **Not causal**: a comparison only,
      which incremental decoding refuses.

    Without ``causal`` every ``columns`` is the paper's non-causal balancing.

    Args:
        logits: ``(..., N, M)`` scores, any float dtype.
        n_iters: balancing rounds (0 gives the unnormalised ``exp(S)``, masked; the paper
            reports 5–10 rounds suffice).
        temperature: ``tau > 0``; smaller is closer to a hard permutation.
        causal: route each query block to strictly earlier key blocks only (see above).
        columns: ``"unit"``, ``"reachable"`` or ``"all-rows"`` (see above; causal only).
        gumbel_noise: add Gumbel noise (training); sampled from ``generator`` if given.
        allowed: optional bool mask broadcastable to ``logits`` (see `allowed_entries`);
            with ``causal=True`` the causal mask is added to it.

    Returns:
        ``P``: float32 (float64 for float64 logits), same shape as ``logits``; exactly 0
        where not allowed.

    Equivalent PyTorch (non-causal, no mask)::

        S = logits / temperature
        for _ in range(n_iters):
            S = S - S.logsumexp(-1, keepdim=True)
            S = S - S.logsumexp(-2, keepdim=True)
        P = S.exp()
    """
    if columns not in COLUMNS and not torch.compiler.is_compiling():
        raise ValueError(f"columns must be one of {COLUMNS}, got {columns!r}")
    s, allowed = _masked_scores(
        logits, n_iters, temperature, causal, gumbel_noise, generator, allowed
    )
    if not causal or columns == "all-rows":  # "all-rows": columns over every row, the leak
        return _balance_rounds(s, allowed, n_iters, False)
    assert allowed is not None
    log_t = causal_log_targets(allowed, s.dtype) if columns == "reachable" else None
    return _balance_rounds(s, allowed, n_iters, True, log_targets=log_t)


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


def _masked_scores(
    logits: Tensor, n_iters: int, temperature: float, causal: bool, gumbel_noise: bool,
    generator: torch.Generator | None, allowed: Tensor | None,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """What every balancing starts with: its arguments checked, the scaled scores
    ``(logits + gumbel) / temperature`` (float32 at least) held at a large negative finite
    value where not allowed, and the allowed entries (causal mask included)."""
    if not torch.compiler.is_compiling():
        validate.check_balance(logits, n_iters, temperature)
    s = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float32, or float64
    if gumbel_noise:
        s = s + sample_gumbel(s.shape, device=s.device, generator=generator).to(s.dtype)
    s = (s / temperature).clamp(-_BIG, _BIG)
    if causal:
        causal_mask = causal_block_mask(s.shape[-2], device=s.device)
        allowed = causal_mask if allowed is None else allowed & causal_mask
    if allowed is not None:
        s = torch.where(allowed, s, torch.full_like(s, _NEG))
    return s, allowed


def _balance_rounds(
    s: Tensor, allowed: Tensor | None, n_iters: int, causal: bool, log_targets: Tensor | None = None
) -> Tensor:
    """The ``n_iters`` normalisation rounds on scaled, masked log-scores; returns ``P``.

    Causal rounds run on ``S^T``, so the cumulative sum over rows (the prefix column step)
    runs along the contiguous last dim (``St[j, i] = S[i, j]``)::

        column step:  St[j, i] -= log sum_{r <= i} exp(St[j, r])     (prefix over rows)
        row step:     St[j, i] -= log sum_j exp(St[j, i])              (ends each round)

    ``log_targets`` (causal only, broadcastable to ``S``): the prefix column step moves
    column ``j`` of prefix ``i`` to the sum ``exp(log_targets[i, j])`` instead of 1.
    """
    masked = None if allowed is None else ~allowed
    if causal:
        assert masked is not None
        st, masked = s.mT.contiguous(), masked.mT.contiguous()
        bias = None if log_targets is None else log_targets.mT.contiguous()
        return _rounds(st, masked, n_iters, causal=True, bias=bias).mT.contiguous()
    return _rounds(s, masked, n_iters, causal=False)


def _rounds(
    s: Tensor, masked: Tensor | None, n_iters: int, *, causal: bool, bias: Tensor | None = None
) -> Tensor:
    """Rounds then ``P = exp(S)``: through autograd when compiling, else one node."""
    if torch.compiler.is_compiling() or not (s.requires_grad and torch.is_grad_enabled()):
        return _exp(_run_steps(s, masked, n_iters, causal, bias, keep=False)[-1], masked)
    return _SinkhornRounds.apply(s, masked, n_iters, causal, bias)


def hard_routing(p: Tensor, allowed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Straight-through hard routing: forward one-hot of the row argmax, backward ``P``'s.

    Returns:
        ``(P_st, indices)``: ``P_st`` has ``P``'s shape and dtype, with forward value a 0/1
        matrix (a row with no allowed entry stays all zero); ``indices`` is ``(..., N)``
        long, the chosen column per row or -1 where the row has no allowed entry.
    """
    idx = p.argmax(dim=-1)  # (..., N)
    has_any = (p > 0).any(dim=-1) if allowed is None else allowed.expand_as(p).any(dim=-1)
    one_hot = torch.nn.functional.one_hot(idx, p.shape[-1]).to(p.dtype)
    one_hot = one_hot * has_any[..., None].to(p.dtype)
    p_st = one_hot + (p - p.detach())
    return p_st, torch.where(has_any, idx, torch.full_like(idx, -1))
