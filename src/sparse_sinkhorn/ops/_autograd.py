"""The autograd functions of Sparse Sinkhorn attention: sorted blocks (``P @ blocks``, or a
gather with hard routing) and the two-part path in one node. `attention` picks which
one a call takes.

Axes: B batch, H heads, N blocks, R rows of the plan, W block size, G = B*H.
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple

import torch
from einops import rearrange
from torch import Tensor

from .lse_merge import merged_forward, part_backward, sorted_part_backward


def _mix(p3: Tensor, x3: Tensor, idx3: Tensor | None) -> Tensor:
    """Sorted rows ``P @ x``: ``(G, R, N)`` P and ``(G, N, F)`` x give ``(G, R, F)``.

    With ``idx3`` (``(G, R)`` long, -1 = no block) ``P`` is a 0/1 selection and the rows
    are gathered instead (O(R·F), not O(R·N·F)); a row with index -1 is 0.
    """
    if idx3 is None:
        return torch.bmm(p3, x3)
    rows = torch.arange(x3.shape[0], device=x3.device)[:, None]  # (G, 1)
    picked = x3[rows, idx3.clamp_min(0)]  # (G, R, F), a fresh tensor
    return picked.masked_fill_(idx3[..., None] < 0, 0.0)


def _mix_backward_x(p3: Tensor, g3: Tensor, idx3: Tensor | None, n: int) -> Tensor:
    """``P^T @ g`` (``(G, N, F)``) for the forward value of ``P``; a scatter when hard."""
    return _add_mix_backward_x(g3.new_zeros(g3.shape[0], n, g3.shape[-1]), p3, g3, idx3)


def _add_mix_backward_x(
    acc: Tensor, p3: Tensor, g3: Tensor, idx3: Tensor | None, *, zero_if_no_block: bool = False
) -> Tensor:
    """``acc += P^T @ g`` in place (``acc`` ``(G, N, F)``); a scatter-add when hard.

    ``zero_if_no_block``: the caller guarantees ``g`` is 0 on rows with index -1.
    """
    if idx3 is None:
        return acc.baddbmm_(p3.mT, g3)
    if not zero_if_no_block:  # rows that received no block add nothing
        g3 = torch.where((idx3 >= 0)[..., None], g3, g3.new_zeros(()))
    return acc.scatter_add_(1, idx3.clamp_min(0)[..., None].expand_as(g3), g3)


def _row_chunks(n: int, causal: bool) -> list[tuple[int, int]]:
    """Row ranges for the plan matmuls. A causal plan is strictly lower triangular, so
    rows ``[r0, r1)`` only need columns ``< r1``: four row chunks skip about 3/8 of the
    ``N x N`` mix (and of its gradients); one chunk otherwise."""
    if not causal or n < 8:
        return [(0, n)]
    bounds = [round(n * i / 4) for i in range(5)]
    return list(itertools.pairwise(bounds))


# The two-part path processes at most this many query elements (rows x W x D of the flattened
# (G*N, 1, W, D) blocks) at a time when the input is larger: whole heads, or row ranges of one
# head. Its memory beyond the inputs, the output and the three gradients is then a few buffers
# of this size, whatever L and H.
_ATTENTION_CHUNK_ELEMENTS = 1 << 24


class _Chunk(NamedTuple):
    """Heads ``g0:g1`` and, of each, plan rows (query blocks) ``r0:r1``: flat block rows
    ``g0*N + r0 .. (g1-1)*N + r1`` (contiguous: whole heads, or part of one head)."""

    g0: int
    g1: int
    r0: int
    r1: int

    def rows(self, n: int) -> slice:
        return slice(self.g0 * n + self.r0, (self.g1 - 1) * n + self.r1)


def _chunks(g: int, n: int, block_elements: int) -> list[_Chunk]:
    """Memory chunks of `_ATTENTION_CHUNK_ELEMENTS`: all heads at once when they fit, else
    whole heads together, else row ranges of one head (``block_elements`` = W*D)."""
    per_head = n * block_elements
    if g * per_head <= _ATTENTION_CHUNK_ELEMENTS:
        return [_Chunk(0, g, 0, n)]
    heads = _ATTENTION_CHUNK_ELEMENTS // per_head
    if heads >= 1:
        return [_Chunk(a, min(a + heads, g), 0, n) for a in range(0, g, heads)]
    rows = max(1, _ATTENTION_CHUNK_ELEMENTS // block_elements)
    return [_Chunk(a, a + 1, r, min(r + rows, n)) for a in range(g) for r in range(0, n, rows)]


def _sorted(p3: Tensor, x3: Tensor, idx3: Tensor | None, c: _Chunk, causal: bool) -> Tensor:
    """The sorted blocks of chunk ``c``: ``(g1-g0, r1-r0, F)`` rows of ``P @ x`` (a gather
    when hard; causal: the rows of `_row_chunks` read only the columns before them)."""
    heads = slice(c.g0, c.g1)
    if idx3 is not None:
        return _mix(p3[heads, c.r0 : c.r1], x3[heads], idx3[heads, c.r0 : c.r1])
    out = x3.new_empty(c.g1 - c.g0, c.r1 - c.r0, x3.shape[-1])
    for a, b in _row_chunks(p3.shape[1], causal):
        a, b = max(a, c.r0), min(b, c.r1)
        if a < b:
            cols = b if causal else p3.shape[2]
            torch.bmm(p3[heads, a:b, :cols], x3[heads, :cols], out=out[:, a - c.r0 : b - c.r0])
    return out


def _sorted_kv(
    p3: Tensor, k4: Tensor, v4: Tensor, idx3: Tensor | None, c: _Chunk, causal: bool
) -> tuple[Tensor, Tensor]:
    """Chunk ``c``'s sorted keys and values (`_sorted`) in the ``(rows, 1, W, D)`` layout of
    the flattened ``(G*N, 1, W, D)`` blocks ``k4``, ``v4``."""
    g, n = p3.shape[:2]
    ks, vs = (
        _sorted(p3, x.view(g, n, -1), idx3, c, causal).view(-1, *x.shape[1:]) for x in (k4, v4)
    )
    return ks, vs


class TwoPartSinkhorn(torch.autograd.Function):
    """The common path in one autograd node: sorted blocks, two merged attention parts.

    ``(B, H, N*W, D)`` q, k, v, the ``(B, H, N, N)`` plan ``P`` and its ``(B, H, N)`` block
    indices (hard routing gathers by them) give ``(B, H, N*W, Dv)``::

        ks_i = sum_j P_ij k_j     vs_i = sum_j P_ij v_j            (or k_idx(i), v_idx(i))
        out_i = softmax([q_i k_i^T ; q_i ks_i^T] * scale) [v_i ; vs_i]   via lse_merge

    Blocks are flattened to ``(B*H*N, 1, W, D)`` rows for the attention kernels (no copy
    for contiguous inputs), and processed in `_chunks` of at most
    `_ATTENTION_CHUNK_ELEMENTS` query elements (one chunk below that size). Saved: q, k, v,
    P, ``out`` and the ``lse``; soft routing also keeps ``ks``, ``vs`` (hard routing
    gathers them again in the backward, an O(L·D) copy). The backward adds ``P^T dks`` into
    ``dk`` (a scatter-add when hard) and returns the soft ``dP = dks k^T + dvs v^T``
    (straight-through for hard routing).
    """

    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        p: Tensor,
        indices: Tensor | None,
        causal: bool,
        scale: float,
    ) -> Tensor:
        b, h, n = p.shape[:3]
        w = q.shape[2] // n
        g = b * h
        p3 = p.reshape(g, n, n)  # (G, N, N)
        idx3 = None if indices is None else indices.reshape(g, n)  # (G, N): hard routing
        q4, k4, v4 = (
            t.reshape(g * n, 1, w, t.shape[-1]).contiguous() for t in (q, k, v)
        )  # (G*N, 1, W, D); no copy for contiguous inputs
        no_sorted = None  # causal: blocks that receive no sorted block (block 0)
        if causal:
            no_sorted = (idx3 < 0) if idx3 is not None else (p3 == 0).all(-1)  # (G, N)
            no_sorted = no_sorted.reshape(g * n, 1, 1)
        chunks = _chunks(g, n, w * q.shape[-1])
        out = lse = None
        kept: list[tuple[Tensor, Tensor]] = []  # soft routing: each chunk's ks, vs
        infos = []
        for c in chunks:
            rows = c.rows(n)
            ks, vs = _sorted_kv(p3, k4, v4, idx3, c, causal)  # (rows, 1, W, D)
            part = None if no_sorted is None else no_sorted[rows]
            o, l, info = merged_forward(q4[rows], k4[rows], v4[rows], ks, vs, causal, scale, part)
            if len(chunks) == 1:
                out, lse = o, l
            else:
                if out is None or lse is None:
                    out = o.new_empty(g * n, *o.shape[1:])
                    lse = l.new_empty(g * n, *l.shape[1:])
                out[rows], lse[rows] = o, l
            infos.append(info)
            if idx3 is None:
                kept.append((ks, vs))
        ctx.save_for_backward(q4, k4, v4, p3, idx3, out, lse, no_sorted)
        # Intermediates, kept on ctx so that the backward can drop them as soon as a chunk's
        # sorted-part gradients are out (saved tensors live until the backward returns).
        ctx.sorted_kv = kept
        ctx.opts = (causal, scale, infos, chunks, q.shape)
        assert out is not None
        return out.view(b, h, n * w, -1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q4, k4, v4, p3, idx3, out, lse, no_sorted = ctx.saved_tensors
        causal, scale, infos, chunks, q_shape = ctx.opts
        g, n = p3.shape[:2]
        b, h, length, _ = q_shape
        dout = grad.reshape(out.shape)  # (G*N, 1, W, Dv)
        kept, ctx.sorted_kv = ctx.sorted_kv, []
        k3, v3 = k4.view(g, n, -1), v4.view(g, n, -1)
        grad_p = None
        if ctx.needs_input_grad[3]:
            grad_p = p3.new_zeros(g, n, n) if causal else p3.new_empty(g, n, n)
        dq = dk = dv = None
        if len(chunks) > 1:
            dq, dk, dv = torch.empty_like(q4), torch.zeros_like(k4), torch.zeros_like(v4)
        for i, c in enumerate(chunks):
            rows, heads = c.rows(n), slice(c.g0, c.g1)
            if kept:  # soft routing: this chunk's sorted blocks from the forward
                ks, vs = kept[i]
                kept[i] = None
            else:  # hard routing, or a second backward (retain_graph): gather or mix again
                ks, vs = _sorted_kv(p3, k4, v4, idx3, c, causal)
            part = None if no_sorted is None else no_sorted[rows]
            # Sorted part first: its keys/values are freed before the local part's gradients
            # exist (peak: out, dq2, dks, dvs, dq, dk, dv -- not also ks, vs).
            dq2, dks, dvs = sorted_part_backward(
                dout[rows], q4[rows], ks, vs, out[rows], lse[rows], scale, part, infos[i]
            )
            del ks, vs
            dks3 = dks.view(c.g1 - c.g0, c.r1 - c.r0, -1)  # (heads, rows, W*D)
            dvs3 = dvs.view(dks3.shape[0], dks3.shape[1], -1)
            if grad_p is not None:  # soft dP = dks k^T + dvs v^T (straight-through if hard)
                for a, e in _row_chunks(n, causal):  # causal: row i needs columns j < i only
                    a, e = max(a, c.r0), min(e, c.r1)
                    if a < e:
                        cols = e if causal else n
                        target = grad_p[heads, a:e, :cols]
                        torch.bmm(dks3[:, a - c.r0 : e - c.r0], k3[heads, :cols].mT, out=target)
                        target.baddbmm_(dvs3[:, a - c.r0 : e - c.r0], v3[heads, :cols].mT)
            local = part_backward(
                dout[rows], q4[rows], k4[rows], v4[rows], out[rows], lse[rows], causal, scale,
                infos[i],
            )  # fmt: skip
            if dq is None or dk is None or dv is None:  # one chunk: the local gradients
                dq, dk, dv = local
                dq += dq2
            else:
                dq[rows] = local[0].add_(dq2)
                dk[rows] += local[1]
                dv[rows] += local[2]
            del dq2, local
            # dk += P^T dks, dv += P^T dvs (dks = 0 on blocks without a sorted block)
            _add_sorted_backward(dk.view(g, n, -1), p3, dks3, idx3, c, causal)
            _add_sorted_backward(dv.view(g, n, -1), p3, dvs3, idx3, c, causal)
        assert dq is not None and dk is not None and dv is not None
        return (
            dq.view(q_shape),
            dk.view(b, h, length, -1),
            dv.view(b, h, length, -1),
            None if grad_p is None else grad_p.view(*q_shape[:2], n, n),
            None,
            None,
            None,
        )


def _add_sorted_backward(
    acc3: Tensor, p3: Tensor, g3: Tensor, idx3: Tensor | None, c: _Chunk, causal: bool
) -> None:
    """``acc += P^T g`` for chunk ``c``'s rows ``g`` (``(heads, rows, F)``) of the sorted
    blocks, in place into the ``(G, N, F)`` accumulator; a scatter-add when hard (``g`` is
    0 on rows without a block). Causal: column ``j`` receives rows ``i > j`` only."""
    heads = slice(c.g0, c.g1)
    if idx3 is not None:
        _add_mix_backward_x(acc3[heads], p3, g3, idx3[heads, c.r0 : c.r1], zero_if_no_block=True)
        return
    for c0, c1 in _row_chunks(p3.shape[1], causal):
        if causal:  # only columns j < r1 receive from these rows, only from rows i > j
            c1, r0 = min(c1, c.r1), max(c0, c.r0)
        else:
            r0 = c.r0
        if c0 < c1 and r0 < c.r1:
            acc3[heads, c0:c1].baddbmm_(p3[heads, r0 : c.r1, c0:c1].mT, g3[:, r0 - c.r0 :])


class SortedBlocks(torch.autograd.Function):
    """Sorted blocks ``sum_j P_rj x_j``: ``(B, H, R, N)`` P, ``(B, H, N, W, D)`` blocks ->
    ``(B, H, R, W, D)``; with ``indices`` (hard routing) a gather by index.

    Backward: ``dP = g x^T`` (the soft, straight-through gradient: O(R·N·W·D) in every
    mode) and ``dx = P^T g`` (a scatter-add when hard). Only ``P`` and ``x`` are saved.
    """

    @staticmethod
    def forward(ctx: Any, p: Tensor, xb: Tensor, indices: Tensor | None) -> Tensor:
        b, h, n, w, d = xb.shape
        p3 = rearrange(p, "b h r j -> (b h) r j")  # (B*H, R, N)
        x3 = xb.reshape(b * h, n, w * d)  # (B*H, N, W*D)
        idx3 = None if indices is None else indices.reshape(b * h, -1)  # (B*H, R)
        out = _mix(p3, x3, idx3)  # (B*H, R, W*D)
        ctx.save_for_backward(p3, xb, idx3)
        return out.view(b, h, -1, w, d)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        p3, xb, idx3 = ctx.saved_tensors
        b, h, n, w, d = xb.shape
        g3 = grad.reshape(b * h, -1, w * d)  # (B*H, R, W*D)
        grad_p = grad_x = None
        if ctx.needs_input_grad[0]:
            x3 = xb.reshape(b * h, n, w * d)
            grad_p = torch.bmm(g3, x3.mT).view(b, h, -1, n)
        if ctx.needs_input_grad[1]:
            grad_x = _mix_backward_x(p3, g3, idx3, n).view(b, h, n, w, d)
        return grad_p, grad_x, None


class LocalAndSorted(torch.autograd.Function):
    """``[x_i ; sum_j P_ij x_j]`` for every block ``i``, written in place into one buffer.

    ``(B, H, N, N)`` P and ``(B, H, N, W, D)`` blocks give ``(B, H, N, 2W, D)``: the local
    block followed by the sorted one, i.e. ``cat([xb, einsum("bhij,bhjwd->bhiwd", P, xb)], -2)``
    without the concatenation copy. The sort matmul (or, with ``indices``, the hard gather)
    writes straight into the second half of the output, and the backward reads the two
    halves of the incoming gradient as views; only ``P`` and ``x`` are saved.
    """

    @staticmethod
    def forward(ctx: Any, p: Tensor, xb: Tensor, indices: Tensor | None) -> Tensor:
        b, h, n, w, d = xb.shape
        p3 = rearrange(p, "b h i j -> (b h) i j")  # (B*H, N, N)
        x3 = rearrange(xb, "b h n w d -> (b h) n (w d)")  # (B*H, N, W*D)
        idx3 = None if indices is None else indices.reshape(b * h, n)  # (B*H, N)
        out = xb.new_empty(b * h, n, 2, w * d)  # (B*H, N, 2, W*D)
        out[:, :, 0] = x3
        if idx3 is None and not torch.compiler.is_compiling():
            torch.bmm(p3, x3, out=out[:, :, 1])  # sorted half, written in place
        else:
            out[:, :, 1] = _mix(p3, x3, idx3)
        ctx.save_for_backward(p3, x3, idx3)
        ctx.dims = (b, w)
        return rearrange(out, "(b h) n two (w d) -> b h n (two w) d", b=b, w=w)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        p3, x3, idx3 = ctx.saved_tensors
        b, w = ctx.dims
        g = rearrange(grad, "b h n (two w) d -> (b h) n two (w d)", two=2)  # (B*H, N, 2, W*D)
        g_loc, g_srt = g[:, :, 0], g[:, :, 1]  # (B*H, N, W*D) strided views
        grad_p = grad_x = None
        if ctx.needs_input_grad[0]:
            grad_p = rearrange(torch.bmm(g_srt, x3.mT), "(b h) i j -> b h i j", b=b)
        if ctx.needs_input_grad[1]:
            grad_x3 = g_loc + _mix_backward_x(p3, g_srt, idx3, x3.shape[1])  # local + P^T g
            grad_x = rearrange(grad_x3, "(b h) n (w d) -> b h n w d", b=b, w=w)
        return grad_p, grad_x, None
