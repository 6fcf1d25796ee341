"""MoBA's top-k block attention on PyTorch's FlexAttention: the gate's choice as a block mask.

[`topk_block_attention`][sparse_sinkhorn.ops.topk_block_attention] multiplies the picked blocks
with the project's own grouped kernels by default (forward and backward on every device); with
``backend="flex"`` it hands the same problem to ``torch.nn.attention.flex_attention`` through
`flex_attend`, whose compiled kernels (CUDA) skip the tiles no query of a tile reads and
evaluate the per-token mask inside the rest. It is the GPU path: in torch 2.13 FlexAttention has
no backward on the CPU, where it runs un-compiled (every score materialised), forward only.

Axes: B batch, H heads, H_kv key/value heads, L length, N blocks, W block size, k picks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .baselines import _drop_padding
from .blocks import check_block_size
from .validate import check_mask, check_tensor


def topk_block_mask(
    picks: Tensor,
    *,
    block_size: int,
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
) -> BlockMask:
    """The FlexAttention block mask of "own block (causal triangle) or a picked block".

    Args:
        picks: ``(B, H, L, k)`` integer block indices, -1 for none (what
            [`topk_block_selection`][sparse_sinkhorn.ops.topk_block_selection] returns).
        key_padding_mask: ``(B, L)`` bool, True = real key; a padded key is never read.

    Returns:
        a ``BlockMask`` over ``(L, L)`` whose ``mask_mod`` is exact per token (its tiles of
        FlexAttention's default size only decide which tiles the kernel visits). It reads
        ``picks`` itself (O(L·k) memory, not an ``(L, N)`` table); on CUDA the mask is built
        by ``create_block_mask`` compiled once per process.
    """
    check_block_size(block_size)
    check_tensor("picks", picks)
    if picks.dim() != 4 or picks.dtype.is_floating_point or picks.dtype == torch.bool:
        raise ValueError(
            f"picks must be a (B, H, L, k) integer tensor, got {tuple(picks.shape)} {picks.dtype}"
        )
    batch, heads, length, _ = picks.shape
    check_mask(key_padding_mask, (batch, length), picks.device)
    mask_mod = topk_mask_mod(
        picks, block_size=block_size, is_causal=is_causal, key_padding_mask=key_padding_mask
    )
    build = _compiled_block_mask() if picks.is_cuda else create_block_mask
    return build(mask_mod, batch, heads, length, length, device=picks.device)


def topk_mask_mod(
    picks: Tensor, *, block_size: int, is_causal: bool, key_padding_mask: Tensor | None
) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """`topk_block_mask`'s ``mask_mod(b, h, q_idx, kv_idx)``: one ``(B, H, L)`` tensor per
    pick, indexed by the (vmapped) indices only, so ``torch.compile`` traces it."""
    w, real = block_size, key_padding_mask
    columns = picks.unbind(-1)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        block = kv_idx // w
        keep = (q_idx // w) == block
        if is_causal:
            keep = keep & (kv_idx <= q_idx)
        for column in columns:  # a pick of -1 matches no block
            keep = keep | (column[b, h, q_idx] == block)
        return keep if real is None else keep & real[b, kv_idx]

    return mask_mod


def flex_attend(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    picks: Tensor,
    *,
    block_size: int,
    is_causal: bool,
    key_padding_mask: Tensor | None,
    scale: float | None,
) -> Tensor:
    """Attention of ``query`` ``(B, H, L, E)`` under `topk_block_mask` of ``picks``, on
    FlexAttention: ``flex_attention`` compiled (once per process) on CUDA, where it trains;
    un-compiled and forward only on the CPU, where inputs that need a gradient are refused.
    ``key``/``value``: ``(B, H_kv, L, E)``, their padded positions not read (NaN included)."""
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if wants_grad and not query.is_cuda:
        raise NotImplementedError(
            "topk_block_attention(backend='flex'): FlexAttention has no backward on the CPU in "
            "this torch; train with backend='grouped' (the same attention), or run under "
            "torch.no_grad()"
        )
    mask = topk_block_mask(
        picks, block_size=block_size, is_causal=is_causal, key_padding_mask=key_padding_mask
    )
    if key_padding_mask is not None:  # no padded value (NaN included) reaches a real output
        key, value = _drop_padding(key, value, key_padding_mask)
    if not query.is_cuda:  # no gradient is wanted; torch's CPU path refuses any requires_grad
        query, key, value = query.detach(), key.detach(), value.detach()
    attend = _compiled_flex() if query.is_cuda else flex_attention
    out = attend(
        query, key, value, block_mask=mask, scale=scale, enable_gqa=key.shape[1] != query.shape[1]
    )
    assert isinstance(out, Tensor)
    return out


@functools.cache
def _compiled_block_mask() -> Any:
    """``create_block_mask`` compiled once per process (CUDA)."""
    return torch.compile(create_block_mask)


@functools.cache
def _compiled_flex() -> Any:
    """``flex_attention`` compiled once per process (CUDA)."""
    return torch.compile(flex_attention)


__all__ = ["flex_attend", "topk_block_mask", "topk_mask_mod"]
