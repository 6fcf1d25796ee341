"""NaN and Inf at padded positions never reach a real output, in every attention kind, in the
layers and models built on them and in incremental decoding; finite inputs never give NaN."""

from __future__ import annotations

import pytest
import torch

from sparse_sinkhorn import SinkhornSelfAttention, sinkhorn_attention
from sparse_sinkhorn.models import ClassifierConfig, Seq2Seq, Seq2SeqConfig
from sparse_sinkhorn.models.classifier import Classifier
from sparse_sinkhorn.nn import AttentionConfig
from sparse_sinkhorn.ops import dense_attention, local_attention, sparse_attention

B, H, L, D, W = 2, 2, 13, 4, 4
N = -(-L // W)
POISONS = (float("nan"), float("inf"), float("-inf"))


def _mask() -> torch.Tensor:
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 9:] = False  # a partly padded block and a padding-only block
    mask[1, 3:] = False  # most of the sequence is padding
    return mask


def _op(kind: str, causal: bool):
    logits = torch.randn(
        B, H, N, N, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )

    def run(q, k, v, mask):
        common = dict(is_causal=causal, key_padding_mask=mask)
        if kind == "dense":
            return dense_attention(q, k, v, **common)
        if kind == "local":
            return local_attention(q, k, v, block_size=W, **common)
        if kind == "sparse":
            return sparse_attention(q, k, v, block_size=W, **common)
        extra = {
            "sinkhorn": {},
            "mixture": {"mix_dense": True},
            "hard": {"hard": True},
            "sortcut": {"n_sortcut": 2},
            "targets": {"balance": "sinkhorn-targets"},
            "targets-hard": {"balance": "sinkhorn-targets", "hard": True},
        }[kind]
        return sinkhorn_attention(q, k, v, logits, block_size=W, **common, **extra)

    return run


OP_CASES = [
    (kind, causal)
    for kind in (
        *("dense", "local", "sparse", "sinkhorn", "mixture", "hard", "sortcut"),
        *("targets", "targets-hard"),
    )
    for causal in (False, True)
    if not (kind == "sortcut" and causal) and not (kind.startswith("targets") and not causal)
]


@pytest.mark.parametrize(("kind", "causal"), OP_CASES)
@pytest.mark.parametrize("poison", POISONS)
def test_op_padding_nonfinite_never_reaches_real_outputs(kind, causal, poison):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64, generator=gen) for _ in range(3))
    mask = _mask()
    run = _op(kind, causal)
    clean = run(q, k, v, mask)
    pad = ~mask[:, None, :, None].expand_as(q)
    dirty = run(*(t.masked_fill(pad, poison) for t in (q, k, v)), mask)
    real = ~pad
    assert torch.isfinite(clean[real]).all()
    assert torch.equal(dirty[real], clean[real])


@pytest.mark.parametrize("kind", ["sinkhorn", "mixture", "dense", "local", "sparse"])
@pytest.mark.parametrize("causal", [False, True])
def test_layer_padding_nonfinite_never_reaches_real_outputs(kind, causal):
    torch.manual_seed(0)
    layer = SinkhornSelfAttention(8, 2, causal=causal, kind=kind, block_size=W, max_len=16).double()
    layer.eval()
    mask = _mask()
    x = torch.randn(B, L, 8, dtype=torch.float64)
    clean = layer(x, mask)
    for poison in POISONS:
        dirty = layer(x.masked_fill(~mask[..., None], poison), mask)
        assert torch.equal(dirty[mask], clean[mask]), (kind, causal, poison)


@pytest.mark.parametrize("kind", ["sinkhorn", "dense"])
def test_classifier_pooling_ignores_nonfinite_padding(kind):
    """A NaN hidden state at a padded position (forced by a hook) does not reach the logits."""
    torch.manual_seed(0)
    att = AttentionConfig(kind=kind, block_size=W, max_len=16)
    model = Classifier(ClassifierConfig(vocab_size=20, d_model=8, n_heads=2, attention=att))
    model.eval()
    ids = torch.randint(1, 20, (B, L))
    ids[~_mask()] = 0
    clean = model(ids)

    def poison(_module, _inputs, output):
        return output.masked_fill((ids == 0)[..., None], float("nan"))

    handle = model.encoder.register_forward_hook(poison)
    try:
        dirty = model(ids)
    finally:
        handle.remove()
    assert torch.equal(dirty, clean)


@pytest.mark.parametrize("kind", ["sinkhorn", "mixture", "dense", "local", "sparse"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_decoding_ignores_nonfinite_padded_memory(kind, use_cache):
    """Seq2Seq decoding (with the incremental cache and without): NaN in the padded part of
    the encoder memory changes no generated token and no logit."""
    torch.manual_seed(0)
    att = AttentionConfig(kind=kind, block_size=W, max_len=32)
    model = Seq2Seq(Seq2SeqConfig(vocab_size=12, d_model=8, n_heads=2, attention=att)).eval()
    src = torch.randint(2, 12, (B, L))
    src[~_mask()] = 0
    clean = model.generate(src, 9, use_cache=use_cache)
    handle = model.encoder.register_forward_hook(
        lambda _m, _i, out: out.masked_fill((src == 0)[..., None], float("nan"))
    )
    try:
        dirty = model.generate(src, 9, use_cache=use_cache)
        memory, mask = model.encode(src)
    finally:
        handle.remove()
    assert memory.isnan().any()  # the hook really poisoned the padding
    assert torch.equal(dirty, clean)
    tgt = torch.cat([torch.ones(B, 1, dtype=torch.long), clean[:, :-1]], dim=1)
    assert torch.isfinite(model.decode(tgt, memory, mask)).all()


@pytest.mark.parametrize(
    "options",
    [
        {"temperature": 1e-40},
        {"temperature": 1e-30, "hard": True},
        {"logits_scale": 3.0e38},
        {"logits_scale": 3.0e38, "is_causal": True},
        {"logits_scale": -3.0e38},
    ],
)
def test_finite_extreme_inputs_give_no_nan(options):
    options = dict(options)
    scale = options.pop("logits_scale", 1.0)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=gen) for _ in range(3))
    logits = torch.randn(B, H, N, N, generator=gen).sign() * scale
    logits.requires_grad_(True)
    out = sinkhorn_attention(q, k, v, logits, block_size=W, **options)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
