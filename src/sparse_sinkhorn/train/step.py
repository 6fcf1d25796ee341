"""One optimizer step of the training loop (`loop.train`) and the metrics row it logs:
``grad_accum`` micro-batches, DDP's gradient sync on the last, clipping, the non-finite
check, AdamW and the LR schedule; then the row averaged over every micro-batch of every rank.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import CHECKPOINTS_DIR, list_checkpoints
from .distributed import all_reduce_sum
from .helpers import autocast, move_to_device
from .state import NonFiniteLossError, Run


def train_step(
    run: Run, batches: Any, step: int, out_dir: Path
) -> tuple[torch.Tensor, dict[str, float], Any]:
    """One optimizer step over ``grad_accum`` micro-batches.

    Returns the summed micro-batch losses of this rank (a tensor), summed metrics and the
    gradient norm before clipping (a tensor, or None without clipping). A non-finite loss
    (or gradient norm) stops training before the update: `check_finite`.
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
    check_finite(run, step, out_dir, loss_sum, grad_norm)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    return loss_sum, metric_sums, grad_norm


def check_finite(
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
class Window:
    """Throughput accounting between two log rows."""

    start: float = field(default_factory=time.perf_counter)
    steps: int = 0
    tokens: float = 0.0


def reduce_row(
    run: Run,
    step: int,
    lr: float,
    step_out: tuple[torch.Tensor, dict[str, float], Any],
    window: Window,
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
