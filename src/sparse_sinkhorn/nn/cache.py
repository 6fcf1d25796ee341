"""Incremental decoding: a per-layer cache whose step-by-step outputs equal the full causal
forward exactly (eval mode), for Sinkhorn attention and every baseline.

Axes: B batch, H heads, T tokens seen so far, E head dim, D model dim, N blocks, W block size.

Why this works for causal Sinkhorn attention (docs/method.md §5):

* the routing row of query block ``i`` reads the prefix summary of the layer input up to and
  including position ``i*W`` ([`block_summaries`][sparse_sinkhorn.ops.block_summaries], causal), so
  it is known as soon as the first token of block ``i`` arrives; key block ``j < i`` is
  summarised whole and is complete by then;
* prefix-causal balancing makes row ``i`` of ``P`` depend on logit rows ``<= i`` only, so the
  row computed from the ``(i+1) x (i+1)`` prefix equals row ``i`` of the full plan; it is
  computed once per block, and with it the sorted keys/values ``sum_{j<i} P_ij K_j`` of block
  ``i`` (which mix only earlier, complete blocks);
* the local half is the causal triangle inside block ``i``: the cached keys of positions
  ``i*W .. t``.

Dense, local, sparse and mixture layers keep the keys and values of every position and apply
their causal mask row for the new query. A [`DecodingCache`][sparse_sinkhorn.nn.DecodingCache]
holds one
[`AttentionCache`][sparse_sinkhorn.nn.AttentionCache] per decoder layer; the first call (``length
== 0``) runs the ordinary
full forward on the prompt and fills the cache from it (so a prompt's outputs are the full
forward's), later calls add tokens one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..ops.blocks import num_blocks, pool, pool_add, pool_value
from ..ops.decode import attend_token, check_decodable, local_and_sorted_token
from ..ops.options import SinkhornOptions
from .config import AttentionConfig
from .kinds import KINDS
from .routing import Routing
from .sequence_routing import SequenceRouting, route_block
from .sortnet import SortNet, routing_summaries


@dataclass
class AttentionCache:
    """Decoding state of one causal self-attention layer (mutable; one per layer).

    Attributes:
        k, v: ``(B, H_kv, T, E)`` keys and values of every position seen so far; ``H_kv``
            may divide the query heads ``H`` (grouped-query attention: the cache keeps the
            ``H_kv`` heads, each serving ``H / H_kv`` query heads).
        x_sum: ``(B, D)`` running pool (`pool`) of the layer
            inputs seen so far (causal row summaries).
        block_sum: ``(B, D)`` running pool of the layer inputs of the current block.
        row_summaries: ``(B, n, D)`` routing-row summary of each block started so far.
        key_summaries: ``(B, m, D)`` summary of each complete block.
        sorted_k, sorted_v: ``(B, H, W, E)`` the current block's sorted keys/values, or None
            (block 0, which receives no sorted block, or before the block's first token).
        sorted_ok: ``(B, H, 1, W)`` bool, which sorted slots hold some weight.
        config, sort_net: the layer's, kept by `prefill`.
        options: the op's options of a causal eval step (routed kinds), built by `prefill`.
        source: the cache whose summaries and sort net route this layer's blocks when that
            is another layer's (`Routing.source`: the first layer's, for a later layer under
            ``shared_routing="layers"``); this cache then keeps no summaries of its own.
            None: the layer routes itself. Set by `DecodingCache.follow`.
    """

    k: Tensor | None = None
    v: Tensor | None = None
    x_sum: Tensor | None = None
    block_sum: Tensor | None = None
    row_summaries: Tensor | None = None
    key_summaries: Tensor | None = None
    sorted_k: Tensor | None = None
    sorted_v: Tensor | None = None
    sorted_ok: Tensor | None = None
    config: AttentionConfig | None = None
    sort_net: SortNet | None = None
    options: SinkhornOptions | None = None
    source: AttentionCache | None = None

    @property
    def length(self) -> int:
        """Tokens seen so far ``T``."""
        return 0 if self.k is None else int(self.k.shape[2])

    def prefill(
        self,
        k: Tensor,
        v: Tensor,
        x: Tensor,
        config: AttentionConfig,
        sort_net: SortNet | None,
    ) -> None:
        """Fill an empty cache from a whole prompt (its outputs come from the full forward).

        Args:
            k, v: ``(B, H, L, E)`` keys and values of the prompt.
            x: ``(B, L, D)`` the layer input (what the sort net summarises).
        """
        if self.length:
            raise RuntimeError("prefill needs an empty cache")
        self.k, self.v, self.config, self.sort_net = k, v, config, sort_net
        if not config.uses_sorting:
            return
        check_decodable(config.balance)  # before anything is routed
        self.options = config.op_options(is_causal=True)
        w, length = config.block_size, x.shape[1]
        started, complete = num_blocks(length, w), length // w  # blocks begun / finished
        if self.source is not None:  # routed by another layer's cache (Routing.source)
            if length % w:
                self._route_block(complete)
            return
        self.x_sum = pool(x, 1, config.pooling)  # (B, D)
        self.block_sum = pool(x[:, complete * w :], 1, config.pooling)  # (B, D); 0 when none
        rows, keys = routing_summaries(x, w, causal=True, pooling=config.pooling)
        self.row_summaries, self.key_summaries = rows[:, :started], keys[:, :complete]
        if length % w:  # the next token continues block `complete`, already routed
            self._route_block(complete)

    def step(self, q: Tensor, k: Tensor, v: Tensor, x: Tensor) -> Tensor:
        """Attend from new tokens, one at a time, updating the cache (after `prefill`).

        Args:
            q, k, v: ``(B, H, L, E)`` the new tokens' projections.
            x: ``(B, L, D)`` their layer inputs.

        Returns:
            ``(B, H, L, E)``: what the full causal forward gives at those positions.
        """
        assert self.config is not None, "prefill first"
        outs = []
        for t in range(q.shape[2]):
            one = (q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1])
            if self.config.uses_sorting:
                outs.append(self._step_sorting(*one, x[:, t], self.config))
            else:
                outs.append(self._step_baseline(*one, self.config))
        return torch.cat(outs, dim=2)

    def _append(self, k: Tensor, v: Tensor) -> int:
        """Add one position's ``(B, H, 1, E)`` key/value; returns its position ``t``."""
        t = self.length
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)  # (B, H, T+1, E)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return t

    def _step_baseline(self, q: Tensor, k: Tensor, v: Tensor, config: AttentionConfig) -> Tensor:
        """One token of a kind without routing (dense, local, sparse, topk): its registry
        decoding step on every cached key (`Kind.decode`)."""
        decode = KINDS[config.kind].decode
        if decode is None:
            raise ValueError(f"no cached decoding step for attention kind {config.kind!r}")
        self._append(k, v)
        assert self.k is not None and self.v is not None
        return decode(config, q, self.k, self.v)

    def _step_sorting(
        self, q: Tensor, k: Tensor, v: Tensor, x: Tensor, config: AttentionConfig
    ) -> Tensor:
        """One token of Sinkhorn (or mixture) attention; ``q`` ``(B, H, 1, E)``, ``x`` ``(B, D)``.

        Block ``i = t // W``: keys are ``[K_{iW..t} ; sorted K of block i]`` under one softmax.
        """
        w = config.block_size
        t = self._append(k, v)
        block = t // w
        if self.source is not None:  # routed by the source, which has seen this token already
            if t % w == 0:
                self._route_block(block)
        else:
            self._summarise(x, t, block)
        assert self.k is not None and self.v is not None
        local_k, local_v = self.k[:, :, block * w :], self.v[:, :, block * w :]  # triangle row
        ones = torch.ones(1, 1, 1, local_k.shape[2], dtype=torch.bool, device=q.device)
        sorted_ = None
        if self.sorted_k is not None:
            assert self.sorted_v is not None and self.sorted_ok is not None
            sorted_ = (self.sorted_k, self.sorted_v, self.sorted_ok)
        out = local_and_sorted_token(q, (local_k, local_v, ones), sorted_)
        if KINDS[config.kind].mix_dense:
            out = out + attend_token(q, self.k, self.v, None)
        return out

    def _summarise(self, x: Tensor, t: int, block: int) -> None:
        """Add position ``t``'s layer input ``x`` ``(B, D)`` to the running summaries; route
        its block at the block's first token."""
        assert self.config is not None
        w, pooling = self.config.block_size, self.config.pooling
        self.x_sum = x if self.x_sum is None else pool_add(self.x_sum, x, pooling)
        if self.block_sum is None or t % w == 0:
            self.block_sum = x
        else:
            self.block_sum = pool_add(self.block_sum, x, pooling)
        if t % w == 0:  # the first token of a block decides its routing row
            row = pool_value(self.x_sum, t + 1, pooling)
            self.row_summaries = _append_row(self.row_summaries, row)
            self._route_block(block)
        if t % w == w - 1:  # the block is complete: its key summary is final
            key = pool_value(self.block_sum, w, pooling)
            self.key_summaries = _append_row(self.key_summaries, key)

    def _route_block(self, block: int) -> None:
        """Row ``block`` of the causal plan -> the block's sorted keys and values."""
        self.sorted_k = self.sorted_v = self.sorted_ok = None
        if block == 0:
            return  # block 0 receives no sorted block (its sorted half is fully masked)
        router = self if self.source is None else self.source  # whose summaries route
        options, sort_net = self.options, router.sort_net
        assert options is not None and sort_net is not None and router.row_summaries is not None
        assert router.key_summaries is not None and self.k is not None and self.v is not None
        self.sorted_k, self.sorted_v, weight = route_block(
            block, router.row_summaries, router.key_summaries, self.k, self.v, options, sort_net
        )
        w = options.block_size
        self.sorted_ok = (weight > 0)[:, :, None, None].expand(-1, -1, 1, w)  # (B, H, 1, W)


@dataclass
class DecodingCache:
    """The decoding state of a whole decoder: one
    [`AttentionCache`][sparse_sinkhorn.nn.AttentionCache] per layer.

    Example::

        model.eval()
        cache = DecodingCache.for_layers(len(model.decoder.layers))
        logits = model(prompt, cache=cache)          # (B, P, V): the full forward
        logits = model(next_ids[:, None], cache=cache)  # (B, 1, V): one more position
    """

    layers: list[AttentionCache] = field(default_factory=list)
    # the last inputs of a model's token convolution (`models.TokenConv`), (B, k - 1, D)
    token_conv_past: Tensor | None = None

    def follow(self, routing: Routing) -> None:
        """Link each layer's cache to the cache that routes it (`Routing.source`); the stack
        calls this on every forward it is given the cache."""
        for i, layer in enumerate(self.layers):
            source = routing.source(i)
            layer.source = None if source == i else self.layers[source]

    @classmethod
    def for_layers(cls, n_layers: int) -> DecodingCache:
        if n_layers <= 0:
            raise ValueError(f"n_layers must be > 0, got {n_layers}")
        return cls([AttentionCache() for _ in range(n_layers)])

    @property
    def length(self) -> int:
        """Positions already decoded (the position offset of the next token)."""
        return self.layers[0].length if self.layers else 0


def _append_row(rows: Tensor | None, row: Tensor) -> Tensor:
    """``(B, n, D)`` + ``(B, D)`` -> ``(B, n+1, D)``."""
    return row[:, None] if rows is None else torch.cat([rows, row[:, None]], dim=1)


__all__ = ["AttentionCache", "DecodingCache", "SequenceRouting"]
