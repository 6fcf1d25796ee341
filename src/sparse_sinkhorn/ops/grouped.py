"""Queries grouped by the key block they read: per-token block selection at GEMM speed.

When every query token picks its own key blocks (MoBA's gate), gathering each token's
``W x D`` keys materialises ``L * k * W * D`` numbers and multiplies them one token at a time.
`BlockGroups` instead sorts the (token, chosen block) pairs by block, cuts each block's
queries into tiles of ``T`` rows, and multiplies every tile by its block once: a batched GEMM
of ``(T, D) x (D, W)`` per tile, with gathers of ``O(L * k * (D + W))`` numbers.

Axes: G batch x heads, L tokens, k picks per token, N key blocks, W block size, D head dim,
P = G * L * k (token, pick) pairs, T tile rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .blocks import num_blocks

TILE = 32  # query rows per tile


def _round_up(n: int) -> int:
    """``n`` rounded up to a multiple of a quarter of its power of two (at least 1)."""
    if n <= 4:
        return max(n, 1)
    step = 1 << (n.bit_length() - 3)
    return num_blocks(n, step) * step


class _Regroup(torch.autograd.Function):
    """``cat([x, 0]).index_select(0, forward)`` whose backward is the same gather with the
    inverse map ``backward``, not a scatter-add: between pairs and tile rows every real entry
    has exactly one place, and an entry mapped to the appended zero row gets no gradient."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, forward: Tensor, backward: Tensor) -> Tensor:
        ctx.save_for_backward(backward)
        return torch.cat([x, x.new_zeros(1, x.shape[-1])]).index_select(0, forward)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (backward,) = ctx.saved_tensors
        grad = torch.cat([grad, grad.new_zeros(1, grad.shape[-1])]).index_select(0, backward)
        return grad, None, None


class _TileBlocks(torch.autograd.Function):
    """``blocks.index_select(0, tile_block)`` (one block per tile) whose backward sums each
    tile's gradient into its block with ``index_add_`` on flat rows: on CPU an order of
    magnitude faster than the scatter-add autograd uses for ``index_select``."""

    @staticmethod
    def forward(ctx: Any, blocks: Tensor, tile_block: Tensor) -> Tensor:
        ctx.save_for_backward(tile_block)
        ctx.shape = blocks.shape
        return blocks.index_select(0, tile_block)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (tile_block,) = ctx.saved_tensors
        flat = grad.reshape(grad.shape[0], -1)
        out = flat.new_zeros(ctx.shape[0], flat.shape[1]).index_add_(0, tile_block, flat)
        return out.view(ctx.shape), None


class BlockGroups:
    """The tiling of ``picked`` ``(G, L, k)`` block indices (-1: no block) over ``n_blocks``
    key blocks per group ``g``. Pairs with no block are left out of every tile (their scores
    are 0; mask them)."""

    def __init__(self, picked: Tensor, n_blocks: int, tile: int | None = None) -> None:
        tile = TILE if tile is None else tile
        g, length, k = picked.shape
        device = picked.device
        self.shape = (g, length, k)
        flat = picked.reshape(-1)  # (P,)
        group = torch.arange(g, device=device).repeat_interleave(length * k)  # (P,)
        real = flat >= 0
        pair = real.nonzero().squeeze(-1)  # (R,) pairs that read a block
        key = group[pair] * n_blocks + flat[pair]  # (R,) the (g, block) each reads
        key, order = torch.sort(key, stable=True)
        pair = pair[order]
        counts = torch.bincount(key, minlength=g * n_blocks)  # (G*N,)
        tiles = num_blocks(counts, tile)  # tiles per (g, block)
        tile_start = torch.cumsum(tiles, 0) - tiles  # first tile of each (g, block)
        pair_start = torch.cumsum(counts, 0) - counts  # first sorted pair of each (g, block)
        rank = torch.arange(len(key), device=device) - pair_start[key]  # rank within its block
        slot = (tile_start[key] + rank // tile) * tile + rank % tile  # (R,) row of the tiles
        # the tile count, rounded up to one of a few sizes (four per octave): a step's shapes
        # repeat across steps, so the allocator reuses its buffers instead of fragmenting
        self.n_tiles = _round_up(int(tiles.sum()))
        self.tile = tile
        # each tile's (g, block) row of a (G*N, ...) block table
        used = torch.repeat_interleave(
            torch.arange(g * n_blocks, device=device), tiles, output_size=int(tiles.sum())
        )
        spare = torch.zeros(self.n_tiles - len(used), dtype=torch.long, device=device)
        self.tile_block = torch.cat([used, spare])  # spare tiles: empty rows, any block
        # tile row -> pair (P for an empty row: a zero row appended to the pair table)
        n_pairs = g * length * k
        self.row_pair = torch.full((self.n_tiles * tile,), n_pairs, dtype=torch.long, device=device)
        self.row_pair[slot] = pair
        # pair -> tile row (a pair without a block reads row n_tiles * tile: a zero row)
        self.pair_row = torch.full((n_pairs,), self.n_tiles * tile, dtype=torch.long, device=device)
        self.pair_row[pair] = slot

    def _rows(self, per_pair: Tensor) -> Tensor:
        """``(P, F)`` -> ``(n_tiles, T, F)``, zeros in empty rows."""
        rows = _Regroup.apply(per_pair, self.row_pair, self.pair_row)
        return rows.view(self.n_tiles, self.tile, per_pair.shape[-1])

    def _pairs(self, per_row: Tensor) -> Tensor:
        """``(n_tiles, T, F)`` -> ``(P, F)``, zeros for pairs without a block."""
        flat = per_row.reshape(self.n_tiles * self.tile, per_row.shape[-1])  # also 0 tiles
        return _Regroup.apply(flat, self.pair_row, self.row_pair)

    def scores(self, q: Tensor, kb: Tensor) -> Tensor:
        """``q`` ``(G, L, D)``, key blocks ``kb`` ``(G, N, W, D)`` -> ``(G, L, k, W)``: each
        token's dot products with the keys of each block it picked (0 where it picked none)."""
        g, length, k = self.shape
        per_pair = q[:, :, None, :].expand(g, length, k, q.shape[-1]).reshape(-1, q.shape[-1])
        keys = _TileBlocks.apply(kb.reshape(-1, *kb.shape[2:]), self.tile_block)  # (tiles, W, D)
        out = torch.bmm(self._rows(per_pair), keys.transpose(1, 2))  # (tiles, T, W)
        return self._pairs(out).view(g, length, k, -1)

    def mix(self, probs: Tensor, vb: Tensor) -> Tensor:
        """``probs`` ``(G, L, k, W)`` over the picked blocks' keys, value blocks ``vb``
        ``(G, N, W, Dv)`` -> ``(G, L, Dv)``: each token's weighted sum of those values."""
        g, length, k = self.shape
        values = _TileBlocks.apply(vb.reshape(-1, *vb.shape[2:]), self.tile_block)  # (tiles, W, Dv)
        rows = self._rows(probs.reshape(-1, probs.shape[-1]))  # (tiles, T, W)
        out = self._pairs(torch.bmm(rows, values))  # (P, Dv)
        return out.view(g, length, k, -1).sum(dim=2)


__all__ = ["TILE", "BlockGroups"]
