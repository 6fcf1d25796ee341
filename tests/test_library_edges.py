"""Library edges that used to reach torch's own errors: a value head dim of its own, a layer
given the wrong dtype, an empty sequence or a float mask, a zero block size, a non-positive
fetch timeout."""

from __future__ import annotations

import pytest
import torch

from helpers_cli import assert_one_line_error
from sparse_sinkhorn import SinkhornSelfAttention, sinkhorn_attention
from sparse_sinkhorn.data.fetch import fetch
from sparse_sinkhorn.ops.blocks import block_summaries
from sparse_sinkhorn.ops.reference import reference_sinkhorn_attention


@pytest.mark.parametrize("is_causal", [False, True], ids=["encoder", "causal"])
def test_value_head_dim_of_its_own_matches_the_reference(is_causal: bool) -> None:
    """V's head dim may differ from Q/K's, as in SDPA, on the common (two-part, flash) path
    too: forward and backward equal the float64 dense reference."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 2, 16, 8, dtype=torch.float64, generator=g) for _ in range(2))
    v = torch.randn(2, 2, 16, 5, dtype=torch.float64, generator=g)
    logits = torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=g)
    inputs = [t.requires_grad_() for t in (q, k, v, logits)]
    out = sinkhorn_attention(*inputs, block_size=4, is_causal=is_causal)
    ref = reference_sinkhorn_attention(*inputs, block_size=4, is_causal=is_causal)
    assert out.shape == (2, 2, 16, 5)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(ref, inputs, grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def _layer() -> SinkhornSelfAttention:
    return SinkhornSelfAttention(d_model=16, n_heads=2, block_size=4, max_len=64)


@pytest.mark.parametrize(
    ("x", "mask", "error", "match"),
    [
        (torch.randn(2, 8, 16, dtype=torch.float64), None, TypeError, "float64 but the layer"),
        (torch.randn(2, 0, 16), None, ValueError, "empty dimension"),
        (torch.randn(0, 8, 16), None, ValueError, "empty dimension"),
        (torch.randn(2, 8, 16), torch.ones(2, 8), TypeError, "key_padding_mask must be a bool"),
        (torch.randn(2, 8, 16), torch.ones(2, 7, dtype=torch.bool), ValueError, r"\(B, L\)"),
        (torch.randint(0, 5, (2, 8, 16)), None, TypeError, "floating point"),
    ],
    ids=["float64-input", "empty-L", "empty-B", "float-mask", "mask-shape", "int-input"],
)
def test_layer_input_errors_name_the_argument(x, mask, error, match) -> None:
    with pytest.raises(error, match=match):
        _layer()(x, key_padding_mask=mask)


def test_layer_still_takes_other_dtypes_under_autocast() -> None:
    layer = _layer()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(2, 8, 16).bfloat16())
    assert y.shape == (2, 8, 16)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_size", [0, -1, 2.0, True])
def test_block_summaries_refuse_a_bad_block_size(causal, block_size) -> None:
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        block_summaries(torch.randn(1, 8, 4), block_size, causal=causal)


@pytest.mark.parametrize("timeout", ["-1", "0", "nan", "inf"])
def test_fetch_timeout_must_be_positive(timeout: str, capsys, tmp_path) -> None:
    argv = ["data", "fetch", "mnist", "--data-dir", str(tmp_path), f"--timeout={timeout}"]
    assert_one_line_error(argv, capsys, "--timeout")
    with pytest.raises(ValueError, match="timeout must be"):
        fetch("mnist", tmp_path, timeout=float(timeout))
    assert list(tmp_path.iterdir()) == []
