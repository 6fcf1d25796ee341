"""The pre-LN Transformer layer (encoder, decoder, encoder-decoder) built from the attention
modules.

Axes: B batch, L length, S memory length, D model dim.
"""

from __future__ import annotations

from torch import Tensor, nn

from .attention import CrossAttention, SinkhornSelfAttention
from .cache import AttentionCache
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
    ``cross_attention=True`` in an encoder-decoder.
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
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = SinkhornSelfAttention.from_config(
            d_model, n_heads, attention, causal=causal, dropout=dropout
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
    ) -> Tensor:
        """``memory``: the encoder output (with ``cross_attention``); ``cache``: incremental
        decoding state of the self-attention (causal, eval mode)."""
        if (memory is None) != (self.cross is None):
            has = "has cross-attention: pass memory" if memory is None else "has no cross-attention"
            raise ValueError(f"this layer {has}")
        x = x + self.drop(self.attn(self.norm1(x), key_padding_mask, cache=cache))
        if self.cross is not None:
            assert memory is not None
            x = x + self.drop(self.cross(self.norm_cross(x), memory, memory_padding_mask))
        return x + self.drop(self.ff(self.norm2(x)))
