"""Kill-and-resume exactness, corrupt-checkpoint detection and fallback, weights round trip."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from helpers_train import MODEL_CONFIG, build_dataset, build_model, mse_loss, noisy_loss
from sparse_sinkhorn.train import (
    CheckpointError,
    TrainConfig,
    load_checkpoint,
    load_model_weights,
    read_config,
    read_metrics,
    train,
    verify_checkpoint,
)
from sparse_sinkhorn.train.checkpoint import sha256_file

COMPARED = ("step", "loss", "lr", "grad_norm", "mse")


class SimulatedCrash(Exception):
    pass


class CrashAfter:
    """A loss function that dies on call ``calls + 1``, like a process killed mid-step."""

    def __init__(self, loss_fn: Any, calls: int) -> None:
        self.loss_fn, self.calls, self.count = loss_fn, calls, 0

    def __call__(self, model: torch.nn.Module, batch: Any) -> Any:
        self.count += 1
        if self.count > self.calls:
            raise SimulatedCrash
        return self.loss_fn(model, batch)


def _config(**overrides: Any) -> TrainConfig:
    settings: dict[str, Any] = dict(
        steps=10,
        batch_size=8,
        grad_accum=2,
        lr=1e-2,
        warmup_steps=3,
        log_every=1,
        ckpt_every=3,
        keep_checkpoints=2,
        progress=False,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def _train(out: Path, loss_fn: Any = noisy_loss, config: TrainConfig | None = None, **kw: Any):
    return train(
        build_model(),
        build_dataset(),
        loss_fn,
        config or _config(),
        out_dir=out,
        model_config=MODEL_CONFIG,
        **kw,
    )


def _rows(run_dir: Path) -> list[dict[str, float]]:
    return [{k: row[k] for k in COMPARED} for row in read_metrics(run_dir / "metrics.jsonl")]


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    # clone: safetensors may map the file, and some tests overwrite it afterwards
    return {k: v.clone() for k, v in load_file(ckpt / "model.safetensors").items()}


def _assert_equal_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key  # bit for bit


def test_killed_run_resumes_exactly(tmp_path: Path) -> None:
    full = _train(tmp_path / "full")
    killed = tmp_path / "killed"
    with pytest.raises(SimulatedCrash):  # dies inside step 8: checkpoints 3, 6; rows 1..7
        _train(killed, CrashAfter(noisy_loss, calls=7 * 2 + 1))
    assert [row["step"] for row in _rows(killed)] == list(range(1, 8))
    ckpts = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert ckpts == ["latest.json", "step_0000003", "step_0000006"]

    # Branch: resume from an explicit checkpoint dir into a new out_dir.
    branch = _train(tmp_path / "branch", resume=killed / "checkpoints" / "step_0000003")
    assert branch.resumed_from is not None and branch.resumed_from.name == "step_0000003"
    assert _rows(tmp_path / "branch") == _rows(tmp_path / "full")[3:]

    # Resume the killed run in place from its latest checkpoint.
    resumed = train(
        build_model(seed=999),
        build_dataset(),
        noisy_loss,
        _config(),
        out_dir=killed,
        model_config=MODEL_CONFIG,
        resume=True,
    )
    assert resumed.resumed_from is not None and resumed.resumed_from.name == "step_0000006"
    assert resumed.step == full.step == 10
    assert _rows(killed) == _rows(tmp_path / "full")  # every logged step, bitwise
    assert resumed.checkpoint is not None and full.checkpoint is not None
    _assert_equal_weights(resumed.checkpoint, full.checkpoint)
    _assert_equal_weights(branch.checkpoint or Path(), full.checkpoint)
    ckpts = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert ckpts == ["latest.json", "step_0000009", "step_0000010"]  # keep_checkpoints=2


def _six_step_run(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    _train(out, mse_loss, _config(steps=6, keep_checkpoints=3))
    return out


def _rewrite_manifest(ckpt: Path, name: str) -> None:
    """Make the manifest agree with a damaged file, so only parsing can catch it."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    file = ckpt / name
    manifest["files"][name] = {"sha256": sha256_file(file), "size": file.stat().st_size}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def _truncate(ckpt: Path) -> None:
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])


def _flip_byte(ckpt: Path) -> None:
    data = bytearray((ckpt / "trainer_state.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (ckpt / "trainer_state.pt").write_bytes(bytes(data))


def _garbage_safetensors(ckpt: Path) -> None:
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    _rewrite_manifest(ckpt, "model.safetensors")


def _no_manifest(ckpt: Path) -> None:
    (ckpt / "manifest.json").unlink()


CORRUPTIONS = {
    "truncated": (_truncate, "truncated"),
    "flipped byte": (_flip_byte, "sha256 does not match"),
    "unreadable safetensors": (_garbage_safetensors, "unreadable safetensors"),
    "missing manifest": (_no_manifest, "missing manifest"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_latest_raises_and_resume_falls_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    out = _six_step_run(tmp_path)
    latest = out / "checkpoints" / "step_0000006"
    original = _weights(latest)
    corrupt, message = CORRUPTIONS[kind]
    corrupt(latest)

    with pytest.raises(CheckpointError, match=message):
        verify_checkpoint(latest)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(latest, build_model())

    with caplog.at_level(logging.WARNING, logger="sparse_sinkhorn.train"):
        result = _train(out, mse_loss, _config(steps=6, keep_checkpoints=3), resume=True)
    assert result.resumed_from is not None and result.resumed_from.name == "step_0000003"
    assert "falling back" in caplog.text and "step_0000006" in caplog.text
    verify_checkpoint(latest)  # rewritten by the resumed run
    for key, value in _weights(latest).items():
        torch.testing.assert_close(value, original[key], atol=1e-6, rtol=0)


def test_unreadable_trainer_state_is_a_checkpoint_error(tmp_path: Path) -> None:
    latest = _six_step_run(tmp_path) / "checkpoints" / "step_0000006"
    (latest / "trainer_state.pt").write_bytes(b"this is not a torch file")
    _rewrite_manifest(latest, "trainer_state.pt")
    with pytest.raises(CheckpointError, match="unreadable trainer state"):
        load_checkpoint(latest, build_model())


def test_all_checkpoints_corrupt(tmp_path: Path) -> None:
    out = _six_step_run(tmp_path)
    for ckpt in (out / "checkpoints").glob("step_*"):
        _truncate(ckpt)
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        load_checkpoint(out, build_model())


def test_weights_config_and_extra_state_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "run"
    vocab = {"tokens": ["a", "b"], "ids": torch.arange(2)}
    result = _train(out, mse_loss, _config(steps=3), extra_state={"vocab": vocab})
    model = build_model(seed=5)
    ckpt = load_model_weights(out, model)
    assert ckpt == result.checkpoint
    assert model.mid_again.weight is model.mid.weight  # tie survives loading
    for key, value in _weights(ckpt).items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=0, rtol=0)
    config = read_config(out)
    assert config["model_config"] == MODEL_CONFIG
    assert TrainConfig.from_dict(config["train_config"]) == _config(steps=3)
    state = load_checkpoint(ckpt, build_model(), expected_config=MODEL_CONFIG)
    assert state["step"] == 3 and state["extra_state"]["vocab"]["tokens"] == ["a", "b"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
