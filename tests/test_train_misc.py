"""Schedule, optimizer groups, evaluation hooks, metrics files and plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers_train import MODEL_CONFIG, build_dataset, build_model, noisy_loss, run
from sparse_sinkhorn.train import (
    TrainConfig,
    build_optimizer,
    lr_multiplier,
    plot_metrics,
    read_metrics,
    train,
)


def test_lr_schedule_warmup_then_cosine() -> None:
    kw = dict(warmup_steps=4, total_steps=13, min_lr_ratio=0.1)
    assert [lr_multiplier(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_multiplier(4, **kw) == 1.0
    assert lr_multiplier(8, **kw) == pytest.approx(0.55)
    assert lr_multiplier(12, **kw) == pytest.approx(0.1)
    assert lr_multiplier(0, warmup_steps=0, total_steps=1, min_lr_ratio=0.0) == 1.0


def test_no_weight_decay_on_1d_params() -> None:
    model = build_model()
    optimizer = build_optimizer(model, TrainConfig(steps=1, batch_size=1, weight_decay=0.1))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    assert all(p.ndim < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_metrics_rows_and_plot(tmp_path: Path) -> None:
    result = run(tmp_path, steps=5, log_every=2)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [row["step"] for row in rows] == [2, 4, 5]  # every log_every, and the last step
    for key in ("loss", "lr", "grad_norm", "examples_per_s", "tokens_per_s", "elapsed"):
        assert all(math.isfinite(row[key]) for row in rows), key
    assert result.metrics == rows[-1] and result.history == rows
    png = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "plots" / "loss.png", ("loss", "lr"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="not found"):
        plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "x.png", ("accuracy",))


def _train_noisy(out: Path, eval_fn: Any) -> Any:
    config = TrainConfig(
        steps=4, batch_size=8, log_every=1, eval_every=2, progress=False, warmup_steps=1
    )
    return train(
        build_model(),
        build_dataset(),
        noisy_loss,
        config,
        out_dir=out,
        eval_fn=eval_fn,
        model_config=MODEL_CONFIG,
    )


def test_eval_runs_on_schedule_without_disturbing_training(tmp_path: Path) -> None:
    calls: list[bool] = []

    def eval_fn(model: torch.nn.Module) -> dict[str, float]:
        calls.append(model.training)
        torch.randn(100)  # consumes RNG: must not shift the training noise
        x, y = build_dataset()[:]
        return {"mse": torch.nn.functional.mse_loss(model(x), y).item()}

    with_eval = _train_noisy(tmp_path / "a", eval_fn)
    without = _train_noisy(tmp_path / "b", None)
    assert calls == [False, False]  # steps 2 and 4, in eval mode
    rows = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert [("eval/mse" in row) for row in rows] == [False, True, False, True]
    assert with_eval.eval_metrics == {"eval/mse": rows[-1]["eval/mse"]}
    plain = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["loss"] for r in rows] == [r["loss"] for r in plain]
    assert without.eval_metrics == {}


def test_peak_memory_sees_a_freed_allocation_and_resets() -> None:
    """``train.memory``: a 256 MiB tensor written and freed inside a stretch shows in its
    peak; after a reset, a stretch that allocates little reads far less."""
    from sparse_sinkhorn.train import memory

    base = memory.reset_peak("cpu")
    big = torch.ones(64 * 2**20)  # 256 MiB of float32, every page written
    del big
    first = memory.peak("cpu") - base
    assert first >= 200, first
    base = memory.reset_peak("cpu")
    small = torch.ones(2**18)  # 1 MiB
    del small
    second = memory.peak("cpu") - base
    assert 0 <= second < 100, second
