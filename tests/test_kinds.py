"""The kind registry (`nn.kinds.KINDS`): which fields each kind reads, its op against its
float64 reference, its decoding step against its op, and saved configurations."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from sparse_sinkhorn.models import LanguageModelConfig, config_from_dict
from sparse_sinkhorn.nn import ATTENTION_KINDS, AttentionConfig
from sparse_sinkhorn.nn.kinds import KINDS, Call, kind_fields, users
from sparse_sinkhorn.ops import num_blocks

# A valid value other than the default, for every field but ``kind``.
OTHER = {
    "block_size": 8,
    "max_len": 128,
    "n_sortcut": 2,
    "hard": True,
    "balance": "softmax",
    "sort_net": "bilinear",
    "pooling": "max",
    "shared_routing": "heads",
    "n_iters": 3,
    "temperature": 0.5,
    "gumbel_noise": False,
    "sparse_mode": "strided",
    "share_kv": True,
    "top_k": 2,
    "compressed": True,
    "gate": "bound",
    "backend": "flex",
    "routing_loss": 0.5,
    "routing_teacher": "max",
}
# a field that only means something beside another one is set with it
WITH = {"routing_teacher": {"routing_loss": 0.5}}
FIELDS = [f.name for f in dataclasses.fields(AttentionConfig)]


def test_the_table_names_every_field_and_only_fields() -> None:
    assert set(OTHER) == set(FIELDS) - {"kind"}  # the walk below covers every field
    assert tuple(KINDS) == ATTENTION_KINDS
    for name, kind in KINDS.items():
        assert kind.name == name
        assert kind.uses <= set(FIELDS), name
        assert (kind.decode is None) == kind.routes, name  # routed kinds: the routing cache
    for field in FIELDS:
        assert users(field), f"no kind reads {field}"
    assert set(users("n_iters")) == {"sinkhorn", "mixture"}
    assert users("n_sortcut") == ("sinkhorn",)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("field", list(OTHER))
def test_a_field_is_accepted_exactly_by_the_kinds_that_read_it(kind: str, field: str) -> None:
    value = OTHER[field]
    if field in KINDS[kind].uses:
        config = AttentionConfig(kind=kind, **WITH.get(field, {}), **{field: value})
        assert getattr(config, field) == value
        assert kind_fields(kind, {field: value}) == {field: value}
    else:
        message = (
            f"AttentionConfig: kind='{kind}' does not use {field} (set it only with kind in "
            f"{users(field)})"
        )
        with pytest.raises(ValueError) as err:
            AttentionConfig(kind=kind, **{field: value})
        assert str(err.value) == message and "\n" not in message
        assert kind_fields(kind, {field: value}) == {}
    # the default is accepted by every kind: "does not use" means "set to another value"
    default = next(f.default for f in dataclasses.fields(AttentionConfig) if f.name == field)
    assert getattr(AttentionConfig(kind=kind, **{field: default}), field) == default


def test_unknown_kind_is_one_line_at_construction() -> None:
    with pytest.raises(ValueError) as err:
        AttentionConfig(kind="sortcut")
    assert str(err.value).startswith("AttentionConfig: unknown attention kind 'sortcut'")
    assert "\n" not in str(err.value)
    assert all(name in str(err.value) for name in KINDS)


def _qkv(length: int, kv_heads: int = 4) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, length, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, kv_heads, length, 8, generator=g, dtype=torch.float64) for _ in "kv")
    return q, k, v


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "causal"])
@pytest.mark.parametrize("padded", [False, True], ids=["", "padded"])
def test_each_kind_attends_as_its_reference(kind: str, causal: bool, padded: bool) -> None:
    """The registry's op equals its float64 oracle, also with padding."""
    length, w = 21, 4
    extra = {"top_k": 2, "compressed": True} if kind == "topk" else {}
    config = AttentionConfig(kind=kind, block_size=w, max_len=64, **extra)
    q, k, v = _qkv(length)
    mask = None
    if padded:
        mask = torch.ones(2, length, dtype=torch.bool)
        mask[0, 15:] = False
    n = num_blocks(length, w)
    logits = None
    if KINDS[kind].routes:
        logits = torch.randn(2, 4, n, n, generator=torch.Generator().manual_seed(1))
        logits = logits.double()
    call = Call(is_causal=causal, key_padding_mask=mask, logits=logits)
    out, plan = KINDS[kind].attend(config, q, k, v, call)
    ref = KINDS[kind].reference(config, q, k, v, call)
    assert (plan is not None) == KINDS[kind].routes
    real = torch.ones(2, length, dtype=torch.bool) if mask is None else mask
    rows = real[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[rows], ref.to(out.dtype)[rows], atol=1e-10, rtol=0)


@pytest.mark.parametrize("kind", [name for name, kind in KINDS.items() if kind.decode])
def test_each_decoding_step_is_the_causal_forward_at_the_newest_position(kind: str) -> None:
    w = 4
    extra = {"top_k": 2, "compressed": True} if kind == "topk" else {}
    if kind == "sparse":
        extra = {"sparse_mode": "strided"}
    config = AttentionConfig(kind=kind, block_size=w, max_len=64, **extra)
    q, k, v = _qkv(19)
    full, _ = KINDS[kind].attend(config, q, k, v, Call(is_causal=True))
    decode = KINDS[kind].decode
    assert decode is not None
    for t in (0, 3, 4, 11, 18):
        step = decode(config, q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1])
        torch.testing.assert_close(step, full[:, :, t : t + 1], atol=1e-10, rtol=0)


def test_a_saved_config_with_a_field_its_kind_ignores_loads_without_it() -> None:
    """Configurations saved before unused fields were refused (the sort experiment gave
    dense its preset's 5 balancing rounds) load with the field dropped and a warning."""
    saved = LanguageModelConfig(vocab_size=11, attention=AttentionConfig(kind="dense")).to_dict()
    saved["attention"]["n_iters"] = 5
    saved["attention"]["pooling"] = "max"
    with pytest.warns(UserWarning, match="kind='dense' does not use pooling, n_iters; dropped"):
        config = config_from_dict(saved)
    assert config.attention == AttentionConfig(kind="dense")
    routed = LanguageModelConfig(vocab_size=11, attention=AttentionConfig(n_iters=5)).to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a field the kind reads: kept, no warning
        assert config_from_dict(routed).attention.n_iters == 5
    with pytest.raises(ValueError, match="kind='dense' does not use n_iters"):
        AttentionConfig(kind="dense", n_iters=5)  # built in code: refused
    with pytest.raises(TypeError, match="unexpected keyword"):
        AttentionConfig.from_dict({"kind": "dense", "n_iter": 5})  # a misspelt field still fails


def test_sort_builds_each_kind_with_only_the_fields_it_reads() -> None:
    from sparse_sinkhorn.experiments import sorting
    from sparse_sinkhorn.experiments.presets import SORT_PRESETS

    preset = SORT_PRESETS["cpu"]
    for kind in sorting.KINDS:
        att = sorting.model_config(preset, kind).attention
        routed = KINDS[kind].routes
        assert att.n_iters == (preset.n_iters if routed else 8), kind
        assert att.temperature == (preset.temperature if routed else 0.75), kind
