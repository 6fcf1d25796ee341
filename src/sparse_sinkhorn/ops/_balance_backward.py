"""The balancing rounds as one autograd node whose backward recomputes them from checkpoints,
one chunk of matrices at a time (`_SinkhornRounds`): the memory-saving backward of
[`sinkhorn_balance`][sparse_sinkhorn.ops.sinkhorn_balance].
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import Tensor

from ._balance_steps import (
    _exp,
    _first_real,
    _floor,
    _run_steps,
    _step_dims,
    _steps,
    prefix_logsumexp,
)

# The balancing's backward recomputes the rounds for at most this many (N, N) entries at a time
# (whole matrices; at least one): its peak memory is a few states of that size, whatever B and H.
_CHUNK_ELEMENTS = 1 << 24


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
