"""The mask-free two-part path (local block + sorted block merged through their log-sum-exp),
the hard-routing gather, and which attention kernels the common paths reach.

Lengths here are multiples of the block size and there is no padding or dropout, so
``sinkhorn_attention`` takes the two-part path (``ops.attention.attend_with_plan``).
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from grids import mode_id, op_modes
from sparse_sinkhorn.ops import _autograd, reference_sinkhorn_attention, sinkhorn_attention
from sparse_sinkhorn.ops import attention as attention_mod

B, H, D = 2, 3, 8

MODES = op_modes(mix_dense=(False, True))
PLAIN = op_modes(sortcut=(None,))  # no SortCut, no Mixture
SHAPES = [(4, 16), (8, 24), (1, 5), (16, 16), (2, 22)]  # (block, length): 4, 3, 5, 1, 11 blocks


def _inputs(length: int, block: int, dtype=torch.float64, kv_heads: int = H, device="cpu"):
    n = length // block
    q = torch.randn(B, H, length, D, dtype=dtype, device=device)
    k, v = (torch.randn(B, kv_heads, length, D, dtype=dtype, device=device) for _ in range(2))
    logits = torch.randn(B, H, n, n, dtype=dtype, device=device)
    return [t.requires_grad_() for t in (q, k, v, logits)]


def _check_against_reference(mode: dict, block: int, length: int, kv_heads: int = H) -> None:
    if (mode.get("n_sortcut") or 0) > length // block:
        pytest.skip("budget larger than N")
    inputs = _inputs(length, block, kv_heads=kv_heads)
    weight = torch.randn(B, H, length, D, dtype=torch.float64)
    rep = H // kv_heads
    outs, grads = [], []
    for fn in (sinkhorn_attention, reference_sinkhorn_attention):
        q, k, v, logits = inputs
        if fn is reference_sinkhorn_attention:
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        out = fn(q, k, v, logits, block_size=block, **mode)
        outs.append(out)
        grads.append(torch.autograd.grad((out * weight).sum(), inputs))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-10, rtol=0)
    for name, fast, ref in zip(["q", "k", "v", "logits"], *grads, strict=True):
        torch.testing.assert_close(fast, ref, atol=1e-10, rtol=0, msg=f"grad {name}")


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
@pytest.mark.parametrize(("block", "length"), SHAPES, ids=[f"b{b}-L{n}" for b, n in SHAPES])
def test_two_part_matches_reference_forward_and_backward(mode, block, length) -> None:
    _check_against_reference(mode, block, length)


@pytest.mark.parametrize("mode", PLAIN, ids=mode_id)
@pytest.mark.parametrize("kv_heads", [1, 3], ids=["kv1", "kv3"])
def test_two_part_gqa_matches_reference(mode, kv_heads) -> None:
    _check_against_reference(mode, 4, 16, kv_heads=kv_heads)


@pytest.mark.parametrize("mode", PLAIN, ids=mode_id)
def test_two_part_in_plain_matmuls_matches_reference(mode) -> None:
    """With SDPA's flash backend switched off the parts run as plain matmuls (the path CUDA
    float32 takes); same result."""
    with sdpa_kernel(SDPBackend.MATH):
        _check_against_reference(mode, 4, 16)


@pytest.mark.parametrize("heads", [1, 3])
def test_two_part_takes_strided_views(heads: int) -> None:
    """Per-head views of one projection buffer (as the layer passes them), one head too."""
    x = torch.randn(1, 16, 3, heads, D, dtype=torch.float64)  # (B, L, 3, H, E)
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, E), strided
    logits = torch.randn(1, heads, 4, 4, dtype=torch.float64)
    for mode in PLAIN:
        out = sinkhorn_attention(q, k, v, logits, block_size=4, **mode)
        ref = reference_sinkhorn_attention(q, k, v, logits, block_size=4, **mode)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)


# `_ATTENTION_CHUNK_ELEMENTS` for 2 of the 6 heads (B x H) of 9 blocks x 4 x D elements at a
# time, 3 query blocks of one head, 1 block
CHUNKS = {"heads": 2 * 9 * 4 * D, "rows": 3 * 4 * D, "one-block": 1}


@pytest.mark.parametrize("mode", PLAIN, ids=mode_id)
@pytest.mark.parametrize("chunk", list(CHUNKS.values()), ids=list(CHUNKS))
def test_two_part_in_memory_chunks_matches_reference(
    mode, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large inputs run in memory chunks (whole heads, or query-block ranges of one head):
    equal to the float64 reference forward and backward, with GQA too, and a second
    backward through the same graph gives the first one's gradients bit for bit."""
    monkeypatch.setattr(_autograd, "_ATTENTION_CHUNK_ELEMENTS", chunk)
    _check_against_reference(mode, 4, 36)
    _check_against_reference(mode, 4, 36, kv_heads=1)
    inputs = _inputs(36, 4)
    out = sinkhorn_attention(*inputs, block_size=4, **mode)
    cotangent = torch.randn_like(out)
    first = torch.autograd.grad(out, inputs, cotangent, retain_graph=True)
    second = torch.autograd.grad(out, inputs, cotangent)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("mode", op_modes(), ids=mode_id)
def test_two_part_gradcheck(mode) -> None:
    """gradcheck runs several backward passes through one graph (the op drops its sorted
    keys/values after the first and rebuilds them)."""
    q, k, v, logits = (t.detach().requires_grad_() for t in _inputs(12, 4))
    inputs = (q, k, v) if mode.get("hard") else (q, k, v, logits)

    def fn(*xs: torch.Tensor) -> torch.Tensor:
        args = xs if len(xs) == 4 else (*xs, logits)
        out = sinkhorn_attention(*args, block_size=4, n_iters=3, **mode)
        return out

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


def test_common_paths_take_the_two_part_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    real = attention_mod._two_part_applies

    def spy(plan, dropout_p):  # type: ignore[no-untyped-def]
        calls.append(real(plan, dropout_p))
        return calls[-1]

    monkeypatch.setattr(attention_mod, "_two_part_applies", spy)
    q, k, v, logits = (t.detach() for t in _inputs(16, 4))
    for mode in op_modes():
        sinkhorn_attention(q, k, v, logits, block_size=4, **mode)
    assert calls and all(calls)
    calls.clear()
    mask = torch.ones(B, 16, dtype=torch.bool)
    mask[0, 10:] = False
    sinkhorn_attention(q, k, v, logits, block_size=4, key_padding_mask=mask)  # padding
    sinkhorn_attention(q[:, :, :15], k[:, :, :15], v[:, :, :15], logits, block_size=4)  # L % W
    sinkhorn_attention(q, k, v, logits, block_size=4, dropout_p=0.1)  # dropout
    assert calls == [False, False, False]


class _AttentionKernels(TorchDispatchMode):
    """Records every attention kernel call (name, whether it got a mask) and every bmm."""

    def __init__(self) -> None:
        super().__init__()
        self.attention: list[tuple[str, bool]] = []
        self.bmm_shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if "attention" in name:
            names = [a.name for a in func._schema.arguments]
            mask = kwargs.get("attn_mask")
            if mask is None and "attn_mask" in names and names.index("attn_mask") < len(args):
                mask = args[names.index("attn_mask")]
            self.attention.append((name, mask is not None))
        if name == "bmm":
            self.bmm_shapes.append((tuple(args[0].shape), tuple(args[1].shape)))
        return func(*args, **kwargs)


FLASH_MODES = op_modes(mix_dense=(False, True), hard=(False,)) + op_modes(
    sortcut=(None,), hard=(True,)
)


FLASH_KERNELS = {  # device: (dtype, the SDPA flash kernels forward and backward)
    "cpu": (
        torch.float32,
        {
            "_scaled_dot_product_flash_attention_for_cpu",
            "_scaled_dot_product_flash_attention_for_cpu_backward",
        },
    ),
    "cuda": (
        torch.bfloat16,  # FlashAttention needs half precision
        {"_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward"},
    ),
}


@pytest.mark.parametrize("mode", FLASH_MODES, ids=mode_id)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_common_paths_use_the_flash_kernel_without_a_mask(mode: dict, device: str) -> None:
    """Issue 12: no boolean mask on the common paths (causal local block, no padding), so
    SDPA keeps its flash backend. The test records the kernels reached under
    ``sdpa_kernel(FLASH_ATTENTION)`` and checks they are the flash ones and none got a mask
    (CPU's flash kernel accepts masks; CUDA's refuses them, so there running at all proves it)."""
    dtype, kernels = FLASH_KERNELS[device]
    q, k, v, logits = _inputs(64, 16, dtype=dtype, device=device)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), _AttentionKernels() as seen:
        out = sinkhorn_attention(q, k, v, logits, block_size=16, **mode)
        torch.autograd.grad(out.float().square().sum(), (q, k, v, logits))
    assert torch.isfinite(out).all()
    names = {name for name, _ in seen.attention}
    assert names, "no attention kernel ran"
    assert names <= kernels, names
    assert not any(masked for _, masked in seen.attention), seen.attention


@pytest.mark.gpu
@pytest.mark.parametrize("mode", PLAIN, ids=mode_id)
def test_two_part_cuda_bf16_close_to_reference(mode: dict) -> None:
    q, k, v, logits = _inputs(64, 16, dtype=torch.bfloat16, device="cuda")
    out = sinkhorn_attention(q, k, v, logits, block_size=16, **mode)
    ref = reference_sinkhorn_attention(
        q.double(), k.double(), v.double(), logits.double(), block_size=16, **mode
    )
    torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("mode", [dict(is_causal=False), dict(is_causal=True)], ids=mode_id)
@pytest.mark.parametrize("n_sortcut", [None, 2])
def test_hard_routing_gathers_instead_of_mixing(mode: dict, n_sortcut: int | None) -> None:
    """Hard routing's forward gathers the chosen blocks: no (N, N) matmul with the plan, in
    training (grad enabled) and in eval; its backward still mixes (straight-through)."""
    if mode["is_causal"] and n_sortcut:
        pytest.skip("SortCut is for encoders only")
    n = 8
    q, k, v, logits = _inputs(4 * n, 4)
    for grad in (False, True):
        with torch.set_grad_enabled(grad), _AttentionKernels() as seen:
            out = sinkhorn_attention(
                q, k, v, logits, block_size=4, hard=True, n_sortcut=n_sortcut, **mode
            )
        plan_mixes = [s for s in seen.bmm_shapes if s[0][-1] == n]
        assert plan_mixes == [], plan_mixes
    with _AttentionKernels() as seen:
        torch.autograd.grad(out.sum(), logits)
    assert any(s[0][-1] == 4 * D for s in seen.bmm_shapes)  # dP = g x^T, soft gradient
