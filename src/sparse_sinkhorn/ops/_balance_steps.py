"""The balancing's log-domain half-steps (row/column log-sum-exp and the prefix step of causal
balancing), written into reused buffers when no gradient is needed; shared by the forward
(`sinkhorn`) and the recomputing backward (`_balance_backward`).

Axes as in `sinkhorn`: ``(..., N, M)`` log-scores, or their transpose for causal rounds.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Held in masked log-entries; exp() of it is exactly 0 in float32, and it stays finite.
_NEG = -1.0e30
# Scaled scores are clamped to [-_BIG, _BIG]: logits near the float maximum, or a tiny
# temperature, would otherwise overflow to +-inf and turn the log-sum-exps into NaN. exp()
# saturates far inside this range, so the clamp changes no ordinary result.
_BIG = 1.0e30


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
