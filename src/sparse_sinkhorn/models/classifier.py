"""Encoder classifier for one sequence or a sentence pair (NLI).

Axes: B batch, L length, D model dim, C classes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .common import Embedding, Encoder, check_ids
from .config import ClassifierConfig


class Classifier(nn.Module):
    """Encoder + pooling + MLP head.

    * ``pair="none"``: ``forward(ids, mask)``.
    * ``pair="concat"``: one sequence ``[CLS] a [SEP] b`` with ``segment_ids`` (0/1) added
      as a learned segment embedding: ``forward(ids, mask, segment_ids=...)``.
    * ``pair="separate"``: both sentences encoded by the same encoder, features
      ``[u, v, |u - v|, u * v]``: ``forward(ids, mask, ids_b=..., mask_b=...)``.
    """

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = Embedding(config)
        self.encoder = Encoder(config)
        self.segments = nn.Embedding(2, config.d_model) if config.pair == "concat" else None
        n_feats = 4 if config.pair == "separate" else 1
        self.head = nn.Sequential(
            nn.Linear(n_feats * config.d_model, config.d_model),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.d_model, config.n_classes),
        )

    def encode(self, ids: Tensor, mask: Tensor | None, segment_ids: Tensor | None = None) -> Tensor:
        """Pooled ``(B, D)`` representation of ``ids`` ``(B, L)``."""
        check_ids(ids, self.config)
        if mask is None:
            mask = ids != self.config.pad_id
        x = self.embed(ids)
        if self.segments is not None:
            if segment_ids is None:
                raise ValueError("pair='concat' needs segment_ids (0 for the first sentence)")
            x = x + self.segments(segment_ids)
        h = self.encoder(x, mask)  # (B, L, D)
        if self.config.pooling == "first":
            return h[:, 0]
        weights = mask[..., None].to(h.dtype)
        return (h * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def forward(
        self,
        ids: Tensor,
        key_padding_mask: Tensor | None = None,
        *,
        segment_ids: Tensor | None = None,
        ids_b: Tensor | None = None,
        mask_b: Tensor | None = None,
    ) -> Tensor:
        """Logits ``(B, C)``."""
        u = self.encode(ids, key_padding_mask, segment_ids)
        if self.config.pair == "separate":
            if ids_b is None:
                raise ValueError("pair='separate' needs ids_b (the second sentence)")
            v = self.encode(ids_b, mask_b)
            u = torch.cat([u, v, (u - v).abs(), u * v], dim=-1)
        return self.head(u)
