"""Small pieces of the training loop: validation, device moves, AMP, rank-0 calls, evaluation."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar

import torch
from torch import nn

from .config import TrainConfig
from .distributed import DistInfo, broadcast_object
from .rng import capture_rng_state, restore_rng_state

T = TypeVar("T")


def check_world(config: TrainConfig, info: DistInfo) -> int:
    """Per-rank micro-batch size; ``ValueError`` unless ``batch_size`` splits evenly."""
    parts = info.world_size * config.grad_accum
    if config.batch_size % parts:
        raise ValueError(
            f"batch_size={config.batch_size} is not divisible by world_size * grad_accum = "
            f"{info.world_size} * {config.grad_accum} = {parts}; choose a batch_size that is a "
            f"multiple of {parts} or change grad_accum / --nproc_per_node"
        )
    return config.batch_size // parts


def check_dataset(dataset: Any, batch_size: int) -> int:
    """``len(dataset)``; map-style datasets with at least one global batch only."""
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        raise TypeError(
            f"train() needs a map-style dataset with __len__ and __getitem__, got "
            f"{type(dataset).__name__}; wrap streaming data in a map-style Dataset"
        )
    size = len(dataset)
    if size < batch_size:
        raise ValueError(
            f"the dataset has {size} examples, fewer than batch_size={batch_size}; "
            "lower batch_size or use more data"
        )
    return size


def as_json_dict(value: Any, name: str) -> dict[str, Any]:
    """``value`` (a dict, a dataclass instance or None) as a JSON-ready dict."""
    if value is None:
        return {}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{name} must be a dict or a dataclass instance, got {type(value).__name__}"
        )
    try:
        return dict(json.loads(json.dumps(dict(value))))
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be JSON-serialisable ({err})") from err


_PLAIN = (torch.Tensor, int, float, bool, str, type(None))


def check_plain_data(value: Any, where: str = "extra_state") -> None:
    """``TypeError`` unless ``value`` holds only what ``torch.load(weights_only=True)`` reads."""
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_plain_data(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where} has a key of type {type(key).__name__}; use str keys")
            check_plain_data(item, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__name__}; checkpoints hold only tensors, numbers, strings, "
        "None and lists/tuples/dicts of them (they are read with weights_only=True)"
    )


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Tensors in (nested) dicts, lists, tuples and namedtuples moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: move_to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to_device(value, device) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(value, device) for value in batch)
    return batch


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``TrainConfig.amp`` on ``device`` (None = full precision)."""
    if amp == "none" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp='fp16' needs a CUDA device; use amp='bf16' or amp='none' on CPU")
    return torch.float16 if amp == "fp16" else torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def rank0_call(info: DistInfo, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 and hand its result to every rank.

    If it raises, rank 0 re-raises and the other ranks raise a ``RuntimeError`` quoting it, so
    no rank is left waiting at a collective. Doubles as a barrier.
    """
    result: Any = None
    error: BaseException | None = None
    if info.is_main:
        try:
            result = fn()
        except Exception as err:
            error = err
    message = None if error is None else f"{type(error).__name__}: {error}"
    result, message = (
        broadcast_object((result, message)) if info.is_distributed else (result, message)
    )
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"rank 0 failed: {message}")
    return result


def run_eval(
    eval_fn: Callable[[nn.Module], Mapping[str, Any]], model: nn.Module
) -> dict[str, float]:
    """``eval_fn(model)`` in eval mode under ``no_grad``, leaving the training RNG untouched."""
    rng = capture_rng_state()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            metrics = eval_fn(model)
    finally:
        model.train(was_training)
        restore_rng_state(rng)
    return {f"eval/{key}": float(value) for key, value in metrics.items()}
