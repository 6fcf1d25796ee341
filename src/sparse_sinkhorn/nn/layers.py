"""The pre-LN Transformer layer (encoder, decoder, encoder-decoder) built from the attention
modules.

Axes: B batch, L length, S memory length, D model dim.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .attention import CrossAttention, SinkhornSelfAttention
from .cache import AttentionCache, DecodingCache
from .config import AttentionConfig


class FeedForward(nn.Sequential):
    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0) -> None:
        super().__init__(
            nn.Linear(d_model, d_ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model)
        )


class TransformerLayer(nn.Module):
    """One pre-LN Transformer layer: ``x + SelfAttn(LN(x))``, then (``cross_attention``)
    ``x + CrossAttn(LN(x), memory)``, then ``x + FF(LN(x))``; ``(B, L, D) -> (B, L, D)``.

    An encoder layer is ``causal=False``; a decoder layer ``causal=True``, with
    ``cross_attention=True`` in an encoder-decoder. ``routes=False``: a later layer of a stack
    with ``shared_routing="layers"`` (no sort net; `forward` takes ``routing``).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        attention: AttentionConfig,
        *,
        dropout: float = 0.0,
        causal: bool = False,
        cross_attention: bool = False,
        routes: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = SinkhornSelfAttention.from_config(
            d_model, n_heads, attention, causal=causal, dropout=dropout, routes=routes
        )
        self.cross: CrossAttention | None = None
        if cross_attention:
            self.norm_cross = nn.LayerNorm(d_model)
            self.cross = CrossAttention(d_model, n_heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model, d_ff, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        key_padding_mask: Tensor | None = None,
        memory: Tensor | None = None,
        memory_padding_mask: Tensor | None = None,
        cache: AttentionCache | None = None,
        routing: Tensor | None = None,
    ) -> Tensor:
        """``memory``: the encoder output (with ``cross_attention``); ``cache``: incremental
        decoding state of the self-attention (causal, eval mode); ``routing``: sort logits
        to route by instead of the layer's own (`stack_routing`)."""
        if (memory is None) != (self.cross is None):
            has = "has cross-attention: pass memory" if memory is None else "has no cross-attention"
            raise ValueError(f"this layer {has}")
        attn = self.attn(self.norm1(x), key_padding_mask, cache=cache, routing=routing)
        x = x + self.drop(attn)
        if self.cross is not None:
            assert memory is not None
            x = x + self.drop(self.cross(self.norm_cross(x), memory, memory_padding_mask))
        return x + self.drop(self.ff(self.norm2(x)))


def stack_layers(
    d_model: int,
    n_heads: int,
    d_ff: int,
    attention: AttentionConfig,
    n_layers: int,
    **kwargs: Any,
) -> nn.ModuleList:
    """``n_layers`` [`TransformerLayer`][sparse_sinkhorn.nn.TransformerLayer] s (``kwargs``:
    ``dropout``, ``causal``,
    ``cross_attention``); with ``shared_routing="layers"`` only the first has a sort net."""
    later = attention.shared_routing != "layers"
    return nn.ModuleList(
        TransformerLayer(d_model, n_heads, d_ff, attention, routes=i == 0 or later, **kwargs)
        for i in range(n_layers)
    )


def stack_routing(
    layers: nn.ModuleList,
    x: Tensor,
    key_padding_mask: Tensor | None = None,
    cache: DecodingCache | None = None,
) -> Tensor | None:
    """The routing every layer of a ``shared_routing="layers"`` stack uses for input ``x``
    (the first layer's sort logits of its attention input), or None (each layer routes
    itself; or a filled ``cache``, whose first layer routes the others: linked here)."""
    first = layers[0]
    assert isinstance(first, TransformerLayer)
    if first.attn.config.shared_routing != "layers":
        return None
    if cache is not None:
        for later in cache.layers[1:]:
            later.source = cache.layers[0]
        if cache.length:
            return None
    return first.attn.sort_logits(first.norm1(x), key_padding_mask)
