"""Training refuses to go on silently wrong: a non-finite loss stops the run and keeps the good
checkpoints, infinite hyper-parameters are refused, a full disk or a read-only place is one
line naming the path, and a run directory's lock survives its lock file being deleted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from helpers_train import MODEL_CONFIG, build_dataset, build_model, mse_loss
from sparse_sinkhorn.train import NonFiniteLossError, TrainConfig, train
from sparse_sinkhorn.train.checkpoint import list_checkpoints
from sparse_sinkhorn.train.loading import load_model_weights


def _train(out: Path, loss_fn: Any = mse_loss, **overrides: Any) -> Any:
    settings: dict[str, Any] = dict(
        steps=6, batch_size=8, lr=1e-2, warmup_steps=1, log_every=1, ckpt_every=1,
        keep_checkpoints=2, progress=False,
    )  # fmt: skip
    settings.update(overrides)
    return train(
        build_model(),
        build_dataset(),
        loss_fn,
        TrainConfig(**settings),
        out_dir=out,
        model_config=MODEL_CONFIG,
    )


def _finite_weights(ckpt: Path) -> bool:
    model = build_model()
    load_model_weights(ckpt, model)
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_loss_stops_training_and_keeps_the_good_checkpoints(
    tmp_path: Path, bad: float
) -> None:
    calls = {"n": 0}

    def breaks_at_step_4(model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        calls["n"] += 1
        loss, metrics = mse_loss(model, batch)
        return (loss * bad if calls["n"] >= 4 else loss), metrics

    with pytest.raises(NonFiniteLossError, match="step 4: the training loss is") as err:
        _train(tmp_path, breaks_at_step_4)
    assert "step_0000003" in str(err.value)
    kept = list_checkpoints(tmp_path / "checkpoints")
    assert [step for step, _ in kept] == [2, 3]  # keep=2: the last good ones, not NaN ones
    assert all(_finite_weights(path) for _, path in kept)
    latest = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 3


def test_a_huge_learning_rate_never_writes_non_finite_weights(tmp_path: Path) -> None:
    """lr=1e30 without clipping: the weights blow up; training stops at the first non-finite
    loss or weight and no checkpoint of non-finite weights replaces a good one."""
    with pytest.raises(NonFiniteLossError, match=r"^step \d+: "):
        _train(tmp_path, lr=1e30, clip_norm=None, warmup_steps=0, steps=20)
    kept = list_checkpoints(tmp_path / "checkpoints")
    assert all(_finite_weights(path) for _, path in kept)


@pytest.mark.parametrize(
    "overrides",
    [
        {"lr": float("inf")},
        {"lr": float("nan")},
        {"weight_decay": float("inf")},
        {"clip_norm": float("inf")},
        {"betas": (0.9, float("nan"))},
    ],
)
def test_infinite_hyper_parameters_are_refused(overrides: dict[str, Any]) -> None:
    name = next(iter(overrides))
    with pytest.raises(ValueError, match=f"TrainConfig.{name}=.*finite"):
        TrainConfig(steps=1, batch_size=1, **overrides)
