"""``train()``: the one training loop every experiment uses, on one process or under torchrun.

Single process::

    config = TrainConfig(steps=1000, batch_size=64)
    result = train(model, dataset, loss_fn, config, out_dir="runs/x")

Several processes (the same script, unchanged)::

    torchrun --standalone --nproc_per_node=2 my_experiment.py

Each step, every rank takes ``grad_accum`` micro-batches of ``batch_size // (world_size *
grad_accum)`` examples (see `sparse_sinkhorn.train.sampling`), back-propagates
``loss / grad_accum`` (DDP averages over ranks, so the gradient is the mean over the global
batch when ``loss_fn`` returns a per-example mean), syncs gradients only on the last
micro-batch (``no_sync``), clips, and steps AdamW and the LR schedule. Rank 0 writes
``metrics.jsonl``, runs ``eval_fn`` and writes checkpoints; the other ranks wait for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from .checkpoint import CHECKPOINTS_DIR, list_checkpoints
from .config import TrainConfig
from .distributed import (
    DistInfo,
    init_distributed,
)
from .helpers import (
    as_json_dict,
    check_dataset,
    check_plain_data,
    check_world,
    rank0_call,
    run_eval,
)
from .metrics import METRICS_FILE, MetricsWriter, read_metrics
from .rng import seed_everything
from .rundir import LOCK_FILE, run_lock
from .sampling import MicroBatchSampler, steps_per_epoch
from .state import (
    LossFn,
    Run,
    build_run,
    prepare_fresh,
    resume_run,
    save_run,
)
from .step import Window, reduce_row, train_step

logger = logging.getLogger(__name__)

EvalFn = Callable[[nn.Module], Mapping[str, Any]]


@dataclass
class TrainResult:
    """What [`train`][sparse_sinkhorn.train.train] returns (identical on every rank).

    Attributes:
        step: optimizer steps completed.
        metrics: the last logged training row.
        eval_metrics: the last ``eval_fn`` result, keys prefixed ``"eval/"``.
        out_dir: the run directory.
        checkpoint: the final checkpoint directory, or None.
        resumed_from: the checkpoint this run started from, if any.
        history: the rows logged by this call.
    """

    step: int
    metrics: dict[str, float]
    eval_metrics: dict[str, float]
    out_dir: Path
    checkpoint: Path | None
    resumed_from: Path | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def _wrap_ddp(run: Run) -> nn.Module:
    if not run.info.is_distributed:
        return run.raw_model
    device_ids = [run.info.local_rank] if run.info.device.type == "cuda" else None
    return DistributedDataParallel(
        run.raw_model,
        device_ids=device_ids,
        find_unused_parameters=run.config.find_unused_parameters,
    )


def _loader(
    run: Run, dataset: Dataset[Any], num_examples: int, start_step: int, collate_fn: Any
) -> DataLoader[Any]:
    config = run.config
    sampler = MicroBatchSampler(
        num_examples=num_examples,
        batch_size=config.batch_size,
        grad_accum=config.grad_accum,
        rank=run.info.rank,
        world_size=run.info.world_size,
        seed=config.seed,
        start_step=start_step,
        steps=config.steps,
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_fn,
        num_workers=config.num_workers,
        pin_memory=run.info.device.type == "cuda",
        # A private generator keeps the loader from drawing on the global torch RNG.
        generator=torch.Generator().manual_seed(config.seed + start_step),
    )


def _progress_bar(config: TrainConfig, info: DistInfo, start_step: int) -> Any:
    if not (config.progress and info.is_main):
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional
        return None
    return tqdm(total=config.steps, initial=start_step, desc="train", dynamic_ncols=True)


def _is_due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def _report(run: Run, row: dict[str, float], writer: MetricsWriter | None, bar: Any) -> None:
    if not run.info.is_main:
        return
    if writer is not None:
        writer.write(row)
    speed = "tokens_per_s" if "tokens_per_s" in row else "examples_per_s"
    shown = {k: v for k, v in row.items() if k in ("loss", speed)}
    if bar is not None and "loss" in row:
        bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()})
    logger.info(
        "step %d/%d %s",
        row["step"],
        run.config.steps,
        " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "step"),
    )


def train(
    model: nn.Module,
    dataset: Dataset[Any],
    loss_fn: LossFn,
    config: TrainConfig,
    *,
    out_dir: str | Path,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    eval_fn: EvalFn | None = None,
    resume: bool | str | Path = False,
    model_config: Mapping[str, Any] | None = None,
    extra_state: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` on ``dataset`` for ``config.steps`` optimizer steps.

    Args:
        model: any ``nn.Module``; moved to this rank's device and wrapped in DDP under torchrun.
        dataset: a map-style dataset; batches are built by ``collate_fn`` (default collate).
        loss_fn: ``loss_fn(model, batch) -> (loss, metrics)``; ``model`` is the (possibly
            DDP-wrapped) module, ``batch`` is already on the device, ``loss`` is the mean over
            the micro-batch and ``metrics`` maps names to floats, with an optional ``"tokens"``
            count for tokens/s. Every rank must return the same metric keys.
        eval_fn: ``eval_fn(unwrapped_model) -> metrics``, run on rank 0 only (eval mode,
            ``no_grad``, RNG state preserved) every ``eval_every`` steps and at the end; its
            results are broadcast to every rank and logged as ``eval/<name>``.
        resume: ``True`` continues from ``out_dir``'s latest valid checkpoint; a path continues
            from that checkpoint dir or run dir. ``False`` starts fresh (and refuses an
            ``out_dir`` that already holds checkpoints).
        model_config: JSON-ready dict saved in every ``config.json``; on resume it must equal the
            saved one (``ConfigMismatchError`` names the differing keys).
        extra_state: tensors/plain data stored in ``trainer_state.pt`` (e.g. a vocabulary).

    Seeds torch/random/numpy with ``config.seed + rank``; build the model before calling (seed
    it yourself with [`seed_everything`][sparse_sinkhorn.train.seed_everything] for a reproducible
    init). Leaves any process group
    initialised: call [`cleanup_distributed`][sparse_sinkhorn.train.cleanup_distributed] at the end
        of a torchrun script.
    """
    info = init_distributed()
    check_world(config, info)
    num_examples = check_dataset(dataset, config.batch_size)
    model_cfg = as_json_dict(model_config, "model_config")
    check_plain_data(extra_state or {})
    out = Path(out_dir)
    if resume is True and rank0_call(info, lambda: _started_without_checkpoint(out)):
        # Stopped before its first checkpoint was complete: nothing to continue from.
        if info.is_main:
            logger.info("%s has no checkpoint yet: starting the run from step 0", out)
        resume = False
    with ExitStack() as stack:
        if info.is_main and (resume is False or out.is_dir()):
            stack.enter_context(run_lock(out))  # one writer per run dir: RunLockedError
        return _train(
            model, dataset, loss_fn, config, info, out, num_examples, model_cfg, collate_fn,
            eval_fn, resume, model_config, extra_state,
        )  # fmt: skip


def _started_without_checkpoint(out: Path) -> bool:
    """``out`` holds a run that began (lock, metrics or a checkpoint folder) but has no
    complete checkpoint: it was stopped before or during its first checkpoint write."""
    if not out.is_dir() or list_checkpoints(out / CHECKPOINTS_DIR):
        return False
    marks = (out / CHECKPOINTS_DIR, out / METRICS_FILE, out / LOCK_FILE)
    return any(mark.exists() for mark in marks)


def _train(
    model: nn.Module,
    dataset: Dataset[Any],
    loss_fn: LossFn,
    config: TrainConfig,
    info: DistInfo,
    out: Path,
    num_examples: int,
    model_cfg: dict[str, Any],
    collate_fn: Callable[[list[Any]], Any] | None,
    eval_fn: EvalFn | None,
    resume: bool | str | Path,
    model_config: Mapping[str, Any] | None,
    extra_state: dict[str, Any] | None,
) -> TrainResult:
    seed_everything(config.seed + info.rank)
    run = build_run(model, loss_fn, config, info)
    start_step, elapsed0, resumed_from = 0, 0.0, None
    if resume is False:
        rank0_call(info, lambda: prepare_fresh(out))
    else:
        expected = model_cfg if model_config is not None else None
        start_step, elapsed0, resumed_from = resume_run(run, out, resume, expected)
        rank0_call(info, lambda: out.mkdir(parents=True, exist_ok=True))
        if start_step == config.steps:
            return _finished_run(run, out, start_step, resumed_from, eval_fn)
    run.model = _wrap_ddp(run)
    extra = {
        "model_config": model_cfg,
        "extra_state": extra_state or {},
        "elapsed": elapsed0,
        "steps_per_epoch": steps_per_epoch(num_examples, config.batch_size),
    }
    loader = _loader(run, dataset, num_examples, start_step, collate_fn)
    writer = None
    if info.is_main:
        writer = MetricsWriter(out, resume_step=start_step if resumed_from else None)
    bar = _progress_bar(config, info, start_step)
    try:
        result = _loop(run, iter(loader), start_step, out, extra, eval_fn, writer, bar)
    finally:
        if writer is not None:
            writer.close()
        if bar is not None:
            bar.close()
    result.resumed_from = resumed_from
    result.checkpoint = result.checkpoint or resumed_from  # nothing left to train: that one
    return result


def _finished_run(
    run: Run, out: Path, step: int, checkpoint: Path, eval_fn: EvalFn | None
) -> TrainResult:
    """``resume`` of a run whose last checkpoint is its final step (e.g. killed before its
    results were written): nothing to train; the final metrics are rebuilt by evaluating the
    final checkpoint, and the last logged training row is read back from ``metrics.jsonl``."""
    if run.info.is_main:
        logger.info("%s already finished at step %d; re-evaluating its final checkpoint", out, step)
    eval_metrics: dict[str, float] = {}
    if eval_fn is not None:
        eval_metrics = rank0_call(run.info, lambda: run_eval(eval_fn, run.raw_model))
    metrics = rank0_call(run.info, lambda: _last_train_row(out / METRICS_FILE))
    return TrainResult(
        step=step,
        metrics=metrics,
        eval_metrics=eval_metrics,
        out_dir=out,
        checkpoint=checkpoint,
        resumed_from=checkpoint,
    )


def _last_train_row(path: Path) -> dict[str, float]:
    if not path.is_file():
        return {}
    rows = [row for row in read_metrics(path) if "loss" in row]
    if not rows:
        return {}
    return {k: v for k, v in rows[-1].items() if not k.startswith("eval/")}


def _loop(
    run: Run,
    batches: Any,
    start_step: int,
    out_dir: Path,
    extra: dict[str, Any],
    eval_fn: EvalFn | None,
    writer: MetricsWriter | None,
    bar: Any,
) -> TrainResult:
    config = run.config
    t0, window = time.perf_counter(), Window()
    result = TrainResult(
        step=start_step, metrics={}, eval_metrics={}, out_dir=out_dir, checkpoint=None
    )
    for step in range(start_step + 1, config.steps + 1):
        lr = float(run.scheduler.get_last_lr()[0])  # the LR this update uses
        step_out = train_step(run, batches, step, out_dir)
        window.steps += 1
        window.tokens += step_out[1].get("tokens", 0.0)
        extra["elapsed_now"] = time.perf_counter() - t0
        row: dict[str, float] = {}
        if _is_due(step, config.log_every, config.steps):
            row = reduce_row(
                run, step, lr, step_out, window, extra["elapsed"] + extra["elapsed_now"]
            )
            result.metrics, window = dict(row), Window()
        if eval_fn is not None and _is_due(step, config.eval_every, config.steps):
            result.eval_metrics = rank0_call(run.info, lambda: run_eval(eval_fn, run.raw_model))
            row = {"step": step, **row, **result.eval_metrics}
        if row:
            _report(run, row, writer, bar)
            result.history.append(row)
        if bar is not None:
            bar.update(1)
        if _is_due(step, config.ckpt_every, config.steps):
            ckpt_extra = {**extra, "elapsed": extra["elapsed"] + extra["elapsed_now"]}
            result.checkpoint = save_run(run, step, out_dir, ckpt_extra)
        result.step = step
    return result
