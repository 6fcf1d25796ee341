"""Sinkhorn attention inside transformers models (tiny random configs, nothing downloaded)."""

from __future__ import annotations

import inspect
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers

# A plain import, not importorskip: the dev extra installs transformers (the hf extra), so CI
# runs these tests and a broken install fails loudly instead of skipping.
from transformers import (
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    StaticCache,
)

from sparse_sinkhorn import hf
from sparse_sinkhorn.hf import attention as hf_attention
from sparse_sinkhorn.hf.decoding import BlockRouting
from sparse_sinkhorn.nn.cache import SequenceRouting
from sparse_sinkhorn.ops import sinkhorn_plan

VOCAB, BLOCK, PAD = 37, 4, 0
CACHES = ["dynamic", "static"]
FAMILIES = ["llama", "llama-gqa", "llama-mqa", "gpt2"]
TOL = 1e-5  # float32: different lengths / batch layouts round differently


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(family: str, **options: object) -> torch.nn.Module:
    if family.startswith("llama"):
        kv = {"llama": 4, "llama-gqa": 2, "llama-mqa": 1}[family]
        cfg = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=kv,
            max_position_embeddings=64,
            pad_token_id=PAD,
            bos_token_id=1,
            eos_token_id=2,
        )
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            pad_token_id=PAD,
            bos_token_id=1,
            eos_token_id=2,
        )
        model = GPT2LMHeadModel(cfg)
    return hf.convert(model, block_size=BLOCK, **options).eval()


def _ids(batch: int, length: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length))


def _cache(kind: str, model: torch.nn.Module) -> DynamicCache | StaticCache:
    """A transformers cache: dynamic (grows per token) or static (preallocated, 40 positions)."""
    if kind == "static":
        return StaticCache(config=model.config, max_cache_len=40)
    return DynamicCache(config=model.config)


def _step_kwarg(model: torch.nn.Module) -> str:
    """The forward's KV-cache keyword (renamed across transformers releases)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def test_import_does_not_import_transformers() -> None:
    code = "import sys, sparse_sinkhorn; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_adds_sort_nets_as_submodules(family: str) -> None:
    model = _model(family, sort_net="bilinear", n_iters=5)
    nets = [name for name, _ in model.named_modules() if name.endswith(".sort_net")]
    assert len(nets) == 2  # one per self-attention layer
    keys = [k for k in model.state_dict() if ".sort_net." in k]
    assert keys and all(any(k.startswith(n) for n in nets) for k in keys)
    trained = {id(p) for p in model.parameters()}
    assert all(id(p) in trained for n in nets for p in model.get_submodule(n).parameters())
    assert model.config._attn_implementation == "sinkhorn"
    opts = model.config.sinkhorn_attention
    assert opts["block_size"] == BLOCK and opts["sort_net"] == "bilinear" and opts["n_iters"] == 5
    assert opts["max_len"] == 64  # the model's maximum positions by default


def test_convert_defaults_to_the_length_agnostic_sort_net() -> None:
    """The default sort net's size does not grow with the model's positions."""
    sizes = []
    for positions in (64, 4096):
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=positions)
        model = hf.convert(GPT2LMHeadModel(cfg), block_size=BLOCK)
        assert model.config.sinkhorn_attention["sort_net"] == "bilinear"
        net = model.transformer.h[0].attn.sort_net
        sizes.append(sum(p.numel() for p in net.parameters()))
    assert sizes[0] == sizes[1]


def test_models_built_from_one_config_keep_their_own_options(tmp_path: Path) -> None:
    """Converting two models that share one config object records each model's options on
    its own config: the second conversion does not rewrite the first model's options (which
    save_pretrained writes), and the shared config is left as it was."""
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=64)
    first = hf.convert(GPT2LMHeadModel(cfg), block_size=BLOCK)
    second = hf.convert(GPT2LMHeadModel(cfg), block_size=BLOCK, sort_net="linear", n_iters=3)
    assert not hasattr(cfg, "sinkhorn_attention")
    assert first.config.sinkhorn_attention["sort_net"] == "bilinear"
    assert second.config.sinkhorn_attention["sort_net"] == "linear"
    assert all(m.config is first.config for m in first.modules() if hasattr(m, "config"))
    first.save_pretrained(tmp_path / "first")
    loaded = hf.from_pretrained(tmp_path / "first")
    assert loaded.config.sinkhorn_attention == first.config.sinkhorn_attention


def _routing(monkeypatch: pytest.MonkeyPatch, length: int, **options: object) -> tuple:
    """The routing logits and plans of every layer of a converted Llama on one random batch
    (``(layers, B, H, N, N)`` each; block size 4, so ``N = length / 4``)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=length,
    )
    model = hf.convert(LlamaForCausalLM(cfg), block_size=BLOCK, **options).eval()
    logits, plans = [], []
    inner = hf_attention.sinkhorn_attention

    def spy(q, k, v, sort_logits, opts, **kwargs):  # type: ignore[no-untyped-def]
        logits.append(sort_logits)
        plans.append(sinkhorn_plan(sort_logits, opts).P)
        return inner(q, k, v, sort_logits, opts, **kwargs)

    monkeypatch.setattr(hf_attention, "sinkhorn_attention", spy)
    with torch.no_grad():
        model(_ids(4, length))
    monkeypatch.undo()
    return model.config.sinkhorn_attention, torch.stack(logits), torch.stack(plans)


def test_convert_defaults_route_by_the_sort_net_in_a_causal_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A converted model is a decoder: with the paper's routing (explicit arguments, still
    honoured) every block routes to its previous one whatever the sort net says, and the
    sum-pooled routing logits grow with the position. convert()'s defaults (rows-only
    balancing, max pooling) follow the sort net, with logits of one scale at every position."""
    options, logits, plans = _routing(monkeypatch, 256)
    assert (options["balance"], options["pooling"]) == ("softmax", "max")
    rows = plans[..., 1:, :]  # (layers, B, H, N-1, N): the rows with an earlier block
    previous = torch.arange(rows.shape[-2])
    assert (rows.argmax(-1) == previous).float().mean() < 0.5

    paper, paper_logits, paper_plans = _routing(monkeypatch, 256, **PAPER)
    assert (paper["balance"], paper["pooling"]) == ("sinkhorn", "sum")
    assert torch.equal(paper_plans[..., 1:, :].argmax(-1), previous.expand(*rows.shape[:-1]))

    def spread(sort_logits: torch.Tensor, row: int) -> float:  # a row's logit range
        earlier = sort_logits[..., row, :row]
        return float((earlier.amax(-1) - earlier.amin(-1)).mean())

    last = logits.shape[-1] - 1
    assert spread(paper_logits, last) > 3 * spread(paper_logits, last // 4)
    assert spread(logits, last) < 3 * spread(logits, last // 4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("sort_net", ["bilinear", "linear"])
def test_exact_causality(family: str, training: bool, sort_net: str) -> None:
    """Changing tokens after t leaves every logit at positions <= t bit-identical."""
    model = _model(family, sort_net=sort_net).train(training)
    ids = _ids(2, 23)  # 5.75 blocks
    for t in (0, 3, 4, 9, 17):
        changed = ids.clone()
        changed[:, t + 1 :] = _ids(2, 22 - t)
        torch.manual_seed(1)  # same Gumbel noise in training mode
        a = model(ids).logits[:, : t + 1]
        torch.manual_seed(1)
        b = model(changed).logits[:, : t + 1]
        assert torch.equal(a, b), (family, t)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("sort_net", ["bilinear", "linear"])
def test_padding_invariance(family: str, side: str, sort_net: str) -> None:
    """A sequence alone and the same sequence padded inside a longer batch agree."""
    model = _model(family, sort_net=sort_net)
    alone = _ids(1, 10)
    other = _ids(1, 17)
    pad = torch.full((1, 7), PAD)
    row = torch.cat([pad, alone], 1) if side == "left" else torch.cat([alone, pad], 1)
    batch = torch.cat([row, other])
    mask = (torch.arange(17) >= 7) if side == "left" else (torch.arange(17) < 10)
    mask = torch.stack([mask, torch.ones(17, dtype=torch.bool)]).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what generate uses
    got = model(batch, attention_mask=mask, position_ids=positions).logits[0]
    want = model(alone).logits[0]
    real = mask[0].bool()
    torch.testing.assert_close(got[real], want, atol=TOL, rtol=0)
    assert torch.isfinite(got).all()  # padded positions stay finite too
    # the longer, unpadded row is unaffected by its neighbour's padding
    torch.testing.assert_close(
        model(batch, attention_mask=mask, position_ids=positions).logits[1],
        model(other).logits[0],
        atol=TOL,
        rtol=0,
    )


class _Spy:
    """Counts calls of a function replaced on a module or class (and still runs it)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> None:
        self.calls = 0
        inner = getattr(owner, name)

        def counted(*args: object, **kwargs: object) -> object:
            self.calls += 1
            return inner(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)


PAPER = {"balance": "sinkhorn", "pooling": "sum"}  # the paper's routing; not convert()'s default
DECODE_OPTIONS = [
    {},  # bilinear, softmax, max
    PAPER,
    {"hard": True},
    {"sort_net": "linear", **PAPER},
    {"sort_net": "linear", "hard": True},
    {"sort_net": "mlp", "pooling": "mean"},
    {"hard": True, **PAPER},
    {"n_iters": 3, "temperature": 0.5, "balance": "sinkhorn"},
    {"mix_dense": True},
    {"mix_dense": True, **PAPER},
    {"shared_routing": "heads"},
]


@pytest.mark.parametrize("cache_kind", CACHES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("options", DECODE_OPTIONS)
def test_kv_cache_equals_full_forward(
    family: str, options: dict, cache_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefill + one token at a time through transformers' DynamicCache or StaticCache == full
    forward, and each single token goes through the block-cost state, not a forward over the
    prefix (a static cache's unset positions are never read); the state starts from the
    prompt's forward, not rebuilt at the first new token."""
    model = _model(family, **options)
    ids = _ids(2, 22)
    full = model(ids).logits
    key = _step_kwarg(model)
    op = _Spy(monkeypatch, hf_attention, "sinkhorn_attention")
    steps = _Spy(monkeypatch, BlockRouting, "step")
    starts = _Spy(monkeypatch, BlockRouting, "prefill")
    for prompt in (1, 4, 7):  # one token, a block boundary, mid-block
        cache = _cache(cache_kind, model)
        outs = [model(ids[:, :prompt], use_cache=True, **{key: cache}).logits]
        for t in range(prompt, ids.shape[1]):
            outs.append(model(ids[:, t : t + 1], use_cache=True, **{key: cache}).logits)
        torch.testing.assert_close(torch.cat(outs, 1), full, atol=TOL, rtol=0)
    layers = 2
    assert op.calls == 3 * layers  # the three prefills only
    assert starts.calls == 3 * layers  # from those forwards
    assert steps.calls == layers * sum(ids.shape[1] - p for p in (1, 4, 7))


@pytest.mark.parametrize("cache_kind", CACHES)
@pytest.mark.parametrize("family", ["llama-gqa", "gpt2"])
@pytest.mark.parametrize(
    "options", [{"sort_net": "linear"}, {"hard": True}, {"pooling": "mean"}, PAPER]
)
def test_kv_cache_float64_left_padded_equals_full_forward(
    family: str, options: dict, cache_kind: str
) -> None:
    """float64, a left-padded batch of 3 (different block phases per sequence): every decoded
    position equals the full forward to 1e-10."""
    model = _model(family, **options).double()
    ids = _ids(3, 21)
    mask = torch.ones_like(ids)
    for row, pads in enumerate((0, 3, 6)):
        ids[row, :pads] = PAD
        mask[row, :pads] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    full = model(ids, attention_mask=mask, position_ids=positions).logits
    key, prompt = _step_kwarg(model), 9
    cache = _cache(cache_kind, model)
    kw = {key: cache, "use_cache": True}
    outs = [model(ids[:, :prompt], attention_mask=mask[:, :prompt],
                  position_ids=positions[:, :prompt], **kw).logits]  # fmt: skip
    for t in range(prompt, ids.shape[1]):
        outs.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1],
                          position_ids=positions[:, t : t + 1], **kw).logits)  # fmt: skip
    got = torch.cat(outs, 1)
    real = mask.bool()
    torch.testing.assert_close(got[real], full[real], atol=1e-10, rtol=0)


def test_static_and_dynamic_caches_agree_at_block_starts() -> None:
    """float64, GQA: decoding through a StaticCache and a DynamicCache gives the same logits at
    every position, block starts included, and both equal the full forward; a state dropped at
    a block start is rebuilt from the cache (static: its filled slice) and stays exact."""
    model = _model("llama-gqa").double()
    ids = _ids(2, 23)
    full = model(ids).logits
    key, prompt = _step_kwarg(model), 6
    got = {}
    for kind in CACHES:
        cache = _cache(kind, model)
        outs = [model(ids[:, :prompt], use_cache=True, **{key: cache}).logits]
        for t in range(prompt, ids.shape[1]):
            if t == 3 * BLOCK:  # a block's first token, routed by a state rebuilt from the cache
                for layer in cache.layers:
                    layer.__dict__.pop(hf_attention._STATE)
            outs.append(model(ids[:, t : t + 1], use_cache=True, **{key: cache}).logits)
        got[kind] = torch.cat(outs, 1)
        torch.testing.assert_close(got[kind], full, atol=1e-10, rtol=0)
    torch.testing.assert_close(got["static"], got["dynamic"], atol=1e-12, rtol=0)


@pytest.mark.parametrize("sort_net", ["linear", "mlp", "bilinear"])
@pytest.mark.parametrize("shared", [False, True])
def test_one_routing_row_equals_that_row_of_the_prefix(sort_net: str, shared: bool) -> None:
    """With row-local balancing a block start scores one row: `route_logits` is that row of
    the sort net's prefix logits, `plan_row` on it that row of the prefix plan (soft and
    hard), and `mix_blocks` mixes grouped key/value heads in place as repeat_kv would."""
    from sparse_sinkhorn.hf.decoding import route_logits
    from sparse_sinkhorn.nn import SortNet
    from sparse_sinkhorn.ops.blocks import repeat_kv
    from sparse_sinkhorn.ops.decode import mix_blocks, plan_row
    from sparse_sinkhorn.ops.options import SinkhornOptions

    torch.manual_seed(0)
    net = SortNet(16, 4, 12, kind=sort_net, shared=shared).double()
    rows, keys = torch.randn(2, 9, 16).double(), torch.randn(2, 9, 16).double()
    w, block = 3, 7
    prefix_keys = torch.cat([keys[:, :block], torch.zeros_like(keys[:, :1])], 1)
    prefix = net(rows[:, : block + 1], prefix_keys)  # (B, H, i+1, i+1)
    row = route_logits(net, rows, keys, block, "softmax")
    torch.testing.assert_close(row, prefix[:, :, block : block + 1], atol=1e-12, rtol=0)
    assert torch.equal(route_logits(net, rows, keys, block, "sinkhorn"), prefix)
    k, v = torch.randn(2, 2, 30, 5).double(), torch.randn(2, 2, 30, 5).double()
    for hard in (False, True):
        opts = SinkhornOptions(block_size=w, is_causal=True, balance="softmax", hard=hard)
        want = sinkhorn_plan(prefix, opts).P[:, :, block, :block]
        torch.testing.assert_close(plan_row(row, block, opts), want, atol=1e-12, rtol=0)
        torch.testing.assert_close(plan_row(prefix, block, opts), want, atol=0, rtol=0)
    sorted_k, sorted_v = mix_blocks(want, k, v, w)
    for got, x in ((sorted_k, k), (sorted_v, v)):
        blocks = repeat_kv(x[:, :, : block * w], 4).unflatten(2, (block, w))
        ref = torch.einsum("bhn,bhnwe->bhwe", want, blocks)
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    opts = SinkhornOptions(block_size=w, is_causal=True, balance="sinkhorn")
    with pytest.raises(ValueError, match="single logits row"):
        plan_row(row, block, opts)


@pytest.mark.parametrize("family", ["llama-gqa", "gpt2"])
def test_a_forward_without_autograd_equals_one_with_it(family: str) -> None:
    """Without autograd the op runs one head at a time; the outputs are those of all heads at
    once (the autograd path), padded batches included."""
    model = _model(family, **PAPER)
    ids = _ids(2, 19)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
    want = model(ids, attention_mask=mask).logits
    assert want.requires_grad
    torch.testing.assert_close(got, want.detach(), atol=TOL, rtol=0)


@pytest.mark.parametrize("cache_kind", CACHES)
def test_kv_cache_state_follows_a_cropped_cache(cache_kind: str) -> None:
    """Cropping the cache (as assisted decoding does) replaces a dynamic cache's tensors and
    shortens a static one's filled length: the next step rebuilds the routing state from the
    cached prefix and stays exact."""
    model = _model("llama", sort_net="bilinear")
    ids = _ids(2, 20)
    full = model(ids).logits
    key = _step_kwarg(model)
    cache = _cache(cache_kind, model)
    model(ids[:, :6], use_cache=True, **{key: cache})
    for t in range(6, 15):
        model(ids[:, t : t + 1], use_cache=True, **{key: cache})
    cache.crop(-5)  # back to 10 tokens: positions 10..14 are decoded again
    outs = [model(ids[:, t : t + 1], use_cache=True, **{key: cache}).logits for t in range(10, 20)]
    torch.testing.assert_close(torch.cat(outs, 1), full[:, 10:], atol=TOL, rtol=0)


@pytest.mark.parametrize("cache_kind", CACHES)
@pytest.mark.parametrize("family", ["llama-gqa", "gpt2"])
def test_beam_search_with_cache_equals_without(family: str, cache_kind: str) -> None:
    """Beam search reorders the cache every step; the routing state must follow it (the
    beams' scores, not only the chosen tokens, equal those without a cache)."""
    model = _model(family, sort_net="bilinear")
    prompt = _ids(2, 7)
    kw = dict(max_new_tokens=12, do_sample=False, num_beams=3, pad_token_id=PAD,
              output_scores=True, return_dict_in_generate=True)  # fmt: skip
    cached = model.generate(prompt, use_cache=True, cache_implementation=cache_kind, **kw)
    plain = model.generate(prompt, use_cache=False, **kw)
    assert torch.equal(cached.sequences, plain.sequences)
    for got, want in zip(cached.scores, plain.scores, strict=True):
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("cache_kind", CACHES)
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_cache_equals_without_and_full_forward(
    family: str, cache_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Left-padded batch: greedy tokens with the KV cache == without; logits == full forward;
    every generated token after the first goes through the block-cost state."""
    model = _model(family)
    steps = _Spy(monkeypatch, SequenceRouting, "step")
    prompt = _ids(2, 9)
    prompt[0, :3] = PAD
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0
    kw = dict(
        attention_mask=mask,
        max_new_tokens=10,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=PAD,
    )
    cached = model.generate(prompt, use_cache=True, cache_implementation=cache_kind, **kw)
    assert steps.calls == 2 * 9  # 2 layers x the 9 tokens after the prompt's forward
    plain = model.generate(prompt, use_cache=False, **kw)
    assert torch.equal(cached.sequences, plain.sequences)
    seq = cached.sequences
    full_mask = torch.cat([mask, torch.ones(2, seq.shape[1] - 9, dtype=mask.dtype)], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    full = model(seq, attention_mask=full_mask, position_ids=positions).logits
    got = torch.stack(cached.logits, 1)  # (B, new, V): logits predicting each new token
    torch.testing.assert_close(got, full[:, 8:-1], atol=TOL, rtol=0)


@pytest.mark.parametrize("family", ["llama-gqa", "gpt2"])
def test_training_reduces_the_loss_and_trains_the_sort_nets(family: str) -> None:
    model = _model(family).train()
    before = {k: v.clone() for k, v in model.state_dict().items() if ".sort_net." in k}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = _ids(4, 24)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    after = {k: v for k, v in model.state_dict().items() if ".sort_net." in k}
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))


@pytest.mark.parametrize("family", ["llama-gqa", "gpt2"])
def test_save_and_load_round_trip(family: str, tmp_path: Path) -> None:
    model = _model(family, pooling="mean", temperature=0.5)
    with torch.no_grad():  # stand-in for training: sort nets differ from any fresh init
        for name, p in model.named_parameters():
            if ".sort_net." in name:
                p.add_(torch.randn_like(p))
    model.save_pretrained(tmp_path)
    loaded = hf.from_pretrained(tmp_path).eval()
    assert loaded.config.sinkhorn_attention == model.config.sinkhorn_attention
    assert loaded.config._attn_implementation == "sinkhorn"
    want = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    ids = _ids(2, 13)
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_from_pretrained_refuses_an_unconverted_checkpoint(tmp_path: Path) -> None:
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"not\s+saved from a model converted"):
        hf.from_pretrained(tmp_path)


def test_convert_errors() -> None:
    with pytest.raises(TypeError, match="PreTrainedModel"):
        hf.convert(torch.nn.Linear(2, 2), block_size=4)  # type: ignore[arg-type]
    mistral = MistralForCausalLM(
        MistralConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    with pytest.raises(ValueError, match="model family 'mistral' is not supported"):
        hf.convert(mistral, block_size=4)
    with pytest.raises(TypeError, match="unknown attention option"):
        hf.convert(_plain_gpt2(), block_size=4, n_sortcut=2)
    with pytest.raises(ValueError, match="block_size"):
        hf.convert(_plain_gpt2(), block_size=0)
    with pytest.raises(ValueError, match="sort_net"):
        hf.convert(_plain_gpt2(), block_size=4, sort_net="conv")
    with pytest.raises(ValueError, match="shared_routing='layers' needs this project's models"):
        hf.convert(_plain_gpt2(), block_size=4, shared_routing="layers")
    with pytest.raises(ValueError, match="sort_net='qk' needs this project's models"):
        hf.convert(_plain_gpt2(), block_size=4, sort_net="qk")
    with pytest.raises(ValueError, match="sort_net='qk-bound' needs this project's models"):
        hf.convert(_plain_gpt2(), block_size=4, sort_net="qk-bound")
    model = hf.convert(_plain_gpt2(), block_size=4, max_len=16, sort_net="linear")
    with pytest.raises(ValueError, match="already converted"):
        hf.convert(model, block_size=4)
    with pytest.raises(ValueError, match="max_blocks=4"):  # 24 tokens > max_len=16
        model(_ids(1, 24))


def test_attention_function_refuses_other_mask_patterns() -> None:
    model = _model("llama-gqa")
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 8, 8)
    k = v = torch.randn(1, 2, 8, 8)
    ones = torch.ones(8, 8, dtype=torch.bool)
    window = ones.tril() & ~ones.tril(-3)  # a sliding window of 3
    with pytest.raises(ValueError, match="causal attention with key padding only"):
        hf.sinkhorn_attention_forward(attn, q, k, v, window[None, None])
    with pytest.raises(ValueError, match="does not support 'sliding_window'"):
        hf.sinkhorn_attention_forward(attn, q, k, v, None, sliding_window=4)
    with pytest.raises(ValueError, match="causal self-attention only"):
        hf.sinkhorn_attention_forward(attn, q, k, v, None, is_causal=False)
    out, weights = hf.sinkhorn_attention_forward(attn, q, k, v, None)
    assert out.shape == (1, 8, 4, 8) and weights is None
    packed = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])  # two documents in one row
    with pytest.raises(ValueError, match="packed sequences"):
        model(_ids(1, 12), position_ids=packed, use_cache=False)


def _plain_gpt2() -> GPT2LMHeadModel:
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    return GPT2LMHeadModel(cfg)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda o: o.pop("block_size"), "no 'block_size'"),
        (lambda o: o.clear(), "no 'block_size'"),
        (lambda o: o.update(n_sortcut=2), r"unknown option\(s\) \['n_sortcut'\]"),
        (lambda o: o.update(max_len=10**12), "max_len=1000000000000 is longer than the model's"),
    ],
    ids=["no-block-size", "empty", "unknown", "huge-max-len"],
)
def test_from_pretrained_refuses_tampered_options(tmp_path: Path, edit, match) -> None:
    """A saved config whose options were edited: a ValueError naming the option, not a bare
    KeyError or a 10**12-position sort net handed to the allocator."""
    _model("gpt2").save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    edit(config["sinkhorn_attention"])
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        hf.from_pretrained(tmp_path)


def test_max_len_is_bounded_by_the_models_positions() -> None:
    with pytest.raises(ValueError, match=r"max_len=100000000 is longer than the model's 32 "):
        hf.convert(_plain_gpt2(), block_size=4, max_len=10**8)
    assert hf.convert(_plain_gpt2(), block_size=4, max_len=32).config.sinkhorn_attention


def test_plain_transformers_loading_is_refused_not_silently_dense(tmp_path: Path) -> None:
    """transformers alone (a fresh process, sparse_sinkhorn.hf never imported) cannot load a
    converted model as if it were dense: the saved config asks for attention "sinkhorn"."""
    model = _model("gpt2")
    model.save_pretrained(tmp_path)
    code = (
        "import transformers\n"
        f"transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
        "print('LOADED')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "LOADED" not in done.stdout and done.returncode != 0
    assert "sinkhorn" in done.stderr
    # in a process where the attention is registered, the layers without sort nets refuse
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"sparse_sinkhorn\.hf\.from_pretrained"):
        plain(_ids(1, 8))
    loaded = hf.from_pretrained(tmp_path).eval()  # the way to load it
    ids = _ids(1, 8)
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_calibrate_trains_only_the_sort_nets_towards_dense_attention() -> None:
    """calibrate: every weight but the sort nets' stays bit-identical, the sort nets move, and
    the KL to the model's own dense attention falls (a fixed batch, 30 steps)."""
    torch.manual_seed(0)
    model = _model("llama-gqa", n_iters=3).train()
    ids = _ids(4, 32)  # 8 blocks of 4
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = hf.calibrate(model, [ids] * 30, lr=3e-2)
    assert len(losses) == 30 and losses[-1] < 0.9 * losses[0], losses
    after = model.state_dict()
    for name, value in after.items():
        same = torch.equal(before[name], value)
        assert same != (".sort_net." in name), name  # only the sort nets changed
    assert model.training  # given back in its mode
    assert model.config._attn_implementation == "sinkhorn"
    assert all(p.requires_grad for p in model.parameters())
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # padded positions are left out of the loss
    assert torch.isfinite(
        torch.tensor(hf.calibrate(model, [{"input_ids": ids, "attention_mask": mask}]))
    )


def test_calibrate_errors() -> None:
    with pytest.raises(ValueError, match="converted"):
        hf.calibrate(_plain_gpt2(), [_ids(1, 8)])
    with pytest.raises(ValueError, match="lr"):
        hf.calibrate(_model("gpt2"), [_ids(1, 8)], lr=float("nan"))


def test_other_static_cache_layers_are_refused() -> None:
    """A static layer whose positions are not the sequence's (a sliding window) is refused
    rather than read as if it held the whole prefix."""
    from transformers.cache_utils import StaticSlidingWindowLayer

    model = _model("llama")
    cache = _cache("static", model)
    cache.layers[0] = StaticSlidingWindowLayer(max_cache_len=40, sliding_window=8)
    with pytest.raises(ValueError, match="does not support StaticSlidingWindowLayer"):
        model(_ids(1, 6), use_cache=True, **{_step_kwarg(model): cache})


def test_convert_turns_off_generate_s_automatic_compile() -> None:
    """generate() would compile the forward for a static cache on a GPU; the decoding state
    kept beside the cache is untested under torch.compile, so a converted model opts out."""
    model = _model("llama")
    assert model.generation_config.disable_compile is True


def test_mix_dense_must_be_a_bool_in_convert_and_in_a_saved_config(tmp_path: Path) -> None:
    """``mix_dense="no"`` (a truthy string) would build Mixture attention; a saved "false"
    would load as Mixture: both refused."""
    with pytest.raises(TypeError, match="mix_dense must be True or False, got str 'no'"):
        hf.convert(_plain_gpt2(), block_size=4, mix_dense="no")
    _edited_save(tmp_path, mix_dense="false")
    with pytest.raises(ValueError, match="mix_dense must be True or False, got str 'false'"):
        hf.from_pretrained(tmp_path)


def test_mixture_is_the_former_name_of_mix_dense(tmp_path: Path) -> None:
    """``convert(mixture=True)`` converts as ``mix_dense=True`` does, and a model saved with
    its options under ``mixture`` (fingerprint included) loads as it was saved: each with a
    DeprecationWarning, and no warning that the options were edited."""
    with pytest.warns(DeprecationWarning, match="mixture= is renamed mix_dense="):
        model = _model("gpt2", mixture=True)
    assert (
        model.config.sinkhorn_attention == _model("gpt2", mix_dense=True).config.sinkhorn_attention
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".sort_net." in name:
                p.add_(torch.randn_like(p))
    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    options = config["sinkhorn_attention"]
    options["mixture"] = options.pop("mix_dense")
    config[hf.DIGEST_KEY] = hf._digest(options)
    path.write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with pytest.warns(DeprecationWarning, match="mixture= is renamed mix_dense="):
            loaded = hf.from_pretrained(tmp_path).eval()
    assert loaded.config.sinkhorn_attention["mix_dense"] is True
    ids = _ids(2, 13)
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def _edited_save(tmp_path: Path, *, model: torch.nn.Module | None = None, **edits) -> None:
    """A converted model saved, then its ``sinkhorn_attention`` options edited by hand (a
    ``None`` value removes the option)."""
    (model or _model("gpt2")).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    for key, value in edits.items():
        if value is None:
            config["sinkhorn_attention"].pop(key)
        else:
            config["sinkhorn_attention"][key] = value
    path.write_text(json.dumps(config))


def test_from_pretrained_paths_that_are_not_a_saved_directory(tmp_path: Path) -> None:
    _model("gpt2").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is a file; pass the directory save_pretrained wrote"):
        hf.from_pretrained(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no directory"):
        hf.from_pretrained(tmp_path / "missing")


def test_a_removed_option_that_changes_the_weights_is_named(tmp_path: Path) -> None:
    """Saved with ``shared_routing="heads"``, the option removed: the default does not fit the
    saved sort nets; the error says so instead of load_state_dict's size mismatch."""
    _edited_save(tmp_path, model=_model("gpt2", shared_routing="heads"), shared_routing=None)
    with pytest.raises(ValueError, match=r"missing, so set to their defaults: shared_routing"):
        hf.from_pretrained(tmp_path)


@pytest.mark.parametrize("edit", [{"block_size": 8}, {"hard": True}, {"pooling": "sum"}])
def test_hand_edited_valid_options_load_with_a_warning(tmp_path: Path, edit: dict) -> None:
    _edited_save(tmp_path, **edit)
    with pytest.warns(UserWarning, match="was edited after the model was saved"):
        loaded = hf.from_pretrained(tmp_path)
    key, value = next(iter(edit.items()))
    assert loaded.config.sinkhorn_attention[key] == value
    with warnings.catch_warnings():  # saved again, it loads without a word
        warnings.simplefilter("error")
        loaded.save_pretrained(tmp_path / "again")
        hf.from_pretrained(tmp_path / "again")


def test_nan_sort_net_weights_are_refused(tmp_path: Path) -> None:
    model = _model("gpt2")
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if ".sort_net." in n)[0] = float("nan")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"sort_net\..* holds NaN or infinite values"):
        hf.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("batches", "lr", "error", "match"),
    [
        (_ids(2, 8), 1e-3, TypeError, "got one Tensor: pass"),
        ([_ids(2, 0)], 1e-3, ValueError, r"shape \(2, 0\) is empty"),
        ([_ids(0, 8)], 1e-3, ValueError, r"shape \(0, 8\) is empty"),
        ([_ids(2, 8).float()], 1e-3, ValueError, "integer tensor"),
        ([{"input_ids": _ids(2, 8), "attention_mask": torch.ones(2, 7)}], 1e-3, ValueError,
         r"attention_mask must have input_ids' shape \(2, 8\), got \(2, 7\)"),
        ([{"attention_mask": torch.ones(2, 8)}], 1e-3, TypeError, "needs input_ids"),
        ([_ids(2, 8)], "1e-3", TypeError, "lr must be a number, got str"),
        ([_ids(2, 8)], True, TypeError, "lr must be a number, got bool"),
    ],
    ids=["bare-tensor", "no-length", "no-batch", "float-ids", "mask-shape", "no-ids", "lr-str",
         "lr-bool"],
)  # fmt: skip
def test_calibrate_checks_its_input_before_a_step(batches, lr, error, match) -> None:
    model = _model("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        hf.calibrate(model, batches, lr=lr)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_calibrate_a_half_precision_model(dtype: torch.dtype) -> None:
    """A real float16 / bfloat16 model: the sort nets train in float32 copies, so no NaN is
    ever written into the model, only they change, and the KL falls."""
    torch.manual_seed(0)
    model = _model("llama-gqa", n_iters=3).to(dtype)
    ids = _ids(4, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = hf.calibrate(model, [ids] * 20, lr=3e-2)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.97 * losses[0], losses
    for name, value in model.state_dict().items():
        assert value.dtype == dtype and bool(torch.isfinite(value).all()), name
        assert torch.equal(before[name], value) != (".sort_net." in name), name


def test_calibrate_in_bfloat16_keeps_updates_smaller_than_a_bfloat16_step() -> None:
    """bfloat16 weights near 3 move in steps of 1/64: AdamW steps of 5e-3 applied to them
    directly round away and the routing never learns; the float32 copies add them up until
    the model's weights move."""
    torch.manual_seed(0)
    model = _model("llama-gqa", n_iters=3).to(torch.bfloat16)
    nets = {n: p for n, p in model.named_parameters() if ".sort_net." in n}
    with torch.no_grad():
        for p in nets.values():
            p.copy_(3.0 + 0.1 * torch.randn_like(p, dtype=torch.float32))
    before = {n: p.clone() for n, p in nets.items()}
    hf.calibrate(model, [_ids(2, 32)] * 5, lr=5e-3)
    moved = sum(int((before[n] != p).sum()) for n, p in nets.items())
    assert moved > sum(p.numel() for p in nets.values()) // 2, moved
