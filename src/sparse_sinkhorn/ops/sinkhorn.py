"""Log-domain Gumbel-Sinkhorn balancing (docs/method.md §4) and its prefix-causal variant (§5).

Axes: B batch, H heads, N query blocks (rows), M key blocks (columns; M == N unless SortCut
keeps fewer rows downstream).

All balancing runs in float32 whatever the input dtype. Entries that are not allowed (a
padding block, or ``j >= i`` under causal masking) are held at a large negative *finite*
value after every half-step, so that fully masked rows never produce NaN and never leak into
the normalisation of allowed entries; ``P`` is exactly 0 there.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import Tensor

from . import _validate

# The balancing's backward recomputes the rounds for at most this many (N, N) entries at a time
# (whole matrices; at least one): its peak memory is a few states of that size, whatever B and H.
_CHUNK_ELEMENTS = 1 << 24
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
    """How far from a line's reference value an exponent may go through ``exp()``.

    ``exp(+-80)`` (float32) and ``exp(+-700)`` (float64) are normal, finite numbers, with
    room for sums of thousands of terms. Exponents further down are clamped there: next to a
    term >= 1 they vanish in rounding either way, and on CPU ``exp()`` of an argument whose
    result underflows (the masked value ``_NEG`` above all) takes a scalar slow path about
    10x slower.
    """
    return 700.0 if dtype == torch.float64 else 80.0


def _logsumexp(s: Tensor, dim: int, masked: Tensor | None) -> Tensor:
    """``logsumexp(s, dim, keepdim=True)``; with masked entries, through in-range ``exp()``.

    Terms more than `_floor` below the line's maximum count as ``exp(-floor)``: equal
    to ``torch.logsumexp`` to rounding (the maximum's term is 1), and a fully masked line
    stays finite.
    """
    if masked is None:
        return torch.logsumexp(s, dim=dim, keepdim=True)
    m = s.detach().amax(dim=dim, keepdim=True)
    return m + _exp_in_range(s - m).sum(dim=dim, keepdim=True).log()


def _exp_in_range(t: Tensor) -> Tensor:
    """``exp(t.clamp(-floor, floor))``, in place when ``t`` is a fresh no-grad temporary."""
    floor = _floor(t.dtype)
    if t.requires_grad:
        return t.clamp(-floor, floor).exp()
    return t.clamp_(-floor, floor).exp_()


def prefix_logsumexp(s: Tensor, first: Tensor) -> Tensor:
    """``torch.logcumsumexp(s, -1)`` as ``c + log(cumsum(exp(s - c)))``.

    ``logcumsumexp`` does one scalar log-add-exp per element, in sequence; this is one
    vectorised exp, a cumulative sum and a log along the contiguous last dim, and its
    backward a reverse cumulative sum. The shift ``c`` of each line is its *first real
    entry* (``first``: its index, ``(..., 1)``), so entry ``i`` depends on entries ``<= i``
    only, bit for bit (a line's maximum would leak later entries into earlier ones'
    rounding), and every prefix from ``first`` on holds ``c``'s term ``exp(0) = 1``: terms
    far below ``c`` vanish in rounding (they are clamped, see `_floor`), only terms
    far *above* it could overflow. Entries whose prefix holds such a term (``> c + floor``)
    take the value computed in float64 instead (range +-700; beyond that, float64 inputs
    take ``torch.logcumsumexp``'s), computed only when some entry needs it; the choice for
    entry ``i`` also depends on entries ``<= i`` only.
    """
    c = s.detach().gather(-1, first)  # (..., 1)
    cs = _exp_in_range(s - c).cumsum(dim=-1)
    lse = (cs.log() if cs.requires_grad else cs.log_()) + c
    if not torch.compiler.is_compiling():
        over = _prefix_overflows(s, c)
        if over is not None:
            lse = torch.where(over, _wider_prefix_logsumexp(s, first), lse)
    return lse


def _wider_prefix_logsumexp(s: Tensor, first: Tensor) -> Tensor:
    """The fallback for prefixes out of range: float32 retries in float64 (range +-700),
    float64 takes ``torch.logcumsumexp``."""
    if s.dtype == torch.float64:
        return torch.logcumsumexp(s, dim=-1)
    return prefix_logsumexp(s.to(torch.float64), first).to(s.dtype)


def _prefix_overflows(s: Tensor, c: Tensor) -> Tensor | None:
    """Where a prefix holds a term too far above its line's shift ``c`` (None: nowhere)."""
    ahead = s.detach() - c > _floor(s.dtype)
    if not bool(ahead.any()):
        return None
    return ahead.cumsum(dim=-1) > 0


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
      with a *prefix* log-sum-exp over rows ``<= i`` (`prefix_logsumexp`) and each round
      ends with the row step, so row ``i`` depends on logits rows ``<= i`` only and every row
      ``i >= 1`` is a convex combination of earlier blocks (sums to 1 exactly).

    Args:
        logits: ``(..., N, M)`` scores, any float dtype.
        n_iters: balancing rounds (0 gives the unnormalised ``exp(S)``, masked; the paper
            reports 5–10 rounds suffice).
        temperature: ``tau > 0``; smaller is closer to a hard permutation.
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
    if not torch.compiler.is_compiling():
        _validate.check_balance(logits, n_iters, temperature)
    s, allowed = _scores(logits, temperature, causal, gumbel_noise, generator, allowed)
    if allowed is not None:
        s = torch.where(allowed, s, torch.full_like(s, _NEG))
    return _balance_rounds(s, allowed, n_iters, causal)


def _scores(
    logits: Tensor, temperature: float, causal: bool, gumbel_noise: bool,
    generator: torch.Generator | None, allowed: Tensor | None,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """Scaled scores ``(logits + gumbel) / temperature`` (float32 at least) and the allowed
    entries, causal mask included."""
    s = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float32, or float64
    if gumbel_noise:
        s = s + sample_gumbel(s.shape, device=s.device, generator=generator).to(s.dtype)
    s = (s / temperature).clamp(-_BIG, _BIG)
    if causal:
        causal_mask = causal_block_mask(s.shape[-2], device=s.device)
        allowed = causal_mask if allowed is None else allowed & causal_mask
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


def _step_dims(causal: bool) -> tuple[tuple[str, int], tuple[str, int]]:
    """The two half-steps of a round: (kind, dim)."""
    return (("prefix", -1), ("lse", -2)) if causal else (("lse", -1), ("lse", -2))


def _first_real(masked: Tensor, shape: torch.Size) -> Tensor:
    """``(..., 1)`` index of each line's first unmasked entry (0 for a fully masked line)."""
    return (~masked).int().argmax(dim=-1, keepdim=True).expand(*shape[:-1], 1)


def _run_steps(
    s: Tensor,
    masked: Tensor | None,
    n_iters: int,
    causal: bool,
    bias: Tensor | None,
    *,
    keep: bool,
) -> list[Tensor]:
    """``[S0, S1, ..., S_2n]`` (every half-step's output if ``keep``, else the last only)."""
    first = None if masked is None or not causal else _first_real(masked, s.shape)
    kinds = [step for _ in range(n_iters) for step in _step_dims(causal)]
    return _steps(s, kinds, masked, first, bias, keep=keep)


def _steps(
    s: Tensor,
    kinds: list[tuple[str, int]],
    masked: Tensor | None,
    first: Tensor | None,
    bias: Tensor | None,
    *,
    keep: bool,
) -> list[Tensor]:
    """The half-steps ``kinds`` from state ``s``: ``[s, y1, ..., yk]`` if ``keep``, else
    ``[yk]`` (``[s]`` for no step).

    Without autograd the half-steps write into reused buffers (two for the states, one
    scratch): on CPU a fresh ``(N, N)`` buffer costs page faults comparable to the
    arithmetic on it. The same inputs give the same states bit for bit, so a backward can
    recompute any state from an earlier one.
    """
    track = s.requires_grad and torch.is_grad_enabled()
    scratch = None if track else torch.empty_like(s)
    spare = [] if track or keep else [torch.empty_like(s), torch.empty_like(s)]
    states = [s]
    for kind, dim in kinds:
        out = None if track else spare.pop() if spare else torch.empty_like(s)
        y = _half_step(states[-1], kind, dim, masked, first, bias, out, scratch)
        if not keep and not track and states[-1] is not s:
            spare.append(states[-1])  # the previous state's buffer is free again
        states = [*states, y] if keep else [y]
    return states


def _half_step(
    x: Tensor,
    kind: str,
    dim: int,
    masked: Tensor | None,
    first: Tensor | None,
    bias: Tensor | None,
    out: Tensor | None,
    scratch: Tensor | None,
) -> Tensor:
    """``y = x - lse(x)`` (row/column or prefix; ``+ bias`` after a prefix step, if given),
    masked entries back at ``_NEG``.

    With ``out`` and ``scratch`` (no autograd) everything is written into them."""
    if out is None or scratch is None:  # autograd (torch.compile) path
        if kind == "prefix":
            assert first is not None
            y = x - prefix_logsumexp(x, first)
            y = y if bias is None else y + bias
        else:
            y = x - _logsumexp(x, dim, masked)
        return y if masked is None else y.masked_fill(masked, _NEG)
    floor = _floor(x.dtype)
    if kind == "prefix":
        assert first is not None
        c = x.gather(-1, first)  # (..., 1)
        torch.sub(x, c, out=scratch)
        over = None
        if not torch.compiler.is_compiling() and bool(scratch.amax() > floor):
            over = _prefix_overflows(x, c)
        torch.cumsum(scratch.clamp_(-floor, floor).exp_(), dim=-1, out=out)
        out.log_().add_(c)  # the prefix lse
        if over is not None:
            out = torch.where(over, _wider_prefix_logsumexp(x, first), out)
        torch.sub(x, out, out=out)
        if bias is not None:
            out.add_(bias)
    else:
        m = x.amax(dim=dim, keepdim=True)
        torch.sub(x, m, out=scratch)
        lse = scratch.clamp_(-floor, floor).exp_().sum(dim=dim, keepdim=True).log_().add_(m)
        torch.sub(x, lse, out=out)
    return out if masked is None else out.masked_fill_(masked, _NEG)


class _SinkhornRounds(torch.autograd.Function):
    """The balancing rounds with a hand-written backward that recomputes them.

    Only ``S0`` is saved: the ``2 * n_iters`` intermediate ``(N, N)`` states exist only
    while this (last) part of the backward runs, not beside every attention activation, and
    then not all at once: the backward keeps a checkpoint every `_segment_length`
    half-steps and recomputes one segment's states at a time (the same arithmetic as the
    forward, so the same states bit for bit), for one chunk of the ``(..., N, N)`` matrices
    at a time (`_CHUNK_ELEMENTS`).
    With ``g`` the gradient of a half-step's output (0 where masked):

    * row/column step ``y = x - logsumexp(x)``: ``dx = g - exp(y) * sum(g)``;
    * prefix step ``y_i = x_i - log sum_{r<=i} exp(x_r)``, with ``e = exp(x - c)``,
      ``cs = cumsum(e)``: ``dx_k = g_k - e_k * sum_{i>=k} g_i / cs_i`` (a reverse
      cumulative sum); a step that fell back to ``logcumsumexp`` goes through autograd.

    All in place on fresh buffers.
    """

    @staticmethod
    def forward(
        ctx: Any, s: Tensor, masked: Tensor | None, n_iters: int, causal: bool, bias: Tensor | None
    ) -> Tensor:
        with torch.no_grad():
            p = _exp(_run_steps(s, masked, n_iters, causal, bias, keep=False)[-1], masked)
        ctx.save_for_backward(s, masked, bias)
        ctx.opts = (n_iters, causal)
        return p

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        s, masked, bias = ctx.saved_tensors
        n_iters, causal = ctx.opts
        m, n = s.shape[-2:]
        count = s.numel() // max(m * n, 1)  # matrices, balanced independently
        per = max(1, _CHUNK_ELEMENTS // max(m * n, 1))
        if count <= per:
            return _rounds_backward(s, masked, bias, grad, n_iters, causal), None, None, None, None
        # a chunk of matrices at a time: the recomputed states are the chunk's, not all of them
        s3, g3 = s.reshape(-1, m, n), grad.reshape(-1, m, n)
        mask3 = None if masked is None else masked.expand(s.shape).reshape(-1, m, n)
        bias3 = None if bias is None else bias.expand(s.shape).reshape(-1, m, n)
        out = torch.empty_like(s3)
        for a in range(0, count, per):
            part = None if mask3 is None else mask3[a : a + per]
            shift = None if bias3 is None else bias3[a : a + per]
            out[a : a + per] = _rounds_backward(
                s3[a : a + per], part, shift, g3[a : a + per], n_iters, causal
            )
        return out.view(s.shape), None, None, None, None


def _rounds_backward(
    s: Tensor, masked: Tensor | None, bias: Tensor | None, grad: Tensor, n_iters: int, causal: bool
) -> Tensor:
    """The gradient of `_SinkhornRounds` with respect to ``s`` (see there; a constant
    ``bias`` after the prefix steps changes the states, not the steps' derivatives)."""
    kinds = [step for _ in range(n_iters) for step in _step_dims(causal)]
    first = None if masked is None or not causal else _first_real(masked, s.shape)
    every = _segment_length(len(kinds))
    with torch.no_grad():
        # checkpoints: the states at the start of every segment of `every` half-steps
        starts = list(range(0, max(len(kinds), 1), every))  # [0] without rounds
        checkpoints = [s]
        for a, b in itertools.pairwise(starts):
            checkpoints.append(
                _steps(checkpoints[-1], kinds[a:b], masked, first, bias, keep=False)[-1]
            )
        g: Tensor | None = None
        bufs = (torch.empty_like(s), torch.empty_like(s))  # scratch, reused by every step
        for a in reversed(starts):  # segments last to first, each recomputed from its start
            states = _steps(checkpoints.pop(), kinds[a : a + every], masked, first, bias, keep=True)
            if g is None:
                g = grad * _exp(states[-1], masked)  # P = exp(S_2n)
            # g stays exactly 0 where masked (masked outputs are constants): P is 0 there,
            # and each step's weights below are 0 there.
            for t in range(len(states) - 2, -1, -1):
                kind, dim = kinds[a + t]
                x, y = states[t], states[t + 1]
                if kind == "lse":
                    w = torch.clamp(y, min=-_floor(y.dtype), out=bufs[0]).exp_()  # softmax
                    if masked is not None:
                        w = w.masked_fill_(masked, 0.0)
                    g = g.sub_(w.mul_(g.sum(dim, keepdim=True)))
                else:
                    assert first is not None
                    g = _prefix_step_backward(g, x, first, masked, bufs)
                del states[t + 1 :]  # free the states as the backward passes them
        assert g is not None
    return g


def _segment_length(n_steps: int) -> int:
    """Half-steps per recomputed segment of the balancing's backward: about ``sqrt(n)``, so
    it holds about ``2 sqrt(n)`` ``(N, N)`` states (checkpoints plus one segment) instead of
    ``n`` and recomputes the rounds once."""
    return max(1, math.isqrt(max(n_steps - 1, 0)) + 1)


def _prefix_step_backward(
    g: Tensor, x: Tensor, first: Tensor, masked: Tensor | None, bufs: tuple[Tensor, Tensor]
) -> Tensor:
    """Gradient of ``x - prefix_logsumexp(x)`` (see `_SinkhornRounds`), in place in
    ``g`` (ours) with two scratch buffers."""
    c = x.gather(-1, first)
    e = torch.sub(x, c, out=bufs[0])
    floor = _floor(x.dtype)
    if not torch.compiler.is_compiling() and bool(e.amax() > floor):
        if x.dtype != torch.float64:  # out of float32's range: the same in float64
            wide = [t.to(torch.float64) for t in (g, x, *bufs)]
            dx = _prefix_step_backward(wide[0], wide[1], first, masked, (wide[2], wide[3]))
            return g.copy_(dx)
        with torch.enable_grad():  # the logcumsumexp fallback: let autograd do it
            xg = x.detach().requires_grad_()
            (dx,) = torch.autograd.grad(xg - prefix_logsumexp(xg, first), xg, g)
        return dx
    e = e.clamp_(-floor, floor).exp_()  # (..., M, N)
    if masked is not None:
        e = e.masked_fill_(masked, 0.0)  # masked entries are not in any prefix
    a = torch.cumsum(e, dim=-1, out=bufs[1])
    a = a.clamp_min_(torch.finfo(a.dtype).tiny).reciprocal_().mul_(g)  # g_i / cs_i
    suffix = torch.cumsum(a.flip(-1), dim=-1).flip(-1)  # sum_{i>=k} a_i
    return g.sub_(suffix.mul_(e))


def _exp(s: Tensor, masked: Tensor | None, *, clamp: bool = False) -> Tensor:
    """``exp(s)``, exactly 0 where masked (masked entries never reach ``exp()``).

    ``clamp``: arguments below ``-floor`` count as ``-floor`` (for softmax weights in a
    backward, where ``exp(-80)`` and an underflowed value are the same to rounding).
    """
    if clamp:
        s = s.clamp_min(-_floor(s.dtype))
    if masked is None:
        return s.exp()
    e = s.masked_fill(masked, 0.0).exp()
    return e.masked_fill(masked, 0.0) if e.requires_grad else e.masked_fill_(masked, 0.0)


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
