"""Pre-LN Transformer encoder and decoder layers built from the attention modules.

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


class TransformerEncoderLayer(nn.Module):
    """``x + SelfAttn(LN(x))``, then ``x + FF(LN(x))``; ``(B, L, D) -> (B, L, D)``."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        attention: AttentionConfig,
        *,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = SinkhornSelfAttention.from_config(d_model, n_heads, attention, dropout=dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model, d_ff, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), key_padding_mask))
        return x + self.drop(self.ff(self.norm2(x)))


class TransformerDecoderLayer(nn.Module):
    """Causal self-attention, optional dense cross-attention to ``memory``, feed-forward."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        attention: AttentionConfig,
        *,
        dropout: float = 0.0,
        cross_attention: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = SinkhornSelfAttention.from_config(
            d_model, n_heads, attention, causal=True, dropout=dropout
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
        """``cache``: incremental decoding state of the self-attention (eval mode)."""
        x = x + self.drop(self.attn(self.norm1(x), key_padding_mask, cache=cache))
        if self.cross is not None:
            if memory is None:
                raise ValueError("this decoder layer has cross-attention: pass memory")
            x = x + self.drop(self.cross(self.norm_cross(x), memory, memory_padding_mask))
        return x + self.drop(self.ff(self.norm2(x)))
