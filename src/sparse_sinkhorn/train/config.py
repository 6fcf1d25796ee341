"""``TrainConfig``: every knob of the training loop, validated on construction.

The config is saved as JSON beside every checkpoint (``config.json["train_config"]``) and can be
rebuilt with :meth:`TrainConfig.from_dict`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

AMP_MODES = ("auto", "bf16", "fp16", "none")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`sparse_sinkhorn.train.train`.

    ``batch_size`` is the GLOBAL number of examples per optimizer step: it is split over
    ``world_size`` ranks and ``grad_accum`` micro-batches per rank, so the per-rank micro-batch is
    ``batch_size // (world_size * grad_accum)``.
    """

    steps: int  # number of optimizer steps of the whole run (resumes included)
    batch_size: int  # global examples per optimizer step, summed over ranks and micro-batches
    grad_accum: int = 1  # micro-batches per optimizer step on each rank
    lr: float = 3e-4  # peak learning rate (reached at the end of warm-up)
    weight_decay: float = 0.01  # AdamW decay, applied to params with ndim >= 2 only
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW (beta1, beta2)
    warmup_steps: int = 100  # linear warm-up length, then cosine decay
    min_lr_ratio: float = 0.1  # cosine decays to min_lr_ratio * lr at the last step
    clip_norm: float | None = 1.0  # global grad-norm clip; None disables clipping
    seed: int = 0  # seeds torch / random / numpy (+ rank) and the data order
    log_every: int = 10  # write a metrics row every N steps (and at the last step)
    eval_every: int = 0  # run eval_fn every N steps; 0 = only at the end
    ckpt_every: int = 0  # save a checkpoint every N steps; 0 = only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept on disk; older ones are pruned
    amp: str = "auto"  # "auto" (bf16 on CUDA, none on CPU) | "bf16" | "fp16" | "none"
    num_workers: int = 0  # DataLoader worker processes per rank
    progress: bool = True  # tqdm bar on rank 0 with loss and throughput
    find_unused_parameters: bool = False  # passed to DistributedDataParallel

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and value >= 1, f"TrainConfig.{name}={value!r}: must be >= 1"
            )
        for name in ("warmup_steps", "eval_every", "ckpt_every", "num_workers"):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and value >= 0, f"TrainConfig.{name}={value!r}: must be >= 0"
            )
        for name in ("lr", "weight_decay", "min_lr_ratio", "clip_norm", "betas"):
            value = getattr(self, name)
            values = value if isinstance(value, (tuple, list)) else (value,)
            _require(
                all(
                    v is None or (isinstance(v, (int, float)) and math.isfinite(v)) for v in values
                ),
                f"TrainConfig.{name}={value!r}: must be a finite number",
            )
        _require(self.lr > 0, f"TrainConfig.lr={self.lr!r}: must be > 0")
        _require(
            self.weight_decay >= 0, f"TrainConfig.weight_decay={self.weight_decay!r}: must be >= 0"
        )
        _require(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            f"TrainConfig.betas={self.betas!r}: need two values in [0, 1)",
        )
        _require(
            0.0 <= self.min_lr_ratio <= 1.0,
            f"TrainConfig.min_lr_ratio={self.min_lr_ratio!r}: must be in [0, 1]",
        )
        _require(
            self.clip_norm is None or self.clip_norm > 0,
            f"TrainConfig.clip_norm={self.clip_norm!r}: must be > 0, or None to disable clipping",
        )
        _require(self.amp in AMP_MODES, f"TrainConfig.amp={self.amp!r}: choose one of {AMP_MODES}")
        _require(
            self.batch_size % self.grad_accum == 0,
            f"TrainConfig.batch_size={self.batch_size} is not divisible by "
            f"grad_accum={self.grad_accum}; pick a batch_size that is a multiple of "
            f"world_size * grad_accum",
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``betas`` becomes a list)."""
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise a ``ValueError`` naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}; known keys are {sorted(known)}")
        kwargs = dict(data)
        if "betas" in kwargs:
            kwargs["betas"] = tuple(kwargs["betas"])
        return cls(**kwargs)
