"""Modules: exact causality, padding invariance through the sort net, determinism, errors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from sparse_sinkhorn.nn import (
    AttentionConfig,
    CrossAttention,
    Routing,
    SinkhornSelfAttention,
    SortNet,
    TransformerLayer,
)
from sparse_sinkhorn.nn.kinds import kind_fields

D_MODEL, HEADS = 16, 2
SORT_NETS = ["linear", "mlp", "bilinear", "qk", "qk-bound"]


def _layer(causal: bool, **kw: object) -> SinkhornSelfAttention:
    cfg: dict = dict(block_size=4, max_len=64, kind="sinkhorn")
    cfg.update(kw)
    if cfg.get("sort_net") in ("qk", "qk-bound"):
        cfg.setdefault("pooling", "max")  # qk refuses sum pooling, qk-bound all but max
    if cfg.get("sort_net") == "qk-bound":
        cfg["pooling"] = "max"
    cfg = kind_fields(cfg["kind"], cfg)  # routing options only where the kind reads them
    return SinkhornSelfAttention(D_MODEL, HEADS, causal=causal, **cfg).double()


def _run(layer: torch.nn.Module, x: torch.Tensor, seed: int = 3, **kw: object) -> torch.Tensor:
    out = layer(x, generator=torch.Generator().manual_seed(seed), **kw)
    return out


# (kind, sort net, hard): sort options only exist for the sinkhorn kinds.
VARIANTS = [(k, "linear", False) for k in ("dense", "local", "sparse")] + [
    (k, s, h) for k in ("sinkhorn", "mixture") for s in SORT_NETS for h in (False, True)
]


@pytest.mark.parametrize(("kind", "sort_net", "hard"), VARIANTS)
@pytest.mark.parametrize("training", [False, True])
def test_module_is_exactly_causal(kind: str, sort_net: str, hard: bool, training: bool) -> None:
    layer = _layer(True, kind=kind, sort_net=sort_net, hard=hard, pooling="mean")
    layer.train(training)
    x = torch.randn(2, 19, D_MODEL, dtype=torch.float64)
    y = _run(layer, x)
    for t in (0, 3, 4, 9, 15, 17):
        x2 = x.clone()
        x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :]) * 10
        y2 = _run(layer, x2)
        torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], atol=1e-12, rtol=0)


@pytest.mark.parametrize(("kind", "sort_net", "hard"), VARIANTS)
@pytest.mark.parametrize("causal", [False, True])
def test_module_padding_invariance(kind: str, sort_net: str, hard: bool, causal: bool) -> None:
    layer = _layer(causal, kind=kind, sort_net=sort_net, hard=hard)
    x = torch.randn(2, 21, D_MODEL, dtype=torch.float64)
    mask = torch.ones(2, 21, dtype=torch.bool)
    mask[0, 13:] = False
    x2 = torch.where(mask[..., None], x, torch.randn_like(x) * 100)  # new padded content
    real = mask[..., None]
    for training in (False, True):  # training: the same Gumbel noise through the generator
        layer.train(training)
        y, y2 = (_run(layer, t, key_padding_mask=mask) for t in (x, x2))
        torch.testing.assert_close(y * real, y2 * real, atol=1e-12, rtol=0)


@pytest.mark.parametrize("sort_net", SORT_NETS)
@pytest.mark.parametrize("sortcut", [None, 2])
def test_example_alone_equals_example_padded_in_a_batch(sort_net: str, sortcut: int | None) -> None:
    layer = _layer(False, sort_net=sort_net, n_sortcut=sortcut).eval()
    x = torch.randn(1, 30, D_MODEL, dtype=torch.float64)
    alone = layer(x[:, :13])
    mask = torch.zeros(1, 30, dtype=torch.bool)
    mask[:, :13] = True
    padded = layer(x, key_padding_mask=mask)
    torch.testing.assert_close(padded[:, :13], alone, atol=1e-12, rtol=0)


def test_eval_is_deterministic_and_training_noise_follows_generator() -> None:
    layer = _layer(False)
    x = torch.randn(2, 16, D_MODEL, dtype=torch.float64)
    layer.eval()
    torch.testing.assert_close(_run(layer, x, seed=1), _run(layer, x, seed=2), atol=0, rtol=0)
    layer.train()
    torch.testing.assert_close(_run(layer, x, seed=1), _run(layer, x, seed=1), atol=0, rtol=0)
    assert not torch.allclose(_run(layer, x, seed=1), _run(layer, x, seed=2))


def test_return_plan_and_gradients_reach_the_sort_net() -> None:
    layer = _layer(False)
    x = torch.randn(2, 16, D_MODEL, dtype=torch.float64)
    y, plan = layer(x, return_plan=True)
    assert plan is not None and plan.P.shape == (2, HEADS, 4, 4)
    y.square().sum().backward()
    assert layer.sort_net is not None
    grad = layer.sort_net.net.weight.grad
    assert grad is not None and grad.abs().sum() > 0  # the sort net is really trained


def _projected_blocks(
    layer: SinkhornSelfAttention, causal: bool
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """The sort logits of a ``qk``/``qk-bound`` layer on random input, and per (row block
    ``i``, key block ``j``, head) the logit with the queries it summarises (causal: the prefix
    up to position ``i*W``) and the keys of block ``j``, from the layer's own projections."""
    x = torch.randn(2, 12, D_MODEL, dtype=torch.float64)
    logits = layer.sort_logits(x)  # (B, H, N, N)
    q, k = layer.qkv(x)[..., :D_MODEL], layer.qkv(x)[..., D_MODEL : 2 * D_MODEL]
    w, e = 4, D_MODEL // HEADS
    found = []
    for i in range(3):
        rows = q[:, : i * w + 1] if causal else q[:, i * w : (i + 1) * w]
        for j in range(3):
            cols = k[:, j * w : (j + 1) * w]
            for h in range(HEADS):
                head = slice(h * e, (h + 1) * e)
                found.append((logits[:, h, i, j], rows[..., head], cols[..., head]))
    return logits, found


@pytest.mark.parametrize("pooling", ["mean", "max"])
@pytest.mark.parametrize("causal", [False, True])
def test_qk_sort_net_routes_by_the_layers_own_pooled_queries_and_keys(
    pooling: str, causal: bool
) -> None:
    """``sort_net="qk"``: ``R_ij = pool(Q)_i · pool(K)_j / √E`` per head, from the layer's
    own projections (rows: the causal prefix up to position ``i*W``), checked against a
    loop; and the routing trains those projections (it has no weights of its own)."""
    layer = _layer(causal, sort_net="qk", pooling=pooling)
    assert layer.sort_net is not None and not list(layer.sort_net.parameters())
    logits, blocks = _projected_blocks(layer, causal)
    reduce = (lambda t: t.mean(1)) if pooling == "mean" else (lambda t: t.amax(1))
    for got, qh, kh in blocks:
        want = (reduce(qh) * reduce(kh)).sum(-1) / qh.shape[-1] ** 0.5
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    logits.square().sum().backward()
    assert layer.qkv.weight.grad is not None and layer.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("causal", [False, True])
def test_qk_bound_sort_net_is_quest_s_bound_at_block_level(causal: bool) -> None:
    """``sort_net="qk-bound"``: ``R_ij`` is the largest ``q · k / √E`` that per-feature
    minima and maxima of block ``i``'s queries (causal: the prefix up to ``i*W``) and block
    ``j``'s keys allow: equal to a loop over the four corners, and never below any real
    pair's ``q · k / √E``."""
    layer = _layer(causal, sort_net="qk-bound")
    logits, blocks = _projected_blocks(layer, causal)
    for got, qh, kh in blocks:
        scale = qh.shape[-1] ** -0.5
        corners = [a * b for a in (qh.amax(1), qh.amin(1)) for b in (kh.amax(1), kh.amin(1))]
        want = torch.stack(corners).amax(0).sum(-1) * scale
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
        pairs = torch.einsum("bte,bse->bts", qh, kh) * scale
        assert (pairs.flatten(1).amax(1) <= got + 1e-12).all()
    logits.sum().backward()
    assert layer.qkv.weight.grad is not None and layer.qkv.weight.grad.abs().sum() > 0


def test_qk_sort_net_refuses_what_it_cannot_do() -> None:
    with pytest.raises(ValueError, match="use pooling='mean' or 'max'"):
        AttentionConfig(sort_net="qk")
    with pytest.raises(ValueError, match="sort_net='qk' has none"):
        AttentionConfig(sort_net="qk", pooling="max", routing_loss=1.0)
    with pytest.raises(ValueError, match="it needs pooling='max'"):
        AttentionConfig(sort_net="qk-bound", pooling="mean")
    assert AttentionConfig(sort_net="qk", pooling="max", max_len=8).length_limit is None
    with pytest.raises(ValueError, match=r"reads \(B, N, 2\*16\) summaries"):
        SortNet(D_MODEL, HEADS, None, kind="qk")(torch.randn(1, 3, D_MODEL))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_sort_net_length_limits(kind: str) -> None:
    """``linear`` and ``mlp`` nets have one weight row per block: a layer takes up to
    ``max_len`` tokens and refuses one block more; ``bilinear`` takes any length."""
    net = SortNet(D_MODEL, HEADS, max_blocks=3, kind=kind)
    with pytest.raises(ValueError, match=f"has 4 blocks but this '{kind}' sort net was built"):
        net(torch.randn(1, 4, D_MODEL))
    layer = SinkhornSelfAttention(D_MODEL, HEADS, block_size=4, max_len=12, sort_net=kind)
    assert layer.config.length_limit == 12
    assert layer(torch.randn(1, 12, D_MODEL)).shape == (1, 12, D_MODEL)
    with pytest.raises(ValueError, match="sort net was built for at"):
        layer(torch.randn(1, 13, D_MODEL))
    bilinear = SortNet(D_MODEL, HEADS, max_blocks=None, kind="bilinear")
    assert bilinear(torch.randn(1, 40, D_MODEL)).shape == (1, HEADS, 40, 40)
    layer = SinkhornSelfAttention(D_MODEL, HEADS, block_size=4, max_len=12, sort_net="bilinear")
    assert layer.config.length_limit is None
    assert layer(torch.randn(1, 40, D_MODEL)).shape == (1, 40, D_MODEL)


@pytest.mark.parametrize("kind", ["linear", "mlp", "bilinear"])
def test_shared_routing_gives_every_head_one_routing_trained_by_all(kind: str) -> None:
    """``shared_routing="heads"``: one net output for all heads (1/H of the per-head width),
    every head's logits equal, and the loss of any one head reaches the shared weights."""
    x = torch.randn(2, 16, D_MODEL, dtype=torch.float64)
    cfg = AttentionConfig(block_size=4, max_len=32, sort_net=kind, shared_routing="heads")
    shared = SortNet.from_config(D_MODEL, HEADS, cfg).double()
    own = SortNet.from_config(D_MODEL, HEADS, replace(cfg, shared_routing="none")).double()
    last = lambda net: [p for p in net.parameters() if p.dim() == 2][-1]  # noqa: E731
    assert HEADS * last(shared).shape[0] == last(own).shape[0]
    logits = shared.route(x, causal=True)
    assert logits.shape == (2, HEADS, 4, 4)
    for h in range(1, HEADS):
        assert torch.equal(logits[:, h], logits[:, 0])
    logits[:, HEADS - 1].square().sum().backward()  # the last head's loss only
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in shared.parameters())


def test_bad_config_errors() -> None:
    with pytest.raises(ValueError, match="unknown attention kind 'flash'"):
        SinkhornSelfAttention(D_MODEL, HEADS, kind="flash")
    with pytest.raises(ValueError, match="not divisible by n_heads=3"):
        SinkhornSelfAttention(D_MODEL, 3)
    with pytest.raises(ValueError, match="encoders only"):
        SinkhornSelfAttention(D_MODEL, HEADS, causal=True, n_sortcut=2)
    with pytest.raises(ValueError, match="kind='dense' does not use n_sortcut"):
        AttentionConfig(kind="dense", n_sortcut=2)
    with pytest.raises(ValueError, match="kind='topk' does not use shared_routing"):
        AttentionConfig(kind="topk", shared_routing="heads")
    with pytest.raises(ValueError, match="shared_routing must be one of"):
        AttentionConfig(shared_routing="all")
    with pytest.raises(ValueError, match="only the first layer has one"):
        AttentionConfig(shared_routing="layers", routing_loss=1.0)
    with pytest.raises(ValueError, match="does not fit the layer's configuration"):
        SinkhornSelfAttention(D_MODEL, HEADS, routing=Routing(layers=True))
    with pytest.raises(ValueError, match="logits= is for sinkhorn/mixture layers"):
        SinkhornSelfAttention(D_MODEL, HEADS, kind="dense")(
            torch.randn(1, 8, D_MODEL), logits=torch.zeros(1, HEADS, 2, 2)
        )
    with pytest.raises(ValueError, match="temperature must be > 0"):
        AttentionConfig(temperature=0.0)
    with pytest.raises(ValueError, match=r"expected x of shape \(B, L, 16\)"):
        _layer(False)(torch.randn(2, 8, 5, dtype=torch.float64))


def test_decoder_layer_is_causal_and_uses_memory() -> None:
    cfg = AttentionConfig(block_size=4, max_len=32)
    layer = TransformerLayer(D_MODEL, HEADS, 32, cfg, causal=True, cross_attention=True)
    layer = layer.double().eval()
    x = torch.randn(2, 11, D_MODEL, dtype=torch.float64)
    memory = torch.randn(2, 7, D_MODEL, dtype=torch.float64)
    y = layer(x, memory=memory)
    x2 = x.clone()
    x2[:, 6:] = 0.0
    torch.testing.assert_close(layer(x2, memory=memory)[:, :6], y[:, :6], atol=1e-12, rtol=0)
    assert not torch.allclose(layer(x, memory=memory * 2), y)
    with pytest.raises(ValueError, match="pass memory"):
        layer(x)
    with pytest.raises(ValueError, match="has no cross-attention"):
        TransformerLayer(D_MODEL, HEADS, 32, cfg, causal=True).double()(x, memory=memory)


def test_encoder_layer_and_cross_attention_respect_padding() -> None:
    cfg = AttentionConfig(block_size=4, max_len=32, n_sortcut=2)
    enc = TransformerLayer(D_MODEL, HEADS, 32, cfg).double().eval()
    x = torch.randn(2, 13, D_MODEL, dtype=torch.float64)
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, 9:] = False
    x2 = torch.where(mask[..., None], x, torch.randn_like(x))
    real = mask[..., None]
    torch.testing.assert_close(enc(x, mask) * real, enc(x2, mask) * real, atol=1e-12, rtol=0)
    cross = CrossAttention(D_MODEL, HEADS).double()
    q = torch.randn(2, 5, D_MODEL, dtype=torch.float64)
    torch.testing.assert_close(cross(q, x, mask), cross(q, x2, mask), atol=1e-12, rtol=0)


@pytest.mark.slow  # about 100 s of compilation on a 2-core CPU: `make test-slow`
@pytest.mark.compile
def test_compile_fullgraph_forward_backward() -> None:
    torch._dynamo.reset()
    layer = _layer(True).float().eval()
    x = torch.randn(2, 16, D_MODEL, requires_grad=True)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 12:] = False
    eager = layer(x, key_padding_mask=mask)
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(x, key_padding_mask=mask)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-4)
    (grad_c,) = torch.autograd.grad(out.square().sum(), x)
    (grad_e,) = torch.autograd.grad(eager.square().sum(), x)
    torch.testing.assert_close(grad_c, grad_e, atol=1e-4, rtol=1e-3)
