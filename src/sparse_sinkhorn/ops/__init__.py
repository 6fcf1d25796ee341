"""Pure functional ops on ``(B, H, L, D)`` tensors: no parameters, no state."""

from __future__ import annotations

from .attention import (
    SinkhornOutput,
    attend_with_plan,
    sinkhorn_attention,
    sinkhorn_attention_with_plan,
)
from .baselines import (
    dense_attention,
    local_attention,
    sparse_attention,
    sparse_pattern,
)
from .blocks import block_summaries, num_blocks, pad_to_blocks
from .flex import topk_block_mask
from .options import SinkhornOptions
from .plan import SinkhornPlan, block_attention_mass, sinkhorn_plan
from .reference import (
    reference_dense_attention,
    reference_sinkhorn_attention,
    reference_sinkhorn_balance,
    reference_softmax_routing,
    reference_topk_block_attention,
)
from .sinkhorn import hard_routing, sample_gumbel, sinkhorn_balance
from .topk import topk_block_attention, topk_block_selection

__all__ = [
    "SinkhornOptions",
    "SinkhornOutput",
    "SinkhornPlan",
    "attend_with_plan",
    "block_attention_mass",
    "block_summaries",
    "dense_attention",
    "hard_routing",
    "local_attention",
    "num_blocks",
    "pad_to_blocks",
    "reference_dense_attention",
    "reference_sinkhorn_attention",
    "reference_sinkhorn_balance",
    "reference_softmax_routing",
    "reference_topk_block_attention",
    "sample_gumbel",
    "sinkhorn_attention",
    "sinkhorn_attention_with_plan",
    "sinkhorn_balance",
    "sinkhorn_plan",
    "sparse_attention",
    "sparse_pattern",
    "topk_block_attention",
    "topk_block_mask",
    "topk_block_selection",
]
