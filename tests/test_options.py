"""SinkhornOptions: the one list of the op's options, validated once, taken by every entry
point (the op, the plan, the reference, the layer config)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sparse_sinkhorn.nn import AttentionConfig, SinkhornSelfAttention
from sparse_sinkhorn.ops import (
    SinkhornOptions,
    reference_sinkhorn_attention,
    sinkhorn_attention,
    sinkhorn_attention_with_plan,
    sinkhorn_plan,
)
from sparse_sinkhorn.ops.options import SinkhornKwargs


def test_keyword_names_are_the_dataclass_fields() -> None:
    names = [f.name for f in dataclasses.fields(SinkhornOptions)]
    assert list(SinkhornKwargs.__annotations__) == names


def _inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 12, 4, generator=g) for _ in range(3))
    return q, k, v, torch.randn(2, 2, 3, 3, generator=g)


@pytest.mark.parametrize("causal", [False, True])
def test_options_object_equals_keywords_and_the_reference(causal: bool) -> None:
    q, k, v, logits = _inputs()
    opts = SinkhornOptions(block_size=4, is_causal=causal, hard=True, n_iters=3)
    by_object = sinkhorn_attention(q, k, v, logits, opts)
    by_keywords = sinkhorn_attention(
        q, k, v, logits, block_size=4, is_causal=causal, hard=True, n_iters=3
    )
    assert torch.equal(by_object, by_keywords)
    ref = reference_sinkhorn_attention(*(t.double() for t in (q, k, v, logits)), opts)
    torch.testing.assert_close(by_object.double(), ref, atol=1e-5, rtol=1e-5)


def test_keywords_override_the_object() -> None:
    q, k, v, logits = _inputs()
    opts = SinkhornOptions(block_size=4)
    out, plan = sinkhorn_attention_with_plan(q, k, v, logits, opts, is_causal=True)
    assert plan.is_causal and not opts.is_causal
    assert torch.equal(out, sinkhorn_attention(q, k, v, logits, block_size=4, is_causal=True))
    assert torch.equal(
        sinkhorn_plan(logits, opts, hard=True).P, sinkhorn_plan(logits, block_size=4, hard=True).P
    )


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ({}, TypeError, "needs block_size"),
        ({"block_size": 0}, ValueError, "block_size must be a positive int"),
        ({"block_size": 4, "n_sortcut": 1, "is_causal": True}, ValueError, "encoders only"),
        ({"block_size": 4, "balance": "rows"}, ValueError, "balance must be one of"),
        ({"block_size": 4, "temperature": float("nan")}, ValueError, "temperature"),
        ({"block_size": 4, "n_iters": -1}, ValueError, "n_iters"),
        ({"block_size": 4, "dropout_p": 1.0}, ValueError, "dropout_p"),
        ({"block_size": 4, "scale": 0.0}, ValueError, "scale"),
        ({"block_size": 4, "nosuch": 1}, TypeError, "nosuch"),
    ],
)
def test_bad_options_fail_once_with_their_name(
    fields: dict[str, object], error: type[Exception], match: str
) -> None:
    q, k, v, logits = _inputs()
    with pytest.raises(error, match=match):
        sinkhorn_attention(q, k, v, logits, **fields)  # type: ignore[arg-type]


def test_options_must_be_a_sinkhorn_options() -> None:
    q, k, v, logits = _inputs()
    with pytest.raises(TypeError, match="SinkhornOptions"):
        sinkhorn_attention(q, k, v, logits, {"block_size": 4})  # type: ignore[arg-type]


def test_config_maps_onto_the_op_options_by_name() -> None:
    cfg = AttentionConfig(kind="mixture", block_size=8, hard=True, n_iters=2, temperature=0.5)
    opts = cfg.op_options(is_causal=True, training=True, dropout_p=0.1)
    assert opts == SinkhornOptions(
        block_size=8,
        is_causal=True,
        mix_dense=True,
        hard=True,
        n_iters=2,
        temperature=0.5,
        gumbel_noise=True,
        dropout_p=0.1,
    )
    assert not cfg.op_options(is_causal=True).gumbel_noise  # noise in training only


def test_layer_takes_a_config_directly() -> None:
    cfg = AttentionConfig(block_size=4, max_len=16)
    torch.manual_seed(0)
    a = SinkhornSelfAttention(16, 2, causal=True, config=cfg).eval()
    torch.manual_seed(0)
    b = SinkhornSelfAttention(16, 2, causal=True, block_size=4, max_len=16).eval()
    x = torch.randn(2, 12, 16)
    assert a.config == b.config
    assert torch.equal(a(x), b(x))
    with pytest.raises(TypeError, match="not both"):
        SinkhornSelfAttention(16, 2, config=cfg, block_size=8)


def test_mixture_is_the_former_name_of_mix_dense() -> None:
    """``mixture=`` (the former name of ``mix_dense=``) gives the same output through every
    keyword entry point, with a DeprecationWarning; both names at once are a TypeError."""
    q, k, v, logits = _inputs()
    for op in (sinkhorn_attention, reference_sinkhorn_attention):
        new = op(q, k, v, logits, block_size=4, mix_dense=True)
        with pytest.warns(DeprecationWarning, match="mixture= is renamed mix_dense="):
            old = op(q, k, v, logits, block_size=4, mixture=True)  # type: ignore[call-arg]
        assert torch.equal(new, old)
    opts = SinkhornOptions(block_size=4)
    with pytest.warns(DeprecationWarning):
        assert sinkhorn_plan(logits, opts, mixture=True) is not None  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="pass mix_dense= only"):
        sinkhorn_attention(q, k, v, logits, block_size=4, mixture=True, mix_dense=True)  # type: ignore[call-arg]
