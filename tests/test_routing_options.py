"""Routing beyond the paper: rows-only ``balance="softmax"`` and MoBA's top-k block gate
(``topk_block_attention``, attention kind ``"topk"``).

The Sinkhorn op's grids (``tests/grids.py``) already cross ``balance`` with every mode
(reference forward/backward, causality, padding, GQA, dropout); this file checks what is
particular to each option, the top-k op against its float64 reference, and both through the
layer and the decoding cache.
"""

from __future__ import annotations

import pytest
import torch

from sparse_sinkhorn.models import LanguageModel, LanguageModelConfig
from sparse_sinkhorn.nn import AttentionConfig, SinkhornSelfAttention
from sparse_sinkhorn.ops import (
    grouped,
    reference_softmax_routing,
    reference_topk_block_attention,
    sinkhorn_plan,
    topk_block_attention,
    topk_block_selection,
)
from sparse_sinkhorn.ops.blocks import block_summaries
from sparse_sinkhorn.ops.routing import softmax_routing

pytestmark = pytest.mark.usefixtures("one_thread")
B, H, D = 2, 4, 4
SHAPES = [(4, 16), (4, 19), (3, 13), (8, 40), (4, 3)]  # (block size, length); one block


def _qkv(length: int, kv_heads: int = H, dtype: torch.dtype = torch.float64):
    q = torch.randn(B, H, length, D, dtype=dtype)
    k, v = (torch.randn(B, kv_heads, length, D, dtype=dtype) for _ in range(2))
    return q, k, v


def _padding(length: int) -> torch.Tensor:
    mask = torch.ones(B, length, dtype=torch.bool)
    mask[-1, length - max(1, 2 * length // 3) :] = False
    mask[0, 1:3] = False  # a hole inside the sequence too
    return mask


# ---- rows-only routing ---------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "causal"])
def test_softmax_routing_matches_reference_and_shares_key_blocks(causal: bool) -> None:
    logits = torch.randn(B, H, 6, 6, dtype=torch.float64)
    logits[..., 0] += 10.0  # every row wants key block 0
    p = softmax_routing(logits, temperature=0.5, causal=causal)
    ref = reference_softmax_routing(logits, temperature=0.5, causal=causal)
    torch.testing.assert_close(p, ref, atol=1e-12, rtol=0)
    rows = p.sum(-1)
    expect = torch.ones_like(rows)
    if causal:
        expect[..., 0] = 0.0  # causal row 0 has no earlier block
    torch.testing.assert_close(rows, expect, atol=1e-12, rtol=0)
    # not balanced: column 0 takes (almost) every row's whole weight
    assert p[..., 0].sum(-1).min() > 4.9


def test_softmax_plan_lets_many_rows_take_one_block_where_sinkhorn_shares_it() -> None:
    logits = torch.zeros(1, 1, 8, 8)
    logits[..., 2] = 5.0  # key block 2 holds what every later block needs
    hard = dict(block_size=4, is_causal=True, hard=True, temperature=0.5)
    rows = sinkhorn_plan(logits, balance="softmax", **hard).indices[0, 0]
    assert rows[3:].tolist() == [2] * 5
    shared = sinkhorn_plan(logits, **hard).indices[0, 0]
    assert (shared[3:] == 2).sum() < 5  # balancing gives block 2 to fewer rows


def test_unknown_balance_is_refused() -> None:
    with pytest.raises(ValueError, match="balance"):
        sinkhorn_plan(torch.zeros(1, 1, 2, 2), block_size=2, balance="rows")
    with pytest.raises(ValueError, match="balance"):
        AttentionConfig(balance="rows")


# ---- the top-k block gate ------------------------------------------------------------------


@pytest.mark.parametrize(("block", "length"), SHAPES, ids=[f"b{b}-L{n}" for b, n in SHAPES])
@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "causal"])
@pytest.mark.parametrize("top_k", [1, 2, 9], ids=["k1", "k2", "k9"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize(
    ("tile", "compressed", "gate"),
    [(32, False, "mean"), (2, False, "mean"), (32, True, "mean"), (32, False, "bound"),
     (2, True, "bound")],
    ids=["", "tile2", "compressed", "bound", "tile2-compressed-bound"],
)  # fmt: skip
def test_topk_matches_reference_forward_and_backward(
    block: int,
    length: int,
    causal: bool,
    top_k: int,
    padded: bool,
    tile: int,
    compressed: bool,
    gate: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """tile2: the queries that read one block fill several tiles (BlockGroups);
    compressed: with the blocks' mean keys and values in the softmax."""
    monkeypatch.setattr(grouped, "TILE", tile)
    q, k, v = (t.requires_grad_() for t in _qkv(length))
    mask = _padding(length) if padded else None
    opts = dict(
        block_size=block,
        top_k=top_k,
        is_causal=causal,
        key_padding_mask=mask,
        compressed=compressed,
        gate=gate,
    )
    out = topk_block_attention(q, k, v, **opts)
    ref = reference_topk_block_attention(q, k, v, **opts)
    real = torch.ones(B, length, dtype=torch.bool) if mask is None else mask
    w = real[:, None, :, None].double()
    torch.testing.assert_close(out * w, ref * w, atol=1e-10, rtol=1e-9)
    cot = torch.randn_like(out) * w
    fast = torch.autograd.grad(out, (q, k, v), cot)
    slow = torch.autograd.grad(ref, (q, k, v), cot)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("kv_heads", [1, 2], ids=["kv1", "kv2"])
@pytest.mark.parametrize("compressed", [False, True], ids=["", "compressed"])
def test_topk_grouped_query_equals_repeated_kv(kv_heads: int, compressed: bool) -> None:
    q, k, v = _qkv(19, kv_heads)
    opts = dict(block_size=4, top_k=2, is_causal=True, compressed=compressed)
    out = topk_block_attention(q, k, v, **opts)
    rep = H // kv_heads
    ref = topk_block_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), **opts)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "causal"])
@pytest.mark.parametrize("top_k", [1, 3], ids=["k1", "k3"])
def test_topk_merged_parts_equal_the_one_softmax_path(
    causal: bool, top_k: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without padding, dropout or the compressed branch (and ``L`` a multiple of ``W``) the
    op merges its own-block and picked-block parts through their log-sum-exp; an all-True
    padding mask sends the same inputs through the one-softmax path. Both agree, forward and
    backward, with grouped-query keys, in float32 on the flash kernels."""
    from sparse_sinkhorn.ops import topk

    merged = []
    apply = topk._OwnAndPicked.apply
    monkeypatch.setattr(topk._OwnAndPicked, "apply", lambda *a: merged.append(1) or apply(*a))
    q = torch.randn(2, 4, 64, 8, requires_grad=True)
    k, v = (torch.randn(2, 2, 64, 8, requires_grad=True) for _ in range(2))
    opts = dict(block_size=8, top_k=top_k, is_causal=causal, gate="bound")
    out = topk_block_attention(q, k, v, **opts)
    assert merged == [1]
    one = topk_block_attention(
        q, k, v, key_padding_mask=torch.ones(2, 64, dtype=torch.bool), **opts
    )
    assert merged == [1]
    torch.testing.assert_close(out, one, atol=1e-5, rtol=1e-5)
    cot = torch.randn_like(out)
    for a, b in zip(
        torch.autograd.grad(out, (q, k, v), cot),
        torch.autograd.grad(one, (q, k, v), cot),
        strict=True,
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_topk_selection_picks_the_best_earlier_blocks() -> None:
    q, k, _ = _qkv(24)
    idx = topk_block_selection(q, k, block_size=4, top_k=2, is_causal=True)  # (B, H, L, 2)
    blk = torch.arange(24) // 4
    k_mean = k.view(B, H, 6, 4, D).mean(3)  # (B, H, N, D)
    gate = torch.einsum("bhld,bhnd->bhln", q, k_mean)
    for t in range(24):
        i = int(blk[t])
        chosen = idx[:, :, t]
        if i == 0:
            assert (chosen == -1).all()  # no earlier block
            continue
        assert ((chosen < i) | (chosen == -1)).all()  # never its own or a later block
        best = gate[:, :, t, :i].topk(min(2, i), dim=-1).indices
        assert torch.equal(chosen[..., : min(2, i)].sort(-1).values, best.sort(-1).values)
        if i == 1:
            assert (chosen[..., 1] == -1).all()  # one candidate only


def test_bound_gate_finds_one_matching_key_that_the_mean_dilutes() -> None:
    """A block with one key along the query beats, under Quest's bound, a block whose every
    key leans a little towards it; MoBA's mean prefers the second."""
    w, length = 4, 32
    q = torch.zeros(1, 1, length, D, dtype=torch.float64)
    k = 0.01 * torch.randn(1, 1, length, D, dtype=torch.float64)
    q[..., -1, :] = torch.ones(D)  # the last query
    k[..., 2 * w + 1, :] += 1.5  # block 2: one key along it
    k[..., 5 * w : 6 * w, :] += 0.5  # block 5: every key a little along it
    pick = {
        gate: topk_block_selection(q, k, block_size=w, top_k=1, is_causal=True, gate=gate)
        for gate in ("mean", "bound")
    }
    assert int(pick["bound"][0, 0, -1, 0]) == 2 and int(pick["mean"][0, 0, -1, 0]) == 5
    with pytest.raises(ValueError, match="gate must be one of"):
        topk_block_selection(q, k, block_size=w, top_k=1, gate="max")
    for kind in ("sinkhorn", "dense"):
        with pytest.raises(ValueError, match=f"kind='{kind}' does not use gate"):
            AttentionConfig(kind=kind, gate="bound")


@pytest.mark.parametrize("compressed", [False, True], ids=["", "compressed"])
def test_topk_is_exactly_causal(compressed: bool) -> None:
    length, w = 22, 4
    q, k, v = _qkv(length, dtype=torch.float32)
    opts = dict(block_size=w, top_k=2, is_causal=True, compressed=compressed)
    out = topk_block_attention(q, k, v, **opts)
    for t in range(length - 1):
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, :, t + 1 :] = torch.randn_like(x[:, :, t + 1 :])
        out2 = topk_block_attention(q2, k2, v2, **opts)
        assert torch.equal(out2[:, :, : t + 1], out[:, :, : t + 1]), f"leak into t <= {t}"
        assert not torch.equal(out2[:, :, t + 1 :], out[:, :, t + 1 :])


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "causal"])
@pytest.mark.parametrize("compressed", [False, True], ids=["", "compressed"])
def test_topk_padding_never_reaches_real_outputs(causal: bool, compressed: bool) -> None:
    length = 23
    q, k, v = _qkv(length, dtype=torch.float32)
    mask = _padding(length)
    opts = dict(
        block_size=4, top_k=2, is_causal=causal, key_padding_mask=mask, compressed=compressed
    )
    out = topk_block_attention(q, k, v, **opts)
    hostile = [
        torch.where(mask[:, None, :, None], x, torch.full_like(x, float("nan"))) for x in (q, k, v)
    ]
    hostile[1] = torch.where(mask[:, None, :, None], k, torch.full_like(k, 1e30))
    out2 = topk_block_attention(*hostile, **opts)
    real = mask[:, None, :, None].expand_as(out)
    assert torch.equal(out2[real], out[real])


def test_topk_arguments_are_checked() -> None:
    q, k, v = _qkv(8)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="top_k"):
            topk_block_attention(q, k, v, block_size=4, top_k=bad)
    with pytest.raises(ValueError, match="top_k"):
        AttentionConfig(kind="topk", top_k=0)
    for kind in ("sinkhorn", "dense", "local"):
        with pytest.raises(ValueError, match=f"kind='{kind}' does not use compressed"):
            AttentionConfig(kind=kind, compressed=True)


# ---- layer and decoding cache --------------------------------------------------------------

VARIANTS = [
    {"kind": "topk", "top_k": 1},
    {"kind": "topk", "top_k": 2},
    {"kind": "topk", "top_k": 1, "compressed": True},
    {"kind": "topk", "top_k": 1, "compressed": True, "gate": "bound"},
    {"kind": "sinkhorn", "balance": "softmax", "sort_net": "bilinear"},
    {"kind": "sinkhorn", "balance": "softmax", "sort_net": "bilinear", "hard": True},
    {"kind": "sinkhorn", "balance": "softmax", "sort_net": "linear", "hard": True},
    {"kind": "mixture", "balance": "softmax", "sort_net": "bilinear"},
    {"kind": "sinkhorn", "balance": "softmax", "sort_net": "bilinear", "pooling": "max"},
    {"kind": "sinkhorn", "sort_net": "linear", "hard": True, "pooling": "max"},
    {
        "kind": "sinkhorn",
        "balance": "softmax",
        "sort_net": "bilinear",
        "pooling": "max",
        "shared_routing": "heads",
    },
    {"kind": "sinkhorn", "sort_net": "linear", "shared_routing": "heads"},
    {
        "kind": "sinkhorn",
        "balance": "softmax",
        "sort_net": "bilinear",
        "pooling": "max",
        "shared_routing": "layers",
    },
    {"kind": "mixture", "sort_net": "linear", "hard": True, "shared_routing": "layers"},
]


def _vid(v: dict) -> str:
    return "-".join(str(x) for x in v.values())


@pytest.mark.parametrize("variant", VARIANTS, ids=_vid)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cached_decoding_equals_the_full_forward(variant: dict, dtype: torch.dtype) -> None:
    att = AttentionConfig(block_size=4, max_len=64, **variant)
    cfg = LanguageModelConfig(
        vocab_size=13, d_model=16, n_heads=2, n_layers=2, d_ff=32, attention=att
    )
    model = LanguageModel(cfg).to(dtype).eval()
    ids = torch.randint(0, 13, (2, 22))
    full = model(ids)
    for prompt in (1, 6):
        cache = model.new_cache()
        outs = [model(ids[:, :prompt], cache=cache)]
        outs += [model(ids[:, t : t + 1], cache=cache) for t in range(prompt, 22)]
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(torch.cat(outs, 1), full, atol=tol, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS, ids=_vid)
def test_layer_is_causal_and_ignores_padding(variant: dict) -> None:
    opts = dict(variant)
    layer = SinkhornSelfAttention(16, 2, causal=True, block_size=4, max_len=64, **opts)
    layer.eval()
    x = torch.randn(2, 19, 16)
    out = layer(x)
    x2 = x.clone()
    x2[:, 10:] = torch.randn_like(x2[:, 10:])
    assert torch.equal(layer(x2)[:, :10], out[:, :10])
    enc = SinkhornSelfAttention(16, 2, block_size=4, max_len=64, **opts).eval()
    mask = torch.ones(2, 19, dtype=torch.bool)
    mask[1, 12:] = False
    x3 = torch.where(mask[..., None], x, torch.full_like(x, 1e4))
    real = mask[..., None].expand(2, 19, 16)
    assert torch.equal(enc(x3, mask)[real], enc(x, mask)[real])


@pytest.mark.parametrize("causal", [False, True], ids=["blocks", "prefixes"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_max_pooled_summaries_are_the_definition(causal: bool, padded: bool) -> None:
    """``pooling="max"``: per feature, the max over the block's (``causal``: the prefix's up
    to the block's first position) real tokens; 0 where there is none; a padded value, NaN
    included, never reaches a summary."""
    batch, length, width, block = 2, 13, 3, 4
    x = torch.randn(batch, length, width, dtype=torch.float64)
    mask = torch.ones(batch, length, dtype=torch.bool)
    if padded:
        mask[1, 5:] = False
        mask[1, 0] = False
        mask[0, 4:8] = False  # a block with no real token
        x = torch.where(mask[..., None], x, torch.full_like(x, float("nan")))
    out = block_summaries(
        x, block, key_padding_mask=mask if padded else None, pooling="max", causal=causal
    )
    n = -(-length // block)
    want = torch.zeros(batch, n, width, dtype=torch.float64)
    for b in range(batch):
        for i in range(n):
            span = (
                range(i * block + 1) if causal else range(i * block, min(length, i * block + block))
            )
            real = [t for t in span if mask[b, t]]
            if real:
                want[b, i] = x[b, real].amax(0)
    assert torch.equal(out, want)


def _far_preference(blocks: int, margin: float) -> torch.Tensor:
    """``(1, 3, N, N)`` logits whose row i prefers another earlier block than i-1 by
    ``margin``: block 0, block i-2, and a random earlier block."""
    g = torch.Generator().manual_seed(2)
    rows = torch.arange(blocks)
    targets = [
        torch.zeros_like(rows),
        (rows - 2).clamp(min=0),
        (torch.rand(blocks, generator=g) * rows).long(),
    ]
    logits = torch.zeros(1, 3, blocks, blocks)
    for head, target in enumerate(targets):
        logits[0, head, rows, target] = margin
    return logits


@pytest.mark.parametrize("blocks", [3, 12, 64])
@pytest.mark.parametrize("scale", [0.01, 1.0, 10.0, 1000.0])
def test_causal_sinkhorn_balancing_sends_every_block_to_its_previous_one(
    blocks: int, scale: float
) -> None:
    """The paper's causal balancing (8 rounds, tau = 0.75) routes block i to block i-1 whatever
    the logits: random ones at every scale, and ones that prefer another earlier block by a
    margin of ``scale``. The only strictly lower-triangular matrix with unit rows and columns is
    that shift, so hard routing always takes the previous block and soft routing puts most of
    its mass (over 0.8) there. Softmax routing (rows only) follows the logits instead."""
    g = torch.Generator().manual_seed(1)
    random = torch.randn(16, 2, blocks, blocks, generator=g) * scale
    previous = torch.arange(blocks - 1)
    for logits in (random, _far_preference(blocks, scale)):
        sink = sinkhorn_plan(logits, block_size=4, is_causal=True)
        assert torch.equal(sink.P[..., 1:, :].argmax(-1), previous.expand(*logits.shape[:2], -1))
        assert torch.diagonal(sink.P, offset=-1, dim1=-2, dim2=-1).mean() > 0.8
    if blocks > 3 and scale >= 1:  # softmax follows logits that are not all alike
        soft = sinkhorn_plan(random, block_size=4, is_causal=True, balance="softmax")
        assert (soft.P[..., 1:, :].argmax(-1) != previous).float().mean() > 0.5
        far = sinkhorn_plan(
            _far_preference(blocks, scale), block_size=4, is_causal=True, balance="softmax"
        )
        assert (far.P[..., 2:, :].argmax(-1) != torch.arange(1, blocks - 1)).float().mean() > 0.5


@pytest.mark.parametrize("reduce", ["mean", "max"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_block_attention_mass_is_the_dense_softmax_summed_by_blocks(
    causal: bool, padded: bool, reduce: str
) -> None:
    from sparse_sinkhorn.ops import block_attention_mass

    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 10, 4, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.ones(2, 10, dtype=torch.bool)
    if padded:
        mask[1, 7:] = False
    got = block_attention_mass(
        q,
        k,
        block_size=4,
        is_causal=causal,
        key_padding_mask=mask if padded else None,
        reduce=reduce,
    )
    want = torch.zeros(2, 3, 3, 3, dtype=torch.float64)
    for b in range(2):
        for h in range(3):
            for i in range(3):
                queries = [t for t in range(4 * i, min(4 * i + 4, 10)) if mask[b, t]]
                for t in queries:
                    keys = [s for s in range(10) if mask[b, s] and (s <= t or not causal)]
                    w = torch.softmax(torch.stack([q[b, h, t] @ k[b, h, s] for s in keys]) / 2, 0)
                    mass = torch.zeros(3, dtype=torch.float64)
                    for s, ws in zip(keys, w, strict=True):
                        mass[s // 4] += ws
                    if reduce == "max":  # the largest mass one query of block i puts there
                        want[b, h, i] = torch.maximum(want[b, h, i], mass)
                    else:
                        want[b, h, i] += mass / len(queries)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="reduce must be one of"):
        block_attention_mass(q, k, block_size=4, reduce="min")


def test_routing_loss_trains_only_the_sort_net_and_leaves_the_output_alone() -> None:
    from sparse_sinkhorn.nn import routing_losses

    cfg = dict(kind="sinkhorn", block_size=4, max_len=32, sort_net="bilinear", hard=True,
               balance="softmax")  # fmt: skip
    torch.manual_seed(0)
    with_loss = SinkhornSelfAttention(16, 2, causal=True, routing_loss=0.5, **cfg).train()
    torch.manual_seed(0)
    plain = SinkhornSelfAttention(16, 2, causal=True, **cfg).train()
    x = torch.randn(2, 19, 16)
    torch.manual_seed(1)
    y = with_loss(x)
    torch.manual_seed(1)
    assert torch.equal(y, plain(x))  # the loss is a side output, not a change of the forward
    aux = routing_losses(with_loss)
    assert aux is not None and aux.item() > 0 and routing_losses(with_loss) is None
    aux.backward()
    for name, p in with_loss.named_parameters():
        touched = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert touched == name.startswith("sort_net."), name
    with_loss.eval()
    with_loss(x)
    assert routing_losses(with_loss) is None  # eval: no loss
    with pytest.raises(ValueError, match="kind='dense' does not use routing_loss"):
        AttentionConfig(kind="dense", routing_loss=1.0)


def test_the_max_teacher_marks_the_block_one_query_reads() -> None:
    """A block whose one query reads block 2 and the rest read their own: the mean teacher's
    row is mostly the own block, the max teacher's has block 2 at that query's mass."""
    from sparse_sinkhorn.ops import block_attention_mass

    length, w = 12, 4
    q = torch.zeros(1, 1, length, 2, dtype=torch.float64)
    k = torch.zeros(1, 1, length, 2, dtype=torch.float64)
    k[0, 0, :, 0] = torch.tensor([1.0] * 8 + [0.0] * 4)  # feature 0: blocks 0 and 1
    k[0, 0, 8:, 1] = 1.0  # feature 1: block 2
    q[0, 0, :, 0] = 20.0  # every query reads blocks 0 and 1 ...
    q[0, 0, 0] = torch.tensor([0.0, 40.0])  # ... but query 0 reads block 2
    mean = block_attention_mass(q, k, block_size=w)[0, 0, 0]
    top = block_attention_mass(q, k, block_size=w, reduce="max")[0, 0, 0]
    assert mean[2] == pytest.approx(0.25, abs=1e-6)  # one query of four
    assert top[2] == pytest.approx(1.0, abs=1e-6) and top.argmax() != mean.argmax()
    with pytest.raises(ValueError, match="routing_teacher chooses routing_loss's target"):
        AttentionConfig(sort_net="bilinear", routing_teacher="max")
    from sparse_sinkhorn.nn import routing_losses

    x = torch.randn(2, length, 8)
    losses = {}
    for teacher in ("mean", "max"):  # the same layer, each teacher
        torch.manual_seed(0)
        layer = SinkhornSelfAttention(
            8, 2, kind="sinkhorn", block_size=w, max_len=16, sort_net="bilinear",
            balance="softmax", routing_loss=1.0, routing_teacher=teacher,
        ).train()  # fmt: skip
        layer(x)
        aux = routing_losses(layer)
        assert aux is not None and torch.isfinite(aux)
        losses[teacher] = float(aux.detach())
    assert losses["mean"] != losses["max"]  # the layer reads its teacher option


def _stack(shared: str, kind: str = "sinkhorn") -> LanguageModel:
    att = AttentionConfig(
        kind=kind,
        block_size=4,
        max_len=64,
        balance="softmax",
        sort_net="bilinear",
        pooling="max",
        shared_routing=shared,
    )
    cfg = LanguageModelConfig(
        vocab_size=13, d_model=16, n_heads=2, n_layers=3, d_ff=32, attention=att
    )
    return LanguageModel(cfg).double()


def test_layers_routing_is_the_first_layer_s_for_every_layer() -> None:
    """``shared_routing="layers"``: only the first layer has a sort net, and the model equals
    a per-layer ("heads") model with the same weights whose later layers' sort logits are
    replaced by the first layer's (``torch.equal``, eval); it is exactly causal."""
    shared = _stack("layers").eval()
    nets = [layer.attn.sort_net for layer in shared.decoder.layers]
    assert nets[0] is not None and nets[1:] == [None, None]
    per_layer = _stack("heads").eval()
    missing, unexpected = per_layer.load_state_dict(shared.state_dict(), strict=False)
    assert not unexpected and all(".sort_net." in k and ".layers.0." not in k for k in missing)
    kept: dict[str, torch.Tensor] = {}
    first = per_layer.decoder.layers[0].attn
    own = first.sort_logits

    def keep(x, key_padding_mask=None):
        kept["logits"] = own(x, key_padding_mask)
        return kept["logits"]

    first.sort_logits = keep
    for layer in per_layer.decoder.layers[1:]:
        layer.attn.sort_logits = lambda x, key_padding_mask=None: kept["logits"]
    ids = torch.randint(0, 13, (2, 23))
    out = shared(ids)
    assert torch.equal(out, per_layer(ids))
    ids2 = ids.clone()
    ids2[:, 12:] = torch.randint(0, 13, (2, 11))
    assert torch.equal(shared(ids2)[:, :12], out[:, :12])
    cache = shared.new_cache()
    shared(ids[:, :5], cache=cache)
    layer = shared.decoder.layers[1]
    with pytest.raises(ValueError, match="a filled cache routes each new block itself"):
        layer(torch.randn(2, 1, 16, dtype=torch.float64), cache=cache.layers[1], logits=out)


def test_layers_routing_trains_the_one_sort_net_from_every_layer() -> None:
    """The first layer's sort net learns from a loss on a later layer's attention alone."""
    model = _stack("layers").train()
    ids = torch.randint(0, 13, (2, 24))
    x = model.embed(ids)
    layers = model.decoder.layers
    routing = layers[0].attn.sort_logits(layers[0].norm1(x))
    layers[2].attn(layers[2].norm1(x), logits=routing).square().sum().backward()
    net = layers[0].attn.sort_net
    assert net is not None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_layers_routing_encoder_ignores_padding() -> None:
    """A classifier (encoder stack) with one routing for all layers: padding never reaches
    a real output."""
    from sparse_sinkhorn.models import Classifier, ClassifierConfig

    att = AttentionConfig(block_size=4, max_len=64, sort_net="bilinear", shared_routing="layers")
    cfg = ClassifierConfig(
        vocab_size=12, d_model=16, n_heads=2, n_layers=3, d_ff=32, n_classes=3, attention=att
    )
    model = Classifier(cfg).double().eval()
    ids = torch.randint(1, 12, (1, 11))
    padded = torch.cat([ids, torch.zeros(1, 9, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(padded), model(ids), atol=1e-10, rtol=0)


def test_layers_routing_seq2seq_decodes_as_teacher_forcing_and_trains_every_parameter() -> None:
    """An encoder-decoder with one routing per stack: cached greedy decoding equals uncached
    and the argmax of the teacher-forced pass; a training step reaches every parameter (no
    unused sort net, which DDP would refuse)."""
    from sparse_sinkhorn.models import Seq2Seq, Seq2SeqConfig

    att = AttentionConfig(block_size=4, max_len=64, sort_net="bilinear", shared_routing="layers")
    cfg = Seq2SeqConfig(vocab_size=12, d_model=16, n_heads=2, n_layers=3, d_ff=32, attention=att)
    model = Seq2Seq(cfg).double().eval()
    src = torch.randint(2, 12, (3, 9))
    out = model.generate(src, 11)
    assert torch.equal(model.generate(src, 11, use_cache=False), out)
    tgt_in = torch.cat([torch.full((3, 1), cfg.bos_id), out[:, :-1]], dim=1)
    logits = model(src, tgt_in)
    logits[..., cfg.pad_id] = float("-inf")
    assert torch.equal(logits.argmax(-1), out)
    model.train()
    model(src, tgt_in).square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
