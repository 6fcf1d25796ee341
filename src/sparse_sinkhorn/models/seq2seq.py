"""Encoder-decoder Transformer (the sorting experiment's model).

Axes: B batch, S source length, T target length, D model dim, V vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..nn.cache import DecodingCache
from .common import Decoder, Embedding, Encoder, check_ids, next_token_sampler
from .config import Seq2SeqConfig


class Seq2Seq(nn.Module):
    """Sinkhorn (or baseline) self-attention in encoder and decoder; dense cross-attention.

    The decoder embedding is shared with the encoder and tied to the output projection.
    """

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = Embedding(config)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config, config.n_decoder_layers, cross_attention=True)

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """``src`` ``(B, S)`` -> memory ``(B, S, D)`` and its padding mask ``(B, S)``."""
        check_ids(src, self.config, "src")
        mask = src != self.config.pad_id
        return self.encoder(self.embed(src), mask), mask

    def decode(
        self,
        tgt_in: Tensor,
        memory: Tensor,
        memory_mask: Tensor,
        *,
        cache: DecodingCache | None = None,
    ) -> Tensor:
        """Teacher-forced decoder: ``tgt_in`` ``(B, T)`` -> logits ``(B, T, V)``.

        With ``cache`` (eval mode; ``tgt_in`` without padding), ``tgt_in`` are the positions
        after the ``cache.length`` already decoded, and the logits equal the full pass's.
        """
        check_ids(tgt_in, self.config, "tgt_in")
        offset = 0 if cache is None else cache.length
        mask = None if cache is not None else tgt_in != self.config.pad_id
        x = self.decoder(self.embed(tgt_in, offset=offset), mask, memory, memory_mask, cache=cache)
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
        sample_temperature: float = 0.0,
        sample_top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        eos_id: int | None = None,
        **former: Any,
    ) -> Tensor:
        """Greedy (``sample_temperature=0``) or sampled decoding: ``(B, S)`` -> ``(B, T)``.

        ``T == max_new_tokens`` unless ``eos_id`` is given: then a row that has emitted
        ``eos_id`` continues with the padding id, and decoding stops once every row has
        emitted it (``T <= max_new_tokens``). The padding token is never emitted otherwise.
        ``use_cache=True`` decodes incrementally with an exact cache (one new position per
        step); ``False`` recomputes the whole prefix each step. Call ``model.eval()`` first.
        ``sample_top_k`` samples among the k most likely tokens (None: all);
        ``temperature=`` and ``top_k=``, the former names of the sampling arguments, are
        accepted with a ``DeprecationWarning``.
        """
        pick = next_token_sampler(
            sample_temperature, sample_top_k, generator, former, "Seq2Seq.generate"
        )
        memory, mask = self.encode(src)
        out = torch.full((src.shape[0], 1), self.config.bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        cache = DecodingCache.for_layers(len(self.decoder.layers)) if use_cache else None
        step_in = out
        for _ in range(max_new_tokens):
            logits = self.decode(step_in if use_cache else out, memory, mask, cache=cache)[:, -1]
            logits[:, self.config.pad_id] = float("-inf")  # (B, V); padding is not an output
            nxt = pick(logits)  # (B,)
            if eos_id is not None:
                nxt = nxt.masked_fill(done, self.config.pad_id)  # (B,)
                done |= nxt == eos_id
            out = torch.cat([out, nxt[:, None]], dim=1)
            if eos_id is not None and bool(done.all()):
                break
            # A finished row's padding is fed back as-is: the decoder attends causally, so what
            # a finished row reads later never changes its own (already emitted) tokens.
            step_in = nxt[:, None]
        return out[:, 1:]
