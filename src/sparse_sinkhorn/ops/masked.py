"""The one attention kernel call with a boolean keep-mask, shared by every op.

``masked_sdpa`` is PyTorch's ``scaled_dot_product_attention`` with a bool mask (True = the
query sees the key), except that a row whose keys are all masked gives 0 instead of NaN.
Without a mask it is the plain (flash-eligible) SDPA call.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .blocks import zero_padding


def masked_sdpa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    keep: Tensor | None,
    dropout_p: float,
    scale: float | None,
) -> Tensor:
    """SDPA with a bool keep-mask; rows with no key kept give 0 instead of NaN."""
    if keep is None:
        return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p, scale=scale)
    any_key = keep.any(dim=-1, keepdim=True)  # rows that see at least one key
    safe = keep | ~any_key  # a fully masked row attends uniformly; zeroed below
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=safe, dropout_p=dropout_p, scale=scale
    )
    return zero_padding(out, any_key)
