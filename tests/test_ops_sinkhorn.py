"""Sinkhorn attention against the dense reference, plus the invariants the README promises
(values are values, blocks really move, causality, padding, eval determinism)."""

from __future__ import annotations

import itertools

import pytest
import torch
from einops import rearrange

from grids import mode_id, op_modes
from helpers_ops import assert_exactly_causal
from sparse_sinkhorn.ops import (
    reference_sinkhorn_attention,
    reference_sinkhorn_balance,
    sample_gumbel,
    sinkhorn_attention,
    sinkhorn_attention_with_plan,
    sinkhorn_balance,
)
from sparse_sinkhorn.ops.sinkhorn import causal_block_mask

B, H, D = 2, 2, 4

# causal x SortCut x hard x Mixture, each over block sizes, odd lengths and padding.
MODES = op_modes(mix_dense=(False, True))
SHAPES = [(4, 16), (4, 19), (3, 13), (8, 40), (1, 7)]  # (block_size, length)


def _inputs(length: int, block: int, dtype: torch.dtype = torch.float64, batch: int = B):
    n = -(-length // block)
    q, k, v = (torch.randn(batch, H, length, D, dtype=dtype) for _ in range(3))
    logits = torch.randn(batch, H, n, n, dtype=dtype)
    return q, k, v, logits


def _padding(length: int, batch: int = B) -> torch.Tensor:
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[-1, length - max(1, 2 * length // 3) :] = False  # last row: keep the first third
    return mask


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
@pytest.mark.parametrize(("block", "length"), SHAPES, ids=[f"b{b}-L{n}" for b, n in SHAPES])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_fast_path_matches_reference(mode: dict, block: int, length: int, padded: bool) -> None:
    n = -(-length // block)
    if mode.get("n_sortcut") and mode["n_sortcut"] > n:
        pytest.skip("budget larger than N")
    q, k, v, logits = _inputs(length, block)
    mask = _padding(length) if padded else None
    out = sinkhorn_attention(q, k, v, logits, block_size=block, key_padding_mask=mask, **mode)
    ref = reference_sinkhorn_attention(
        q, k, v, logits, block_size=block, key_padding_mask=mask, **mode
    )
    assert out.shape == (B, H, length, D) and out.dtype == torch.float64
    real = 1.0 if mask is None else mask[:, None, :, None]
    torch.testing.assert_close(out * real, ref * real, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("mode", op_modes(), ids=mode_id)
def test_backward_matches_reference(mode: dict) -> None:
    q, k, v, logits = _inputs(13, 4)
    inputs = [t.requires_grad_() for t in (q, k, v, logits)]
    grads = []
    for fn in (sinkhorn_attention, reference_sinkhorn_attention):
        out = fn(*inputs, block_size=4, **mode)
        grads.append(torch.autograd.grad((out * torch.arange(13.0)[:, None]).sum(), inputs))
    for fast, ref in zip(*grads, strict=True):
        torch.testing.assert_close(fast, ref, atol=1e-9, rtol=1e-8)


@pytest.mark.parametrize("mode", op_modes(), ids=mode_id)
def test_gradcheck(mode: dict) -> None:
    q, k, v, logits = _inputs(9, 4, batch=1)
    mask = torch.tensor([[True] * 7 + [False] * 2])
    # Hard routing is piecewise constant in the logits (its logits gradient is the
    # straight-through estimate, checked against the reference above), so check q, k, v only.
    inputs = tuple(t.requires_grad_() for t in ((q, k, v) if mode["hard"] else (q, k, v, logits)))

    def fn(*xs: torch.Tensor) -> torch.Tensor:
        args = xs if len(xs) == 4 else (*xs, logits)
        out = sinkhorn_attention(*args, block_size=4, key_padding_mask=mask, n_iters=3, **mode)
        return out

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


# ---- balancing ---------------------------------------------------------------------------


def test_balance_matches_loop_reference() -> None:
    logits = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    for causal in (False, True):
        fast = sinkhorn_balance(logits, causal=causal, n_iters=5)
        ref = reference_sinkhorn_balance(logits, causal=causal, n_iters=5)
        torch.testing.assert_close(fast, ref, atol=1e-12, rtol=1e-10)
        for columns in ("reachable", "all-rows"):
            fast = sinkhorn_balance(logits, causal=causal, n_iters=5, columns=columns)
            ref = reference_sinkhorn_balance(logits, causal=causal, n_iters=5, columns=columns)
            torch.testing.assert_close(fast, ref, atol=1e-12, rtol=1e-10)


def test_balance_refuses_unknown_columns() -> None:
    with pytest.raises(ValueError, match="columns must be one of"):
        sinkhorn_balance(torch.randn(4, 4), causal=True, columns="targets")
    with pytest.raises(ValueError, match="columns must be one of"):  # and so does the oracle
        reference_sinkhorn_balance(torch.randn(4, 4), causal=True, columns="targets")


@pytest.mark.parametrize(
    ("causal", "columns"), [(False, "unit"), (True, "unit"), (True, "reachable")],
    ids=["encoder", "causal", "causal-targets"],
)  # fmt: skip
@pytest.mark.parametrize("n_iters", [0, 1, 8])
def test_balance_backward_in_chunks_and_segments_is_the_reference_gradient(
    causal: bool, columns: str, n_iters: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The balancing's backward recomputes its rounds from checkpoints, one chunk of
    matrices at a time: its gradient is the loop reference's (autograd, float64), and the
    chunked gradient is the one-chunk gradient bit for bit."""
    from sparse_sinkhorn.ops import _balance_backward

    logits = (3 * torch.randn(2, 3, 7, 7, dtype=torch.float64)).requires_grad_()
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, 5:] = False  # padding: the last blocks of the second sequence
    allowed = valid[:, None, :, None] & valid[:, None, None, :]
    cotangent = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    kw = {"n_iters": n_iters, "causal": causal, "allowed": allowed, "columns": columns}
    ref = reference_sinkhorn_balance(logits, **kw)
    (expected,) = torch.autograd.grad(ref, logits, cotangent)
    grads = []
    for chunk in (1 << 24, 49, 1):  # everything at once, one matrix per chunk, the minimum
        monkeypatch.setattr(_balance_backward, "_CHUNK_ELEMENTS", chunk)
        (grad,) = torch.autograd.grad(sinkhorn_balance(logits, **kw), logits, cotangent)
        grads.append(grad)
    torch.testing.assert_close(grads[0], expected, atol=1e-10, rtol=1e-8)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


def test_rows_and_columns_sum_to_one() -> None:
    logits = torch.randn(2, 3, 8, 8)
    p = sinkhorn_balance(logits, n_iters=8)
    torch.testing.assert_close(p.sum(-2), torch.ones(2, 3, 8), atol=1e-5, rtol=0)  # last step
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 3, 8), atol=2e-2, rtol=0)
    p = sinkhorn_balance(logits, n_iters=100)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 3, 8), atol=1e-4, rtol=0)


@pytest.mark.parametrize("columns", ["unit", "reachable"])
def test_causal_balance_rows_are_convex_and_prefix_only(columns: str) -> None:
    logits = torch.randn(1, 1, 7, 7, dtype=torch.float64)
    p = sinkhorn_balance(logits, causal=True, columns=columns)
    assert torch.all(p[0, 0][~causal_block_mask(7)] == 0)  # only strictly earlier blocks
    assert torch.all(p[0, 0, 0] == 0)  # block 0 receives nothing
    torch.testing.assert_close(p[0, 0, 1:].sum(-1), torch.ones(6, dtype=torch.float64))
    for i in range(7):  # row i must not change when later rows change
        changed = logits.clone()
        changed[..., i + 1 :, :] = torch.randn_like(changed[..., i + 1 :, :])
        torch.testing.assert_close(
            sinkhorn_balance(changed, causal=True, columns=columns)[..., : i + 1, :],
            p[..., : i + 1, :],
            atol=0,
            rtol=0,
        )


def test_low_temperature_gives_a_permutation() -> None:
    perm = torch.randperm(6)
    logits = torch.full((1, 1, 6, 6), -3.0)
    logits[0, 0, torch.arange(6), perm] = 3.0
    p = sinkhorn_balance(logits, temperature=0.01, n_iters=20)
    torch.testing.assert_close(p[0, 0], torch.eye(6)[perm], atol=1e-4, rtol=0)


def test_half_precision_logits_are_balanced_in_float32() -> None:
    p = sinkhorn_balance(torch.randn(1, 1, 4, 4, dtype=torch.bfloat16))
    assert p.dtype == torch.float32 and torch.isfinite(p).all()


# ---- invariants (README) -----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_values_are_values(mode: dict) -> None:
    q, k, v, logits = _inputs(16, 4)
    out = sinkhorn_attention(q, k, torch.zeros_like(v), logits, block_size=4, **mode)
    assert torch.all(out == 0)  # keys never leak into values


@pytest.mark.parametrize("sortcut", [None, 2])
def test_hard_low_temperature_equals_explicit_block_permutation(sortcut: int | None) -> None:
    w, n = 4, 5
    q, k, v, _ = _inputs(w * n, w)
    perm = torch.stack([torch.randperm(n) for _ in range(B * H)]).view(B, H, n)
    logits = torch.full((B, H, n, n), -5.0, dtype=torch.float64)
    logits.scatter_(-1, perm[..., None], 5.0)
    out = sinkhorn_attention(
        q, k, v, logits, block_size=w, hard=True, temperature=1e-3, n_sortcut=sortcut
    )
    kb = rearrange(k, "b h (n w) d -> b h n w d", w=w)
    vb = rearrange(v, "b h (n w) d -> b h n w d", w=w)
    gather = perm[..., None, None].expand(-1, -1, -1, w, D)
    ks, vs = kb.gather(2, gather), vb.gather(2, gather)  # block perm[i] placed at i
    scale = D**-0.5
    if sortcut is None:
        qb = rearrange(q, "b h (n w) d -> b h n w d", w=w)
        keys, values = torch.cat([kb, ks], -2), torch.cat([vb, vs], -2)
        expect = torch.softmax(qb @ keys.mT * scale, -1) @ values
        expect = rearrange(expect, "b h n w d -> b h (n w) d")
    else:
        keys = rearrange(ks[:, :, :sortcut], "b h n w d -> b h (n w) d")
        values = rearrange(vs[:, :, :sortcut], "b h n w d -> b h (n w) d")
        expect = torch.softmax(q @ keys.mT * scale, -1) @ values
    torch.testing.assert_close(out, expect)


@pytest.mark.parametrize("mode", op_modes(causal=(True,), mix_dense=(False, True)), ids=mode_id)
@pytest.mark.parametrize(
    "length", [19, 36], ids=["masked-path", "two-part-path"]
)  # 19: padded to blocks; 36: 9 whole blocks, the plan matmuls run in row chunks
def test_exact_causality(mode: dict, length: int) -> None:
    assert_exactly_causal(mode, length=length, block=4)


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_padding_invariance(mode: dict) -> None:
    length, w = 23, 4
    q, k, v, logits = _inputs(length, w)
    mask = _padding(length)
    out = sinkhorn_attention(q, k, v, logits, block_size=w, key_padding_mask=mask, **mode)
    q2, k2, v2 = (
        torch.where(mask[:, None, :, None], x, torch.randn_like(x) * 100) for x in (q, k, v)
    )
    out2 = sinkhorn_attention(q2, k2, v2, logits, block_size=w, key_padding_mask=mask, **mode)
    real = mask[:, None, :, None]
    torch.testing.assert_close(out2 * real, out * real, atol=0, rtol=0)


def test_whole_block_padding_gives_the_unpadded_result() -> None:
    w, length, extra = 4, 14, 10
    q, k, v, logits = _inputs(length + extra, w, batch=1)
    n = -(-length // w)
    mask = torch.zeros(1, length + extra, dtype=torch.bool)
    mask[:, :length] = True
    for mode in MODES:
        padded = sinkhorn_attention(q, k, v, logits, block_size=w, key_padding_mask=mask, **mode)
        alone = sinkhorn_attention(
            q[:, :, :length],
            k[:, :, :length],
            v[:, :, :length],
            logits[..., :n, :n].contiguous(),
            block_size=w,
            **mode,
        )
        assert isinstance(padded, torch.Tensor) and isinstance(alone, torch.Tensor)
        torch.testing.assert_close(padded[:, :, :length], alone)


def test_gumbel_noise_is_standard_gumbel() -> None:
    noise = sample_gumbel((200_000,), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(noise).all()
    assert abs(noise.mean().item() - 0.5772) < 0.02  # Euler-Mascheroni constant
    assert abs(noise.var().item() - torch.pi**2 / 6) < 0.05


def test_gumbel_noise_follows_generator_and_eval_is_deterministic() -> None:
    q, k, v, logits = _inputs(16, 4, dtype=torch.float32)

    def run(**kw: object) -> torch.Tensor:
        out = sinkhorn_attention(q, k, v, logits, block_size=4, **kw)  # type: ignore[arg-type]
        return out

    torch.testing.assert_close(run(), run(), atol=0, rtol=0)
    a = run(gumbel_noise=True, generator=torch.Generator().manual_seed(1))
    b = run(gumbel_noise=True, generator=torch.Generator().manual_seed(1))
    c = run(gumbel_noise=True, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, run())


def test_plan_is_inspectable() -> None:
    q, k, v, logits = _inputs(19, 4)
    _, plan = sinkhorn_attention_with_plan(q, k, v, logits, block_size=4, is_causal=True)
    assert "SinkhornPlan(batch=2, heads=2, rows=5, blocks=5, block_size=4, causal=True" in repr(
        plan
    )
    assert plan.P.shape == (B, H, 5, 5) and plan.indices is None  # soft: no hard choice
    assert torch.all(plan.P[..., 0, :] == 0)  # causal block 0 has no earlier block
    _, hard = sinkhorn_attention_with_plan(q, k, v, logits, block_size=4, is_causal=True, hard=True)
    assert hard.indices is not None and hard.indices.shape == (B, H, 5)
    assert torch.all(hard.indices[..., 0] == -1) and torch.all(hard.indices[..., 1] == 0)
    pattern = plan.to_dense(19)
    assert pattern.shape == (B, H, 19, 19)
    assert torch.all(pattern.triu(1) == 0)  # causal plan: no future key at all
    assert torch.all(pattern.diagonal(dim1=-2, dim2=-1) == 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype: torch.dtype) -> None:
    q, k, v, logits = _inputs(24, 8, dtype=dtype)
    for causal, hard in itertools.product((False, True), (False, True)):
        out = sinkhorn_attention(q, k, v, logits, block_size=8, is_causal=causal, hard=hard)
        assert out.dtype == dtype and torch.isfinite(out).all()
        ref = reference_sinkhorn_attention(
            q, k, v, logits, block_size=8, is_causal=causal, hard=hard
        )
        torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("mode", op_modes(hard=(False,), mix_dense=(False, True)), ids=mode_id)
def test_dropout(mode: dict) -> None:
    """``dropout_p > 0`` (the masked path): reproducible under a seed, unbiased (the mean over
    many draws is the dropout-free output, as SDPA rescales by 1 / (1 - p)), values stay
    values, exactly causal and blind to padding (NaN included) for a fixed seed."""
    length, w = 11, 4
    q, k, v, logits = _inputs(length, w)
    mask = _padding(length)

    def run(seed: int, **kw: object) -> torch.Tensor:
        torch.manual_seed(seed)
        args = dict(block_size=w, key_padding_mask=mask, dropout_p=0.3, **mode)
        inputs = (kw.get(n, x) for n, x in zip("qkvl", (q, k, v, logits), strict=True))
        return sinkhorn_attention(*inputs, **args)

    real = mask[:, None, :, None]
    torch.testing.assert_close(run(1), run(1), atol=0, rtol=0)
    assert not torch.allclose(run(1) * real, run(2) * real)
    assert torch.all(run(1, v=torch.zeros_like(v)) == 0)
    poisoned = torch.where(real, v, torch.full_like(v, float("nan")))
    torch.testing.assert_close(run(3, v=poisoned) * real, run(3) * real, atol=0, rtol=0)
    if mode["is_causal"]:
        t = 6  # change everything after position t: outputs up to t are unchanged
        v2 = v.clone()
        v2[:, :, t + 1 :] = torch.randn_like(v2[:, :, t + 1 :])
        torch.testing.assert_close(
            run(4, v=v2)[:, :, : t + 1], run(4)[:, :, : t + 1], atol=0, rtol=0
        )
    plain = sinkhorn_attention(q, k, v, logits, block_size=w, key_padding_mask=mask, **mode)
    draws = 4000  # independent dropout masks: the batch repeated, one call
    many = sinkhorn_attention(
        *(x.repeat(draws, 1, 1, 1) for x in (q, k, v, logits)),
        block_size=w,
        key_padding_mask=mask.repeat(draws, 1),
        dropout_p=0.3,
        **mode,
    )
    mean = many.view(draws, *plain.shape).mean(0)
    torch.testing.assert_close(mean * real, plain * real, atol=0.05, rtol=0)
