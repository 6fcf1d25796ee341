"""The decoding state of a converted layer whose sequences share their positions (no padding):
one new token per step at the cost of a block, one routing row per block (see
`sparse_sinkhorn.hf`, "Decoding"). Padded batches, whose sequences sit at different block
phases, decode through `sparse_sinkhorn.nn.cache.SequenceRouting`.

Axes: B batch, H heads, H_kv key/value heads (``G = H / H_kv`` each), T positions so far,
E head dim, D routing-input features, N blocks, W block size.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor
from torch.nn import functional as F

from ..nn.config import AttentionConfig
from ..nn.sortnet import SortNet, routing_summaries
from ..ops.blocks import num_blocks, pool, pool_add, pool_value
from ..ops.decode import ROW_LOCAL, attend_token, sorted_row


class BlockRouting:
    """Running routing state of one causal Sinkhorn layer for a batch without padding.

    Per token: the running pools of the routing input, one key/value written into a
    ``(B, H, 2W, E)`` buffer (the block's sorted keys/values in slots ``[0, W)``, the block's
    own keys/values so far, one copy per query head, in ``[W, 2W)``), and one attention over
    ``W + offset + 1`` of its slots. At a block's first token: the routing row of that block
    (with a balancing in `ROW_LOCAL`, the sort net on one row summary against the ``i`` key
    summaries, O(N·D); otherwise the prefix-causal plan of the ``(i+1) x (i+1)`` prefix) and
    the sorted keys/values it mixes from the cache's first ``i*W`` positions, read in place.

    Attributes:
        t: positions seen (the next token's position).
        rows, keys: ``(B, cap, D)`` routing-row summary of each block started / key summary
            of each complete block.
        x_sum, block_sum: ``(B, D)`` running pools over all positions / the current block.
    """

    def __init__(self, config: AttentionConfig, sort_net: SortNet) -> None:
        self.config, self.sort_net = config, sort_net
        self.options = config.op_options(is_causal=True)
        self.dtype = next(sort_net.parameters()).dtype  # what the sort net reads
        self.t = 0

    def prefill(
        self, k: Tensor, v: Tensor, x: Tensor, summaries: tuple[Tensor, Tensor] | None = None
    ) -> None:
        """Start from a prefix: ``k, v`` ``(B, H_kv, T, E)``, its routing input ``x``
        ``(B, T, D)`` and, when the caller has them, its causal `routing_summaries`."""
        w, pooling = self.config.block_size, self.config.pooling
        batch, kv_heads, length, e = k.shape
        heads = self.sort_net.n_heads
        started, complete = num_blocks(length, w), length // w
        rows, keys = summaries or routing_summaries(x, w, causal=True, pooling=pooling)
        cap = started + 2
        self.rows = x.new_zeros(batch, cap, x.shape[-1])
        self.keys = x.new_zeros(batch, cap, x.shape[-1])
        self.rows[:, :started], self.keys[:, :complete] = rows[:, :started], keys[:, :complete]
        self.x_sum = pool(x, 1, pooling)
        self.block_sum = pool(x[:, complete * w :], 1, pooling)
        self.buf_k = k.new_zeros(batch, heads, 2 * w, e)
        self.buf_v = v.new_zeros(batch, heads, 2 * w, e)
        # the block's own slots, seen per key/value head: (B, H_kv, G, W, E) views
        self.local_k = self.buf_k[:, :, w:].unflatten(1, (kv_heads, heads // kv_heads))
        self.local_v = self.buf_v[:, :, w:].unflatten(1, (kv_heads, heads // kv_heads))
        tail = length - complete * w
        self.local_k[:, :, :, :tail] = k[:, :, None, complete * w :]
        self.local_v[:, :, :, :tail] = v[:, :, None, complete * w :]
        self.keep: Tensor | None = None
        self.t = length
        if tail:  # the next token continues block `complete`, already routed
            self._route(complete, k, v)

    def step(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        x: Tensor,
        cache: tuple[Tensor, Tensor],
        scale: float | None,
    ) -> Tensor:
        """Attend from one new token and add it to the state.

        Args:
            q: ``(B, H, 1, E)``; k, v: ``(B, H_kv, 1, E)`` the new token's projections.
            x: ``(B, D)`` its routing input.
            cache: the keys and values ``(B, H_kv, >= t, E)`` of the earlier positions (a
                static cache's slice is fine); read only at a block's first token.
            scale: the attention scale (None: ``E**-0.5``).

        Returns:
            ``(B, H, 1, E)``: the full causal forward's output at the new token.
        """
        w, pooling = self.config.block_size, self.config.pooling
        t = self.t
        block, offset = divmod(t, w)
        self.x_sum = pool_add(self.x_sum, x, pooling)
        self.block_sum = x if offset == 0 else pool_add(self.block_sum, x, pooling)
        self.local_k[:, :, :, offset] = k[:, :, None, 0]
        self.local_v[:, :, :, offset] = v[:, :, None, 0]
        if offset == 0:  # the first token of a block decides its routing row
            if block + 1 >= self.rows.shape[1]:  # room for one more block
                self.rows = torch.cat([self.rows, torch.zeros_like(self.rows)], 1)
                self.keys = torch.cat([self.keys, torch.zeros_like(self.keys)], 1)
            self.rows[:, block] = pool_value(self.x_sum, t + 1, pooling)
            self._route(block, *cache)
        if offset == w - 1:  # the block is complete: its key summary is final
            self.keys[:, block] = pool_value(self.block_sum, w, pooling)
        self.t = t + 1
        end = w + offset + 1
        first = w if block == 0 else 0  # block 0 receives no sorted block
        keys, values = self.buf_k[:, :, first:end], self.buf_v[:, :, first:end]
        if self.keep is None:  # every slot holds a key: plain attention
            return F.scaled_dot_product_attention(q, keys, values, scale=scale)
        return attend_token(q, keys, values, self.keep[..., first:end], scale)

    def _route(self, block: int, k: Tensor, v: Tensor) -> None:
        """Row ``block`` of the causal plan -> the sorted slots of the buffer; ``k, v``
        ``(B, H_kv, >= block*W, E)`` the earlier positions."""
        self.keep = None
        if block == 0:
            return
        w = self.config.block_size
        logits = route_logits(self.sort_net, self.rows, self.keys, block, self.config.balance)
        sorted_k, sorted_v, weight = sorted_row(logits.to(k.dtype), block, k, v, self.options)
        self.buf_k[:, :, :w] = sorted_k
        self.buf_v[:, :, :w] = sorted_v
        if not bool((weight > 0).all()):  # a row with no weight: its sorted slots are masked
            keep = torch.ones(*weight.shape, 1, 2 * w, dtype=torch.bool, device=weight.device)
            keep[..., :w] = (weight > 0)[:, :, None, None]
            self.keep = keep


def route_logits(sort_net: SortNet, rows: Tensor, keys: Tensor, block: int, balance: str) -> Tensor:
    """The routing logits that decide row ``block`` (``i``) of the causal plan.

    Args:
        rows: ``(B, >= i+1, D)`` routing-row summaries; keys: ``(B, >= i, D)`` key summaries
            of the complete blocks (column ``i``, the block itself, is masked in the plan).

    Returns:
        with ``balance`` in `ROW_LOCAL`, row ``i`` alone, ``(B, H, 1, i+1)``, equal to row
        ``i`` of ``sort_net(rows, keys)``; otherwise the ``(B, H, i+1, i+1)`` prefix.
    """
    keys = torch.cat([keys[:, :block], torch.zeros_like(keys[:, :1])], dim=1)  # (B, i+1, D)
    if balance not in ROW_LOCAL:
        return sort_net(rows[:, : block + 1], keys)
    row = rows[:, block : block + 1]  # (B, 1, D)
    if sort_net.kind == "bilinear":
        return sort_net(row, keys)  # scores any number of rows against the keys
    n = block + 1
    if sort_net.max_blocks is None or n > sort_net.max_blocks:
        return sort_net(rows[:, :n], keys)[:, :, block : block + 1]  # its own length error
    assert sort_net.net is not None  # hf.convert refuses the parameter-free projected nets
    scores = rearrange(sort_net.net(row), "b n (h m) -> b h n m", h=sort_net.n_scored)
    return scores[..., :n].expand(-1, sort_net.n_heads, -1, -1)  # as SortNet.forward slices


__all__ = ["BlockRouting", "route_logits"]
