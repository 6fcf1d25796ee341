"""Library-level proofs of claims made in ``docs/guarantees.md`` and ``docs/method.md``:
exact causality in training mode (Gumbel noise and dropout on), forward and backward against
the float64 reference over padding x Mixture x block size x causal, O(L·b) memory, hostile
trainer-state pickles, and non-finite ``dropout_p``."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from helpers_train import run as train_toy
from sparse_sinkhorn.models import LanguageModel, LanguageModelConfig
from sparse_sinkhorn.nn import AttentionConfig, SinkhornSelfAttention
from sparse_sinkhorn.ops import (
    dense_attention,
    local_attention,
    reference_sinkhorn_attention,
    sinkhorn_attention,
)
from sparse_sinkhorn.train import CheckpointError, load_checkpoint
from sparse_sinkhorn.train.loading import load_trainer_state

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- exact causality, bit for bit, in training mode -----------------------------------------
# docs/guarantees.md: "perturbing any input after position t leaves output t bit-identical,
# in training and in eval (op, layer, language model)". The existing tests check eval (op) or
# use a tolerance (layer, model); these run in training mode with Gumbel noise and dropout on,
# the random streams seeded identically for both runs, and compare with torch.equal.

CAUSAL_MODES = [
    dict(hard=hard, mix_dense=mix, dropout_p=p)
    for hard, mix, p in itertools.product((False, True), (False, True), (0.0, 0.3))
]


def _mode_id(mode: dict[str, Any]) -> str:
    hard = "hard" if mode["hard"] else "soft"
    return f"{hard}-{'mixture' if mode['mix_dense'] else 'plain'}-drop{mode['dropout_p']}"


@pytest.mark.parametrize("mode", CAUSAL_MODES, ids=_mode_id)
@pytest.mark.parametrize("length", [16, 19])  # 16: the two-part path when dropout is off
def test_op_is_exactly_causal_in_training_mode(mode: dict[str, Any], length: int) -> None:
    block, g = 4, torch.Generator().manual_seed(5)
    n = -(-length // block)
    q, k, v = (torch.randn(2, 2, length, 8, generator=g, dtype=torch.float64) for _ in range(3))
    logits = torch.randn(2, 2, n, n, generator=g, dtype=torch.float64)

    def run(q: Tensor, k: Tensor, v: Tensor, logits: Tensor) -> Tensor:
        torch.manual_seed(11)  # SDPA's dropout draws from the global generator
        return sinkhorn_attention(
            q,
            k,
            v,
            logits,
            block_size=block,
            is_causal=True,
            gumbel_noise=True,
            generator=torch.Generator().manual_seed(3),  # the Gumbel noise
            **mode,
        )

    out = run(q, k, v, logits)

    # The noise is really on: another Gumbel seed changes the routing. Its gradient shows it
    # in every mode (causal hard routing picks block i-1 in the forward whatever the noise).
    def logits_grad(seed: int) -> Tensor:
        leaf = logits.clone().requires_grad_()
        torch.manual_seed(11)
        out = sinkhorn_attention(
            q, k, v, leaf, block_size=block, is_causal=True, gumbel_noise=True,
            generator=torch.Generator().manual_seed(seed), **mode,
        )  # fmt: skip
        return torch.autograd.grad((out * v).sum(), leaf)[0]

    assert torch.equal(logits_grad(3), logits_grad(3))
    assert not torch.equal(logits_grad(3), logits_grad(4))
    for t in range(length - 1):
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, :, t + 1 :] = torch.randn(x[:, :, t + 1 :].shape, generator=g, dtype=x.dtype)
        logits2 = logits.clone()
        logits2[:, :, t // block + 1 :] = torch.randn(
            logits2[:, :, t // block + 1 :].shape, generator=g, dtype=logits.dtype
        )
        out2 = run(q2, k2, v2, logits2)
        assert torch.equal(out2[:, :, : t + 1], out[:, :, : t + 1]), f"leak into t <= {t}"
        assert not torch.equal(out2[:, :, t + 1 :], out[:, :, t + 1 :])


@pytest.mark.parametrize("kind", ["sinkhorn", "mixture"])
@pytest.mark.parametrize("sort_net", ["linear", "mlp", "bilinear"])
@pytest.mark.parametrize("hard", [False, True])
def test_layer_is_exactly_causal_in_training_mode(kind: str, sort_net: str, hard: bool) -> None:
    layer = SinkhornSelfAttention(
        16, 2, causal=True, kind=kind, block_size=4, max_len=64, sort_net=sort_net,
        hard=hard, dropout=0.25,
    ).double()  # fmt: skip
    layer.train()
    assert layer.config.gumbel_noise

    def run(x: Tensor, gumbel_seed: int = 3) -> Tensor:
        torch.manual_seed(7)  # dropout
        return layer(x, generator=torch.Generator().manual_seed(gumbel_seed))

    x = torch.randn(2, 19, 16, dtype=torch.float64)
    y = run(x)
    assert layer.sort_net is not None

    def sort_net_grad(gumbel_seed: int) -> list[Tensor]:
        params = list(layer.sort_net.parameters())  # type: ignore[union-attr]
        return list(torch.autograd.grad(run(x, gumbel_seed).pow(2).sum(), params))

    # Gumbel noise is on: another seed changes the routing (seen in the sort net's gradient,
    # as causal hard routing picks block i-1 in the forward whatever the noise).
    assert all(map(torch.equal, sort_net_grad(3), sort_net_grad(3)))
    assert not all(map(torch.equal, sort_net_grad(3), sort_net_grad(4)))
    torch.manual_seed(8)
    assert not torch.equal(layer(x, generator=torch.Generator().manual_seed(3)), y)  # dropout
    for t in (0, 3, 4, 9, 15, 17):
        x2 = x.clone()
        x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :]) * 10
        y2 = run(x2)
        assert torch.equal(y2[:, : t + 1], y[:, : t + 1]), f"leak into t <= {t}"
        assert not torch.equal(y2[:, t + 1 :], y[:, t + 1 :])


@pytest.mark.parametrize("kind", ["sinkhorn", "mixture"])
def test_language_model_is_exactly_causal_in_training_mode(kind: str) -> None:
    cfg = LanguageModelConfig(
        vocab_size=12, d_model=16, n_heads=2, n_layers=2, d_ff=32, dropout=0.2,
        attention=AttentionConfig(kind=kind, block_size=4, max_len=64),
    )  # fmt: skip
    assert cfg.attention.gumbel_noise
    model = LanguageModel(cfg).double().train()

    def run(ids: Tensor, seed: int = 13) -> Tensor:
        torch.manual_seed(seed)  # dropout and the Gumbel noise (the model passes no generator)
        return model(ids)

    ids = torch.randint(1, 12, (2, 21))
    logits = run(ids)
    assert not torch.equal(run(ids, seed=14), logits)  # the noise is on
    for t in (0, 4, 10, 19):
        ids2 = ids.clone()
        shift = torch.randint(1, 11, ids2[:, t + 1 :].shape)  # another id in 1..11 after t
        ids2[:, t + 1 :] = (ids2[:, t + 1 :] - 1 + shift) % 11 + 1
        assert (ids2[:, t + 1 :] != ids[:, t + 1 :]).all()
        logits2 = run(ids2)
        assert torch.equal(logits2[:, : t + 1], logits[:, : t + 1]), f"leak into t <= {t}"
        assert not torch.equal(logits2[:, t + 1 :], logits[:, t + 1 :])


# ---- forward and backward against the float64 reference -------------------------------------

GRID = list(itertools.product((False, True), (False, True), (2, 4, 8), (False, True)))


def _grid_id(case: tuple[bool, bool, int, bool]) -> str:
    padded, mixture, block, causal = case
    return (
        f"{'padded' if padded else 'unpadded'}-{'mixture' if mixture else 'plain'}-b{block}-"
        f"{'causal' if causal else 'encoder'}"
    )


def _grid_inputs(block: int, padded: bool, length: int) -> tuple[list[Tensor], Tensor | None]:
    g = torch.Generator().manual_seed(block * 10 + length)
    n = -(-length // block)
    q, k, v = (torch.randn(2, 2, length, 4, generator=g, dtype=torch.float64) for _ in range(3))
    logits = torch.randn(2, 2, n, n, generator=g, dtype=torch.float64)
    mask = None
    if padded:
        mask = torch.ones(2, length, dtype=torch.bool)
        mask[1, length - 2 * length // 3 :] = False  # row 1 keeps its first third
    return [q, k, v, logits], mask


def _forward_backward(fn: Any, inputs: list[Tensor], mask: Tensor | None, weight: Tensor, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves, key_padding_mask=mask, **kw)
    real = torch.ones(out.shape[0], out.shape[2], dtype=torch.bool) if mask is None else mask
    out = torch.where(real[:, None, :, None], out, torch.zeros_like(out))  # real outputs only
    grads = torch.autograd.grad((out * weight.to(out.dtype)).sum(), leaves)
    return out.detach(), [gr.detach() for gr in grads]


@pytest.mark.parametrize("case", GRID, ids=_grid_id)
@pytest.mark.parametrize("length", [16, 19])  # 16 unpadded: the two-part path; 19: masked
def test_forward_and_backward_equal_the_float64_reference(
    case: tuple[bool, bool, int, bool], length: int
) -> None:
    """Outputs and the gradients w.r.t. q, k, v and the sort logits: the op in float64 equals
    the float64 reference to 1e-10; the op in float32 equals it to float32 round-off."""
    padded, mixture, block, causal = case
    inputs, mask = _grid_inputs(block, padded, length)
    weight = torch.randn(2, 2, length, 4, generator=torch.Generator().manual_seed(1))
    kw = dict(block_size=block, is_causal=causal, mix_dense=mixture)
    ref_out, ref_grads = _forward_backward(reference_sinkhorn_attention, inputs, mask, weight, **kw)
    # Every input gets a gradient; the logits' is 0 only where routing has no choice (causal
    # with two blocks: block 1 can only take block 0).
    n = -(-length // block)
    assert all(gr.abs().max() > 0 for gr in ref_grads[:3])
    assert (ref_grads[3].abs().max() > 0) == (not causal or n > 2)
    out64, grads64 = _forward_backward(sinkhorn_attention, inputs, mask, weight, **kw)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, ref_out, atol=1e-10, rtol=1e-9)
    for name, fast, ref in zip("qkvl", grads64, ref_grads, strict=True):
        torch.testing.assert_close(fast, ref, atol=1e-9, rtol=1e-8, msg=f"d{name} (float64)")
    out32, grads32 = _forward_backward(
        sinkhorn_attention, [x.float() for x in inputs], mask, weight, **kw
    )
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref_out, atol=2e-5, rtol=1e-4)
    for name, fast, ref in zip("qkvl", grads32, ref_grads, strict=True):
        torch.testing.assert_close(
            fast.double(), ref, atol=1e-4, rtol=1e-3, msg=f"d{name} (float32)"
        )


# ---- O(L·b) memory: nothing L x L is allocated ----------------------------------------------
# docs/method.md: "Memory is O(L·b + N²) per head; nothing of size L × L is built outside the
# dense reference". torch.profiler's profile_memory does not see most CPU allocations here,
# so each case runs in a fresh process, resets its peak resident memory (Linux clear_refs) and
# reads how far one forward + backward raises it above the memory in use before (VmHWM -
# VmRSS). L = 16384, b = 64: one float32 L x L tensor is 1 GiB.

MEMORY_CHILD = r"""
import json, sys
import torch
from sparse_sinkhorn.ops import sinkhorn_attention
torch.set_num_threads(1)
L, W, D = 16384, 64, 16
case = json.loads(sys.argv[1])
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 1, L, D, generator=g).requires_grad_() for _ in range(3))
logits = torch.randn(1, 1, L // W, L // W, generator=g).requires_grad_()
mask = None
if case.pop("padded", False):
    mask = torch.ones(1, L, dtype=torch.bool)
    mask[:, -100:] = False  # padding (and so the masked path)
def status(field: str) -> int:  # bytes, from /proc/self/status
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the memory in use now
before = status("VmRSS")
if case.pop("dense", False):  # the control: the score matrix dense attention starts from
    with torch.no_grad():
        out = q[0, 0] @ k[0, 0].T
    assert out.shape == (L, L)
else:
    torch.manual_seed(0)
    out = sinkhorn_attention(q, k, v, logits, block_size=W, key_padding_mask=mask, **case)
    out.square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))
print(json.dumps({"before": before, "after": status("VmHWM")}))
"""

MEMORY_CASES = {
    "encoder-two-part": {},
    "causal-padded": {"is_causal": True, "padded": True},
    "encoder-hard-dropout": {"hard": True, "dropout_p": 0.1, "gumbel_noise": True},
    "encoder-sortcut": {"n_sortcut": 4, "padded": True},
    "dense-control": {"dense": True},
}


def test_sinkhorn_forward_and_backward_never_allocate_an_l_by_l_tensor() -> None:
    import subprocess
    import sys

    length = 16384
    l_by_l = length * length * 4  # bytes of one float32 L x L tensor (1 GiB)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    children = {}
    for name, case in MEMORY_CASES.items():
        argv = [sys.executable, "-c", MEMORY_CHILD, json.dumps(case)]
        children[name] = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
    growth = {}
    for name, child in children.items():
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, (name, err)
        peaks = json.loads(out)
        growth[name] = peaks["after"] - peaks["before"]
    # The measurement sees an L x L tensor when there is one ...
    assert growth.pop("dense-control") > 0.9 * l_by_l
    # ... and Sinkhorn attention, forward and backward, stays far below one.
    for name, grew in growth.items():
        assert grew < l_by_l / 8, (name, grew / 2**20)


# ---- hostile trainer-state files ------------------------------------------------------------


class _RunsCode:
    """Pickles to a call of ``os.mkdir(marker)``: loading it with plain pickle runs it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.marker,))


def test_a_crafted_trainer_state_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    """A ``trainer_state.pt`` whose pickle would call ``os.mkdir`` (manifest updated to match,
    as whoever crafts the file can do) is refused by ``weights_only`` loading and the call
    never happens."""
    run_dir = tmp_path / "run"
    train_toy(run_dir, steps=2)
    ckpts = run_dir / "checkpoints"
    ckpt = ckpts / json.loads((ckpts / "latest.json").read_text())["checkpoint"]
    state_file = ckpt / "trainer_state.pt"
    marker = tmp_path / "code-ran"
    payload = {"step": 2, "optimizer": _RunsCode(marker)}
    torch.save(payload, state_file)
    # The payload is live: an unrestricted load runs it.
    torch.load(state_file, weights_only=False)
    assert marker.is_dir()
    marker.rmdir()
    manifest = json.loads((ckpt / "manifest.json").read_text())
    data = state_file.read_bytes()
    manifest["files"]["trainer_state.pt"] = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
    }
    (ckpt / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(CheckpointError, match="unreadable trainer state"):
        load_trainer_state(ckpt)
    assert not marker.exists()
    from helpers_train import build_model

    with pytest.raises(CheckpointError, match=r"trainer_state\.pt"):
        load_checkpoint(ckpt, build_model())
    assert not marker.exists()
    # Resuming the run reads the same file: refused or passed over, the code never runs.
    try:
        train_toy(run_dir, resume=True, steps=3)
    except CheckpointError as err:
        assert "trainer_state.pt" in str(err)
    assert not marker.exists()


# ---- non-finite dropout_p -------------------------------------------------------------------


@pytest.mark.parametrize("p", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("op", ["sinkhorn", "dense", "local"])
def test_non_finite_dropout_p_is_refused(op: str, p: float) -> None:
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    calls = {
        "sinkhorn": lambda: sinkhorn_attention(
            q, k, v, torch.randn(1, 2, 2, 2), block_size=4, dropout_p=p
        ),
        "dense": lambda: dense_attention(q, k, v, dropout_p=p),
        "local": lambda: local_attention(q, k, v, block_size=4, dropout_p=p),
    }
    with pytest.raises(ValueError, match="dropout_p"):
        calls[op]()
