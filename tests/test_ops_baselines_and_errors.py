"""Baselines against explicit-mask references, and clear errors for bad input."""

from __future__ import annotations

import re

import pytest
import torch

from sparse_sinkhorn.ops import (
    dense_attention,
    local_attention,
    reference_dense_attention,
    sinkhorn_attention,
    sinkhorn_balance,
    sparse_attention,
    sparse_pattern,
)

B, H, D = 2, 3, 4


def _qkv(length: int = 11) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(B, H, length, D, dtype=torch.float64) for _ in range(3))


def _mask(length: int = 11) -> torch.Tensor:
    mask = torch.ones(B, length, dtype=torch.bool)
    mask[1, 6:] = False
    return mask


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_dense_matches_reference(causal: bool, padded: bool) -> None:
    q, k, v = _qkv()
    mask = _mask() if padded else None
    keep = torch.ones(11, 11, dtype=torch.bool)
    if causal:
        keep = keep.tril()
    keep = keep[None, None] if mask is None else keep & mask[:, None, None, :]
    out = dense_attention(q, k, v, is_causal=causal, key_padding_mask=mask)
    torch.testing.assert_close(out, reference_dense_attention(q, k, v, keep=keep))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_local_matches_reference(causal: bool, padded: bool) -> None:
    q, k, v = _qkv()
    mask = _mask() if padded else None
    pos = torch.arange(11)
    keep = pos[:, None] // 4 == pos[None, :] // 4
    if causal:
        keep = keep & (pos[None, :] <= pos[:, None])
    keep = keep[None, None] if mask is None else keep & mask[:, None, None, :]
    out = local_attention(q, k, v, block_size=4, is_causal=causal, key_padding_mask=mask)
    ref = reference_dense_attention(q, k, v, keep=keep)
    real = 1.0 if mask is None else mask[:, None, :, None]
    torch.testing.assert_close(out * real, ref * real)


@pytest.mark.parametrize("mode", ["fixed", "strided"])
@pytest.mark.parametrize("causal", [False, True])
def test_sparse_matches_its_pattern(mode: str, causal: bool) -> None:
    q, k, v = _qkv(16)
    pattern = sparse_pattern(16, block_size=4, is_causal=causal, mode=mode)
    out = sparse_attention(q, k, v, block_size=4, is_causal=causal, mode=mode)
    torch.testing.assert_close(out, reference_dense_attention(q, k, v, keep=pattern))
    if mode == "fixed":  # own block + the last position of every block
        assert pattern[5].tolist() == [
            p in (3, 4, 5, 6, 7, 11, 15) and (p <= 5 or not causal) for p in range(16)
        ]


def test_sparse_attention_is_causal() -> None:
    q, k, v = _qkv(16)
    out = sparse_attention(q, k, v, block_size=4, is_causal=True)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 9:], v2[:, :, 9:] = 0.0, 0.0
    out2 = sparse_attention(q, k2, v2, block_size=4, is_causal=True)
    torch.testing.assert_close(out[:, :, :9], out2[:, :, :9], atol=0, rtol=0)


# ---- errors ------------------------------------------------------------------------------


def _call(**overrides: object) -> None:
    q, k, v = (torch.randn(2, 3, 16, 4) for _ in range(3))
    kwargs: dict = dict(sort_logits=torch.randn(2, 3, 4, 4), block_size=4)
    kwargs.update(overrides)
    args = [kwargs.pop(name, default) for name, default in (("query", q), ("key", k), ("value", v))]
    sinkhorn_attention(*args, kwargs.pop("sort_logits"), **kwargs)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (
            dict(query=torch.randn(3, 16, 4)),
            ValueError,
            "query must be 4-D (B, H, L, D), got shape (3, 16, 4)",
        ),
        (dict(key=torch.randn(2, 2, 16, 4)), ValueError, "share batch and heads"),
        (dict(key=torch.randn(2, 3, 16, 5)), ValueError, "head dims differ: 4 vs 5"),
        (dict(query=torch.randn(2, 3, 12, 4)), ValueError, "lengths must match: got 12 and 16"),
        (dict(sort_logits=torch.randn(2, 3, 5, 5)), ValueError, "(2, 3, 4, 4)"),
        (dict(block_size=0), ValueError, "block_size must be a positive int, got 0"),
        (dict(block_size=-2), ValueError, "got -2"),
        (dict(n_sortcut=5), ValueError, "n_sortcut=5 is larger than the number of blocks N=4"),
        (dict(n_sortcut=2, is_causal=True), ValueError, "encoders only"),
        (dict(key_padding_mask=torch.ones(2, 16)), TypeError, "must be a bool tensor"),
        (dict(key_padding_mask=torch.ones(2, 15, dtype=torch.bool)), ValueError, "(2, 16)"),
        (dict(temperature=0.0), ValueError, "temperature must be > 0, got 0.0"),
        (dict(temperature=-1.0), ValueError, "got -1.0"),
        (dict(dropout_p=1.5), ValueError, "dropout_p must be in [0, 1), got 1.5"),
        (dict(query=torch.randn(2, 3, 16, 4, dtype=torch.float64)), TypeError, "dtypes differ"),
        (dict(n_iters=-1), ValueError, "n_iters must be a non-negative int"),
    ],
)
def test_bad_input_gets_a_clear_error(overrides: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        _call(**overrides)


def test_balance_rejects_bad_temperature() -> None:
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        sinkhorn_balance(torch.randn(3, 3), temperature=0)


def test_baselines_reject_bad_input() -> None:
    q, k, v = _qkv(8)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        local_attention(q, k, v, block_size=0)
    with pytest.raises(ValueError, match="sparse mode must be 'fixed' or 'strided'"):
        sparse_attention(q, k, v, block_size=4, mode="dilated")
    with pytest.raises(TypeError, match="bool tensor"):
        dense_attention(q, k, v, key_padding_mask=torch.ones(B, 8))
