"""Property-based tests: generated shapes, block sizes, masks, dtypes and modes (causal,
SortCut, hard, Mixture) of ``sinkhorn_attention`` against the dense reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_sinkhorn import sinkhorn_attention
from sparse_sinkhorn.ops.blocks import num_blocks
from sparse_sinkhorn.ops.reference import reference_sinkhorn_attention

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)


@st.composite
def cases(draw: st.DrawFn) -> dict:
    batch, heads = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    length, dim = draw(st.integers(1, 24)), draw(st.integers(1, 5))
    block = draw(st.integers(1, 9))
    n = num_blocks(length, block)
    causal = draw(st.booleans())
    sortcut = None if causal or not draw(st.booleans()) else draw(st.integers(1, n))
    hard = draw(st.booleans())
    dtype = torch.float64 if hard else draw(st.sampled_from([torch.float64, torch.float32]))
    lengths = draw(st.none() | st.lists(st.integers(1, length), min_size=batch, max_size=batch))
    return dict(
        shape=(batch, heads, length, dim),
        block=block,
        causal=causal,
        sortcut=sortcut,
        hard=hard,
        mix_dense=draw(st.booleans()),
        dtype=dtype,
        lengths=lengths,
        balance=draw(st.sampled_from(["sinkhorn", "softmax", "sinkhorn-targets"])),
        n_iters=draw(st.integers(0, 6)),
        temperature=draw(st.floats(0.2, 2.0)),
        seed=draw(st.integers(0, 2**16)),
    )


def _inputs(case: dict):
    gen = torch.Generator().manual_seed(case["seed"])
    b, h, length, d = case["shape"]
    q, k, v = (torch.randn(b, h, length, d, generator=gen, dtype=case["dtype"]) for _ in range(3))
    n = num_blocks(length, case["block"])
    logits = torch.randn(b, h, n, n, generator=gen, dtype=case["dtype"])
    mask = None
    if case["lengths"] is not None:
        mask = torch.arange(length)[None, :] < torch.tensor(case["lengths"])[:, None]
    return q, k, v, logits, mask


def _options(case: dict, mask) -> dict:
    return dict(
        block_size=case["block"],
        is_causal=case["causal"],
        n_sortcut=case["sortcut"],
        hard=case["hard"],
        mix_dense=case["mix_dense"],
        balance=case["balance"],
        key_padding_mask=mask,
        n_iters=case["n_iters"],
        temperature=case["temperature"],
    )


@SETTINGS
@given(cases())
def test_matches_the_dense_reference(case: dict) -> None:
    q, k, v, logits, mask = _inputs(case)
    out = sinkhorn_attention(q, k, v, logits, **_options(case, mask))
    ref = reference_sinkhorn_attention(q, k, v, logits, **_options(case, mask))
    assert out.shape == q.shape and out.dtype == q.dtype
    real = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool) if mask is None else mask
    sel = real[:, None, :, None].expand_as(out)
    tol = 1e-9 if case["dtype"] == torch.float64 else 2e-4
    torch.testing.assert_close(out[sel].double(), ref[sel].double(), atol=tol, rtol=tol)


@SETTINGS
@given(cases(), st.sampled_from([float("nan"), float("inf"), -float("inf")]))
def test_nonfinite_padding_never_reaches_real_outputs(case: dict, poison: float) -> None:
    q, k, v, logits, mask = _inputs(case)
    if mask is None:
        mask = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool)
        mask[:, -1] = q.shape[2] == 1  # pad the last position unless it is the only one
    clean = sinkhorn_attention(q, k, v, logits, **_options(case, mask))
    pad = ~mask[:, None, :, None].expand_as(q)
    dirty = sinkhorn_attention(
        *(t.masked_fill(pad, poison) for t in (q, k, v)), logits, **_options(case, mask)
    )
    assert torch.isfinite(clean[~pad]).all()
    assert torch.equal(dirty[~pad], clean[~pad])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@SETTINGS
@given(st.integers(1, 3), st.integers(1, 20), st.integers(1, 6), st.integers(0, 2**16))
def test_low_precision_is_finite_and_close(dtype, heads, length, block, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, length, 8, generator=gen) for _ in range(3))
    n = num_blocks(length, block)
    logits = torch.randn(1, heads, n, n, generator=gen)
    out = sinkhorn_attention(*(t.to(dtype) for t in (q, k, v)), logits.to(dtype), block_size=block)
    ref = reference_sinkhorn_attention(q, k, v, logits, block_size=block)
    assert out.dtype == dtype and torch.isfinite(out).all()
    tol = 2e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(out.double(), ref.double(), atol=tol, rtol=tol)
