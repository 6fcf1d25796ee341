"""`ops.topk_block_attention(backend="flex")`, MoBA's top-k block attention on FlexAttention:
equal to the float64 reference on the CPU (forward; FlexAttention has no CPU backward in torch
2.13), the block mask skips the tiles no query reads, and on CUDA (marker ``gpu``) forward and
backward."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from sparse_sinkhorn.ops import (
    reference_topk_block_attention,
    topk_block_attention,
    topk_block_mask,
)
from sparse_sinkhorn.ops.flex import topk_mask_mod

# (length, block size, top_k, causal, gate, padded, key/value heads): every combination of a
# whole and a partial last block, two block sizes, one and three picks, causal or not, both
# gates; each unpadded with as many key/value heads as heads, and padded with grouped heads.
GRID = [
    (*shape, padded, kv)
    for shape in itertools.product([64, 70], [8, 16], [1, 3], [False, True], ["mean", "bound"])
    for padded, kv in [(False, 4), (True, 2)]
]


def _inputs(length: int, kv_heads: int, padded: bool, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, length, 8, generator=g, dtype=dtype)
    k, v = (torch.randn(2, kv_heads, length, 8, generator=g, dtype=dtype) for _ in range(2))
    mask = None
    if padded:  # the second sequence ends 13 tokens early; its padded keys/values are NaN
        mask = torch.ones(2, length, dtype=torch.bool)
        mask[1, length - 13 :] = False
        k[1, :, length - 13 :] = float("nan")
        v[1, :, length - 13 :] = float("nan")
    return q, k, v, mask


def _flex(*args, **kwargs):
    with warnings.catch_warnings():  # the CPU's un-compiled FlexAttention says so
        warnings.simplefilter("ignore", UserWarning)
        return topk_block_attention(*args, backend="flex", **kwargs)


@pytest.mark.parametrize(("length", "block", "top_k", "causal", "gate", "padded", "kv"), GRID)
def test_flex_equals_the_float64_reference(
    length: int, block: int, top_k: int, causal: bool, gate: str, padded: bool, kv: int
) -> None:
    q, k, v, mask = _inputs(length, kv, padded, torch.float64)
    options = dict(block_size=block, top_k=top_k, is_causal=causal, gate=gate)
    with torch.no_grad():
        out = _flex(q, k, v, key_padding_mask=mask, **options)
    ref = reference_topk_block_attention(q, k, v, key_padding_mask=mask, **options)
    real = torch.ones(2, length, dtype=torch.bool) if mask is None else mask
    real = real[:, None, :, None].expand_as(out)  # padded queries' outputs are not compared
    assert torch.isfinite(out[real]).all()
    torch.testing.assert_close(out[real], ref[real], rtol=1e-12, atol=1e-12)


def test_flex_equals_the_grouped_op_in_float32() -> None:
    q, k, v, mask = _inputs(96, 2, True, torch.float32, seed=3)
    options = dict(block_size=16, top_k=2, is_causal=True, gate="bound", key_padding_mask=mask)
    with torch.no_grad():
        out = _flex(q, k, v, **options)
        ours = topk_block_attention(q, k, v, **options)
    real = mask[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[real], ours[real], rtol=1e-5, atol=1e-5)


def test_the_block_mask_visits_only_the_tiles_some_query_reads() -> None:
    """No picks, not causal: each 128-query tile of a 512-token sequence reads its own blocks
    only, so the mask visits one key tile per query tile; one pick of block 0 by one query
    of the last tile adds exactly that tile."""
    picks = torch.full((1, 1, 512, 1), -1, dtype=torch.long)
    mask = topk_block_mask(picks, block_size=32)
    assert mask.kv_num_blocks.flatten().tolist() == [1, 1, 1, 1]
    picks[0, 0, 500, 0] = 0
    mask = topk_block_mask(picks, block_size=32)
    assert mask.kv_num_blocks.flatten().tolist() == [1, 1, 1, 2]
    assert set(mask.kv_indices[0, 0, 3, :2].tolist()) == {0, 3}


def test_the_mask_mod_compiles_to_the_same_block_mask() -> None:
    """CUDA builds the block mask through ``torch.compile(create_block_mask)``: the mask_mod
    traces (here with the eager backend, on the CPU) and gives the mask built without it."""
    from torch.nn.attention.flex_attention import create_block_mask

    g = torch.Generator().manual_seed(0)
    picks = torch.randint(-1, 8, (2, 2, 256, 2), generator=g)
    real = torch.ones(2, 256, dtype=torch.bool)
    real[1, 200:] = False
    mod = topk_mask_mod(picks, block_size=32, is_causal=True, key_padding_mask=real)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(create_block_mask, backend="eager")(mod, 2, 2, 256, 256, "cpu")
    eager = topk_block_mask(picks, block_size=32, is_causal=True, key_padding_mask=real)
    assert torch.equal(compiled.kv_num_blocks, eager.kv_num_blocks)
    assert torch.equal(compiled.to_dense(), eager.to_dense())


def test_the_block_mask_checks_its_inputs() -> None:
    picks = torch.zeros(1, 1, 64, 1, dtype=torch.long)
    for bad in (0, -4, 3.5):
        with pytest.raises((ValueError, TypeError), match="block_size"):
            topk_block_mask(picks, block_size=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="integer tensor"):
        topk_block_mask(picks.float(), block_size=16)
    with pytest.raises(ValueError, match="integer tensor"):
        topk_block_mask(picks[0], block_size=16)
    with pytest.raises(TypeError, match="bool"):
        topk_block_mask(picks, block_size=16, key_padding_mask=torch.ones(1, 64))
    with pytest.raises(ValueError, match="shape"):
        topk_block_mask(picks, block_size=16, key_padding_mask=torch.ones(1, 63, dtype=torch.bool))


def test_flex_refuses_a_cpu_gradient_and_what_it_does_not_compute() -> None:
    q, k, v, _ = _inputs(64, 4, False, torch.float32)
    with pytest.raises(NotImplementedError, match="no backward on the CPU"):
        _flex(q.requires_grad_(), k, v, block_size=16)
    with torch.no_grad():  # as the message says: leaves that need a gradient, none wanted
        out = _flex(q, k, v, block_size=16)
        assert torch.equal(out, _flex(q.detach(), k, v, block_size=16))
    q = q.detach()
    with pytest.raises(ValueError, match="no compressed branch; use"):
        _flex(q, k, v, block_size=16, compressed=True)
    with pytest.raises(ValueError, match=r"no dropout, got dropout_p=0\.1"):
        _flex(q, k, v, block_size=16, dropout_p=0.1)
    with pytest.raises(ValueError, match="backend must be one of"):
        topk_block_attention(q, k, v, block_size=16, backend="triton")


@pytest.mark.gpu
def test_cuda_flex_forward_and_backward_match_the_reference() -> None:
    """One case (each compiles FlexAttention, which costs make gpu-check's time): causal,
    padded, grouped key/value heads."""
    causal, padded, kv = True, True, 2
    q, k, v, mask = _inputs(256, kv, padded, torch.float32, seed=5)
    if mask is not None:  # NaN padding would make the reference's gradients NaN there
        k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)
    options = dict(block_size=32, top_k=2, is_causal=causal, gate="bound")
    cuda = [t.cuda().requires_grad_() for t in (q, k, v)]
    cmask = None if mask is None else mask.cuda()
    out = topk_block_attention(*cuda, key_padding_mask=cmask, backend="flex", **options)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = reference_topk_block_attention(*ref_in, key_padding_mask=mask, **options)
    real = torch.ones(2, 256, dtype=torch.bool) if mask is None else mask
    real = real[:, None, :, None].expand_as(ref).double()
    cot = torch.randn(ref.shape, generator=torch.Generator().manual_seed(9)).double() * real
    got = torch.autograd.grad(out, cuda, cot.float().cuda())
    want = torch.autograd.grad(ref, ref_in, cot)
    torch.testing.assert_close(
        (out.cpu().double() * real), ref.detach() * real, atol=1e-4, rtol=1e-4
    )
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.cpu().double(), b, atol=1e-4, rtol=1e-4)


def test_a_topk_model_with_the_flex_backend_equals_the_grouped_one() -> None:
    """`AttentionConfig(backend="flex")`: the same language model's logits in eval; training
    it on the CPU is refused with the reason; the config refuses the compressed branch, and
    the model a dropout the kernel has no place for (at build, not at the first step)."""
    from sparse_sinkhorn.models import LanguageModel, LanguageModelConfig
    from sparse_sinkhorn.nn import AttentionConfig

    def model(backend: str) -> LanguageModel:
        torch.manual_seed(0)
        att = AttentionConfig(kind="topk", top_k=2, gate="bound", block_size=8, backend=backend)
        config = LanguageModelConfig(
            vocab_size=32, d_model=32, n_heads=4, n_layers=2, d_ff=64, dropout=0.0, attention=att
        )
        return LanguageModel(config)

    ids = torch.randint(0, 32, (2, 45), generator=torch.Generator().manual_seed(1))
    grouped, flex = model("grouped").eval(), model("flex").eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.testing.assert_close(flex(ids), grouped(ids), rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="no backward on the CPU"):
        flex.train()(ids)
    with pytest.raises(ValueError, match="no compressed branch"):
        AttentionConfig(kind="topk", compressed=True, backend="flex")
    att = AttentionConfig(kind="topk", block_size=8, backend="flex")
    with pytest.raises(ValueError, match=r"no attention dropout, got dropout=0\.1"):
        LanguageModel(LanguageModelConfig(vocab_size=32, d_model=32, n_heads=4, attention=att))
