"""Decoder-only language model (text and pixel-wise image generation).

Axes: B batch, L length, P prompt length, D model dim, V vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..nn.cache import DecodingCache
from .common import Decoder, Embedding, TokenConv, check_ids, next_token_sampler
from .config import LanguageModelConfig


class LanguageModel(nn.Module):
    """Causal Transformer LM with tied input/output embeddings: ``(B, L)`` -> ``(B, L, V)``."""

    def __init__(self, config: LanguageModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = Embedding(config)
        self.token_conv = (
            TokenConv(config.d_model, config.token_conv) if config.token_conv else None
        )
        self.decoder = Decoder(config, config.n_layers, cross_attention=False)

    def new_cache(self) -> DecodingCache:
        """An empty incremental-decoding cache for `forward` (eval mode)."""
        return DecodingCache.for_layers(len(self.decoder.layers))

    def forward(
        self,
        ids: Tensor,
        key_padding_mask: Tensor | None = None,
        *,
        cache: DecodingCache | None = None,
    ) -> Tensor:
        """Next-token logits ``(B, L, V)`` for ``ids`` ``(B, L)``.

        With ``cache`` (eval mode, no padding), ``ids`` are the positions after the
        ``cache.length`` already decoded; the logits equal those of the full forward on the
        whole sequence at these positions (see `sparse_sinkhorn.nn.cache`).
        """
        offset = 0 if cache is None else cache.length
        check_ids(ids, self.config)
        self._check_length(offset + ids.shape[1])
        x = self.embed(ids, offset=offset)
        past = None  # the next call's token-convolution inputs (with a cache)
        if self.token_conv is not None:
            before = None if cache is None else cache.token_conv_past
            if cache is not None and before is None:  # zeros before the start
                before = x.new_zeros(x.shape[0], self.token_conv.width - 1, x.shape[2])
            mixed = self.token_conv(x, key_padding_mask, before)
            if before is not None:  # the last k - 1 inputs so far
                past = torch.cat([before, x], dim=1)[:, -before.shape[1] :]
            x = mixed
        x = self.decoder(x, key_padding_mask, cache=cache)
        if cache is not None and past is not None:  # only once the layers' caches took the step
            cache.token_conv_past = past
        return x @ self.embed.tokens.weight.T

    def _check_length(self, length: int) -> None:
        att = self.config.attention
        if att.length_limit is not None and length > att.length_limit:
            raise ValueError(
                f"sequence length {length} > attention.max_len={att.max_len} of this "
                f"{att.sort_net!r} sort net; generate fewer tokens or use a shorter prompt"
            )

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        *,
        sample_temperature: float = 1.0,
        sample_top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        **former: Any,
    ) -> Tensor:
        """Continue ``prompt`` ``(B, P)``; returns ``(B, P + max_new_tokens)``.

        ``use_cache=True`` decodes incrementally (the prompt once, then one position per
        step, exactly the full forward's logits); ``False`` recomputes the whole prefix each
        step (O(L²) steps, the reference). Call ``model.eval()`` first.

        ``sample_temperature`` 0 is greedy; ``sample_top_k`` samples among the k most likely
        tokens (None: all). ``temperature=`` and ``top_k=``, their former names, are accepted
        with a ``DeprecationWarning``.
        """
        if prompt.dim() != 2 or prompt.shape[1] == 0:
            raise ValueError(f"prompt must be (B, P) with P >= 1, got {tuple(prompt.shape)}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        pick = next_token_sampler(
            sample_temperature, sample_top_k, generator, former, "LanguageModel.generate"
        )
        self._check_length(prompt.shape[1] + max(max_new_tokens - 1, 0))
        out = prompt
        cache = self.new_cache() if use_cache else None
        step_in = prompt
        for _ in range(max_new_tokens):
            logits = self(step_in if use_cache else out, cache=cache)[:, -1]  # (B, V)
            nxt = pick(logits)  # (B,)
            out = torch.cat([out, nxt[:, None]], dim=1)
            step_in = nxt[:, None]
        return out
