"""Grouped-query / multi-query attention in the Sinkhorn op: ``H_kv`` key/value heads serving
``H`` query heads equals the op on key/value repeated ``H / H_kv`` times, in every mode."""

from __future__ import annotations

import pytest
import torch

from grids import mode_id, op_modes
from sparse_sinkhorn.nn import AttentionConfig, SortNet
from sparse_sinkhorn.nn.cache import AttentionCache
from sparse_sinkhorn.ops import (
    block_summaries,
    reference_sinkhorn_attention,
    sinkhorn_attention,
    sinkhorn_attention_with_plan,
)

B, H, D = 2, 4, 4

MODES = op_modes(mix_dense=(False, True))


def _inputs(kv_heads: int, length: int, block: int, dtype: torch.dtype = torch.float64):
    n = -(-length // block)
    q = torch.randn(B, H, length, D, dtype=dtype)
    k, v = (torch.randn(B, kv_heads, length, D, dtype=dtype) for _ in range(2))
    logits = torch.randn(B, H, n, n, dtype=dtype)
    return q, k, v, logits


def _padding(length: int) -> torch.Tensor:
    mask = torch.ones(B, length, dtype=torch.bool)
    mask[-1, length // 3 :] = False
    return mask


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
@pytest.mark.parametrize("kv_heads", [1, 2], ids=["kv1", "kv2"])  # MQA, GQA with groups of 2
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_gqa_matches_reference_with_repeated_kv(mode: dict, kv_heads: int, padded: bool) -> None:
    block, length = 4, 19
    q, k, v, logits = _inputs(kv_heads, length, block)
    mask = _padding(length) if padded else None
    out = sinkhorn_attention(q, k, v, logits, block_size=block, key_padding_mask=mask, **mode)
    rep = H // kv_heads
    ref = reference_sinkhorn_attention(
        q,
        k.repeat_interleave(rep, dim=1),
        v.repeat_interleave(rep, dim=1),
        logits,
        block_size=block,
        key_padding_mask=mask,
        **mode,
    )
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", op_modes(), ids=mode_id)
def test_gqa_backward_matches_reference(mode: dict) -> None:
    """Gradients reach the shared key/value heads summed over their query-head group."""
    block, length, kv_heads = 4, 16, 2
    q, k, v, logits = _inputs(kv_heads, length, block)
    grads = []
    for fn in (sinkhorn_attention, reference_sinkhorn_attention):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, logits)]
        qq, kk, vv, ll = leaves
        if fn is reference_sinkhorn_attention:
            kk, vv = (t.repeat_interleave(H // kv_heads, dim=1) for t in (kk, vv))
        out = fn(qq, kk, vv, ll, block_size=block, **mode)
        out.pow(2).sum().backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_gqa_plan_has_one_routing_matrix_per_query_head() -> None:
    q, k, v, logits = _inputs(1, 16, 4, dtype=torch.float32)
    _, plan = sinkhorn_attention_with_plan(q, k, v, logits, block_size=4)
    assert plan.P.shape == (B, H, 4, 4)


def test_gqa_float32_matches_repeated_kv_fast_path() -> None:
    q, k, v, logits = _inputs(2, 40, 8, dtype=torch.float32)
    mask = _padding(40)
    kw = dict(block_size=8, is_causal=True, key_padding_mask=mask)
    out = sinkhorn_attention(q, k, v, logits, **kw)
    rep = sinkhorn_attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), logits, **kw
    )
    assert torch.equal(out, rep)


@pytest.mark.parametrize("kv_heads", [3, 8], ids=["kv3", "kv8"])
def test_kv_heads_must_divide_query_heads(kv_heads: int) -> None:
    q, k, v, logits = _inputs(kv_heads, 16, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="divide the query heads"):
        sinkhorn_attention(q, k, v, logits, block_size=4)


def test_key_and_value_heads_must_match() -> None:
    q, k, _, logits = _inputs(2, 16, 4, dtype=torch.float32)
    v = torch.randn(B, 1, 16, D)
    with pytest.raises(ValueError, match="share batch and heads"):
        sinkhorn_attention(q, k, v, logits, block_size=4)


def test_sort_logits_need_query_heads() -> None:
    q, k, v, _ = _inputs(2, 16, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="sort_logits must have shape"):
        sinkhorn_attention(q, k, v, torch.randn(B, 2, 4, 4), block_size=4)


@pytest.mark.parametrize("kind", ["sinkhorn", "mixture"])
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("kv_heads", [1, 2], ids=["kv1", "kv2"])
def test_gqa_decoding_cache_equals_full_forward(kind: str, hard: bool, kv_heads: int) -> None:
    """The incremental cache keeps H_kv heads and steps to the full causal forward's outputs."""
    block, length, d_x = 4, 22, 6
    cfg = AttentionConfig(kind=kind, block_size=block, max_len=32, hard=hard)
    sort_net = SortNet(d_x, H, cfg.max_blocks).double()
    q, k, v, _ = _inputs(kv_heads, length, block)
    x = torch.randn(B, length, d_x, dtype=torch.float64)
    logits = sort_net(block_summaries(x, block, causal=True), block_summaries(x, block))
    full = sinkhorn_attention(
        q, k, v, logits, block_size=block, is_causal=True, mix_dense=kind == "mixture", hard=hard
    )
    assert isinstance(full, torch.Tensor)
    for prompt in (1, 4, 6):
        cache = AttentionCache()
        cache.prefill(k[:, :, :prompt], v[:, :, :prompt], x[:, :prompt], cfg, sort_net)
        rest = (t[:, :, prompt:] for t in (q, k, v))
        got = cache.step(*rest, x[:, prompt:])
        assert cache.k is not None and cache.k.shape[1] == kv_heads
        torch.testing.assert_close(got, full[:, :, prompt:], rtol=0, atol=1e-10)
