"""Models: shapes, configs, decoding, causality through the whole stack, padding."""

from __future__ import annotations

import json

import pytest
import torch

from sparse_sinkhorn.models import (
    Classifier,
    ClassifierConfig,
    LanguageModel,
    LanguageModelConfig,
    Seq2Seq,
    Seq2SeqConfig,
    build_model,
    config_from_dict,
)
from sparse_sinkhorn.nn import AttentionConfig

ATT = AttentionConfig(block_size=4, max_len=64)
SMALL = dict(vocab_size=12, d_model=16, n_heads=2, n_layers=2, d_ff=32, dropout=0.0)


def test_config_json_round_trip() -> None:
    for cfg in (
        Seq2SeqConfig(**SMALL, attention=ATT, n_decoder_layers=1),
        LanguageModelConfig(**SMALL, attention=AttentionConfig(kind="local", block_size=8)),
        ClassifierConfig(**SMALL, n_classes=3, pair="separate"),
    ):
        data = json.loads(json.dumps(cfg.to_dict()))
        assert config_from_dict(data) == cfg
        assert type(build_model(cfg)).__name__ == type(cfg).__name__.removesuffix("Config")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(d_model=15), "d_model=15 is not divisible by n_heads=2"),
        (dict(vocab_size=0), "vocab_size must be > 0"),
        (dict(pad_id=12), "pad_id=12 is outside the vocabulary"),
        (dict(dropout=1.0), "dropout must be in [0, 1)"),
    ],
)
def test_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        LanguageModelConfig(**{**SMALL, **kwargs})
    with pytest.raises(ValueError, match="unknown model config type 'Nope'"):
        config_from_dict({"type": "Nope"})


@pytest.mark.parametrize("kind", ["sinkhorn", "mixture", "dense", "local", "sparse"])
def test_language_model_is_causal_end_to_end(kind: str) -> None:
    cfg = LanguageModelConfig(
        **SMALL, attention=AttentionConfig(kind=kind, block_size=4, max_len=64)
    )
    model = LanguageModel(cfg).double().eval()
    ids = torch.randint(1, 12, (2, 21))
    logits = model(ids)
    assert logits.shape == (2, 21, 12)
    for t in (0, 4, 10, 19):
        ids2 = ids.clone()
        ids2[:, t + 1 :] = torch.randint(1, 12, ids2[:, t + 1 :].shape)
        torch.testing.assert_close(model(ids2)[:, : t + 1], logits[:, : t + 1], atol=1e-10, rtol=0)


@pytest.mark.parametrize("kind", ["sinkhorn", "mixture", "dense", "local", "sparse"])
def test_seq2seq_decoding_is_consistent_with_teacher_forcing(kind: str) -> None:
    cfg = Seq2SeqConfig(**SMALL, attention=AttentionConfig(kind=kind, block_size=4, max_len=64))
    model = Seq2Seq(cfg).double().eval()
    src = torch.randint(2, 12, (3, 9))
    out = model.generate(src, 11)
    assert out.shape == (3, 11) and not (out == cfg.pad_id).any()
    tgt_in = torch.cat([torch.full((3, 1), cfg.bos_id), out[:, :-1]], dim=1)
    logits = model(src, tgt_in)
    logits[..., cfg.pad_id] = float("-inf")
    assert torch.equal(logits.argmax(-1), out)  # greedy == argmax of the teacher-forced pass
    assert torch.equal(model.generate(src, 11, use_cache=False), out)  # cache is exact
    kwargs: dict = dict(sample_temperature=1.0, sample_top_k=3)
    sampled = model.generate(src, 11, generator=torch.Generator().manual_seed(0), **kwargs)
    uncached = model.generate(
        src, 11, generator=torch.Generator().manual_seed(0), use_cache=False, **kwargs
    )
    assert torch.equal(sampled, uncached)


def test_seq2seq_source_padding_is_invisible() -> None:
    model = Seq2Seq(Seq2SeqConfig(**SMALL, attention=ATT)).double().eval()
    src = torch.randint(2, 12, (1, 10))
    padded = torch.cat([src, torch.zeros(1, 7, dtype=torch.long)], dim=1)
    tgt_in = torch.randint(2, 12, (1, 6))
    torch.testing.assert_close(model(padded, tgt_in), model(src, tgt_in), atol=1e-10, rtol=0)


@pytest.mark.parametrize("pair", ["none", "concat", "separate"])
def test_classifier_shapes_and_padding(pair: str) -> None:
    cfg = ClassifierConfig(
        **SMALL,
        n_classes=3,
        pair=pair,
        attention=AttentionConfig(block_size=4, max_len=64, n_sortcut=2),
    )
    model = Classifier(cfg).double().eval()
    ids = torch.randint(1, 12, (1, 11))
    padded = torch.cat([ids, torch.zeros(1, 9, dtype=torch.long)], dim=1)
    kwargs: dict = {}
    kwargs_padded: dict = {}
    if pair == "concat":
        kwargs = dict(segment_ids=(torch.arange(11) > 5).long()[None])
        kwargs_padded = dict(segment_ids=(torch.arange(20) > 5).long()[None])
    if pair == "separate":
        kwargs = kwargs_padded = dict(ids_b=torch.randint(1, 12, (1, 9)))
    alone = model(ids, **kwargs)
    assert alone.shape == (1, 3)
    torch.testing.assert_close(model(padded, **kwargs_padded), alone, atol=1e-10, rtol=0)


def test_models_reject_bad_input() -> None:
    model = LanguageModel(
        LanguageModelConfig(**SMALL, attention=AttentionConfig(block_size=4, max_len=16))
    )
    with pytest.raises(ValueError, match=r"length 20 > attention\.max_len=16"):
        model(torch.randint(0, 12, (1, 20)))
    with pytest.raises(ValueError, match=r"must be a \(B, L\) integer tensor"):
        model(torch.randn(1, 8))
    with pytest.raises(ValueError, match=r"SortCut .* is for encoders only; it cannot be causal"):
        LanguageModel(LanguageModelConfig(**SMALL, attention=AttentionConfig(n_sortcut=2)))
    with pytest.raises(ValueError, match=r"SortCut .* is for encoders only; it cannot be causal"):
        Seq2Seq(Seq2SeqConfig(**SMALL, attention=AttentionConfig(n_sortcut=2)))
