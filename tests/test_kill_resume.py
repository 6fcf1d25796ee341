"""A real training process killed with SIGKILL at random moments, several of them inside a
checkpoint write (the first one included), resumed each time with ``resume=True``, ends with
weights ``torch.equal`` to an uninterrupted run's and the same logged losses."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

CHILD = Path(__file__).parent / "helpers_kill.py"


def _launch(out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(CHILD), "--out", str(out), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    latest = json.loads((out / "checkpoints" / "latest.json").read_text())["checkpoint"]
    assert latest == "step_0000040"
    return {
        k: v.clone()
        for k, v in load_file(out / "checkpoints" / latest / "model.safetensors").items()
    }


def _losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["loss"]) for row in rows]


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    done = _launch(reference)
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0, err

    rng = random.Random(20260101)
    out = tmp_path / "killed"
    # Inside a checkpoint write: the very first one, then later ones at every phase.
    plans = ["1:files", "2:publish", "1:sealed"]
    kills = 0
    for plan in plans:
        child = _launch(out, "--die-in-checkpoint", plan)
        _, err = child.communicate(timeout=300)
        assert child.returncode == -signal.SIGKILL, (plan, child.returncode, err)
        kills += 1
    for _ in range(2):  # from outside, at a random moment of training
        child = _launch(out)
        assert child.stdout is not None and child.stdout.readline().strip() == "READY"
        time.sleep(rng.uniform(0.2, 1.2))
        child.send_signal(signal.SIGKILL)
        _, err = child.communicate(timeout=300)
        kills += child.returncode == -signal.SIGKILL
    child = _launch(out)
    _, err = child.communicate(timeout=300)
    assert child.returncode == 0, err
    assert kills >= 4
    assert not list((out / "checkpoints").glob(".tmp_*"))  # stale staging dirs pruned
    want, got = _final_weights(reference), _final_weights(out)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert _losses(out) == _losses(reference)  # every logged step, bitwise
