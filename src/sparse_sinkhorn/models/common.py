"""Pieces the models share: token embedding with sinusoidal positions, layer stacks.

Axes: B batch, L length, D model dim, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ..nn.cache import DecodingCache
from ..nn.layers import stack_layers
from ..ops.validate import check_layer_input, check_number
from ..renamed import renamed_keywords
from .config import TransformerConfig


def sinusoidal_positions(
    length: int, dim: int, *, offset: int = 0, device: torch.device | None = None
) -> Tensor:
    """``(L, D)`` fixed sinusoidal position codes (any length, so models generalise to 2L)."""
    pos = torch.arange(offset, offset + length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(
        torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim)
    )  # (D/2,)
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table


class Embedding(nn.Module):
    """Token embedding scaled by ``sqrt(D)`` plus sinusoidal positions, then dropout."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.d_model = config.d_model
        self.tokens = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_id)
        nn.init.normal_(self.tokens.weight, std=config.d_model**-0.5)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, ids: Tensor, *, offset: int = 0) -> Tensor:
        x = self.tokens(ids) * self.d_model**0.5  # (B, L, D)
        pos = sinusoidal_positions(ids.shape[1], self.d_model, offset=offset, device=ids.device)
        return self.drop(x + pos.to(x.dtype))


class TokenConv(nn.Module):
    """``x + conv(x)``: a causal depthwise convolution of width ``k`` over the positions,
    ``(B, L, D) -> (B, L, D)``; position ``t`` reads ``t - k + 1 .. t`` (zeros before the
    start). Padded positions (``key_padding_mask`` False) are read as zeros, so no padded
    value reaches a real position. ``past`` ``(B, k - 1, D)``: the inputs just before ``x``
    (incremental decoding; zeros when None)."""

    def __init__(self, d_model: int, width: int) -> None:
        super().__init__()
        self.width = width
        self.conv = nn.Conv1d(d_model, d_model, width, groups=d_model)

    def forward(
        self, x: Tensor, key_padding_mask: Tensor | None = None, past: Tensor | None = None
    ) -> Tensor:
        check_layer_input(
            x, key_padding_mask, d_model=self.conv.in_channels, weight=self.conv.weight
        )
        seen = x if key_padding_mask is None else x.masked_fill(~key_padding_mask[..., None], 0)
        if past is None:
            past = x.new_zeros(x.shape[0], self.width - 1, x.shape[2])
        elif past.shape != (x.shape[0], self.width - 1, x.shape[2]):
            raise ValueError(
                f"past must be (B, k - 1, D) = {(x.shape[0], self.width - 1, x.shape[2])} for "
                f"this input, got {tuple(past.shape)} (a decoding cache serves one batch)"
            )
        window = torch.cat([past, seen], dim=1).transpose(1, 2)  # (B, D, k - 1 + L)
        return x + self.conv(window).transpose(1, 2)


class Encoder(nn.Module):
    """A stack of pre-LN encoder layers with a final LayerNorm: ``(B, L, D) -> (B, L, D)``."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        c = config
        self.layers = stack_layers(
            c.d_model, c.n_heads, c.d_ff, c.attention, c.n_layers, dropout=c.dropout
        )
        self.norm = nn.LayerNorm(c.d_model)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        return self.norm(self.layers(x, key_padding_mask))


class Decoder(nn.Module):
    """A stack of causal pre-LN decoder layers (cross-attention optional)."""

    def __init__(self, config: TransformerConfig, n_layers: int, *, cross_attention: bool) -> None:
        super().__init__()
        c = config
        self.layers = stack_layers(
            c.d_model,
            c.n_heads,
            c.d_ff,
            c.attention,
            n_layers,
            dropout=c.dropout,
            causal=True,
            cross_attention=cross_attention,
        )
        self.norm = nn.LayerNorm(c.d_model)

    def forward(
        self,
        x: Tensor,
        key_padding_mask: Tensor | None = None,
        memory: Tensor | None = None,
        memory_padding_mask: Tensor | None = None,
        cache: DecodingCache | None = None,
    ) -> Tensor:
        """``cache``: incremental decoding state, one entry per layer (eval mode)."""
        return self.norm(self.layers(x, key_padding_mask, memory, memory_padding_mask, cache))


def check_ids(ids: Tensor, config: TransformerConfig, name: str = "ids") -> None:
    """Token ids must be a (B, L) integer tensor within the vocabulary and the length limit."""
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"{name} must be a (B, L) integer tensor, got {ids.dtype} {tuple(ids.shape)}"
        )
    if 0 in ids.shape:
        raise ValueError(f"{name} is empty: shape {tuple(ids.shape)}; B and L must be >= 1")
    if not torch.compiler.is_compiling():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= config.vocab_size:
            raise ValueError(
                f"{name} holds token ids outside the vocabulary [0, {config.vocab_size}): "
                f"min {low}, max {high}"
            )
    limit = config.attention.length_limit
    if limit is not None and ids.shape[1] > limit:
        raise ValueError(
            f"{name} has length {ids.shape[1]} > attention.max_len={config.attention.max_len}; "
            "build the model with a larger max_len or sort_net='bilinear'"
        )


# Sampling keywords accepted under their former names (the attention's ``temperature``, the
# Gumbel-Sinkhorn tau, and ``top_k``, the top-k gate's block count, keep those names).
FORMER_SAMPLING_NAMES = {"temperature": "sample_temperature", "top_k": "sample_top_k"}


def check_sampling(sample_temperature: object, sample_top_k: object) -> None:
    """``sample_temperature`` a finite number >= 0 and ``sample_top_k`` None or a positive
    int, else raise."""
    check_number("sample_temperature", sample_temperature, low=0.0, low_ok=True)
    k = sample_top_k
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"sample_top_k must be None or a positive int, got {k!r}")


def next_token_sampler(
    sample_temperature: float,
    sample_top_k: int | None,
    generator: torch.Generator | None,
    former: Mapping[str, Any],
    where: str,
) -> Callable[[Tensor], Tensor]:
    """`sample_next` with the sampling arguments of a ``generate``-like function ``where``,
    checked once: ``(B, V)`` logits -> ``(B,)`` next tokens. ``former``: that function's
    ``**former``, where ``temperature=`` and ``top_k=`` (the former names) are accepted with
    a ``DeprecationWarning``."""
    values = renamed_keywords(former, FORMER_SAMPLING_NAMES, where, strict=True, stacklevel=4)
    sample_temperature = values.get("sample_temperature", sample_temperature)
    sample_top_k = values.get("sample_top_k", sample_top_k)
    check_sampling(sample_temperature, sample_top_k)
    return partial(
        sample_next,
        sample_temperature=sample_temperature,
        sample_top_k=sample_top_k,
        generator=generator,
    )


def sample_next(
    logits: Tensor,
    *,
    sample_temperature: float,
    sample_top_k: int | None,
    generator: torch.Generator | None,
) -> Tensor:
    """Greedy (``sample_temperature == 0``) or sampled next tokens from ``(B, V)`` logits."""
    check_sampling(sample_temperature, sample_top_k)
    if sample_temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / sample_temperature
    if sample_top_k is not None:
        kth = logits.topk(min(sample_top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
