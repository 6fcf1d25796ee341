"""`LanguageModelConfig.token_conv`: the causal depthwise convolution over the embeddings
(`models.TokenConv`) against a float64 loop, exactly causal, padding-invariant (NaN in padded
positions included) and exact under incremental decoding."""

from __future__ import annotations

import pytest
import torch

from sparse_sinkhorn.models import LanguageModel, LanguageModelConfig, TokenConv
from sparse_sinkhorn.nn import AttentionConfig


def _reference(conv: TokenConv, x: torch.Tensor) -> torch.Tensor:
    """``x[t] + b + sum_j w[j] * x[t - k + 1 + j]`` in float64, zeros before the start."""
    w = conv.conv.weight.detach().double()[:, 0]  # (D, k)
    b = conv.conv.bias.detach().double()
    x = x.double()
    out = x.clone()
    k = conv.width
    for t in range(x.shape[1]):
        acc = b.expand(x.shape[0], -1).clone()
        for j in range(k):
            s = t - k + 1 + j
            if s >= 0:
                acc = acc + w[:, j] * x[:, s]
        out[:, t] = out[:, t] + acc
    return out


@pytest.mark.parametrize("width", [2, 3, 5])
def test_token_conv_equals_the_float64_loop(width: int) -> None:
    torch.manual_seed(0)
    conv = TokenConv(8, width)
    x = torch.randn(2, 9, 8)
    torch.testing.assert_close(conv(x).double(), _reference(conv, x), rtol=1e-5, atol=1e-5)


def test_token_conv_is_exactly_causal() -> None:
    torch.manual_seed(0)
    conv = TokenConv(8, 4)
    x = torch.randn(2, 12, 8, requires_grad=True)
    for t in range(12):
        (grad,) = torch.autograd.grad(conv(x)[:, : t + 1].sum(), x)
        assert torch.equal(grad[:, t + 1 :], torch.zeros_like(grad[:, t + 1 :]))
        assert grad[:, max(0, t - 3) : t + 1].abs().sum() > 0  # it does read its window


def test_no_padded_value_reaches_a_real_position() -> None:
    """Left padding holding NaN: the real positions equal the unpadded sequence's."""
    torch.manual_seed(0)
    conv = TokenConv(8, 3)
    real = torch.randn(2, 7, 8)
    padded = torch.cat([torch.full((2, 4, 8), float("nan")), real], dim=1)
    mask = torch.cat([torch.zeros(2, 4, dtype=torch.bool), torch.ones(2, 7, dtype=torch.bool)], 1)
    out = conv(padded, mask)[:, 4:]
    assert not out.isnan().any()
    torch.testing.assert_close(out, conv(real), rtol=0, atol=1e-6)


def _lm(kind: str, width: int = 3) -> LanguageModel:
    torch.manual_seed(0)
    attention = AttentionConfig(kind=kind, block_size=4, max_len=32)
    config = LanguageModelConfig(
        vocab_size=20, d_model=16, n_heads=2, n_layers=2, d_ff=32, dropout=0.0,
        attention=attention, token_conv=width,
    )  # fmt: skip
    return LanguageModel(config).eval()


@pytest.mark.parametrize("kind", ["dense", "sinkhorn", "local"])
@pytest.mark.parametrize("prompt", [1, 6])
def test_incremental_decoding_is_the_full_forward(kind: str, prompt: int) -> None:
    """Prefill ``prompt`` tokens (fewer than the width included), then one token at a time:
    the logits equal the full forward's at every position."""
    model = _lm(kind)
    ids = torch.randint(1, 20, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        steps = [model(ids[:, :prompt], cache=cache)]
        steps += [model(ids[:, t : t + 1], cache=cache) for t in range(prompt, 13)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_generate_with_and_without_the_cache_agree() -> None:
    model = _lm("dense")
    prompt = torch.randint(1, 20, (2, 3), generator=torch.Generator().manual_seed(2))
    greedy = {"sample_temperature": 0.0}
    cached = model.generate(prompt, 8, use_cache=True, **greedy)
    assert torch.equal(cached, model.generate(prompt, 8, use_cache=False, **greedy))


def test_the_model_output_is_exactly_causal_with_a_token_conv() -> None:
    model = _lm("dense", width=4)
    ids = torch.randint(1, 20, (1, 12), generator=torch.Generator().manual_seed(3))
    x = model.embed(ids).detach().requires_grad_(True)
    out = model.decoder(model.token_conv(x))
    (grad,) = torch.autograd.grad(out[:, :5].sum(), x)
    assert torch.equal(grad[:, 5:], torch.zeros_like(grad[:, 5:]))


@pytest.mark.parametrize("width", [1, -1])
def test_a_token_conv_width_below_two_is_refused(width: int) -> None:
    with pytest.raises(ValueError, match="token_conv must be 0"):
        LanguageModelConfig(vocab_size=10, token_conv=width)


def test_token_conv_round_trips_through_the_saved_config_and_defaults_to_none() -> None:
    config = LanguageModelConfig(vocab_size=10, token_conv=4)
    assert LanguageModelConfig.from_dict(config.to_dict()).token_conv == 4
    assert LanguageModel(LanguageModelConfig(vocab_size=10)).token_conv is None


def test_prefill_in_chunks_is_the_full_forward() -> None:
    """Several calls of several tokens each (the convolution's past spans the calls)."""
    model = _lm("sinkhorn")
    ids = torch.randint(1, 20, (2, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        steps = [model(ids[:, a:b], cache=cache) for a, b in ((0, 4), (4, 7), (7, 8), (8, 13))]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_a_refused_call_leaves_the_cache_as_it_was() -> None:
    """A call the layers refuse (a padding mask, or training mode, with a cache) does not
    advance the convolution's past: decoding goes on exactly."""
    model = _lm("dense")
    ids = torch.randint(1, 20, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        steps = [model(ids[:, :5], cache=cache)]
        with pytest.raises(ValueError, match="no key_padding_mask"):
            model(ids[:, 5:6], torch.ones(2, 1, dtype=torch.bool), cache=cache)
        model.train()
        with pytest.raises(ValueError, match="eval mode"):
            model(ids[:, 5:6], cache=cache)
        model.eval()
        steps += [model(ids[:, t : t + 1], cache=cache) for t in range(5, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_a_cache_serves_one_batch() -> None:
    model = _lm("dense")
    ids = torch.randint(1, 20, (2, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        cache = model.new_cache()
        model(ids[:, :5], cache=cache)
        with pytest.raises(ValueError, match="a decoding cache serves one batch"):
            model(ids[:1, 5:6], cache=cache)


def test_token_conv_checks_its_input_as_a_layer_does() -> None:
    """A padding mask that is not bool ``(B, L)``, or an input of another width, gets the
    layers' one-line messages (not a broadcasting error, nor a mask applied as broadcast)."""
    conv = TokenConv(8, 3)
    x = torch.randn(2, 5, 8)
    with pytest.raises(TypeError, match="key_padding_mask must be a bool tensor"):
        conv(x, torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, L\)"):
        conv(x, torch.ones(2, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"expected x of shape \(B, L, 8\)"):
        conv(torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="past must be"):
        conv(x, past=torch.zeros(2, 3, 8))
