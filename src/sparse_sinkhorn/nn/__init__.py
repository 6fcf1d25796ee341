"""Modules: sort nets, attention layers, Transformer encoder/decoder layers."""

from __future__ import annotations

from .attention import CrossAttention, SinkhornSelfAttention, routing_losses
from .cache import AttentionCache, DecodingCache
from .config import ATTENTION_KINDS, AttentionConfig
from .layers import FeedForward, LayerStack, TransformerLayer
from .routing import Routing
from .sortnet import SORT_NETS, SortNet

__all__ = [
    "ATTENTION_KINDS",
    "SORT_NETS",
    "AttentionCache",
    "AttentionConfig",
    "CrossAttention",
    "DecodingCache",
    "FeedForward",
    "LayerStack",
    "Routing",
    "SinkhornSelfAttention",
    "SortNet",
    "TransformerLayer",
    "routing_losses",
]
