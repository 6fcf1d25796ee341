"""Encoder classifier for one sequence or a sentence pair (NLI).

Axes: B batch, L length, D model dim, C classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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

    Inputs may be right-padded to any length (``mask`` True on real tokens): padding never
    changes the logits. With SortCut (``attention.n_sortcut = n``) every input needs at least
    ``n`` blocks, so a shorter batch is padded internally to ``n * block_size`` positions
    (invariant by the rule above): a short sentence simply fills fewer than ``n`` sorted slots.
    """

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        att = config.attention
        need = (att.n_sortcut or 1) * att.block_size
        if att.n_sortcut is not None and att.length_limit is not None and need > att.length_limit:
            raise ValueError(
                f"SortCut needs n_sortcut * block_size = {att.n_sortcut} * {att.block_size} "
                f"= {need} positions, more than attention.max_len={att.max_len}"
            )
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
        if mask.shape != ids.shape:
            raise ValueError(
                f"key_padding_mask shape {tuple(mask.shape)} differs from ids {tuple(ids.shape)}"
            )
        ids, mask, segment_ids = self._pad_for_sortcut(ids, mask, segment_ids)
        x = self.embed(ids)
        if self.segments is not None:
            if segment_ids is None:
                raise ValueError("pair='concat' needs segment_ids (0 for the first sentence)")
            x = x + self.segments(segment_ids)
        h = self.encoder(x, mask)  # (B, L, D)
        if self.config.pooling == "first":
            return h[:, 0]
        real = mask[..., None]  # (B, L, 1)
        count = real.sum(1).clamp_min(1).to(h.dtype)  # (B, 1)
        return torch.where(real, h, h.new_zeros(())).sum(1) / count  # padding never summed

    def min_length(self) -> int:
        """Shortest padded length the encoder takes: ``n_sortcut * block_size`` or 1."""
        att = self.config.attention
        return 1 if att.n_sortcut is None else att.n_sortcut * att.block_size

    def _pad_for_sortcut(
        self, ids: Tensor, mask: Tensor, segment_ids: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Right-pad ``(B, L)`` inputs to `min_length` (padding is invisible)."""
        extra = self.min_length() - ids.shape[1]
        if extra <= 0:
            return ids, mask, segment_ids
        ids = F.pad(ids, (0, extra), value=self.config.pad_id)  # (B, n*W)
        mask = F.pad(mask, (0, extra), value=False)
        if segment_ids is not None:
            segment_ids = F.pad(segment_ids, (0, extra), value=0)
        return ids, mask, segment_ids

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
