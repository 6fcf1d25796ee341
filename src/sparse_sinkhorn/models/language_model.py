"""Decoder-only language model (text and pixel-wise image generation).

Axes: B batch, L length, D model dim, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .common import Decoder, Embedding, check_ids, sample_next
from .config import LanguageModelConfig


class LanguageModel(nn.Module):
    """Causal Transformer LM with tied input/output embeddings: ``(B, L)`` -> ``(B, L, V)``."""

    def __init__(self, config: LanguageModelConfig) -> None:
        super().__init__()
        if config.attention.n_sortcut is not None:
            raise ValueError("SortCut cannot be used in a causal language model")
        self.config = config
        self.embed = Embedding(config)
        self.decoder = Decoder(config, config.n_layers, cross_attention=False)

    def forward(self, ids: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        check_ids(ids, self.config)
        x = self.decoder(self.embed(ids), key_padding_mask)
        return x @ self.embed.tokens.weight.T

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue ``prompt`` ``(B, P)``; returns ``(B, P + max_new_tokens)``.

        Recomputes the whole prefix each step (exact; O(L²) steps). Use ``model.eval()``.
        """
        out = prompt
        for _ in range(max_new_tokens):
            logits = self(out)[:, -1]
            nxt = sample_next(logits, temperature=temperature, top_k=top_k, generator=generator)
            out = torch.cat([out, nxt[:, None]], dim=1)
        return out
