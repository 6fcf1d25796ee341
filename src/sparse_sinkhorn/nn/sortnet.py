"""The meta sorting network: block summaries -> per-head block-routing logits (docs/method.md §3).

Axes: B batch, H heads, N blocks, M key blocks (== N), D model dim, E per-head sort dim.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from einops import rearrange
from torch import Tensor, nn

from ..ops.blocks import POOLINGS, check_block_size, routing_block_summaries

if TYPE_CHECKING:
    from .config import AttentionConfig

SORT_NETS = ("linear", "mlp", "bilinear", "qk", "qk-bound")
# sort nets with no weight row per block, which take any number of blocks
LENGTH_AGNOSTIC = ("bilinear", "qk", "qk-bound")
# sort nets that score the layer's own projections: how many D-wide parts their input has
# ([Q | K], or [Q | K | -Q | -K] whose max-pooling gives per-feature maxima and minima)
PROJECTED = {"qk": 2, "qk-bound": 4}


class SortNet(nn.Module):
    """Scores every (query block, key block) pair, per head.

    * ``"linear"`` (the paper's default and best): one linear layer ``D -> H * max_blocks``
      on each query-block summary, sliced to the actual ``N`` columns.
    * ``"mlp"``: two layers with a ReLU (the paper's ablation).
    * ``"bilinear"`` (length-agnostic, beyond the paper): ``R_ij = (W_q x_i)·(W_k x_j)/√E``;
      it has no ``max_blocks`` and works for any number of blocks.
    * ``"qk"`` (length-agnostic, no parameters, beyond the paper): the attention layer's own
      query and key projections, pooled per block: ``R_ij = pool(Q)_i · pool(K)_j / √E`` per
      head, so the routing learns with the attention it serves (a block-level form of
      MoBA's gate). Its input is the layer's ``(B, L, 2D)`` projected ``[Q | K]``, not the
      layer input (`SinkhornSelfAttention` feeds it so); with one routing for all heads the
      heads' logits are averaged.
    * ``"qk-bound"`` (as ``qk``, with ``pooling="max"``): Quest's bound at block level, the
      largest ``q · k / √E`` any query of block ``i`` could have with any key of block ``j``
      given their per-feature minima and maxima (``Σ_e`` of the largest of the four corner
      products); its input is ``[Q | K | -Q | -K]`` ``(B, L, 4D)``. Its scores take
      ``B·H·N²·E`` memory.

    Args:
        d_model: summary width ``D``.
        n_heads: heads ``H`` (one routing matrix each, or one for all with ``shared``).
        max_blocks: the most blocks a sequence may have (``linear`` / ``mlp`` only).
        kind: one of `SORT_NETS`.
        d_hidden: hidden width of ``mlp`` (default ``D``) and per-head width of ``bilinear``
            (default ``D // H``).
        shared: one routing matrix for every head (the net scores one head's worth of
            logits and every head routes by them), so a block that any head's loss favours
            is routed to by all heads; the output keeps its ``H`` axis.
        block_size: tokens per block ``W`` of the input `route` summarises.
        pooling: how `route` pools a block (``"sum"``, ``"mean"`` or ``"max"``,
            [`block_summaries`][sparse_sinkhorn.ops.block_summaries]).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        max_blocks: int | None,
        *,
        kind: str = "linear",
        d_hidden: int | None = None,
        shared: bool = False,
        block_size: int = 64,
        pooling: str = "sum",
    ) -> None:
        super().__init__()
        check_block_size(block_size)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.block_size, self.pooling = block_size, pooling
        if kind not in SORT_NETS:
            raise ValueError(f"sort net kind must be one of {SORT_NETS}, got {kind!r}")
        if kind not in LENGTH_AGNOSTIC and (max_blocks is None or max_blocks <= 0):
            raise ValueError(f"sort net {kind!r} needs max_blocks > 0, got {max_blocks}")
        self.kind = kind
        self.n_heads = n_heads
        self.n_scored = scored = 1 if shared else n_heads  # routing matrices the net computes
        self.max_blocks = max_blocks
        self.d_model = d_model
        self.net: nn.Module | None = None
        if kind == "linear":
            assert max_blocks is not None
            self.net = nn.Linear(d_model, scored * max_blocks)
        elif kind == "mlp":
            assert max_blocks is not None
            hidden = d_hidden or d_model
            self.net = nn.Sequential(
                nn.Linear(d_model, hidden), nn.ReLU(), nn.Linear(hidden, scored * max_blocks)
            )
        elif kind == "bilinear":
            self.d_sort = d_hidden or max(1, d_model // n_heads)
            self.net = nn.Linear(d_model, scored * self.d_sort)  # query-block side
            self.key_net = nn.Linear(d_model, scored * self.d_sort)  # key-block side

    @classmethod
    def from_config(cls, d_model: int, n_heads: int, config: AttentionConfig) -> SortNet:
        """The sort net an attention configuration asks for (``sort_net``, ``max_len`` /
        ``block_size``, ``pooling``; one routing for all heads unless
        ``shared_routing="none"``)."""
        return cls(
            d_model,
            n_heads,
            config.max_blocks,
            kind=config.sort_net,
            shared=config.shared_routing != "none",
            block_size=config.block_size,
            pooling=config.pooling,
        )

    def route(self, x: Tensor, *, causal: bool, key_padding_mask: Tensor | None = None) -> Tensor:
        """``(B, H, N, N)`` routing logits from the layer input ``x`` ``(B, L, D)``: the sort
        net on its `routing_summaries` (the one recipe every layer and cache uses)."""
        rows, keys = routing_summaries(
            x, self.block_size, causal=causal, key_padding_mask=key_padding_mask,
            pooling=self.pooling,
        )  # fmt: skip
        return self(rows, keys)

    def forward(self, query_summary: Tensor, key_summary: Tensor | None = None) -> Tensor:
        """``(B, N, D)`` row summaries (and key summaries for bilinear) -> ``(B, H, N, N)``
        (summaries of the layer's projections for ``qk`` and ``qk-bound``).

        ``key_summary`` defaults to ``query_summary``; only ``bilinear`` and the projected
        nets read it
        (the linear nets score columns by learned weights).
        """
        n, scored = query_summary.shape[1], self.n_scored
        keys = query_summary if key_summary is None else key_summary
        if self.kind in PROJECTED:
            logits = self._projected_logits(query_summary, keys)
            if scored == 1:
                logits = logits.mean(1, keepdim=True)
            return logits.expand(-1, self.n_heads, -1, -1)
        assert self.net is not None
        if self.kind == "bilinear":
            q = rearrange(self.net(query_summary), "b n (h e) -> b h n e", h=scored)
            k = rearrange(self.key_net(keys), "b m (h e) -> b h m e", h=scored)
            logits = torch.einsum("bhne,bhme->bhnm", q, k) * self.d_sort**-0.5
            return logits.expand(-1, self.n_heads, -1, -1)
        assert self.max_blocks is not None
        if n > self.max_blocks and not torch.compiler.is_compiling():
            raise ValueError(
                f"the input has {n} blocks but this {self.kind!r} sort net was built for at "
                f"most max_blocks={self.max_blocks}; build it with a larger max_len, or use "
                "sort_net='bilinear', which has no length limit"
            )
        scores = rearrange(self.net(query_summary), "b n (h m) -> b h n m", h=scored)
        return scores[..., :n].expand(-1, self.n_heads, -1, -1)  # (B, H, N, N)

    def _projected_logits(self, rows: Tensor, keys: Tensor) -> Tensor:
        """``qk`` / ``qk-bound``: ``(B, H, N, M)`` logits from summaries of the layer's
        projections (`PROJECTED` says which)."""
        d, h = self.d_model, self.n_heads
        width = PROJECTED[self.kind] * d
        if rows.shape[-1] != width or keys.shape[-1] != width:
            raise ValueError(
                f"sort net {self.kind!r} reads (B, N, {PROJECTED[self.kind]}*{d}) summaries of "
                f"the layer's projections, got {tuple(rows.shape)} and {tuple(keys.shape)}"
            )

        def heads(t: Tensor, part: int) -> Tensor:
            return rearrange(t[..., part * d : (part + 1) * d], "b n (h e) -> b h n e", h=h)

        scale = (d // h) ** -0.5
        if self.kind == "qk":
            return torch.einsum("bhne,bhme->bhnm", heads(rows, 0), heads(keys, 1)) * scale
        # max-pooled [Q | K | -Q | -K]: per-feature maxima and (negated) minima
        q_hi, q_lo = heads(rows, 0)[:, :, :, None], -heads(rows, 2)[:, :, :, None]
        k_hi, k_lo = heads(keys, 1)[:, :, None], -heads(keys, 3)[:, :, None]
        corners = torch.stack([q_hi * k_hi, q_hi * k_lo, q_lo * k_hi, q_lo * k_lo])
        return corners.amax(0).sum(-1) * scale  # (B, H, N, M)


def routing_summaries(
    x: Tensor,
    block_size: int,
    *,
    causal: bool,
    key_padding_mask: Tensor | None = None,
    pooling: str = "sum",
) -> tuple[Tensor, Tensor]:
    """What the sort net reads: ``(B, N, D)`` row and key summaries of ``x`` ``(B, L, D)``.

    Keys are the masked block summaries; rows are the same, or in a causal layer the
    leak-free prefix summaries (row ``i`` sees positions ``<= i*W`` only, docs/method.md §5).
    """
    return routing_block_summaries(
        x, block_size, key_padding_mask=key_padding_mask, pooling=pooling, causal=causal
    )
