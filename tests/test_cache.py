"""Incremental decoding: cached step-by-step logits equal the full causal forward."""

from __future__ import annotations

import pytest
import torch

from sparse_sinkhorn.models import LanguageModel, LanguageModelConfig
from sparse_sinkhorn.nn import AttentionConfig, SinkhornSelfAttention
from sparse_sinkhorn.nn.cache import AttentionCache, DecodingCache
from sparse_sinkhorn.nn.kinds import kind_fields

SORT_NETS = ("linear", "mlp", "bilinear", "qk", "qk-bound")
# (kind, sort net, hard, pooling, sparse mode); sort options exist for sinkhorn kinds only.
VARIANTS = [
    ("dense", "linear", False, "sum", "fixed"),
    ("local", "linear", False, "sum", "fixed"),
    ("sparse", "linear", False, "sum", "fixed"),
    ("sparse", "linear", False, "sum", "strided"),
    ("topk", "linear", False, "sum", "fixed"),
] + [
    (kind, net, hard, pool, "fixed")
    for kind in ("sinkhorn", "mixture")
    for net in SORT_NETS
    for hard in (False, True)
    for pool in ("sum", "mean", "max")
    if not (net == "qk" and pool == "sum")  # qk refuses sum pooling
    if not (net == "qk-bound" and pool != "max")  # qk-bound reads max-pooled summaries
]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(
    kind: str,
    net: str,
    hard: bool,
    pool: str,
    mode: str,
    dtype: torch.dtype,
    balance: str = "sinkhorn",
    **kw: int,
) -> LanguageModel:
    fields = dict(
        block_size=kw.get("block_size", 4),
        max_len=64,
        sort_net=net,
        hard=hard,
        pooling=pool,
        sparse_mode=mode,
        n_iters=kw.get("n_iters", 8),
        balance=balance,
    )
    att = AttentionConfig(kind=kind, **kind_fields(kind, fields))  # the fields the kind reads
    cfg = LanguageModelConfig(
        vocab_size=13, d_model=16, n_heads=2, n_layers=2, d_ff=32, attention=att
    )
    return LanguageModel(cfg).to(dtype).eval()


def _cached_logits(
    model: LanguageModel, ids: torch.Tensor, prompt: int, chunk: int = 1
) -> torch.Tensor:
    cache = model.new_cache()
    outs = [model(ids[:, :prompt], cache=cache)]
    for t in range(prompt, ids.shape[1], chunk):
        outs.append(model(ids[:, t : t + chunk], cache=cache))
    assert cache.length == ids.shape[1]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize(("kind", "net", "hard", "pool", "mode"), VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cached_logits_equal_full_forward(
    kind: str, net: str, hard: bool, pool: str, mode: str, dtype: torch.dtype
) -> None:
    model = _model(kind, net, hard, pool, mode, dtype)
    ids = torch.randint(0, 13, (2, 22))  # 5.5 blocks of 4: a partial last block
    full = model(ids)  # (B, L, V)
    for prompt in (1, 4, 6):  # a prompt ending mid-block and at a block boundary
        got = _cached_logits(model, ids, prompt)
        torch.testing.assert_close(got, full, atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("balance", ["softmax", "sinkhorn-targets"])
@pytest.mark.parametrize(("kind", "net", "hard"), [("sinkhorn", "linear", False),
    ("sinkhorn", "bilinear", True), ("mixture", "mlp", False)])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cached_logits_equal_full_forward_beyond_the_paper_balancing(
    balance: str, kind: str, net: str, hard: bool, dtype: torch.dtype
) -> None:
    model = _model(kind, net, hard, "max", "fixed", dtype, balance=balance)
    ids = torch.randint(0, 13, (2, 22))
    full = model(ids)
    for prompt in (1, 6):
        torch.testing.assert_close(
            _cached_logits(model, ids, prompt), full, atol=TOL[dtype], rtol=0
        )


def test_decoding_refuses_the_non_causal_balancing() -> None:
    """``balance="sinkhorn-leaky"``: row ``i`` of its plan depends on later blocks, so no
    cache can reproduce the full forward; decoding says so (without the cache it runs)."""
    model = _model("sinkhorn", "linear", False, "sum", "fixed", torch.float64, "sinkhorn-leaky")
    prompt = torch.randint(0, 13, (1, 6))
    with pytest.raises(ValueError, match="not causal"):
        model.generate(prompt, 3)
    with pytest.raises(ValueError, match="not causal"):
        model(prompt[:, :2], cache=model.new_cache())  # refused before any block is routed
    assert model.generate(prompt, 3, use_cache=False).shape == (1, 9)


@pytest.mark.parametrize("kind", ["sinkhorn", "mixture", "sparse", "topk"])
def test_cached_chunks_and_odd_block_sizes(kind: str) -> None:
    model = _model(kind, "linear", False, "sum", "fixed", torch.float64, block_size=5)
    ids = torch.randint(0, 13, (3, 31))
    full = model(ids)
    torch.testing.assert_close(_cached_logits(model, ids, 2, chunk=3), full, atol=1e-10, rtol=0)


def test_generate_with_cache_matches_without() -> None:
    model = _model("sinkhorn", "bilinear", False, "sum", "fixed", torch.float64)
    prompt = torch.randint(0, 13, (2, 3))
    fast = model.generate(prompt, 20, sample_temperature=0.0)
    slow = model.generate(prompt, 20, sample_temperature=0.0, use_cache=False)
    assert torch.equal(fast, slow)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = model.generate(prompt, 20, sample_temperature=1.0, sample_top_k=5, generator=g1)
    b = model.generate(
        prompt, 20, sample_temperature=1.0, sample_top_k=5, generator=g2, use_cache=False
    )
    assert torch.equal(a, b)


def test_generate_takes_the_former_sampling_names() -> None:
    """``temperature=`` and ``top_k=`` (the former names of ``sample_temperature`` and
    ``sample_top_k``) sample the same tokens, with a DeprecationWarning each; another unknown
    keyword is a TypeError."""
    model = _model("sinkhorn", "bilinear", False, "sum", "fixed", torch.float64)
    prompt = torch.randint(0, 13, (2, 3))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    new = model.generate(prompt, 8, sample_temperature=0.7, sample_top_k=4, generator=g1)
    with pytest.warns(DeprecationWarning) as caught:
        old = model.generate(prompt, 8, temperature=0.7, top_k=4, generator=g2)
    assert torch.equal(new, old)
    messages = {str(w.message) for w in caught}
    assert any("temperature= is renamed sample_temperature=" in m for m in messages)
    assert any("top_k= is renamed sample_top_k=" in m for m in messages)
    with pytest.raises(TypeError, match="unexpected keyword argument 'topk'"):
        model.generate(prompt, 2, topk=3)


def test_cache_errors() -> None:
    model = _model("sinkhorn", "linear", False, "sum", "fixed", torch.float32)
    ids = torch.randint(0, 13, (1, 5))
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        model(ids, cache=model.new_cache())
    model.eval()
    with pytest.raises(ValueError, match="key_padding_mask"):
        model(ids, torch.ones(1, 5, dtype=torch.bool), cache=model.new_cache())
    with pytest.raises(ValueError, match="max_len=64"):
        model.generate(ids, 80)
    with pytest.raises(ValueError, match="P >= 1"):
        model.generate(ids[:, :0], 3)
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="temperature"):
            model.generate(ids, 3, sample_temperature=bad)
    for bad_k in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="top_k"):
            model.generate(ids, 3, sample_top_k=bad_k)  # type: ignore[arg-type]
    enc = SinkhornSelfAttention(16, 2, causal=False, block_size=4, max_len=64).eval()
    with pytest.raises(ValueError, match="causal"):
        enc(torch.randn(1, 5, 16), cache=AttentionCache())
    with pytest.raises(ValueError, match="layers"):
        model(ids, cache=DecodingCache.for_layers(3))
