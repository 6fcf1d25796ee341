"""Log-domain Gumbel-Sinkhorn balancing (SPEC §2.4) and its prefix-causal variant (§2.7).

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
from torch.utils.checkpoint import checkpoint

from ._validate import check_number

# Held in masked log-entries; exp() of it is exactly 0 in float32, and it stays finite.
_NEG = -1.0e30
# Scaled scores are clamped to [-_BIG, _BIG]: logits near the float maximum, or a tiny
# temperature, would otherwise overflow to +-inf and turn the log-sum-exps into NaN. exp()
# saturates far inside this range, so the clamp changes no ordinary result.
_BIG = 1.0e30


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


def _floor(dtype: torch.dtype) -> float:
    """How far below a line's maximum a term may lie and still go through ``exp()``.

    ``exp(-80)`` (float32) and ``exp(-700)`` (float64) are normal numbers, and ``N`` such
    terms vanish in rounding next to the maximum's term, 1. Arguments further down are
    clamped there: on CPU, ``exp()`` of an argument whose result underflows (the masked
    value ``_NEG`` above all) and ``log(0)`` take a scalar slow path about 10x slower.
    """
    return 700.0 if dtype == torch.float64 else 80.0


def _logsumexp(s: Tensor, dim: int, masked: Tensor | None) -> Tensor:
    """``logsumexp(s, dim, keepdim=True)``; with masked entries, through in-range ``exp()``.

    Terms more than :func:`_floor` below the line's maximum count as ``exp(-floor)``: equal
    to ``torch.logsumexp`` to rounding, and a fully masked line stays finite.
    """
    if masked is None:
        return torch.logsumexp(s, dim=dim, keepdim=True)
    m = s.detach().amax(dim=dim, keepdim=True)
    return m + (s - m).clamp_min(-_floor(s.dtype)).exp().sum(dim=dim, keepdim=True).log()


# A prefix term may lie this far from its line's reference entry (its float64 exp() stays a
# normal, finite number, with room for N-term sums); further out, the prefix falls back.
_PREFIX_RANGE = 600.0


def prefix_logsumexp(s: Tensor, first: Tensor, masked: Tensor) -> Tensor:
    """``torch.logcumsumexp(s, -1)``, as ``c + log(cumsum(exp(s - c)))`` in float64.

    ``logcumsumexp`` does one scalar log-add-exp per element, in sequence; this is one
    vectorised exp, a cumulative sum and a log along the contiguous last dim, and its
    backward a reverse cumulative sum. The shift ``c`` of each line is its *first real
    entry* (``first``: its index, ``(..., 1)``), so entry ``i`` depends on entries
    ``<= i`` only, bit for bit (a line's maximum would leak later entries into earlier
    ones' rounding). Float64 keeps every term within ``_PREFIX_RANGE`` of ``c`` exact to
    float32 (float64) rounding; an entry whose prefix holds a real term further out takes
    ``torch.logcumsumexp``'s value instead (computed only when some entry needs it; the
    choice for entry ``i`` also depends on entries ``<= i`` only). ``masked`` entries are
    clamped into range (they are masked again after every half-step).
    """
    c = s.detach().gather(-1, first).to(torch.float64)  # (..., 1)
    shifted = s.to(torch.float64) - c
    floor = _floor(torch.float64)
    lse = shifted.clamp(-floor, floor).exp().cumsum(dim=-1).log() + c
    if not torch.compiler.is_compiling():
        far = (shifted.detach().abs() > _PREFIX_RANGE) & ~masked
        if bool(far.any()):
            unsafe = far.cumsum(dim=-1) > 0  # some real term of the prefix is out of range
            lse = torch.where(unsafe, torch.logcumsumexp(s.to(torch.float64), dim=-1), lse)
    return lse.to(s.dtype)


def sinkhorn_balance(
    logits: Tensor,
    *,
    n_iters: int = 8,
    temperature: float = 0.75,
    causal: bool = False,
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
      with a *prefix* log-sum-exp over rows ``<= i`` (``torch.logcumsumexp``) and each round
      ends with the row step, so row ``i`` depends on logits rows ``<= i`` only and every row
      ``i >= 1`` is a convex combination of earlier blocks (sums to 1 exactly).

    Args:
        logits: ``(..., N, M)`` scores, any float dtype.
        n_iters: balancing rounds (0 gives the unnormalised ``exp(S)``, masked; the paper
            reports 5–10 rounds suffice).
        temperature: ``tau > 0``; smaller is closer to a hard permutation.
        gumbel_noise: add Gumbel noise (training); sampled from ``generator`` if given.
        allowed: optional bool mask broadcastable to ``logits`` (see :func:`allowed_entries`);
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
    if not torch.compiler.is_compiling():
        _check_balance_args(logits, n_iters, temperature)
    s = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float32, or float64
    if gumbel_noise:
        s = s + sample_gumbel(s.shape, device=s.device, generator=generator).to(s.dtype)
    s = (s / temperature).clamp(-_BIG, _BIG)
    if causal:
        causal_mask = causal_block_mask(s.shape[-2], device=s.device)
        allowed = causal_mask if allowed is None else allowed & causal_mask
    if allowed is not None:
        s = torch.where(allowed, s, torch.full_like(s, _NEG))
    if s.requires_grad and not torch.compiler.is_compiling():
        # Keep only S0 for backward and recompute the rounds there: the 2 * n_iters
        # intermediate (N, N) states then exist only while this (last) part of the backward
        # runs, not beside every attention activation (most of the op's memory at long L).
        return checkpoint(_balance_rounds, s, allowed, n_iters, causal, use_reentrant=False)
    return _balance_rounds(s, allowed, n_iters, causal)


def _balance_rounds(s: Tensor, allowed: Tensor | None, n_iters: int, causal: bool) -> Tensor:
    """The ``n_iters`` normalisation rounds on scaled, masked log-scores; returns ``P``."""
    masked = None if allowed is None else ~allowed
    if causal:
        assert masked is not None
        return _causal_rounds(s, masked, n_iters)
    for _ in range(n_iters):
        s = _remask(s - _logsumexp(s, -1, masked), masked)  # rows
        s = _remask(s - _logsumexp(s, -2, masked), masked)  # columns
    return _exp(s, masked)


def _causal_rounds(s: Tensor, masked: Tensor, n_iters: int) -> Tensor:
    """Prefix-causal rounds, computed on ``S^T`` so the cumulative sum over rows runs along
    the contiguous last dim (``St[j, i] = S[i, j]``)::

        column step:  St[j, i] -= log sum_{r <= i} exp(St[j, r])     (prefix over rows)
        row step:     St[j, i] -= log sum_j exp(St[j, i])              (ends each round)
    """
    st = s.mT.contiguous()  # (..., M, N)
    masked_t = masked.mT
    first = (~masked_t).int().argmax(dim=-1, keepdim=True)  # first real row of each column
    first = first.expand(*st.shape[:-1], 1)
    for _ in range(n_iters):
        st = _remask(st - prefix_logsumexp(st, first, masked_t), masked_t)
        st = _remask(st - _logsumexp(st, -2, masked_t), masked_t)
    return _exp(st, masked_t).mT.contiguous()


def _remask(s: Tensor, masked: Tensor | None) -> Tensor:
    return s if masked is None else s.masked_fill(masked, _NEG)


def _exp(s: Tensor, masked: Tensor | None) -> Tensor:
    """``exp(s)``, exactly 0 where masked (masked entries never reach ``exp()``)."""
    if masked is None:
        return s.exp()
    return s.masked_fill(masked, 0.0).exp().masked_fill(masked, 0.0)


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


def _check_balance_args(logits: Tensor, n_iters: int, temperature: float) -> None:
    if logits.dim() < 2:
        raise ValueError(f"sort logits must have at least 2 dims (..., N, M), got {logits.shape}")
    if not logits.is_floating_point():
        raise TypeError(f"sort logits must be floating point, got {logits.dtype}")
    check_number("temperature", temperature, low=0.0)
    if isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 0:
        raise ValueError(f"n_iters must be a non-negative int, got {n_iters!r}")
