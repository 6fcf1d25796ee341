"""Sparse Sinkhorn attention: a sort *plan* (logits -> P) kept apart from the compute.

Axes: B batch, H heads, L length, D head dim, N blocks, R rows of the plan (N, or n for
SortCut), W block size, Q/K query/key positions inside a block.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import torch
from einops import rearrange
from torch import Tensor

from . import _validate
from .baselines import dense_attention
from .blocks import block_validity, num_blocks, pad_to_blocks, padded_mask, zero_padding
from .lse_merge import local_part_backward, merged_forward, sorted_part_backward
from .masked import masked_sdpa
from .sinkhorn import BALANCES, allowed_entries, hard_routing, sinkhorn_balance, softmax_routing


@dataclass(frozen=True, repr=False)
class SinkhornPlan:
    """Where every block's keys and values come from.

    Attributes:
        P: ``(B, H, R, N)`` float32 sort matrix; row ``r`` mixes key blocks into slot ``r``
            (``R = N``, or ``n`` with SortCut). With ``hard=True`` its forward value is 0/1
            and its gradient the soft matrix's (straight-through).
        indices: with hard routing, ``(B, H, R)`` long: the block each row takes, -1 where a
            row receives no block (causal row 0, padding-only blocks); None for a soft plan
            (every row mixes blocks by ``P``; a row with no block is a zero row of ``P``).
        block_size: tokens per block ``W``.
        is_causal, n_sortcut, hard: how the plan was made.
        key_mask: ``(B, N*W)`` bool, True = real key (after internal padding), or None.
    """

    P: Tensor
    indices: Tensor | None
    block_size: int
    is_causal: bool
    n_sortcut: int | None
    hard: bool
    key_mask: Tensor | None

    def __repr__(self) -> str:
        b, h, r, n = self.P.shape
        return (
            f"SinkhornPlan(batch={b}, heads={h}, rows={r}, blocks={n}, "
            f"block_size={self.block_size}, causal={self.is_causal}, "
            f"sortcut={self.n_sortcut}, hard={self.hard}, padded={self.key_mask is not None})"
        )

    def to_dense(self, length: int) -> Tensor:
        """The token-level attention pattern, ``(B, H, L, L)`` float32 (for plots and tests).

        Entry ``[t, s]`` is how much key position ``s`` enters query ``t``'s key set: 1 for
        its local block (causal triangle, real keys), plus ``P[i, j]`` for each position of
        key block ``j`` mixed into query block ``i``'s sorted block (for SortCut: the summed
        weight of ``j`` over the first ``n`` rows, for every query). O(L²): small L only.
        """
        w = self.block_size
        b, h, _, n = self.P.shape
        pos = torch.arange(n * w, device=self.P.device)
        blk = pos // w
        if self.n_sortcut is None:
            local = (blk[:, None] == blk[None, :]).float()  # (NW, NW)
            if self.is_causal:
                local = local * (pos[None, :] <= pos[:, None]).float()
            p_tok = self.P.detach().repeat_interleave(w, -2).repeat_interleave(w, -1)
            pattern = local + p_tok  # (B, H, NW, NW)
        else:
            col = self.P.detach().sum(-2).repeat_interleave(w, -1)  # (B, H, NW)
            pattern = col[..., None, :].expand(b, h, n * w, n * w)
        if self.key_mask is not None:
            pattern = pattern * self.key_mask[:, None, None, :].float()
        return pattern[..., :length, :length].contiguous()


class SinkhornOutput(NamedTuple):
    """What :func:`sinkhorn_attention_with_plan` returns."""

    out: Tensor  # (B, H, L, Dv)
    plan: SinkhornPlan


def sinkhorn_plan(
    sort_logits: Tensor,
    *,
    block_size: int,
    is_causal: bool = False,
    key_mask: Tensor | None = None,
    n_sortcut: int | None = None,
    hard: bool = False,
    balance: str = "sinkhorn",
    n_iters: int = 8,
    temperature: float = 0.75,
    gumbel_noise: bool = False,
    generator: torch.Generator | None = None,
) -> SinkhornPlan:
    """Balance ``(B, H, N, N)`` routing logits into a :class:`SinkhornPlan`
    (``balance="softmax"``: normalise rows only, see :func:`sinkhorn_attention`).

    ``key_mask`` is the ``(B, N*W)`` bool mask of real tokens after internal padding (see
    :func:`sparse_sinkhorn.ops.blocks.padded_mask`); padding-only blocks are dropped from the
    balancing (rows and columns), so whole-block padding never changes the plan.
    """
    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
    n = sort_logits.shape[-1]
    allowed = allowed_entries(
        n,
        n,
        causal=is_causal,
        block_valid=block_validity(key_mask, block_size),
        device=sort_logits.device,
    )
    # "softmax": rows only, a key block may serve many query blocks
    route = partial(sinkhorn_balance, n_iters=n_iters) if balance == "sinkhorn" else softmax_routing
    p = route(
        sort_logits,
        temperature=temperature,
        causal=is_causal,
        gumbel_noise=gumbel_noise,
        generator=generator,
        allowed=allowed,
    )  # (B, H, N, N) float32
    if n_sortcut is not None:
        p = p[..., :n_sortcut, :]  # (B, H, n, N): only the first n sorted blocks are kept
        if allowed is not None:
            allowed = allowed[..., :n_sortcut, :]
    indices: Tensor | None = None
    if hard:
        p, indices = hard_routing(p, allowed)
    return SinkhornPlan(p, indices, block_size, is_causal, n_sortcut, hard, key_mask)


def sinkhorn_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    sort_logits: Tensor,
    *,
    block_size: int,
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
    n_sortcut: int | None = None,
    mixture: bool = False,
    hard: bool = False,
    balance: str = "sinkhorn",
    n_iters: int = 8,
    temperature: float = 0.75,
    gumbel_noise: bool = False,
    generator: torch.Generator | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> Tensor:
    """Sparse Sinkhorn attention (Tay et al., 2020) on ``(B, H, L, D)`` tensors.

    Each query block attends, under one softmax, to its own (local) block and to the key /
    value block sorted into its place by the Gumbel-Sinkhorn plan ``P``. Any ``L`` works
    (padded internally to a multiple of ``block_size``). Memory is O(L·W + N²) per head.

    Args:
        query, key, value: ``(B, H, L, D)`` (``value`` may have another last dim). Key and
            value may have ``H_kv`` heads where ``H_kv`` divides ``H`` (grouped-query / multi-
            query attention, as SDPA's ``enable_gqa``): query heads ``g*H/H_kv .. (g+1)*H/H_kv
            - 1`` share key/value head ``g``. The result equals the op on key/value repeated
            with ``repeat_interleave(H // H_kv, dim=1)``.
        sort_logits: ``(B, H, N, N)`` block-routing scores, ``N = ceil(L / block_size)``;
            row ``i`` scores which key block to place beside query block ``i``. Routing is
            per *query* head even with grouped key/value heads: each query head mixes its
            group's shared key/value blocks with its own plan (GQA shares the K/V
            projections and cache to save memory; routing is an O(N²) per-head choice that
            costs little, and one plan per query head keeps ``H_kv = H`` the ordinary case).
        block_size: tokens per block ``W``.
        is_causal: decoder attention: causal local triangle, sorted blocks strictly from the
            past, prefix-causal balancing; output ``t`` depends on inputs ``<= t`` only
            (given logits whose row ``i`` depends on positions ``<= i*W``).
        key_padding_mask: ``(B, L)`` bool, True = real token. Padding never influences a real
            output: padded keys/values are zeroed before sorting, padding-only blocks leave
            the balancing, and sorted slots holding no real key are masked.
        n_sortcut: SortCut budget ``n`` (in blocks): every query attends to the first ``n``
            sorted blocks only (``n*W`` keys). Encoders only.
        mixture: add dense attention (Sinkhorn Mixture; O(L²)).
        hard: straight-through hard routing (argmax block per row forward, soft backward).
        balance: ``"sinkhorn"`` (the paper: Gumbel-Sinkhorn balancing, each key block shared
            out over the query blocks, one-to-one in the limit) or ``"softmax"`` (each row a
            softmax over its allowed key blocks, no column normalisation: many query blocks
            may take the same key block; see :func:`~.sinkhorn.softmax_routing`).
        n_iters, temperature, gumbel_noise, generator: see :func:`sinkhorn_balance`
            (``n_iters`` is unused with ``balance="softmax"``).
        dropout_p: dropout on the attention weights (pass 0 in eval, like SDPA).
        scale: score scale, default ``1/sqrt(D)``.

    Returns:
        ``(B, H, L, Dv)`` in the input dtype. :func:`sinkhorn_attention_with_plan` also
        returns the :class:`SinkhornPlan`.

    Equivalent PyTorch (non-causal, no padding, L a multiple of W)::

        P = sinkhorn_balance(sort_logits)                          # (B, H, N, N)
        kb = rearrange(key, "b h (n w) d -> b h n w d", w=W)       # same for value, query
        ks = einsum("bhij,bhjwd->bhiwd", P, kb)                    # sorted keys, values
        scores = cat([qb @ kb.mT, qb @ ks.mT], -1) * scale         # (B, H, N, W, 2W)
        out = softmax(scores) @ cat([vb, vs], -2)
    """
    return sinkhorn_attention_with_plan(
        query,
        key,
        value,
        sort_logits,
        block_size=block_size,
        is_causal=is_causal,
        key_padding_mask=key_padding_mask,
        n_sortcut=n_sortcut,
        mixture=mixture,
        hard=hard,
        balance=balance,
        n_iters=n_iters,
        temperature=temperature,
        gumbel_noise=gumbel_noise,
        generator=generator,
        dropout_p=dropout_p,
        scale=scale,
    ).out


def sinkhorn_attention_with_plan(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    sort_logits: Tensor,
    *,
    block_size: int,
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
    n_sortcut: int | None = None,
    mixture: bool = False,
    hard: bool = False,
    balance: str = "sinkhorn",
    n_iters: int = 8,
    temperature: float = 0.75,
    gumbel_noise: bool = False,
    generator: torch.Generator | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> SinkhornOutput:
    """:func:`sinkhorn_attention` that also returns its :class:`SinkhornPlan`
    (``out, plan = sinkhorn_attention_with_plan(...)``); same arguments."""
    if not torch.compiler.is_compiling():
        _validate.check_inputs(
            query,
            key,
            value,
            same_length=True,
            key_padding_mask=key_padding_mask,
            dropout_p=dropout_p,
            scale=scale,
            gqa=True,
        )
        _validate.check_sinkhorn(
            query,  # (B, H, L, D): the plan has one routing matrix per query head
            sort_logits,
            block_size=block_size,
            is_causal=is_causal,
            n_sortcut=n_sortcut,
        )
    batch, heads, length, _ = query.shape
    if key.shape[1] != heads:  # grouped-query attention: each K/V head serves H / H_kv heads
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
        value = value.repeat_interleave(heads // value.shape[1], dim=1)
    key_mask = padded_mask(key_padding_mask, batch, length, block_size, query.device)
    plan = sinkhorn_plan(
        sort_logits,
        block_size=block_size,
        is_causal=is_causal,
        key_mask=key_mask,
        n_sortcut=n_sortcut,
        hard=hard,
        balance=balance,
        n_iters=n_iters,
        temperature=temperature,
        gumbel_noise=gumbel_noise,
        generator=generator,
    )
    out = attend_with_plan(query, key, value, plan, dropout_p=dropout_p, scale=scale)
    if mixture:
        out = out + dense_attention(
            query,
            key,
            value,
            is_causal=is_causal,
            key_padding_mask=key_padding_mask,
            dropout_p=dropout_p,
            scale=scale,
        )
    return SinkhornOutput(out, plan)


def attend_with_plan(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    plan: SinkhornPlan,
    *,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> Tensor:
    """Local + sorted attention (or SortCut) given a plan; ``(B, H, L, Dv)`` out.

    Which path a call takes (all equal the dense reference; see ``tests/test_ops_sinkhorn``):

    ============================  =====================================================
    two-part (the common path)    no padding (``L`` a multiple of ``W``, no
                                  ``key_padding_mask``), no dropout, not SortCut, not
                                  under ``torch.compile``: local and sorted blocks as two
                                  mask-free attention calls merged through their
                                  log-sum-exp (:mod:`.lse_merge`); the causal local block
                                  is a plain causal call
    masked ``[local ; sorted]``   padding or dropout: one SDPA over ``2W`` keys per block
                                  with a boolean keep-mask
    SortCut                       one SDPA over the ``n*W`` sorted keys (a mask only
                                  with padding)
    ============================  =====================================================

    Hard routing (``plan.hard``) gathers the chosen blocks by index on every path (O(L·D)
    instead of the ``N x N`` mix); its backward is the soft plan's (straight-through).
    """
    w = plan.block_size
    length = query.shape[2]
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = (pad_to_blocks(t, w) for t in (query, key, value))  # (B, H, N*W, D)
    if plan.key_mask is not None:
        real = plan.key_mask[:, None, :, None]  # (B, 1, N*W, 1)
        # where, not a product: NaN/Inf at a padded position can never reach a sorted block
        k, v = zero_padding(k, real), zero_padding(v, real)
    kb = rearrange(k, "b h (n w) d -> b h n w d", w=w)
    vb = rearrange(v, "b h (n w) d -> b h n w d", w=w)
    p = plan.P.to(k.dtype)  # (B, H, R, N)
    idx = plan.indices  # (B, H, R) with hard routing: gather instead of mixing
    if plan.n_sortcut is not None:
        k_sorted = _SortedBlocks.apply(p, kb, idx)  # (B, H, n, W, D)
        v_sorted = _SortedBlocks.apply(p, vb, idx)  # (B, H, n, W, Dv)
        out = _sortcut(q, k_sorted, v_sorted, plan, scale, dropout_p)
    elif _two_part_applies(plan, dropout_p):
        out = _TwoPartSinkhorn.apply(q, k, v, p, plan.indices, plan.is_causal, scale)
    else:
        k_pair = _LocalAndSorted.apply(p, kb, idx)  # (B, H, N, 2W, D): [K_i ; sum_j P_ij K_j]
        v_pair = _LocalAndSorted.apply(p, vb, idx)  # (B, H, N, 2W, Dv)
        out = _local_and_sorted(q, k_pair, v_pair, plan, scale, dropout_p)
    return out[:, :, :length].to(query.dtype)


def _two_part_applies(plan: SinkhornPlan, dropout_p: float) -> bool:
    """Whether the mask-free two-part path computes this call (see :func:`attend_with_plan`)."""
    return (
        plan.key_mask is None
        and dropout_p == 0.0
        and plan.n_sortcut is None
        and not torch.compiler.is_compiling()
    )


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


def _mix_rows(p3: Tensor, x3: Tensor, idx3: Tensor | None, chunks: list[tuple[int, int]]) -> Tensor:
    """:func:`_mix` by row chunks (see :func:`_row_chunks`)."""
    if idx3 is not None or len(chunks) == 1:
        return _mix(p3, x3, idx3)
    out = x3.new_empty(x3.shape[0], p3.shape[1], x3.shape[-1])
    for r0, r1 in chunks:
        torch.bmm(p3[:, r0:r1, :r1], x3[:, :r1], out=out[:, r0:r1])
    return out


class _TwoPartSinkhorn(torch.autograd.Function):
    """The common path in one autograd node: sorted blocks, two merged attention parts.

    ``(B, H, N*W, D)`` q, k, v, the ``(B, H, N, N)`` plan ``P`` and its ``(B, H, N)`` block
    indices (hard routing gathers by them) give ``(B, H, N*W, Dv)``::

        ks_i = sum_j P_ij k_j     vs_i = sum_j P_ij v_j            (or k_idx(i), v_idx(i))
        out_i = softmax([q_i k_i^T ; q_i ks_i^T] * scale) [v_i ; vs_i]   via lse_merge

    Blocks are flattened to ``(B*H*N, 1, W, D)`` rows for the attention kernels (no copy
    for contiguous inputs). Saved: q, k, v, P, ``ks``, ``vs``, ``out`` and the ``lse``. The
    backward adds ``P^T dks`` into ``dk`` in place (a scatter-add when hard) and returns
    the soft ``dP = dks k^T + dvs v^T`` (straight-through for hard routing).
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
        chunks = _row_chunks(n, causal)
        ks = _mix_rows(p3, k4.view(g, n, -1), idx3, chunks).view(k4.shape)  # (G*N, 1, W, D)
        vs = _mix_rows(p3, v4.view(g, n, -1), idx3, chunks).view(v4.shape)  # (G*N, 1, W, Dv)
        no_sorted = None  # causal: blocks that receive no sorted block (block 0)
        if causal:
            no_sorted = (idx3 < 0) if idx3 is not None else (p3 == 0).all(-1)  # (G, N)
            no_sorted = no_sorted.reshape(g * n, 1, 1)
        out, lse, info = merged_forward(q4, k4, v4, ks, vs, causal, scale, no_sorted)
        ctx.save_for_backward(q4, k4, v4, p3, idx3, out, lse, no_sorted)
        # Intermediates, kept on ctx so that the backward can drop them as soon as the
        # sorted part's gradients are out (saved tensors live until the backward returns).
        ctx.sorted_kv = [ks, vs]
        ctx.opts = (causal, scale, info, q.shape)
        return out.view(b, h, n * w, -1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q4, k4, v4, p3, idx3, out, lse, no_sorted = ctx.saved_tensors
        causal, scale, info, q_shape = ctx.opts
        g, n = p3.shape[:2]
        b, h, length, _ = q_shape
        dout = grad.reshape(out.shape)  # (G*N, 1, W, Dv)
        # Sorted part first: its keys/values are freed before the local part's gradients
        # exist (peak: out, dq2, dks, dvs, dq, dk, dv -- not also ks, vs).
        chunks = _row_chunks(n, causal)
        kv, ctx.sorted_kv = ctx.sorted_kv, None
        if kv is None:  # a second backward through the graph (retain_graph): rebuild them
            kv = [_mix_rows(p3, x.view(g, n, -1), idx3, chunks).view(x.shape) for x in (k4, v4)]
        ks, vs = kv
        del kv
        dq2, dks, dvs = sorted_part_backward(dout, q4, ks, vs, out, lse, scale, no_sorted, info)
        del ks, vs
        dks3, dvs3 = dks.view(g, n, -1), dvs.view(g, n, -1)  # (G, N, W*D)
        k3, v3 = k4.view(g, n, -1), v4.view(g, n, -1)
        grad_p = None
        if ctx.needs_input_grad[3]:  # soft dP = dks k^T + dvs v^T (straight-through if hard)
            grad_p = p3.new_zeros(g, n, n) if len(chunks) > 1 else p3.new_empty(g, n, n)
            for r0, r1 in chunks:  # causal: row i needs columns j < i only
                part = grad_p[:, r0:r1, :r1]
                torch.bmm(dks3[:, r0:r1], k3[:, :r1].mT, out=part)
                part.baddbmm_(dvs3[:, r0:r1], v3[:, :r1].mT)
            grad_p = grad_p.view(*q_shape[:2], n, n)
        dq, dk, dv = local_part_backward(dout, q4, k4, v4, out, lse, causal, scale, info)
        dq += dq2
        del dq2
        # dk += P^T dks, dv += P^T dvs (dks = 0 on blocks without a sorted block)
        if idx3 is None:
            for c0, c1 in chunks:  # causal: column j receives rows i > j only
                dk.view(g, n, -1)[:, c0:c1].baddbmm_(p3[:, c0:, c0:c1].mT, dks3[:, c0:])
                dv.view(g, n, -1)[:, c0:c1].baddbmm_(p3[:, c0:, c0:c1].mT, dvs3[:, c0:])
        else:
            _add_mix_backward_x(dk.view(g, n, -1), p3, dks3, idx3, zero_if_no_block=True)
            _add_mix_backward_x(dv.view(g, n, -1), p3, dvs3, idx3, zero_if_no_block=True)
        return (
            dq.view(q_shape),
            dk.view(b, h, length, -1),
            dv.view(b, h, length, -1),
            grad_p,
            None,
            None,
            None,
        )


class _SortedBlocks(torch.autograd.Function):
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


class _LocalAndSorted(torch.autograd.Function):
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


def keep_mask(plan: SinkhornPlan) -> tuple[Tensor | None, Tensor | None]:
    """Which keys each query may see, as ``(local, sorted)`` bool keep-masks (None = all).

    Query block ``i`` (``W`` queries) attends, under one softmax, to ``2W`` keys: its own block
    (local) and the block sorted into its place (slot ``w`` of it mixes position ``w`` of
    every key block ``j`` with weight ``P[i, j]``)::

                      local: K_i  (W keys)        sorted: sum_j P_ij K_j  (W slots)
                   +----------------------------+----------------------------------+
        query q    | causal: key s <= q         | slot w holds real weight:        |
        of block i | padding: key s is real     |   sum_j P_ij [key (j, w) real]>0 |
                   +----------------------------+----------------------------------+

    * ``local``: ``(1, 1, 1, W, W)`` causal triangle and/or ``(B, 1, N, 1, W)`` real keys,
      combined to ``(B|1, 1, N|1, W|1, W)``; None without causality and padding.
    * ``sorted``: ``(B, H, R, W)`` per slot, with ``R = N`` rows (``n`` with SortCut); a slot
      is masked when no real key reaches it (a padding-only mix, or causal row 0, which has
      no earlier block). None without causality and padding (every slot has weight 1).

    SortCut uses only the sorted part (every query sees the ``n*W`` slots of the first ``n``
    rows). The reference (:func:`~.reference.reference_sinkhorn_attention`) states the same
    rule on the ``(L, L)`` token grid.
    """
    w = plan.block_size
    local: Tensor | None = None
    if plan.is_causal:
        pos = torch.arange(w, device=plan.P.device)
        local = (pos[None, :] <= pos[:, None])[None, None, None]  # (1, 1, 1, W, W)
    if plan.key_mask is not None:
        real = rearrange(plan.key_mask, "b (n w) -> b 1 n 1 w", w=w)  # (B, 1, N, 1, W)
        local = real if local is None else local & real
    if plan.key_mask is None and not plan.is_causal:
        return local, None
    p = plan.P.detach()  # (B, H, R, N)
    if plan.key_mask is None:
        weight = p.sum(-1)[..., None].expand(*p.shape[:-1], w)  # (B, H, R, W)
    else:
        real_kw = rearrange(plan.key_mask, "b (n w) -> b n w", w=w).to(p.dtype)
        weight = torch.einsum("bhrn,bnw->bhrw", p, real_kw)  # real weight per slot
    return local, weight > 0


def _local_and_sorted(
    q: Tensor,
    k_pair: Tensor,
    v_pair: Tensor,
    plan: SinkhornPlan,
    scale: float,
    dropout_p: float,
) -> Tensor:
    """Each query block attends to its ``2W`` keys ``[local ; sorted]`` under one softmax.

    One fused ``scaled_dot_product_attention`` over ``B*H`` x ``N`` blocks with the
    :func:`keep_mask`: no ``(W, 2W)`` score tensor is materialised or saved for backward.
    """
    w = plan.block_size
    batch, heads, n = k_pair.shape[:3]
    q_blocks = rearrange(q, "b h (n w) d -> (b h) n w d", w=w)  # (B*H, N, W, D)
    k_rows = rearrange(k_pair, "b h n k d -> (b h) n k d")  # (B*H, N, 2W, D)
    v_rows = rearrange(v_pair, "b h n k d -> (b h) n k d")  # (B*H, N, 2W, Dv)
    local, sorted_ = keep_mask(plan)
    keep: Tensor | None = None
    if local is not None or sorted_ is not None:
        rows = w if plan.is_causal else 1  # only the causal triangle depends on the query
        shape = (batch, heads, n, rows, w)
        ones = torch.ones(1, 1, 1, 1, w, dtype=torch.bool, device=q.device)
        keep_local = (ones if local is None else local).expand(shape)
        keep_sorted = (ones if sorted_ is None else sorted_[..., None, :]).expand(shape)
        keep = rearrange(
            torch.cat([keep_local, keep_sorted], dim=-1), "b h n q k -> (b h) n q k"
        )  # (B*H, N, W|1, 2W)
    out = masked_sdpa(q_blocks, k_rows, v_rows, keep, dropout_p, scale)  # (B*H, N, W, Dv)
    return rearrange(out, "(b h) n w d -> b h (n w) d", b=batch)


def _sortcut(
    q: Tensor,
    k_sorted: Tensor,
    v_sorted: Tensor,
    plan: SinkhornPlan,
    scale: float,
    dropout_p: float,
) -> Tensor:
    """Every query attends to the ``n*W`` sorted slots of the first ``n`` rows."""
    k_cut = rearrange(k_sorted, "b h r w d -> b h (r w) d")  # (B, H, n*W, D)
    v_cut = rearrange(v_sorted, "b h r w d -> b h (r w) d")
    _, sorted_ = keep_mask(plan)
    keep = None if sorted_ is None else rearrange(sorted_, "b h r w -> b h 1 (r w)")
    return masked_sdpa(q, k_cut, v_cut, keep, dropout_p, scale)  # (B, H, N*W, Dv)


__all__ = [
    "SinkhornOutput",
    "SinkhornPlan",
    "attend_with_plan",
    "num_blocks",
    "sinkhorn_attention",
    "sinkhorn_attention_with_plan",
    "sinkhorn_plan",
]
