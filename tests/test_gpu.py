"""CUDA checks (marker ``gpu``; skipped without a CUDA device): ``make gpu-check`` runs them.

- Every mode of the op (soft / hard, causal, SortCut, Mixture; padding, odd lengths, grouped
  key/value heads) in fp32, fp16 and bf16, forward and backward, against the float64 CPU
  reference, by flash-attn's rule: the op's error is at most twice the error of the same
  computation done by PyTorch's dense path in that dtype on the same device, plus a small floor.
- Exact causality in bf16 (op and model, eval and training), the decoding cache against the
  full forward, ``torch.compile`` on CUDA, and one-process ``torchrun`` runs (the ``sort``
  command; a DDP training step over nccl).

The checks are written for any device: the ``cpu_smoke`` tests run a few of them on the CPU in
the ordinary suite, so the logic is exercised where no GPU is at hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from helpers_ops import assert_exactly_causal
from sparse_sinkhorn.models import LanguageModel, LanguageModelConfig
from sparse_sinkhorn.nn import AttentionConfig, SinkhornSelfAttention
from sparse_sinkhorn.ops import (
    reference_sinkhorn_attention,
    reference_sinkhorn_balance,
    sinkhorn_attention,
)

ROOT = Path(__file__).resolve().parents[1]
HELPER = Path(__file__).with_name("helpers_gpu_ddp.py")
CUDA = torch.device("cuda")

MODES: dict[str, dict[str, Any]] = {
    "soft": {},
    "hard": {"hard": True},
    "causal": {"is_causal": True},
    "causal_hard": {"is_causal": True, "hard": True},
    "sortcut": {"n_sortcut": 2},
    "sortcut_hard": {"n_sortcut": 2, "hard": True},
    "mixture": {"mix_dense": True},
    "mixture_causal": {"mix_dense": True, "is_causal": True},
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (block size, length): whole blocks, and an odd length with a partial last block.
SHAPES = {"b64_L256": (64, 256), "b32_L200": (32, 200)}
# The additive floor of the tolerance, relative to max(1, |reference|): about one ulp at 1.
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


# ---- the rule: error vs float64 <= 2 x PyTorch's dense error in the same dtype + floor ------


def _padding(batch: int, length: int) -> Tensor:
    """True = real; the last row keeps its first third (so it has padding-only blocks)."""
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[-1, max(1, length // 3) :] = False
    return mask


def _dense_in_dtype(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    sort_logits: Tensor,
    *,
    block_size: int,
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
    n_sortcut: int | None = None,
    mix_dense: bool = False,
    hard: bool = False,
) -> Tensor:
    """Sinkhorn attention as one dense problem, computed in the inputs' dtype and device.

    The construction of `reference_sinkhorn_attention` (token-level permutation
    ``kron(P, I_W)``, one masked softmax over ``[all keys ; sorted keys]``) with every tensor
    op in the input dtype: what PyTorch's plain dense path gives in that precision. ``P`` is
    balanced in float64 (the op balances in float32 whatever the input dtype).
    """
    dt, dev = query.dtype, query.device
    batch, heads, length, _ = query.shape
    w = block_size
    n = -(-length // w)
    lp = n * w
    rows = n if n_sortcut is None else n_sortcut

    def pad(x: Tensor) -> Tensor:
        return torch.cat([x, x.new_zeros(*x.shape[:-2], lp - length, x.shape[-1])], dim=-2)

    q, k, v = pad(query), pad(key), pad(value)
    real = torch.ones(batch, length, dtype=torch.bool, device=dev)
    if key_padding_mask is not None:
        real = key_padding_mask.to(dev)
    real = torch.cat([real, real.new_zeros(batch, lp - length)], dim=1)  # (B, Lp)
    block_real = real.view(batch, n, w).any(-1).cpu()
    allowed = (block_real[:, :, None] & block_real[:, None, :])[:, None]  # (B, 1, N, N)
    p = reference_sinkhorn_balance(
        sort_logits.double().cpu(), causal=is_causal, allowed=allowed
    )  # (B, H, N, N) float64 on the CPU (the reference's loops build CPU masks)
    p = p[..., :rows, :]
    if hard:
        one_hot = torch.zeros_like(p).scatter_(-1, p.argmax(-1, keepdim=True), 1.0)
        p = one_hot * (p.sum(-1, keepdim=True) > 0) + (p - p.detach())
    p = p.to(dev, dt)
    eye = torch.eye(w, dtype=dt, device=dev)
    perm = torch.einsum("bhrn,st->bhrsnt", p, eye).reshape(batch, heads, rows * w, lp)
    realk = real[:, None, :, None]
    k_sorted = perm @ torch.where(realk, k, 0)  # (B, H, R*W, D) in dtype
    v_sorted = perm @ torch.where(realk, v, 0)
    slot_real = (perm.detach().float() @ realk.float()).squeeze(-1) > 0  # (B, H, R*W)
    pos = torch.arange(lp, device=dev)
    q_blk = pos[:, None] // w
    slot_blk = torch.arange(rows * w, device=dev)[None, :] // w
    if n_sortcut is None:
        local = (q_blk == pos[None, :] // w) & real[:, None, None, :]
        if is_causal:
            local = local & (pos[None, :] <= pos[:, None])
        sorted_ok = (q_blk == slot_blk) & slot_real[:, :, None, :]
    else:
        local = torch.zeros(1, 1, lp, lp, dtype=torch.bool, device=dev)
        sorted_ok = slot_real[:, :, None, :].expand(batch, heads, lp, rows * w)
    keep = torch.cat([local.expand(batch, heads, lp, lp), sorted_ok], dim=-1)
    out = _masked_softmax_attend(
        q, torch.cat([k, k_sorted], -2), torch.cat([v, v_sorted], -2), keep
    )
    if mix_dense:
        dense_keep = real[:, None, None, :].expand(batch, heads, lp, lp)
        if is_causal:
            dense_keep = dense_keep & (pos[None, :] <= pos[:, None])
        out = out + _masked_softmax_attend(q, k, v, dense_keep)
    return out[:, :, :length]


def _masked_softmax_attend(q: Tensor, k: Tensor, v: Tensor, keep: Tensor) -> Tensor:
    """``softmax(q kᵀ / sqrt(D))`` over kept keys, ``@ v``, in the inputs' dtype; rows with no
    kept key give 0 (with finite gradients)."""
    scores = (q @ k.mT) * q.shape[-1] ** -0.5
    has = keep.any(-1, keepdim=True)
    scores = scores.masked_fill(~keep, float("-inf")).masked_fill(~has, 0.0)
    return (torch.softmax(scores, dim=-1) * has) @ v


def _with_repeated_kv(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``fn`` on key/value heads repeated up to the query heads (the GQA definition)."""

    def wrapped(q: Tensor, k: Tensor, v: Tensor, logits: Tensor, **kw: Any) -> Tensor:
        rep = q.shape[1] // k.shape[1]
        return fn(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), logits, **kw)

    return wrapped


def _forward_backward(
    fn: Callable[..., Any], inputs: list[Tensor], cotangent: Tensor, **kw: Any
) -> list[Tensor]:
    """``[output, dq, dk, dv, dlogits]``, all float64 on the CPU."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves, **kw)
    grads = torch.autograd.grad(out, leaves, cotangent.to(out.device, out.dtype))
    return [t.detach().double().cpu() for t in (out, *grads)]


def check_against_reference(
    device: torch.device,
    dtype: torch.dtype,
    mode: dict[str, Any],
    *,
    block: int,
    length: int,
    padded: bool,
    kv_heads: int,
    batch: int = 2,
    heads: int = 4,
    head_dim: int = 64,
    seed: int = 0,
) -> dict[str, tuple[float, float, float]]:
    """Run the op in ``dtype`` on ``device`` and assert flash-attn's rule on the output and
    every gradient; returns ``{name: (op error, dense error, bound)}``."""
    g = torch.Generator().manual_seed(seed)
    n = -(-length // block)

    def randn(*shape: int) -> Tensor:  # made on the CPU, rounded to dtype: same on any device
        return torch.randn(*shape, generator=g).to(dtype)

    q = randn(batch, heads, length, head_dim)
    k, v = randn(batch, kv_heads, length, head_dim), randn(batch, kv_heads, length, head_dim)
    logits = randn(batch, heads, n, n)
    mask = _padding(batch, length) if padded else None
    real = torch.ones(batch, 1, length, 1) if mask is None else mask[:, None, :, None].double()
    cot = torch.randn(batch, heads, length, head_dim, generator=g).double() * real
    kw = dict(block_size=block, **mode)

    ref = _forward_backward(
        _with_repeated_kv(reference_sinkhorn_attention),
        [x.double() for x in (q, k, v, logits)],
        cot,
        key_padding_mask=mask,
        **kw,
    )
    on_dev = [x.to(device) for x in (q, k, v, logits)]
    dev_mask = None if mask is None else mask.to(device)
    ours = _forward_backward(sinkhorn_attention, on_dev, cot, key_padding_mask=dev_mask, **kw)
    dense = _forward_backward(
        _with_repeated_kv(_dense_in_dtype), on_dev, cot, key_padding_mask=dev_mask, **kw
    )
    report = {}
    for i, name in enumerate(("out", "dq", "dk", "dv", "dlogits")):
        weight = real if name in ("out", "dq") else 1.0  # padded query rows are not outputs
        r = ref[i] * weight
        assert torch.isfinite(ours[i] * weight).all(), f"{name}: non-finite values"
        err = float((ours[i] * weight - r).abs().max())
        base = float((dense[i] * weight - r).abs().max())
        bound = 2 * base + FLOOR[dtype] * max(1.0, float(r.abs().max()))
        report[name] = (err, base, bound)
        assert err <= bound, (
            f"{name}: error {err:.3g} vs the float64 reference exceeds 2 x PyTorch dense "
            f"{base:.3g} + floor = {bound:.3g}"
        )
    return report


def _case_ids(params: dict[str, Any]) -> list[Any]:
    """Dict entries as parametrize values with readable ids (tuples spread over the names)."""
    return [pytest.param(*(v if isinstance(v, tuple) else (v,)), id=k) for k, v in params.items()]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", _case_ids(MODES))
@pytest.mark.parametrize("dtype", _case_ids(DTYPES))
@pytest.mark.parametrize(("block", "length"), _case_ids(SHAPES))
@pytest.mark.parametrize("padded", [False, True], ids=["dense_batch", "padded"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa2"])
def test_cuda_matches_float64_reference(
    mode: dict[str, Any], dtype: torch.dtype, block: int, length: int, padded: bool, kv_heads: int
) -> None:
    check_against_reference(
        CUDA, dtype, mode, block=block, length=length, padded=padded, kv_heads=kv_heads
    )


@pytest.mark.parametrize(
    ("mode", "dtype", "padded", "kv_heads"),
    [
        pytest.param("soft", torch.float32, False, 2, id="soft-fp32-gqa2"),
        pytest.param("causal_hard", torch.bfloat16, True, 2, id="causal_hard-bf16-padded"),
        pytest.param("sortcut", torch.bfloat16, True, 1, id="sortcut-bf16-padded-mqa"),
        pytest.param("mixture_causal", torch.float32, True, 2, id="mixture_causal-fp32"),
    ],
)
def test_cpu_smoke_of_the_reference_rule(
    mode: str, dtype: torch.dtype, padded: bool, kv_heads: int
) -> None:
    """The CUDA grid's check, run on the CPU with small shapes (keeps its logic honest)."""
    report = check_against_reference(
        torch.device("cpu"),
        dtype,
        MODES[mode],
        block=8,
        length=37,
        padded=padded,
        kv_heads=kv_heads,
        heads=2,
        head_dim=16,
    )
    if dtype == torch.bfloat16:  # the rule is not vacuous: bf16 is far from float64
        assert report["out"][1] > 1e-4


# ---- exact causality in bf16 -----------------------------------------------------------------


def check_op_causality(device: torch.device, mode: dict[str, Any], dtype: torch.dtype) -> None:
    """Changing inputs after position t leaves outputs <= t bit-identical."""
    assert_exactly_causal(
        mode, length=200, block=32, heads=4, head_dim=64, device=device, dtype=dtype,
        positions=(0, 31, 32, 3 * 32 + 5, 198),
    )  # fmt: skip


def check_model_causality(device: torch.device, train: bool) -> None:
    """A decoder LanguageModel (sort net included) under bf16 autocast: logits <= t
    bit-identical when tokens after t change (train mode: same Gumbel noise via the seed)."""
    att = AttentionConfig(kind="sinkhorn", block_size=16, max_len=128)
    cfg = LanguageModelConfig(
        vocab_size=50, d_model=128, n_heads=2, n_layers=2, d_ff=256, attention=att
    )
    model = LanguageModel(cfg).to(device).train(train)
    ids = torch.randint(0, 50, (2, 120), generator=torch.Generator().manual_seed(2))

    def run(x: Tensor) -> Tensor:
        torch.manual_seed(0)  # training draws Gumbel noise: the same for both runs
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            return model(x.to(device)).float().cpu()

    full = run(ids)
    for t in (5, 16, 47, 100):
        ids2 = ids.clone()
        ids2[:, t + 1 :] = (ids2[:, t + 1 :] + 1) % 50
        assert torch.equal(run(ids2)[:, : t + 1], full[:, : t + 1]), f"leak into t <= {t}"


CAUSAL_MODES = {k: v for k, v in MODES.items() if v.get("is_causal")}


@pytest.mark.gpu
@pytest.mark.parametrize("mode", _case_ids(CAUSAL_MODES))
def test_cuda_exact_causality_bf16(mode: dict[str, Any]) -> None:
    check_op_causality(CUDA, mode, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_cuda_model_exact_causality_bf16_autocast(train: bool) -> None:
    check_model_causality(CUDA, train)


def test_cpu_smoke_of_the_causality_checks() -> None:
    check_op_causality(torch.device("cpu"), MODES["causal_hard"], torch.bfloat16)
    check_model_causality(torch.device("cpu"), train=True)


# ---- the decoding cache -----------------------------------------------------------------------

# (kind, sort net, hard) and the tolerance per dtype (step shapes differ from the full
# forward's, so CUDA may pick other GEMM kernels: float32 differs in the last bits).
CACHE_VARIANTS = {
    "sinkhorn_linear": ("sinkhorn", "linear", False),
    "sinkhorn_bilinear_hard": ("sinkhorn", "bilinear", True),
    "mixture_mlp": ("mixture", "mlp", False),
    "dense": ("dense", "linear", False),
}
CACHE_TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def check_cache(device: torch.device, variant: tuple[str, str, bool], dtype: torch.dtype) -> None:
    kind, net, hard = variant
    att = AttentionConfig(kind=kind, block_size=8, max_len=96, sort_net=net, hard=hard)
    cfg = LanguageModelConfig(
        vocab_size=31, d_model=64, n_heads=2, n_layers=2, d_ff=128, attention=att
    )
    model = LanguageModel(cfg).to(device, dtype).eval()
    ids = torch.randint(0, 31, (2, 45), generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad():
        full = model(ids)
        for prompt in (1, 8, 13):  # prompts ending at and inside a block
            cache = model.new_cache()
            steps = [model(ids[:, :prompt], cache=cache)]
            steps += [model(ids[:, t : t + 1], cache=cache) for t in range(prompt, ids.shape[1])]
            torch.testing.assert_close(
                torch.cat(steps, 1), full, atol=CACHE_TOL[dtype], rtol=CACHE_TOL[dtype]
            )
        with_cache = model.generate(ids[:, :5], 20, sample_top_k=1, use_cache=True)  # greedy
        without = model.generate(ids[:, :5], 20, sample_top_k=1, use_cache=False)
    assert torch.equal(with_cache, without)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", [pytest.param(v, id=k) for k, v in CACHE_VARIANTS.items()])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_cuda_decoding_cache_equals_full_forward(
    variant: tuple[str, str, bool], dtype: torch.dtype
) -> None:
    check_cache(CUDA, variant, dtype)


def test_cpu_smoke_of_the_cache_check() -> None:
    check_cache(torch.device("cpu"), CACHE_VARIANTS["sinkhorn_bilinear_hard"], torch.float32)


# ---- one-process torchrun ---------------------------------------------------------------------


def _env() -> dict[str, str]:
    """The child sees the project from source (``make gpu-check`` installs nothing)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p
    )
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _torchrun(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    proc = subprocess.run(
        cmd + args, capture_output=True, text=True, timeout=timeout, env=_env(), check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.gpu
def test_cuda_torchrun_sort_smoke(tmp_path: Path) -> None:
    """``sparse-sinkhorn sort`` under a one-process torchrun trains on the GPU (bf16 autocast)."""
    out = tmp_path / "run"
    _torchrun(
        ["-m", "sparse_sinkhorn.cli", "sort", "--out", str(out), "--length", "8",
         "--block-size", "4", "--n-eval", "12", "--no-progress", "--seeds", "1",
         "--attention", "sinkhorn", "--steps", "4"],
        timeout=120,
    )  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert results["machine"].get("gpu"), results["machine"]
    assert [r["kind"] for r in results["results"]] == ["sinkhorn"]


@pytest.mark.gpu
def test_cuda_torchrun_nccl_ddp_step() -> None:
    """One torchrun rank joins an nccl group and trains a DDP-wrapped Sinkhorn model."""
    proc = _torchrun([str(HELPER), "nccl"], timeout=120)
    assert "OK backend=nccl" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.slow
def test_cpu_smoke_torchrun_gloo_ddp_step() -> None:
    """The same helper on the CPU with gloo."""
    proc = _torchrun([str(HELPER), "gloo"], timeout=120)
    assert "OK backend=gloo" in proc.stdout, proc.stdout[-2000:]


# ---- torch.compile on CUDA (last: the slowest to start) ------------------------------------


@pytest.mark.gpu
@pytest.mark.compile
@pytest.mark.parametrize(
    ("causal", "dtype", "atol"),
    [
        pytest.param(True, torch.float32, 1e-4, id="decoder-fp32"),
        pytest.param(False, torch.bfloat16, 3e-2, id="encoder-bf16"),
    ],
)
def test_cuda_compile_fullgraph_forward_backward(
    causal: bool, dtype: torch.dtype, atol: float
) -> None:
    check_compile(CUDA, causal, dtype, atol)


def check_compile(device: torch.device, causal: bool, dtype: torch.dtype, atol: float) -> None:
    """A padded layer compiled with ``fullgraph=True`` equals eager, forward and backward."""
    torch._dynamo.reset()
    layer = SinkhornSelfAttention(128, 2, causal=causal, block_size=32, max_len=256)
    layer = layer.to(device, dtype).eval()
    x = torch.randn(2, 250, 128, device=device, dtype=dtype, requires_grad=True)
    mask = torch.ones(2, 250, dtype=torch.bool, device=device)
    mask[1, 170:] = False
    eager = layer(x, key_padding_mask=mask)
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(x, key_padding_mask=mask)
    real = mask[..., None]
    torch.testing.assert_close(out * real, eager * real, atol=atol, rtol=atol)
    (grad_c,) = torch.autograd.grad((out * real).float().square().sum(), x)
    (grad_e,) = torch.autograd.grad((eager * real).float().square().sum(), x)
    torch.testing.assert_close(grad_c, grad_e, atol=10 * atol, rtol=10 * atol)
