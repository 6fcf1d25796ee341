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
import math
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack, nullcontext
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
    all_reduce_sum,
    init_distributed,
)
from .helpers import (
    as_json_dict,
    autocast,
    check_dataset,
    check_plain_data,
    check_world,
    move_to_device,
    rank0_call,
    run_eval,
)
from .metrics import METRICS_FILE, MetricsWriter, read_metrics
from .rng import seed_everything
from .rundir import LOCK_FILE, run_lock
from .sampling import MicroBatchSampler, steps_per_epoch
from .state import (
    LossFn,
    NonFiniteLossError,
    Run,
    build_run,
    prepare_fresh,
    resume_run,
    save_run,
)

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


def _train_step(
    run: Run, batches: Any, step: int, out_dir: Path
) -> tuple[torch.Tensor, dict[str, float], Any]:
    """One optimizer step over ``grad_accum`` micro-batches.

    Returns the summed micro-batch losses of this rank (a tensor), summed metrics and the
    gradient norm before clipping (a tensor, or None without clipping). A non-finite loss
    (or gradient norm) stops training before the update: `_check_finite`.
    """
    config, model = run.config, run.model
    loss_sum = torch.zeros((), device=run.info.device)
    metric_sums: dict[str, float] = {}
    for micro in range(config.grad_accum):
        batch = move_to_device(next(batches), run.info.device)
        last = micro == config.grad_accum - 1
        # DDP all-reduces gradients on the last micro-batch only.
        sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else None
        with sync or nullcontext():
            with autocast(run.info.device, run.amp_dtype):
                loss, metrics = run.loss_fn(model, batch)
            scaled = loss / config.grad_accum
            (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
        loss_sum += loss.detach().float()
        for key, value in metrics.items():
            metric_sums[key] = metric_sums.get(key, 0.0) + float(value)
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    grad_norm = None
    if config.clip_norm is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), config.clip_norm)
    _check_finite(run, step, out_dir, loss_sum, grad_norm)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    return loss_sum, metric_sums, grad_norm


def _check_finite(
    run: Run, step: int, out_dir: Path, loss_sum: torch.Tensor, grad_norm: Any
) -> None:
    """Stop at the first step whose loss (any rank's) or gradient norm is NaN or infinite,
    before the optimizer applies it:
    [`NonFiniteLossError`][sparse_sinkhorn.train.NonFiniteLossError] on every rank.

    With fp16 loss scaling an infinite gradient only means the scale was too high (the scaler
    skips that update itself), so there the loss alone decides.
    """
    bad = ~torch.isfinite(loss_sum)
    if grad_norm is not None and run.scaler is None:
        bad = bad | ~torch.isfinite(grad_norm)
    flag = all_reduce_sum(bad.to(torch.float32).reshape(1))  # every rank stops together
    if not bool(flag.item()):
        return
    loss = loss_sum.item() / run.config.grad_accum
    if not math.isfinite(loss):
        what = f"loss is {loss:g}"
    elif grad_norm is not None and not math.isfinite(float(grad_norm)):
        what = f"gradient norm is {float(grad_norm):g}"
    else:
        what = "loss is not finite on another rank"
    newest = list_checkpoints(out_dir / CHECKPOINTS_DIR)
    kept = f"the newest is {newest[-1][1]}" if newest else "none was written yet"
    raise NonFiniteLossError(
        f"step {step}: the training {what}; training stopped before applying that update and "
        f"no later checkpoint was written ({kept}); lower the learning rate or check the data"
    )


@dataclass
class _Window:
    """Throughput accounting between two log rows."""

    start: float = field(default_factory=time.perf_counter)
    steps: int = 0
    tokens: float = 0.0


def _reduce_row(
    run: Run,
    step: int,
    lr: float,
    step_out: tuple[torch.Tensor, dict[str, float], Any],
    window: _Window,
    elapsed: float,
) -> dict[str, float]:
    """The metrics row of ``step``: loss/metrics averaged over every micro-batch of every rank."""
    loss_sum, metric_sums, grad_norm = step_out
    keys = sorted(k for k in metric_sums if k != "tokens")
    values = [loss_sum.item(), window.tokens, *(metric_sums[k] for k in keys)]
    totals = all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=run.info.device))
    parts = run.info.world_size * run.config.grad_accum
    seconds = max(time.perf_counter() - window.start, 1e-9)
    row: dict[str, float] = {"step": step, "loss": totals[0].item() / parts, "lr": lr}
    if grad_norm is not None:
        row["grad_norm"] = float(grad_norm)
    row.update({key: totals[2 + i].item() / parts for i, key in enumerate(keys)})
    row["examples_per_s"] = window.steps * run.config.batch_size / seconds
    if "tokens" in metric_sums:
        row["tokens_per_s"] = totals[1].item() / seconds
    row["elapsed"] = elapsed
    return row


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
    t0, window = time.perf_counter(), _Window()
    result = TrainResult(
        step=start_step, metrics={}, eval_metrics={}, out_dir=out_dir, checkpoint=None
    )
    for step in range(start_step + 1, config.steps + 1):
        lr = float(run.scheduler.get_last_lr()[0])  # the LR this update uses
        step_out = _train_step(run, batches, step, out_dir)
        window.steps += 1
        window.tokens += step_out[1].get("tokens", 0.0)
        extra["elapsed_now"] = time.perf_counter() - t0
        row: dict[str, float] = {}
        if _is_due(step, config.log_every, config.steps):
            row = _reduce_row(
                run, step, lr, step_out, window, extra["elapsed"] + extra["elapsed_now"]
            )
            result.metrics, window = dict(row), _Window()
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
