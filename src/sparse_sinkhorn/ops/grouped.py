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
    """``x.index_select(0, forward)`` with the rows ``forward_empty`` set to 0, whose backward
    is the same gather with the inverse map (``backward``, ``backward_empty``), not a
    scatter-add: between pairs and tile rows every real entry has exactly one place, and an
    empty entry gets no gradient."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        forward: Tensor,
        forward_empty: Tensor,
        backward: Tensor,
        backward_empty: Tensor,
    ) -> Tensor:
        ctx.save_for_backward(backward, backward_empty)
        return _gather_rows(x, forward, forward_empty)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        backward, backward_empty = ctx.saved_tensors
        return _gather_rows(grad, backward, backward_empty), None, None, None, None


def _gather_rows(x: Tensor, index: Tensor, empty: Tensor) -> Tensor:
    """``x.index_select(0, index)`` with the rows listed in ``empty`` zeroed (whatever ``x``
    holds at the row they point to, NaN included)."""
    return x.index_select(0, index).index_fill_(0, empty, 0.0)


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


def _unlisted(listed: Tensor, n: int) -> Tensor:
    """The indices in ``range(n)`` that ``listed`` (distinct indices) does not hold."""
    free = torch.ones(n, dtype=torch.bool, device=listed.device)
    free[listed] = False
    return free.nonzero().squeeze(-1)


class BlockGroups:
    """The tiling of ``picked`` ``(G, L, k)`` block indices (-1: no block) over ``n_blocks``
    key blocks per group ``g``. Pairs with no block are left out of every tile (their scores
    are 0; mask them)."""

    def __init__(self, picked: Tensor, n_blocks: int, tile: int | None = None) -> None:
        tile = TILE if tile is None else tile
        g, length, k = picked.shape
        device = picked.device
        self.shape = (g, length, k)
        self.has_block = picked >= 0  # (G, L, k)
        flat = picked.reshape(-1)  # (P,)
        group = torch.arange(0, g * n_blocks, n_blocks, device=device)  # (G,) g's first key
        group = group[:, None].expand(g, length * k).reshape(-1)  # (P,)
        # the (g, block) each pair reads; pairs without a block sort last (key G*N)
        key = torch.where(flat >= 0, group + flat, g * n_blocks)
        key, pair = torch.sort(key, stable=True)
        n_real = int(self.has_block.sum())
        key, pair = key[:n_real], pair[:n_real]  # (R,) the pairs that read a block
        counts = torch.bincount(key, minlength=g * n_blocks)  # (G*N,)
        tiles = num_blocks(counts, tile)  # tiles per (g, block)
        tile_start = torch.cumsum(tiles, 0) - tiles  # first tile of each (g, block)
        pair_start = torch.cumsum(counts, 0) - counts  # first sorted pair of each (g, block)
        rank = torch.arange(len(key), device=device) - pair_start[key]  # rank within its block
        slot = tile_start[key] * tile + rank  # (R,) row of the tiles: a block's tiles are
        # consecutive, so its r-th pair sits r rows after its first tile's first row
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
        # tile row -> pair, and the rows without a pair (zeros)
        n_pairs, n_rows = g * length * k, self.n_tiles * tile
        self.row_pair = torch.zeros(n_rows, dtype=torch.long, device=device)
        self.row_pair[slot] = pair
        self.empty_rows = _unlisted(slot, n_rows)
        # pair -> tile row, and the pairs without a block (zeros)
        self.pair_row = torch.zeros(n_pairs, dtype=torch.long, device=device)
        self.pair_row[pair] = slot
        self.blockless_pairs = _unlisted(pair, n_pairs)

    def _rows(self, per_pair: Tensor) -> Tensor:
        """``(P, F)`` -> ``(n_tiles, T, F)``, zeros in empty rows (differentiable)."""
        rows = _Regroup.apply(
            per_pair, self.row_pair, self.empty_rows, self.pair_row, self.blockless_pairs
        )
        return rows.view(self.n_tiles, self.tile, per_pair.shape[-1])

    def _pairs(self, per_row: Tensor) -> Tensor:
        """``(n_tiles, T, F)`` -> ``(P, F)``, zeros for pairs without a block."""
        flat = per_row.reshape(self.n_tiles * self.tile, per_row.shape[-1])  # also 0 tiles
        return _Regroup.apply(
            flat, self.pair_row, self.blockless_pairs, self.row_pair, self.empty_rows
        )

    def per_token_rows(self, x: Tensor) -> Tensor:
        """``(G, L, F)`` per token -> ``(n_tiles, T, F)``: each (token, pick) pair's copy of
        its token's row in its tile row, zeros in empty rows."""
        g, length, k = self.shape
        per_pair = x[:, :, None, :].expand(g, length, k, x.shape[-1]).reshape(-1, x.shape[-1])
        return self._rows(per_pair)

    def blocks(self, xb: Tensor) -> Tensor:
        """``(G, N, W, F)`` blocks -> ``(n_tiles, W, F)``: each tile's block
        (differentiable: the backward sums each tile's gradient into its block)."""
        return _TileBlocks.apply(xb.reshape(-1, *xb.shape[2:]), self.tile_block)

    def scores(self, q: Tensor, kb: Tensor) -> Tensor:
        """``q`` ``(G, L, D)``, key blocks ``kb`` ``(G, N, W, D)`` -> ``(G, L, k, W)``: each
        token's dot products with the keys of each block it picked (0 where it picked none)."""
        out = torch.bmm(self.per_token_rows(q), self.blocks(kb).transpose(1, 2))  # (tiles, T, W)
        return self.per_pair(out)

    def mix(self, probs: Tensor, vb: Tensor) -> Tensor:
        """``probs`` ``(G, L, k, W)`` over the picked blocks' keys, value blocks ``vb``
        ``(G, N, W, Dv)`` -> ``(G, L, Dv)``: each token's weighted sum of those values."""
        rows = self._rows(probs.reshape(-1, probs.shape[-1]))  # (tiles, T, W)
        return self.per_pair(torch.bmm(rows, self.blocks(vb))).sum(dim=2)  # (G, L, Dv)

    def per_pair(self, per_row: Tensor) -> Tensor:
        """``(n_tiles, T, F)`` -> ``(G, L, k, F)``, zeros for pairs without a block
        (differentiable)."""
        return self._pairs(per_row).view(*self.shape, per_row.shape[-1])


__all__ = ["TILE", "BlockGroups"]
