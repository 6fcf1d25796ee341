"""The paper's baselines with Sinkhorn attention's calling convention.

Axes: B batch, H heads, L query length, S key length, D head dim, N blocks, W block size.
All take ``(B, H, L, D)`` tensors, keyword-only options, ``key_padding_mask`` ``(B, S)`` bool
with True = real token, and return ``(B, H, L, Dv)`` in the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from . import validate
from .blocks import check_block_size, pad_to_blocks, padded_mask, zero_padding
from .masked import masked_sdpa


def dense_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> Tensor:
    """Full softmax attention through ``F.scaled_dot_product_attention`` (the Transformer).

    With ``is_causal`` and ``L != S`` the triangle is aligned to the end (query ``t`` sees
    keys ``<= t + S - L``), as in incremental decoding.
    """
    if not torch.compiler.is_compiling():
        validate.check_inputs(
            query,
            key,
            value,
            same_length=False,
            key_padding_mask=key_padding_mask,
            dropout_p=dropout_p,
            scale=scale,
        )
    if key_padding_mask is None and (not is_causal or query.shape[2] == key.shape[2]):
        return F.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout_p, is_causal=is_causal, scale=scale
        )
    mask = _causal_mask(query.shape[2], key.shape[2], query.device) if is_causal else None
    if key_padding_mask is not None:
        key, value = _drop_padding(key, value, key_padding_mask)
        real = key_padding_mask[:, None, None, :]  # (B, 1, 1, S)
        mask = real if mask is None else mask & real
    return masked_sdpa(query, key, value, mask, dropout_p, scale)


def local_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    block_size: int,
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> Tensor:
    """Each query block attends to its own block only (non-overlapping windows of W)."""
    _check_blocked(query, key, value, block_size, key_padding_mask, dropout_p, scale)
    batch, heads, length, _ = query.shape
    w = block_size
    mask = padded_mask(key_padding_mask, batch, length, w, query.device)  # (B, N*W) or None
    if key_padding_mask is not None:
        key, value = _drop_padding(key, value, key_padding_mask)
    qb, kb, vb = (
        rearrange(pad_to_blocks(t, w), "b h (n w) d -> (b h) n w d", w=w)
        for t in (query, key, value)
    )  # (B*H, N, W, D)
    keep: Tensor | None = None
    if is_causal:
        keep = _causal_mask(w, w, query.device)  # (W, W)
    if mask is not None:
        real = rearrange(mask, "b (n w) -> b 1 n 1 w", w=w).expand(-1, heads, -1, -1, -1)
        real = rearrange(real, "b h n q w -> (b h) n q w")  # (B*H, N, 1, W)
        keep = real if keep is None else keep & real
    out = masked_sdpa(qb, kb, vb, keep, dropout_p, scale)  # (B*H, N, W, Dv)
    out = rearrange(out, "(b h) n w d -> b h (n w) d", b=batch)
    return out[:, :, :length]


def sparse_pattern(
    length: int,
    *,
    block_size: int,
    is_causal: bool = False,
    mode: str = "fixed",
    n_summary: int = 1,
    device: torch.device | str | None = None,
    queries: Tensor | None = None,
) -> Tensor:
    """Child et al. (2019) Sparse Transformer pattern as an ``(L, L)`` bool mask.

    * ``"fixed"``: query ``t`` sees its own block of W, plus the last ``n_summary`` positions
      of every block (the "summary" columns).
    * ``"strided"``: query ``t`` sees the W positions around it (``|t - s| < W``) plus every
      position ``s`` with ``(t - s) % W == 0``.

    With ``is_causal`` the pattern is restricted to ``s <= t``. ``queries`` (``(Q,)`` long
    positions) returns those rows only, ``(Q, L)`` (one decoding step needs one row).
    """
    if mode not in ("fixed", "strided"):
        raise ValueError(f"sparse mode must be 'fixed' or 'strided', got {mode!r}")
    if not 1 <= n_summary <= block_size:
        raise ValueError(f"n_summary must be in [1, block_size={block_size}], got {n_summary}")
    t = (torch.arange(length, device=device) if queries is None else queries)[:, None]  # (Q, 1)
    s = torch.arange(length, device=device)[None, :]  # (1, L) key positions
    if mode == "fixed":
        keep = (t // block_size == s // block_size) | (s % block_size >= block_size - n_summary)
    else:
        keep = ((t - s).abs() < block_size) | ((t - s) % block_size == 0)
    if is_causal:
        keep = keep & (s <= t)
    return keep


def sparse_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    block_size: int,
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
    mode: str = "fixed",
    n_summary: int = 1,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> Tensor:
    """Sparse Transformer attention emulated with a mask, as the paper did (O(L²) memory)."""
    _check_blocked(query, key, value, block_size, key_padding_mask, dropout_p, scale)
    mask = sparse_pattern(
        query.shape[2],
        block_size=block_size,
        is_causal=is_causal,
        mode=mode,
        n_summary=n_summary,
        device=query.device,
    )[None, None]  # (1, 1, L, L)
    if key_padding_mask is not None:
        key, value = _drop_padding(key, value, key_padding_mask)
        mask = mask & key_padding_mask[:, None, None, :]
    return masked_sdpa(query, key, value, mask, dropout_p, scale)


def _check_blocked(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    block_size: int,
    key_padding_mask: Tensor | None,
    dropout_p: float,
    scale: float | None,
    *,
    gqa: bool = False,
) -> None:
    """The checks of every block-sparse baseline (skipped while ``torch.compile`` traces)."""
    if torch.compiler.is_compiling():
        return
    validate.check_inputs(
        query,
        key,
        value,
        same_length=True,
        key_padding_mask=key_padding_mask,
        dropout_p=dropout_p,
        scale=scale,
        gqa=gqa,
    )
    check_block_size(block_size)


def _drop_padding(key: Tensor, value: Tensor, key_padding_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Keys and values with padded positions set to exactly 0 (NaN/Inf there included).

    A masked score alone is not enough: SDPA adds ``-inf`` to a NaN score (still NaN) and
    multiplies a NaN value by its zero weight (still NaN).
    """
    real = key_padding_mask[:, None, :, None]  # (B, 1, S, 1)
    return zero_padding(key, real), zero_padding(value, real)


def _causal_mask(q_len: int, k_len: int, device: torch.device) -> Tensor:
    """``(L, S)`` bool, end-aligned: query ``t`` sees keys ``s <= t + S - L``."""
    t = torch.arange(q_len, device=device)[:, None]
    s = torch.arange(k_len, device=device)[None, :]
    return s <= t + (k_len - q_len)
