"""Contiguous blocking, padding to a multiple of the block size, and masked block pooling.

Axes: B batch, H heads, L length, D feature/head dim, N blocks, W block size (tokens per block).
Block ``i`` always holds positions ``[i*W, (i+1)*W)`` — contiguous, never strided.
"""

from __future__ import annotations

from typing import overload

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


@overload
def num_blocks(length: int, block_size: int) -> int: ...
@overload
def num_blocks(length: Tensor, block_size: int) -> Tensor: ...
def num_blocks(length: int | Tensor, block_size: int) -> int | Tensor:
    """Blocks needed to cover ``length`` tokens (the last one may be partly padding): the
    ceiling of ``length / block_size``, elementwise for an integer tensor of lengths."""
    return -(-length // block_size)


def pad_to_blocks(x: Tensor, block_size: int, *, dim: int = -2) -> Tensor:
    """Zero-pad ``x`` along ``dim`` up to the next multiple of ``block_size`` (no copy if none)."""
    length = x.shape[dim]
    extra = num_blocks(length, block_size) * block_size - length
    if extra == 0:
        return x
    dim = dim % x.dim()
    pad = [0, 0] * (x.dim() - dim - 1) + [0, extra]
    return F.pad(x, pad)


def padded_mask(
    key_padding_mask: Tensor | None, batch: int, length: int, block_size: int, device: torch.device
) -> Tensor | None:
    """The ``(B, N*W)`` bool mask (True = real) after internal padding, or None if all real."""
    padded_len = num_blocks(length, block_size) * block_size
    if key_padding_mask is None and padded_len == length:
        return None
    if key_padding_mask is None:
        key_padding_mask = torch.ones(batch, length, dtype=torch.bool, device=device)
    return pad_to_blocks(key_padding_mask, block_size, dim=-1)  # pads with False


def repeat_kv(x: Tensor, heads: int) -> Tensor:
    """``(B, H_kv, S, E)`` -> ``(B, H, S, E)``: each key/value head serves ``H / H_kv`` heads
    (grouped-query attention; the one place this rule is written)."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def zero_padding(x: Tensor, real: Tensor) -> Tensor:
    """``x`` with every position where ``real`` (broadcastable bool) is False set to exactly 0.

    ``torch.where``, not a multiplication: NaN or Inf at a padded position would survive
    ``x * 0`` (``nan * 0 = nan``) and reach real outputs.
    """
    return torch.where(real, x, x.new_zeros(()))


def check_block_size(block_size: int) -> None:
    """A positive int (the one check of a block size, wherever one is given)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


POOLINGS = ("sum", "mean", "max")  # block_summaries' pooling


def _real_blocks(
    x: Tensor, block_size: int, key_padding_mask: Tensor | None, pooling: str
) -> tuple[Tensor, Tensor | None]:
    """``x`` ``(B, L, D)`` as ``(B, N, W, D)`` blocks with padding set to 0, and the
    ``(B, N*W)`` real mask (None without padding); the summaries' arguments checked."""
    _check_summary_args(x, block_size, key_padding_mask, pooling)
    mask = padded_mask(key_padding_mask, x.shape[0], x.shape[1], block_size, x.device)
    x = pad_to_blocks(x, block_size, dim=1)  # (B, N*W, D)
    if mask is not None:
        x = zero_padding(x, mask[..., None])
    return rearrange(x, "b (n w) d -> b n w d", w=block_size), mask


def _check_summary_args(
    x: Tensor, block_size: int, key_padding_mask: Tensor | None, pooling: str
) -> None:
    """The arguments of [`block_summaries`][sparse_sinkhorn.ops.block_summaries] (skipped while
    ``torch.compile`` traces)."""
    if torch.compiler.is_compiling():
        return
    check_block_size(block_size)
    if not isinstance(x, Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a (B, L, D) tensor, got {shape}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if key_padding_mask is not None and (
        not isinstance(key_padding_mask, Tensor)
        or key_padding_mask.dtype != torch.bool
        or tuple(key_padding_mask.shape) != tuple(x.shape[:2])
    ):
        what = (
            f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            if isinstance(key_padding_mask, Tensor)
            else type(key_padding_mask).__name__
        )
        raise ValueError(
            f"key_padding_mask must be a bool (B, L) = {tuple(x.shape[:2])} tensor, got {what}"
        )


def block_summaries(
    x: Tensor,
    block_size: int,
    *,
    key_padding_mask: Tensor | None = None,
    pooling: str = "sum",
    causal: bool = False,
) -> Tensor:
    """Masked pooling of each contiguous block (docs/method.md §2), or with ``causal`` the
    leak-free query-side summaries of causal routing (docs/method.md §5).

    Row ``i`` of the causal sort matrix is decided at the *first* position of block ``i``, so
    its causal summary may use tokens ``0 .. i*W`` only: the pool of all real tokens up to and
    including position ``i*W``. Any output at position ``t`` in block ``i`` (``t >= i*W``)
    therefore depends on positions ``<= t`` only.

    Args:
        x: ``(B, L, D)``; any ``L`` (padded internally).
        key_padding_mask: ``(B, L)`` bool, True = real token; padding is excluded from the pool.
        pooling: ``"sum"`` (the paper), ``"mean"`` (over the real tokens pooled) or ``"max"``
            (per feature, over the real tokens pooled: one token with a large feature marks
            its block whatever the block size, where a sum or mean dilutes it).
        causal: pool each block's prefix (positions ``<= i*W``) instead of the block.

    Returns:
        ``(B, N, D)``; a pool of no real token is 0.
    """
    blocks, mask = _real_blocks(x, block_size, key_padding_mask, pooling)  # (B, N, W, D)
    return _pooled(x, blocks, mask, block_size, pooling, causal)


def routing_block_summaries(
    x: Tensor,
    block_size: int,
    *,
    key_padding_mask: Tensor | None = None,
    pooling: str = "sum",
    causal: bool = False,
) -> tuple[Tensor, Tensor]:
    """What a sort net reads: ``(B, N, D)`` row and key summaries of ``x`` ``(B, L, D)``, from
    one blocking of ``x`` (the arguments checked once).

    Keys are the masked [`block_summaries`][sparse_sinkhorn.ops.block_summaries]; rows are the
    same, or with ``causal`` the leak-free prefix summaries (row ``i`` sees positions
    ``<= i*W`` only, docs/method.md §5).
    """
    blocks, mask = _real_blocks(x, block_size, key_padding_mask, pooling)  # (B, N, W, D)
    keys = _pooled(x, blocks, mask, block_size, pooling, False)
    if not causal:
        return keys, keys
    return _pooled(x, blocks, mask, block_size, pooling, True), keys


def _pooled(
    x: Tensor, blocks: Tensor, mask: Tensor | None, block_size: int, pooling: str, causal: bool
) -> Tensor:
    """`block_summaries` of ``x`` from its ``(B, N, W, D)`` blocks and ``(B, N*W)`` mask."""
    if pooling == "max":
        return _max_summaries(blocks, mask, block_size, causal)
    if causal:
        # Sum over positions <= i*W: the earlier blocks' sums (an exclusive cumulative sum
        # over N blocks, which never reads block i itself) plus position i*W. Cheaper than a
        # cumulative sum over all L positions, whose backward is three passes over (L, D).
        earlier = blocks[:, :-1].sum(dim=2).cumsum(dim=1)  # (B, N-1, D): blocks 0 .. i-1
        none = x.new_zeros(x.shape[0], 1, x.shape[-1])  # block 0 has no earlier block
        pooled = torch.cat([none, earlier], dim=1) + blocks[:, :, 0]  # (B, N, D)
    else:
        pooled = blocks.sum(dim=2)  # (B, N, D)
    if pooling == "sum":
        return pooled
    if causal and mask is None:
        positions = torch.arange(0, x.shape[1], block_size, device=x.device) + 1  # (N,)
        return pooled / positions[None, :, None].to(x.dtype)
    if mask is None:
        return pooled / block_size
    if causal:
        count = mask.cumsum(dim=1)[:, ::block_size]  # (B, N)
    else:
        count = rearrange(mask, "b (n w) -> b n w", w=block_size).sum(-1)  # (B, N)
    return pooled / count.clamp_min(1)[..., None].to(x.dtype)


def pool(x: Tensor, dim: int, pooling: str) -> Tensor:
    """The running pool a decoding cache keeps of ``x`` over ``dim``: the sum (``"sum"``,
    ``"mean"``) or the max (``"max"``); 0 over no element."""
    if pooling != "max" or x.shape[dim] == 0:
        return x.sum(dim)
    return x.amax(dim)


def pool_add(acc: Tensor, x: Tensor, pooling: str) -> Tensor:
    """A running `pool` with one more token's features ``x`` added."""
    return torch.maximum(acc, x) if pooling == "max" else acc + x


def pool_value(acc: Tensor, count: int, pooling: str) -> Tensor:
    """A running `pool` of ``count`` tokens as
    [`block_summaries`][sparse_sinkhorn.ops.block_summaries] pools them."""
    return acc / count if pooling == "mean" else acc


def _max_summaries(blocks: Tensor, mask: Tensor | None, block_size: int, causal: bool) -> Tensor:
    """``pooling="max"`` of [`block_summaries`][sparse_sinkhorn.ops.block_summaries] on ``(B, N, W,
    D)`` blocks whose padding is 0; a pool of no real token is 0."""
    if mask is not None:
        real = rearrange(mask, "b (n w) -> b n w", w=block_size)[..., None]  # (B, N, W, 1)
        blocks = blocks.masked_fill(~real, float("-inf"))
    pooled = blocks.amax(dim=2)  # (B, N, D)
    if causal:  # positions <= i*W: the earlier blocks' running max and position i*W
        earlier = pooled[:, :-1].cummax(dim=1).values  # (B, N-1, D): blocks 0 .. i-1
        first = blocks[:, :, 0]  # (B, N, D): position i*W
        pooled = torch.cat([first[:, :1], torch.maximum(earlier, first[:, 1:])], dim=1)
    return pooled.masked_fill(pooled == float("-inf"), 0.0)


def block_validity(mask: Tensor | None, block_size: int) -> Tensor | None:
    """``(B, N)`` bool: True where a block holds at least one real token (mask is padded)."""
    if mask is None:
        return None
    return rearrange(mask, "b (n w) -> b n w", w=block_size).any(dim=-1)
