"""Decoding state of a causal Sinkhorn layer over a left-padded batch (`SequenceRouting`, the
Hugging Face decoding path's), and the routing of one block from running summaries
(`route_block`, shared with the per-layer cache `sparse_sinkhorn.nn.cache`).

Axes: B batch, H heads, H_kv key/value heads, T tokens seen so far, E head dim, D model dim,
N blocks, W block size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.blocks import num_blocks, pool, pool_add, pool_value
from ..ops.decode import local_and_sorted_token, sorted_row
from ..ops.options import SinkhornOptions
from .config import AttentionConfig
from .sortnet import SortNet, routing_summaries


class SequenceRouting:
    """Decoding state of one causal Sinkhorn layer whose sequences sit at different positions
    (a left-padded batch): each sequence has its own block boundaries, counted from its own
    first real token (the positions the full forward uses after moving real tokens first).

    One token per sequence per `step`, at O(W + N) per head, plus one routing row per
    sequence at its blocks' first tokens (a sort net on that sequence's ``i+1`` summaries and
    the prefix-causal plan; its sorted keys/values mix the ``i`` earlier, complete blocks). The
    routing input ``x`` is whatever the layer's sort net summarises (``D`` features per token).

    Attributes:
        count: ``(B,)`` real tokens seen per sequence (the next token's position ``r``).
        x_sum, block_sum: ``(B, D)`` running pools of ``x`` over all real tokens / the current
            block.
        rows, keys: ``(B, cap, D)`` routing-row summary of each block started / key summary
            of each complete block (zeros beyond a sequence's own count).
        block_k, block_v: ``(B, H_kv, W, E)`` the current block's keys/values (slot = offset).
        sorted_k, sorted_v: ``(B, H, W, E)`` the current block's sorted keys/values.
        sorted_ok: ``(B, H, W)`` bool, which sorted slots hold weight (none in block 0).
    """

    def __init__(self, config: AttentionConfig, sort_net: SortNet) -> None:
        self.config, self.sort_net = config, sort_net
        self.options = config.op_options(is_causal=True)
        self.count: Tensor | None = None

    def prefill(self, k: Tensor, v: Tensor, x: Tensor, real: Tensor | None) -> None:
        """Start from a prefix: ``k, v`` ``(B, H_kv, T, E)``, ``x`` ``(B, T, D)``, ``real``
        ``(B, T)`` bool (None: every position is real)."""
        w, pooling = self.config.block_size, self.config.pooling
        batch, kv_heads, length, e = k.shape
        heads = self.sort_net.n_heads
        d = x.shape[-1]
        if real is None:
            real = torch.ones(batch, length, dtype=torch.bool, device=k.device)
        count = real.sum(1)  # (B,)
        cap = num_blocks(max(int(count.max()), 1) + 1, w) + 1
        self.count = count.clone()
        self.x_sum = x.new_zeros(batch, d)
        self.block_sum = x.new_zeros(batch, d)
        self.rows = x.new_zeros(batch, cap, d)
        self.keys = x.new_zeros(batch, cap, d)
        self.block_k = k.new_zeros(batch, kv_heads, w, e)
        self.block_v = v.new_zeros(batch, kv_heads, w, e)
        self.sorted_k = k.new_zeros(batch, heads, w, e)
        self.sorted_v = v.new_zeros(batch, heads, w, e)
        self.sorted_ok = torch.zeros(batch, heads, w, dtype=torch.bool, device=k.device)
        for b in range(batch):
            r = int(count[b])
            if r == 0:
                continue
            idx = real[b].nonzero()[:, 0]  # (r,): the sequence's real positions, in order
            xb = x[b, idx][None]  # (1, r, D)
            started, complete = num_blocks(r, w), r // w
            self.x_sum[b] = pool(xb[0], 0, pooling)
            self.block_sum[b] = pool(xb[0, complete * w :], 0, pooling)
            rows, keys = routing_summaries(xb, w, causal=True, pooling=pooling)
            self.rows[b, :started], self.keys[b, :complete] = rows[0, :started], keys[0, :complete]
            tail = idx[complete * w :]
            self.block_k[b, :, : tail.numel()] = k[b, :, tail]
            self.block_v[b, :, : tail.numel()] = v[b, :, tail]
            if r % w:  # the next token continues block `complete`, already routed
                self._route(b, complete, k[b, :, idx], v[b, :, idx])

    def step(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        x: Tensor,
        prefix: tuple[Tensor, Tensor, Tensor | None],
        scale: float | None,
    ) -> Tensor:
        """Attend from one new real token per sequence and add it to the state.

        Args:
            q: ``(B, H, 1, E)``; k, v: ``(B, H_kv, 1, E)`` the new token's projections.
            x: ``(B, D)`` its routing input.
            prefix: the keys, values ``(B, H_kv, T, E)`` of every position (the new one
                last) and their ``(B, T)`` real mask (None: all real); read only at a
                block's first token, to mix the earlier blocks.
            scale: the attention scale (None: ``E**-0.5``).

        Returns:
            ``(B, H, 1, E)``: the full causal forward's output at the new token.
        """
        assert self.count is not None, "prefill first"
        w, pooling = self.config.block_size, self.config.pooling
        r = self.count  # (B,) the new token's position per sequence
        offset = r % w
        if int(r.max()) // w + 1 >= self.rows.shape[1]:  # room for one more block
            self.rows = torch.cat([self.rows, torch.zeros_like(self.rows)], 1)
            self.keys = torch.cat([self.keys, torch.zeros_like(self.keys)], 1)
        start = offset == 0  # (B,) sequences whose new token opens a block
        self.x_sum = torch.where((r == 0)[:, None], x, pool_add(self.x_sum, x, pooling))
        self.block_sum = torch.where(start[:, None], x, pool_add(self.block_sum, x, pooling))
        batch = torch.arange(r.shape[0], device=r.device)
        self.block_k[batch, :, offset] = k[:, :, 0]
        self.block_v[batch, :, offset] = v[:, :, 0]
        for b in start.nonzero()[:, 0].tolist():
            i = int(r[b]) // w
            row = pool_value(self.x_sum[b], int(r[b]) + 1, pooling)
            self.rows[b, i] = row
            keys, values, real = prefix
            idx = real[b].nonzero()[:, 0] if real is not None else None
            kb = keys[b] if idx is None else keys[b, :, idx]
            vb = values[b] if idx is None else values[b, :, idx]
            self._route(b, i, kb, vb)
        done = offset == w - 1  # (B,) blocks completed by the new token
        if bool(done.any()):
            key = pool_value(self.block_sum, w, pooling)
            self.keys[batch, r // w] = torch.where(done[:, None], key, self.keys[batch, r // w])
        self.count = r + 1
        local_ok = torch.arange(w, device=q.device)[None, :] <= offset[:, None]  # (B, W)
        local = (self.block_k, self.block_v, local_ok[:, None, None, :])
        sorted_ = (self.sorted_k, self.sorted_v, self.sorted_ok[:, :, None, :])
        return local_and_sorted_token(q, local, sorted_, scale)

    def _route(self, b: int, block: int, k: Tensor, v: Tensor) -> None:
        """Routing row ``block`` of sequence ``b`` -> its sorted keys/values; ``k, v``
        ``(H_kv, r, E)`` the sequence's real keys/values in order (``r >= block * W``)."""
        self.sorted_k[b] = 0
        self.sorted_v[b] = 0
        self.sorted_ok[b] = False
        if block == 0:
            return  # block 0 receives no sorted block
        sorted_k, sorted_v, weight = route_block(
            block,
            self.rows[b : b + 1],
            self.keys[b : b + 1],
            k[None],
            v[None],
            self.options,
            self.sort_net,
            logits_dtype=k.dtype,
        )
        self.sorted_k[b], self.sorted_v[b] = sorted_k[0], sorted_v[0]
        self.sorted_ok[b] = (weight[0] > 0)[:, None]


def route_block(
    block: int,
    rows: Tensor,
    keys: Tensor,
    k: Tensor,
    v: Tensor,
    options: SinkhornOptions,
    sort_net: SortNet,
    *,
    logits_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Row ``block`` (``i >= 1``) of the causal plan from the running summaries -> block
    ``i``'s sorted keys, values and row weight (`sorted_row`).

    Args:
        rows: ``(B, >= i+1, D)`` routing-row summaries; keys: ``(B, >= i, D)`` key summaries
            of the complete blocks.
        k, v: ``(B, H_kv, >= i*W, E)`` keys/values of the earlier blocks, in block order.
        options: the op's options of a causal eval step (`AttentionConfig.op_options`).
        logits_dtype: cast the sort logits to it before balancing (None: keep them).
    """
    rows = rows[:, : block + 1]  # (B, i+1, D)
    keys = keys[:, :block]  # (B, i, D): complete earlier blocks
    keys = torch.cat([keys, torch.zeros_like(keys[:, :1])], dim=1)  # column i: masked
    logits = sort_net(rows, keys)  # (B, H, i+1, i+1)
    if logits_dtype is not None:
        logits = logits.to(logits_dtype)
    return sorted_row(logits, block, k, v, options)


__all__ = ["SequenceRouting", "route_block"]
