"""Encoder-decoder Transformer (the sorting experiment's model).

Axes: B batch, S source length, T target length, D model dim, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .common import Decoder, Embedding, Encoder, check_ids, sample_next
from .config import Seq2SeqConfig


class Seq2Seq(nn.Module):
    """Sinkhorn (or baseline) self-attention in encoder and decoder; dense cross-attention.

    The decoder embedding is shared with the encoder and tied to the output projection.
    """

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        if config.attention.n_sortcut is not None:
            raise ValueError("SortCut cannot be used in a decoder; Seq2Seq has one")
        self.config = config
        self.embed = Embedding(config)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config, config.n_decoder_layers, cross_attention=True)

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """``src`` ``(B, S)`` -> memory ``(B, S, D)`` and its padding mask ``(B, S)``."""
        check_ids(src, self.config, "src")
        mask = src != self.config.pad_id
        return self.encoder(self.embed(src), mask), mask

    def decode(self, tgt_in: Tensor, memory: Tensor, memory_mask: Tensor) -> Tensor:
        """Teacher-forced decoder: ``tgt_in`` ``(B, T)`` -> logits ``(B, T, V)``."""
        check_ids(tgt_in, self.config, "tgt_in")
        x = self.decoder(self.embed(tgt_in), tgt_in != self.config.pad_id, memory, memory_mask)
        return x @ self.embed.tokens.weight.T  # tied output projection

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        memory, mask = self.encode(src)
        return self.decode(tgt_in, memory, mask)

    @torch.no_grad()
    def generate(
        self,
        src: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Greedy (``temperature=0``) or sampled decoding: ``(B, S)`` -> ``(B, max_new_tokens)``.

        Runs in eval mode semantics (call ``model.eval()`` first for deterministic routing).
        """
        memory, mask = self.encode(src)
        out = torch.full((src.shape[0], 1), self.config.bos_id, dtype=torch.long, device=src.device)
        for _ in range(max_new_tokens):
            logits = self.decode(out, memory, mask)[:, -1]  # (B, V)
            nxt = sample_next(logits, temperature=temperature, top_k=top_k, generator=generator)
            out = torch.cat([out, nxt[:, None]], dim=1)
        return out[:, 1:]
