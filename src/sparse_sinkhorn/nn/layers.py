"""The pre-LN Transformer layer (encoder, decoder, encoder-decoder) built from the attention
modules.

Axes: B batch, L length, S memory length, D model dim.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from .attention import CrossAttention, SinkhornSelfAttention
from .cache import AttentionCache, DecodingCache
from .config import AttentionConfig
from .routing import Routing


class FeedForward(nn.Sequential):
    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0) -> None:
        super().__init__(
            nn.Linear(d_model, d_ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model)
        )


class TransformerLayer(nn.Module):
    """One pre-LN Transformer layer: ``x + SelfAttn(LN(x))``, then (``cross_attention``)
    ``x + CrossAttn(LN(x), memory)``, then ``x + FF(LN(x))``; ``(B, L, D) -> (B, L, D)``.

    An encoder layer is ``causal=False``; a decoder layer ``causal=True``, with
    ``cross_attention=True`` in an encoder-decoder. ``routing``, ``index``: the stack's
    [`Routing`][sparse_sinkhorn.nn.Routing] and the layer's place in it (a later layer of a
    stack with ``shared_routing="layers"`` has no sort net; `forward` takes ``logits``).
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
        routing: Routing | None = None,
        index: int = 0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = SinkhornSelfAttention.from_config(
            d_model, n_heads, attention, causal=causal, dropout=dropout, routing=routing,
            index=index,
        )  # fmt: skip
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
        logits: Tensor | None = None,
        *,
        return_logits: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor | None]:
        """``memory``: the encoder output (with ``cross_attention``); ``cache``: incremental
        decoding state of the self-attention (causal, eval mode); ``logits``: sort logits
        to route by instead of the layer's own (the stack's, `LayerStack`).
        ``return_logits``: return ``(out, sort_logits)``, the sort logits the self-attention
        routed by (None when it does not route, or steps a filled cache)."""
        if (memory is None) != (self.cross is None):
            has = "has cross-attention: pass memory" if memory is None else "has no cross-attention"
            raise ValueError(f"this layer {has}")
        attn, _, logits = self.attn.attend(
            self.norm1(x), key_padding_mask, cache=cache, logits=logits
        )
        x = x + self.drop(attn)
        if self.cross is not None:
            assert memory is not None
            x = x + self.drop(self.cross(self.norm_cross(x), memory, memory_padding_mask))
        x = x + self.drop(self.ff(self.norm2(x)))
        return (x, logits) if return_logits else x


class LayerStack(nn.ModuleList):
    """[`TransformerLayer`][sparse_sinkhorn.nn.TransformerLayer] s and the
    [`Routing`][sparse_sinkhorn.nn.Routing] they share (``routing``; `stack_layers` builds
    both): with ``shared_routing="layers"`` only the first has a sort net and `forward` hands
    its sort logits to the others. A ``ModuleList`` (its parameters are ``<i>.<name>``); a
    slice of it has the default routing (every layer routes itself)."""

    def __init__(
        self, layers: Iterable[nn.Module] | None = None, routing: Routing | None = None
    ) -> None:
        super().__init__(layers)
        self.routing = Routing() if routing is None else routing

    def attentions(self) -> list[SinkhornSelfAttention]:
        """Each layer's self-attention, in order."""
        return [layer.attn for layer in self.layers()]

    def layers(self) -> list[TransformerLayer]:
        """The layers, in order (typed)."""
        return [layer for layer in self if isinstance(layer, TransformerLayer)]

    def share_first_routing(self) -> None:
        """Route every layer by the first layer's sort logits from now on, the later layers
        keeping their own (unused) sort nets (`Routing.shared_by_layers`)."""
        self.routing = self.routing.shared_by_layers(idle_nets=True)

    def forward(
        self,
        x: Tensor,
        key_padding_mask: Tensor | None = None,
        memory: Tensor | None = None,
        memory_padding_mask: Tensor | None = None,
        cache: DecodingCache | None = None,
    ) -> Tensor:
        """Every layer in turn (arguments as `TransformerLayer.forward`'s; ``cache``: one
        entry per layer). A layer whose routing `Routing.source` is another layer's routes by
        that layer's sort logits of this forward (or, decoding, by its cache)."""
        if cache is not None:
            if len(cache.layers) != len(self):
                raise ValueError(
                    f"the cache has {len(cache.layers)} layers but the decoder has {len(self)}"
                )
            cache.follow(self.routing)
        made: dict[int, Tensor | None] = {}  # layer -> the sort logits it routed by
        for i, layer in enumerate(self.layers()):
            source = self.routing.source(i)
            given = made.get(source) if source != i else None
            layer_cache = None if cache is None else cache.layers[i]
            x, made[i] = layer(
                x, key_padding_mask, memory, memory_padding_mask, layer_cache, given,
                return_logits=True,
            )  # fmt: skip
        return x


def stack_layers(
    d_model: int,
    n_heads: int,
    d_ff: int,
    attention: AttentionConfig,
    n_layers: int,
    **kwargs: Any,
) -> LayerStack:
    """A [`LayerStack`][sparse_sinkhorn.nn.LayerStack] of ``n_layers`` layers and the routing
    ``attention`` asks for (``kwargs``: ``dropout``, ``causal``, ``cross_attention``)."""
    routing = Routing.from_config(attention)
    layers = (
        TransformerLayer(d_model, n_heads, d_ff, attention, routing=routing, index=i, **kwargs)
        for i in range(n_layers)
    )
    return LayerStack(layers, routing)
