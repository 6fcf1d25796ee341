"""What [`train`][sparse_sinkhorn.train.train] builds once, and how it is saved and resumed.

A checkpoint's ``trainer_state.pt`` holds the optimizer, scheduler and GradScaler states, the
step and the position in the data order, every rank's RNG states, the elapsed time and the
caller's ``extra_state``; ``config.json`` holds ``model_config`` and the ``TrainConfig``.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SparseSinkhornError
from .checkpoint import CHECKPOINTS_DIR, list_checkpoints, save_checkpoint
from .config import TrainConfig
from .distributed import DistInfo, all_gather_objects
from .helpers import autocast_dtype, rank0_call
from .loading import config_differences, load_checkpoint, resolve_checkpoint
from .metrics import METRICS_FILE
from .optim import build_optimizer, build_scheduler
from .rng import capture_rng_state, restore_rng_state
from .rundir import take_overwrite

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, Mapping[str, Any]]]


class NonFiniteLossError(SparseSinkhornError, ValueError):
    """Training produced a NaN or infinite loss (or gradient, or weights): the run stopped
    before that update, and the checkpoints already on disk are the last good ones."""


@dataclass
class Run:
    """Everything the step function needs, built once by [`train`][sparse_sinkhorn.train.train]."""

    config: TrainConfig
    info: DistInfo
    raw_model: nn.Module
    model: nn.Module  # raw_model or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    amp_dtype: torch.dtype | None
    loss_fn: LossFn


def build_run(model: nn.Module, loss_fn: LossFn, config: TrainConfig, info: DistInfo) -> Run:
    model.to(info.device)
    optimizer = build_optimizer(model, config)
    amp_dtype = autocast_dtype(config.amp, info.device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    return Run(
        config=config,
        info=info,
        raw_model=model,
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, config),
        scaler=scaler,
        amp_dtype=amp_dtype,
        loss_fn=loss_fn,
    )


def save_run(run: Run, step: int, out_dir: Path, extra: dict[str, Any]) -> Path:
    """Checkpoint after ``step`` updates: rank 0 writes, every rank returns the path.

    Weights that are not finite are never written (they would replace good checkpoints):
    [`NonFiniteLossError`][sparse_sinkhorn.train.NonFiniteLossError] instead (every rank holds the
    same weights, so all raise).
    """
    for name, param in run.raw_model.named_parameters():
        if not bool(torch.isfinite(param).all()):
            raise NonFiniteLossError(
                f"step {step}: parameter {name} is not finite; not writing a checkpoint of it "
                f"(the checkpoints in {out_dir / CHECKPOINTS_DIR} are the last good ones)"
            )
    rng_states = all_gather_objects(capture_rng_state())  # collective: every rank's RNG
    per_epoch = extra["steps_per_epoch"]

    def write() -> Path:
        state = {
            "format_version": 1,
            "step": step,
            "epoch": step // per_epoch,
            "position": step % per_epoch,  # optimizer steps already taken in this epoch
            "steps_per_epoch": per_epoch,
            "examples_seen": step * run.config.batch_size,
            "world_size": run.info.world_size,
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "grad_scaler": None if run.scaler is None else run.scaler.state_dict(),
            "rng": rng_states,
            "elapsed": extra["elapsed"],
            "extra_state": extra["extra_state"],
        }
        config = {
            "format_version": 1,
            "step": step,
            "model_config": extra["model_config"],
            "train_config": run.config.to_dict(),
            "world_size": run.info.world_size,
        }
        return save_checkpoint(
            out_dir / CHECKPOINTS_DIR,
            step,
            run.raw_model,
            config=config,
            trainer_state=state,
            keep=run.config.keep_checkpoints,
        )

    return rank0_call(run.info, write)


def prepare_fresh(out_dir: Path) -> None:
    """Make ``out_dir`` ready for a new run.

    A run already there is an error, unless `allow_overwrite`
    marked the directory: its checkpoints and metrics are removed now, once the new run has
    everything it needs. What an interrupted first checkpoint write left (a ``checkpoints``
    folder without any ``step_*`` checkpoint) is cleared.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    root = out_dir / CHECKPOINTS_DIR
    existing = list_checkpoints(root)
    if existing and take_overwrite(out_dir):
        logger.info("replacing the earlier run in %s", out_dir)
        shutil.rmtree(root)
        (out_dir / METRICS_FILE).unlink(missing_ok=True)
        existing = []
    if existing:
        raise FileExistsError(
            f"{out_dir} already holds checkpoints (newest: {existing[-1][1].name}); pass "
            "resume=True to continue that run, or choose a new out_dir"
        )
    if root.is_dir():  # only leftovers of a first checkpoint write that never finished
        shutil.rmtree(root)


# TrainConfig fields that may change between a run and its resumption without a warning.
_HARMLESS = {"progress", "log_every", "eval_every", "ckpt_every", "keep_checkpoints", "num_workers"}


def resume_run(
    run: Run, out_dir: Path, resume: bool | str | Path, model_config: dict[str, Any] | None
) -> tuple[int, float, Path]:
    """Load the checkpoint ``resume`` designates; returns (step, elapsed seconds, its path)."""
    source = Path(resume) if isinstance(resume, (str, Path)) else out_dir
    if not source.exists():
        raise FileNotFoundError(
            f"resume path {source} does not exist; pass resume=False to start a new run, or "
            "point resume at an existing run dir or checkpoint dir"
        )
    ckpt = rank0_call(run.info, lambda: resolve_checkpoint(source))
    state = load_checkpoint(ckpt, run.raw_model, run.optimizer, run.scheduler, model_config)
    if run.scaler is not None and state.get("grad_scaler"):
        run.scaler.load_state_dict(state["grad_scaler"])
    rng_states = state["rng"]
    restore_rng_state(rng_states[run.info.rank % len(rng_states)])
    diffs = config_differences(state["config"].get("train_config", {}), run.config.to_dict())
    diffs = [d for d in diffs if d.split(":")[0] not in _HARMLESS]
    if diffs and run.info.is_main:
        logger.warning("resuming %s with a different TrainConfig: %s", ckpt, "; ".join(diffs))
    if state["step"] > run.config.steps:
        raise ValueError(
            f"checkpoint {ckpt} is at step {state['step']}, past TrainConfig.steps="
            f"{run.config.steps}; raise steps to continue training"
        )
    if run.info.is_main:
        logger.info("resumed from %s at step %d", ckpt, state["step"])
    return int(state["step"]), float(state.get("elapsed", 0.0)), ckpt
