"""MoBA's parameter-free top-k block gate (with Quest's bound and NSA's compressed branch):
each query token attends to its own block and the earlier blocks its gate picks."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .baselines import _causal_mask, _check_blocked
from .blocks import pad_to_blocks, padded_mask, repeat_kv, zero_padding
from .flex import flex_attend
from .grouped import BlockGroups
from .lse_merge import flash_parts_available, part_backward, part_forward

GATES = ("mean", "bound")  # topk block scores: MoBA's q . mean(K), Quest's upper bound
BACKENDS = ("grouped", "flex")  # the project's kernels (every device), FlexAttention


def topk_block_selection(
    query: Tensor,
    key: Tensor,
    *,
    block_size: int,
    top_k: int,
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
    gate: str = "mean",
) -> Tensor:
    """A parameter-free block gate: which ``top_k`` other key blocks each query reads.

    Query ``t`` (in block ``i``) scores every candidate key block ``j`` and keeps the
    ``top_k`` best: ``gate="mean"`` (MoBA's) by ``q_t · mean(K_j)``, the mean over block
    ``j``'s real keys; ``gate="bound"`` (Quest's) by ``sum_d max(q_d min_d, q_d max_d)`` over
    the per-feature minimum and maximum of its real keys, an upper bound on ``q_t · k`` for
    every key ``k`` of the block, so one key that matches the query marks its block.
    Candidates are the blocks ``j < i`` (causal: complete, earlier blocks only, so the choice
    depends on positions ``<= t``) or every ``j != i``, and never a block without a real key.

    Returns:
        ``(B, H, L, k)`` long block indices, ``k = min(top_k, N)``, -1 where a query has
        fewer than ``k`` candidates. The selection carries no gradient.
    """
    if gate not in GATES and not torch.compiler.is_compiling():
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    batch, _, length, _ = query.shape
    w = block_size
    mask = padded_mask(key_padding_mask, batch, length, w, query.device)  # (B, N*W) or None
    kb = rearrange(pad_to_blocks(key.detach(), w), "b h (n w) d -> b h n w d", w=w)
    real = None if mask is None else rearrange(mask, "b (n w) -> b 1 n w 1", w=w)
    valid = None if real is None else real.squeeze(-1).any(dim=-1)  # (B, 1, N): a real key
    n = kb.shape[2]
    wide = torch.promote_types(query.dtype, torch.float32)  # the gate in float32 at least
    q = query.detach().to(wide)
    if gate == "mean":
        if real is None:
            k_mean = kb.mean(dim=3)  # (B, H, N, D)
        else:
            count = real.sum(dim=3).clamp_min(1).to(kb.dtype)  # (B, 1, N, 1)
            k_mean = zero_padding(kb, real).sum(dim=3) / count  # (B, H, N, D)
        score = torch.einsum("bhld,bhnd->bhln", q, k_mean.to(wide))
    else:
        if real is None:
            k_min, k_max = torch.aminmax(kb.to(wide), dim=3)  # (B, H, N, D)
        else:  # padding never sets a bound; a block without a real key: 0
            k_max = kb.to(wide).masked_fill(~real, float("-inf")).amax(dim=3)
            k_min = kb.to(wide).masked_fill(~real, float("inf")).amin(dim=3)
        if valid is not None:
            k_max = torch.where(valid[..., None], k_max, 0.0)
            k_min = torch.where(valid[..., None], k_min, 0.0)
        # sum_d max(q_d min_d, q_d max_d) = q . max + min(q, 0) . (min - max)
        q3, k3 = q.flatten(0, 1), k_max.flatten(0, 1)  # (B*H, L, D), (B*H, N, D)
        span = (k_min - k_max).flatten(0, 1)
        score = torch.baddbmm(q3 @ k3.mT, q3.clamp(max=0), span.mT).view(batch, -1, length, n)
    t_blk = torch.arange(length, device=query.device)[:, None] // w  # (L, 1)
    j = torch.arange(n, device=query.device)[None, :]  # (1, N)
    allowed = (j < t_blk) if is_causal else (j != t_blk)  # (L, N)
    allowed = allowed[None, None]  # (1, 1, L, N)
    if valid is not None:
        allowed = allowed & valid[:, :, None, :]  # (B, 1, L, N)
    # -inf where not allowed, as an added bias: on CPU much faster than a broadcast masked_fill
    bias = torch.zeros(allowed.shape, dtype=score.dtype, device=score.device)
    score = score.add_(bias.masked_fill_(~allowed, float("-inf")))  # a fresh tensor
    if top_k == 1:  # the common case: the first maximum, from reductions without indices
        best = score.amax(dim=-1, keepdim=True)  # (B, H, L, 1)
        rank = torch.arange(n, 0, -1, device=score.device, dtype=score.dtype)  # N - j
        idx = n - torch.where(score == best, rank, 0.0).amax(dim=-1, keepdim=True).long()
    else:
        best, idx = score.topk(min(top_k, n), dim=-1)  # (B, H, L, k)
    return torch.where(best > float("-inf"), idx, torch.full_like(idx, -1))


def topk_block_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    block_size: int,
    top_k: int = 1,
    is_causal: bool = False,
    compressed: bool = False,
    gate: str = "mean",
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: str = "grouped",
) -> Tensor:
    """Block attention with MoBA's top-k gate (Lu et al., 2025): no parameters, no sorting.

    Each query attends, under one softmax, to its own block (the causal triangle when
    ``is_causal``) and to every key of the ``top_k`` blocks
    [`topk_block_selection`][sparse_sinkhorn.ops.topk_block_selection]
    picks for it (``gate``: its block score, MoBA's ``"mean"`` or Quest's ``"bound"``). Exactly
    causal: a query's blocks are chosen from complete earlier blocks by its own query vector.

    ``compressed``: the softmax also holds one entry per gate candidate block (every complete
    earlier block when causal, every other block if not), its mean real key and mean real
    value (NSA's compressed branch), which trains the keys the gate scores blocks by (with
    ``gate="mean"``, the very ``q · mean(K)`` the gate ranks).

    The selected blocks are multiplied a tile of queries at a time
    (`BlockGroups`): O(L·k·(W + D)) gathered numbers, no per-token copy of a
    block. Without padding, dropout or ``compressed``, and for ``L`` a multiple of the block
    size, the own block and the picked blocks are separate attention parts (flash kernels
    where available) merged through their log-sum-exp; otherwise one softmax over the
    concatenated scores. Both equal the float64 reference.

    ``backend="flex"`` computes the same attention with PyTorch's FlexAttention instead, the
    picks as a block mask that is exact per token (`sparse_sinkhorn.ops.flex`): compiled on
    CUDA; on the CPU forward only (no gradient). It has no ``compressed`` branch or dropout.
    """
    _check_blocked(query, key, value, block_size, key_padding_mask, dropout_p, scale, gqa=True)
    bad_k = isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0
    if bad_k and not torch.compiler.is_compiling():
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "flex" and compressed:
        raise ValueError("backend='flex' has no compressed branch; use backend='grouped'")
    if backend == "flex" and dropout_p > 0.0:
        raise ValueError(
            f"backend='flex' has no dropout, got dropout_p={dropout_p}; use backend='grouped'"
        )
    batch, heads, length, _ = query.shape
    kv_heads = key, value  # FlexAttention reads grouped key/value heads as they are
    key, value = repeat_kv(key, heads), repeat_kv(value, heads)  # grouped-query attention
    w = block_size
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    mask = padded_mask(key_padding_mask, batch, length, w, query.device)  # (B, N*W) or None
    idx = topk_block_selection(
        query,
        key,
        block_size=w,
        top_k=top_k,
        is_causal=is_causal,
        key_padding_mask=key_padding_mask,
        gate=gate,
    )  # (B, H, L, k)
    if backend == "flex":
        out = flex_attend(
            query, *kv_heads, idx, block_size=w, is_causal=is_causal,
            key_padding_mask=key_padding_mask, scale=scale,
        )  # fmt: skip
        return out.to(query.dtype)
    if mask is None and not compressed and dropout_p == 0.0 and length % w == 0:
        qb, kb, vb = (
            rearrange(t, "b h (n w) d -> (b h) n w d", w=w) for t in (query, key, value)
        )  # (G, N, W, D)
        groups = BlockGroups(rearrange(idx, "b h l k -> (b h) l k"), length // w)
        out = _OwnAndPicked.apply(qb, kb, vb, groups, is_causal, scale)  # (G, L, Dv)
        return rearrange(out, "(b h) l d -> b h l d", b=batch).to(query.dtype)
    q, k, v = (pad_to_blocks(t, w) for t in (query, key, value))  # (B, H, N*W, D)
    if mask is not None:
        real = mask[:, None, :, None]  # (B, 1, N*W, 1)
        k, v = zero_padding(k, real), zero_padding(v, real)
    kb = rearrange(k, "b h (n w) d -> (b h) n w d", w=w)  # (G, N, W, D)
    vb = rearrange(v, "b h (n w) d -> (b h) n w d", w=w)
    qb = rearrange(q, "b h (n w) d -> (b h) n w d", w=w)  # (G, N, W, D)
    local = torch.einsum("gnqd,gnkd->gnqk", qb, kb) * scale  # (G, N, W, W)
    keep_local = torch.ones(1, 1, w, w, dtype=torch.bool, device=q.device)
    if is_causal:
        keep_local = _causal_mask(w, w, q.device)[None, None]  # (1, 1, W, W)
    real_kw = None
    if mask is not None:
        # (G, N, W): real keys of each (batch, head) row, computed once for every part
        real_kw = rearrange(mask, "b (n w) -> b n w", w=w).repeat_interleave(heads, dim=0)
        keep_local = keep_local & real_kw[:, :, None, :]  # (G, N, W, W)
    idx3 = rearrange(pad_to_blocks(idx, w), "b h l k -> (b h) l k")  # (G, N*W, k)
    groups = BlockGroups(idx3, kb.shape[1])  # queries grouped by the block they read
    q_tok = rearrange(q, "b h l d -> (b h) l d")  # (G, N*W, D)
    chosen = groups.scores(q_tok, kb) * scale  # (G, N*W, k, W)
    keep_sel = (idx3 >= 0)[..., None].expand(*idx3.shape, w)  # (G, N*W, k, W)
    if real_kw is not None:
        rows = torch.arange(kb.shape[0], device=q.device)[:, None, None]  # (G, 1, 1)
        keep_sel = keep_sel & real_kw[rows, idx3.clamp_min(0)]
    local = local.masked_fill(~keep_local, float("-inf"))
    summary = None
    if compressed:
        summary = _compressed_branch(q_tok, kb, vb, real_kw, scale, is_causal)
    out = _softmax_local_and_selected(
        local,
        chosen.masked_fill(~keep_sel, float("-inf")),
        vb,
        groups,
        dropout_p,
        summary,
        padded=mask is not None,
    )
    out = rearrange(out, "(b h) l d -> b h l d", b=batch)
    return out[:, :, :length].to(query.dtype)


class _OwnAndPicked(torch.autograd.Function):
    """One softmax over each query's own block (the causal triangle when causal) and the
    blocks it picked, computed as attention parts merged through their log-sum-exp
    (`lse_merge`): the own part is one ``(W, W)`` problem per block, the picked part one
    ``(T, W)`` problem per tile of `BlockGroups` (queries that read the same block), each
    on the flash kernel where `flash_parts_available`. No score tensor of a query's whole
    width is built; the backward hands each part's kernel the merged output and
    log-sum-exp. Without padding, dropout or the compressed branch, and for ``L`` a
    multiple of ``W``; `topk_block_attention` takes the general path otherwise.

    ``q, k, v`` ``(G, N, W, D)`` blocks -> ``(G, N*W, Dv)``.
    """

    @staticmethod
    def forward(
        ctx: Any, q: Tensor, k: Tensor, v: Tensor, groups: BlockGroups, causal: bool, scale: float
    ) -> Tensor:
        g, n, w, d = q.shape
        flash = flash_parts_available(q) and v.shape[-1] == d
        qb, kb, vb = (t.reshape(g * n, 1, w, t.shape[-1]) for t in (q, k, v))  # a block a row
        o1, l1, aux1 = part_forward(qb, kb, vb, causal, scale, flash)  # (G*N, 1, W, Dv)
        q_rows = groups.per_token_rows(q.reshape(g, n * w, d))[:, None]  # (tiles, 1, T, D)
        k_tiles, v_tiles = groups.blocks(k)[:, None], groups.blocks(v)[:, None]  # (tiles,1,W,D)
        o2, l2, aux2 = part_forward(q_rows, k_tiles, v_tiles, False, scale, flash)
        l2 = groups.per_pair(l2.squeeze(1)[..., None]).squeeze(-1)  # (G, L, k)
        l2 = l2.masked_fill(~groups.has_block, float("-inf"))  # a pair without a block
        parts = torch.cat([l1.reshape(g, n * w, 1), l2], dim=-1)  # (G, L, 1 + k)
        lse = torch.logsumexp(parts, dim=-1)  # (G, L)
        share = (parts - lse[..., None]).exp().to(o1.dtype)  # each part's weight
        o2 = groups.per_pair(o2.squeeze(1))  # (G, L, k, Dv)
        out = o1.reshape(g, n * w, -1) * share[..., :1] + (o2 * share[..., 1:, None]).sum(2)
        ctx.save_for_backward(qb, kb, vb, q_rows, k_tiles, v_tiles, out, lse)
        ctx.groups, ctx.causal, ctx.scale, ctx.info = groups, causal, scale, (flash, aux1, aux2)
        return out

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:
        qb, kb, vb, q_rows, k_tiles, v_tiles, out, lse = ctx.saved_tensors
        groups, scale, info = ctx.groups, ctx.scale, ctx.info
        g, length, dv = out.shape
        gn, _, w, d = qb.shape
        dout = dout.contiguous()
        dq, dk, dv_ = part_backward(
            dout.view(gn, 1, w, dv), qb, kb, vb, out.view(gn, 1, w, dv), lse.view(gn, 1, w),
            ctx.causal, scale, info, part=0,
        )  # fmt: skip
        # the picked part: each pair's row of the merged dout, out and lse, in tiles; an
        # empty row has dout = 0, so it adds nothing
        d_rows, o_rows = (groups.per_token_rows(x)[:, None] for x in (dout, out))
        l_rows = groups.per_token_rows(lse[..., None])[:, None, :, 0]  # (tiles, 1, T)
        dq2, dk2, dv2 = part_backward(
            d_rows, q_rows, k_tiles, v_tiles, o_rows, l_rows, False, scale, info, part=1
        )
        dq = dq.view(g, length, d).add_(groups.per_pair(dq2.squeeze(1)).sum(2))
        dk = dk.view(gn, w, d).index_add_(0, groups.tile_block, dk2.squeeze(1))
        dv_ = dv_.view(gn, w, dv).index_add_(0, groups.tile_block, dv2.squeeze(1))
        shape = (g, gn // g, w)
        return dq.view(*shape, d), dk.view(*shape, d), dv_.view(*shape, dv), None, None, None


def _compressed_branch(
    q_tok: Tensor,
    kb: Tensor,
    vb: Tensor,
    real_kw: Tensor | None,
    scale: float,
    is_causal: bool,
) -> tuple[Tensor, Tensor]:
    """Scores ``(G, N*W, N)`` of each query against every block's mean real key (-inf where
    the block is not a gate candidate: own or later blocks when causal, own block if not,
    blocks without a real key) and the blocks' mean real values ``(G, N, Dv)``."""
    n, w = kb.shape[1:3]
    if real_kw is None:
        count = kb.new_full((1, n, 1), float(w))
        has = torch.ones(1, n, dtype=torch.bool, device=kb.device)
    else:
        count = real_kw.sum(-1, keepdim=True).clamp_min(1).to(kb.dtype)  # (G, N, 1)
        has = real_kw.any(-1)  # (G, N)
    k_mean, v_mean = kb.sum(dim=2) / count, vb.sum(dim=2) / count  # padding is zero already
    scores = torch.einsum("gld,gnd->gln", q_tok, k_mean) * scale  # (G, N*W, N)
    t_blk = torch.arange(n * w, device=kb.device)[:, None] // w  # (N*W, 1)
    j = torch.arange(n, device=kb.device)[None, :]  # (1, N)
    ok = ((j < t_blk) if is_causal else (j != t_blk))[None] & has[:, None, :]  # (G|1, N*W, N)
    return scores.masked_fill(~ok, float("-inf")), v_mean


def _softmax_local_and_selected(
    local: Tensor,
    chosen: Tensor,
    vb: Tensor,
    groups: BlockGroups,
    dropout_p: float,
    summary: tuple[Tensor, Tensor] | None = None,
    *,
    padded: bool = True,
) -> Tensor:
    """One softmax over each query's own-block scores ``(G, N, W, W)``, selected-block
    scores ``(G, N*W, k, W)`` and (``summary``) block-summary scores ``(G, N*W, N)``
    (masked entries -inf), applied to the block values ``vb`` ``(G, N, W, Dv)``, own and
    selected (``groups``: which blocks each query picked), and to the summaries' values
    ``(G, N, Dv)``; a query with no key gets 0 (possible only with ``padded``: padding in
    the keys). Returns ``(G, N*W, Dv)``."""
    w = local.shape[-1]
    parts = [rearrange(local, "g n q k -> g (n q) k"), rearrange(chosen, "g l k w -> g l (k w)")]
    if summary is not None:
        parts.append(summary[0])
    scores = torch.cat(parts, dim=-1)  # (G, N*W, W + k*W [+ N])
    wide = torch.promote_types(vb.dtype, torch.float32)
    probs = torch.softmax(scores.to(wide), dim=-1)
    if padded:  # a padded query may have no key at all: its row is NaN, make it 0
        probs = probs.nan_to_num(0.0)
    probs = probs.to(vb.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    # split, not slices: the backward concatenates the parts' gradients instead of adding
    # each into a zero tensor of the whole width
    p_local, p_sel, *p_summary = probs.split([p.shape[-1] for p in parts], dim=-1)
    p_local = rearrange(p_local, "g (n q) k -> g n q k", q=w)  # (G, N, W, W)
    p_sel = rearrange(p_sel, "g l (k w) -> g l k w", w=w)  # (G, N*W, k, W)
    out = torch.einsum("gnqk,gnkd->gnqd", p_local, vb)  # (G, N, W, Dv)
    out = rearrange(out, "g n q d -> g (n q) d") + groups.mix(p_sel, vb)
    if summary is not None:
        out = out + torch.einsum("gln,gnd->gld", p_summary[0], summary[1])
    return out
