"""Bad input fails early with messages that name the offending values and say what to do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import IterableDataset

from helpers_train import MODEL_CONFIG, build_dataset, build_model, mse_loss, run
from sparse_sinkhorn.train import (
    ConfigMismatchError,
    DistInfo,
    TrainConfig,
    load_checkpoint,
    train,
)
from sparse_sinkhorn.train.helpers import check_world


def _config(**overrides: Any) -> TrainConfig:
    return TrainConfig(**{"steps": 2, "batch_size": 8, "progress": False, **overrides})


def test_model_config_mismatch_names_the_keys(tmp_path: Path) -> None:
    run(tmp_path, steps=2)
    other = {**MODEL_CONFIG, "d_hidden": 32, "extra": 1}
    with pytest.raises(ConfigMismatchError) as err:
        train(
            build_model(d_hidden=32),
            build_dataset(),
            mse_loss,
            _config(),
            out_dir=tmp_path,
            model_config=other,
            resume=True,
        )
    assert "d_hidden: saved 16, current 32" in str(err.value)
    assert "extra: saved <absent>, current 1" in str(err.value)
    with pytest.raises(ConfigMismatchError, match="d_hidden"):
        load_checkpoint(tmp_path, build_model(), expected_config=other)


def test_missing_resume_dir_is_a_one_line_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        train(
            build_model(),
            build_dataset(),
            mse_loss,
            _config(),
            out_dir=tmp_path / "out",
            resume=missing,
        )
    assert str(missing) in str(err.value) and "\n" not in str(err.value)
    assert "resume=False" in str(err.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(build_model(), build_dataset(), mse_loss, _config(), out_dir=missing, resume=True)


def test_resume_without_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        train(build_model(), build_dataset(), mse_loss, _config(), out_dir=tmp_path, resume=True)


def test_fresh_run_refuses_a_dir_with_checkpoints(tmp_path: Path) -> None:
    run(tmp_path, steps=2)
    with pytest.raises(FileExistsError, match="resume=True"):
        run(tmp_path, steps=2)


def test_batch_size_must_split_over_ranks_and_accumulation() -> None:
    with pytest.raises(ValueError, match="batch_size=10 is not divisible by grad_accum=4"):
        TrainConfig(steps=1, batch_size=10, grad_accum=4)
    info = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    config = TrainConfig(steps=1, batch_size=6, grad_accum=2)
    with pytest.raises(ValueError, match=r"batch_size=6 .* = 2 \* 2 = 4; choose"):
        check_world(config, info)
    assert check_world(TrainConfig(steps=1, batch_size=8, grad_accum=2), info) == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"steps": 0}, "steps=0"),
        ({"lr": -1.0}, "lr=-1.0"),
        ({"amp": "fp8"}, "amp='fp8'"),
        ({"clip_norm": 0.0}, "clip_norm=0.0"),
        ({"keep_checkpoints": 0}, "keep_checkpoints=0"),
        ({"min_lr_ratio": 2.0}, "min_lr_ratio=2.0"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"warmup_steps": -1}, "warmup_steps=-1"),
    ],
)
def test_train_config_validation(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        TrainConfig(**{"steps": 1, "batch_size": 1, **overrides})


def test_train_config_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="unknown TrainConfig keys \\['stepz'\\]"):
        TrainConfig.from_dict({"stepz": 1, "batch_size": 1})


def test_dataset_checks(tmp_path: Path) -> None:
    class Stream(IterableDataset):  # type: ignore[type-arg]
        def __iter__(self):  # type: ignore[no-untyped-def]
            yield from ()

    with pytest.raises(TypeError, match="map-style"):
        train(build_model(), Stream(), mse_loss, _config(), out_dir=tmp_path)
    with pytest.raises(ValueError, match="4 examples, fewer than batch_size=8"):
        train(build_model(), build_dataset(n=4), mse_loss, _config(), out_dir=tmp_path)


def test_extra_state_must_be_weights_only_loadable(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"extra_state\['bad'\] is a object"):
        train(
            build_model(),
            build_dataset(),
            mse_loss,
            _config(),
            out_dir=tmp_path,
            extra_state={"bad": object()},
        )


def test_fp16_needs_cuda(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present: fp16 is allowed")
    with pytest.raises(ValueError, match="amp='fp16' needs a CUDA device"):
        train(build_model(), build_dataset(), mse_loss, _config(amp="fp16"), out_dir=tmp_path)
