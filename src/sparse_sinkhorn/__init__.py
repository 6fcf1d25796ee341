"""sparse-sinkhorn: Sparse Sinkhorn Attention (Tay et al., ICML 2020) for PyTorch."""

from __future__ import annotations

from .nn import (
    AttentionConfig,
    CrossAttention,
    SinkhornSelfAttention,
    SortNet,
    TransformerLayer,
)
from .ops import (
    SinkhornPlan,
    dense_attention,
    local_attention,
    sinkhorn_attention,
    sinkhorn_attention_with_plan,
    sinkhorn_balance,
    sinkhorn_plan,
    sparse_attention,
)

__version__ = "0.1.0"

__all__ = [
    "AttentionConfig",
    "CrossAttention",
    "SinkhornPlan",
    "SinkhornSelfAttention",
    "SortNet",
    "TransformerLayer",
    "__version__",
    "dense_attention",
    "local_attention",
    "sinkhorn_attention",
    "sinkhorn_attention_with_plan",
    "sinkhorn_balance",
    "sinkhorn_plan",
    "sparse_attention",
]
