"""Data-parallel equivalence: 2 torchrun processes == 1 process on the same global batch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers_train import run
from sparse_sinkhorn.train import micro_batch_indices, read_metrics
from sparse_sinkhorn.train.sampling import MicroBatchSampler, global_batch_indices

HELPER = Path(__file__).with_name("helpers_train.py")
FINAL = Path("checkpoints/step_0000004/model.safetensors")


@pytest.mark.parametrize(("world_size", "grad_accum"), [(1, 1), (1, 4), (2, 1), (2, 2), (4, 2)])
def test_union_of_micro_batches_is_the_global_batch(world_size: int, grad_accum: int) -> None:
    for step in range(7):  # 64 examples / 16 per step: crosses two epoch boundaries
        parts = [
            idx
            for rank in range(world_size)
            for idx in micro_batch_indices(
                step,
                rank=rank,
                world_size=world_size,
                grad_accum=grad_accum,
                num_examples=64,
                batch_size=16,
                seed=3,
            )
        ]
        assert all(len(p) == 16 // (world_size * grad_accum) for p in parts)
        union = sorted(i for p in parts for i in p)
        expected = global_batch_indices(step, num_examples=64, batch_size=16, seed=3)
        assert union == sorted(expected.tolist())


def test_sampler_resumes_mid_run_and_reshuffles_each_epoch() -> None:
    kwargs = dict(num_examples=20, batch_size=4, grad_accum=2, rank=1, world_size=2, seed=0)
    full = list(MicroBatchSampler(start_step=0, steps=12, **kwargs))
    assert len(full) == 24
    assert list(MicroBatchSampler(start_step=7, steps=12, **kwargs)) == full[14:]
    epoch0 = global_batch_indices(0, num_examples=20, batch_size=4, seed=0)
    epoch1 = global_batch_indices(5, num_examples=20, batch_size=4, seed=0)
    assert not torch.equal(epoch0, epoch1)


@pytest.fixture(scope="module")
def torchrun_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 2-process torchrun (gloo, CPU) training with grad_accum=1 and then grad_accum=2."""
    out = tmp_path_factory.mktemp("ddp")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(HELPER),
        "--out",
        str(out),
        "--steps",
        "4",
        "--batch-size",
        "8",
        "--grad-accum",
        "1",
        "2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=0, msg=key)


@pytest.mark.parametrize(("ddp_accum", "single_accum"), [(1, 1), (1, 2), (2, 4), (2, 1)])
def test_two_processes_match_one(
    torchrun_dir: Path, tmp_path: Path, ddp_accum: int, single_accum: int
) -> None:
    single = tmp_path / "single"
    run(single, steps=4, batch_size=8, grad_accum=single_accum)
    ddp = torchrun_dir / f"accum_{ddp_accum}"
    _assert_same_weights(ddp / FINAL, single / FINAL)
    ddp_loss = [row["loss"] for row in read_metrics(ddp / "metrics.jsonl")]
    single_loss = [row["loss"] for row in read_metrics(single / "metrics.jsonl")]
    assert ddp_loss == pytest.approx(single_loss, abs=1e-6)


def test_resume_under_torchrun_matches_uninterrupted(torchrun_dir: Path) -> None:
    """The helper resumed accum_1 from its step-2 checkpoint on 2 ranks into ``resumed``."""
    resumed = torchrun_dir / "resumed"
    _assert_same_weights(resumed / FINAL, torchrun_dir / "accum_1" / FINAL)
    rows = read_metrics(resumed / "metrics.jsonl")
    full = read_metrics(torchrun_dir / "accum_1" / "metrics.jsonl")
    assert [r["loss"] for r in rows] == [r["loss"] for r in full[2:]]
