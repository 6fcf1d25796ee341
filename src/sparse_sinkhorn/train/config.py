"""``TrainConfig``: every knob of the training loop, validated on construction.

The config is saved as JSON beside every checkpoint (``config.json["train_config"]``) and can be
rebuilt with [`TrainConfig.from_dict`][sparse_sinkhorn.train.TrainConfig.from_dict].
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
    """Hyper-parameters of [`sparse_sinkhorn.train.train`][sparse_sinkhorn.train.train].

    ``batch_size`` is the GLOBAL number of examples per optimizer step: it is split over
    ``world_size`` ranks and ``grad_accum`` micro-batches per rank, so the per-rank micro-batch is
    ``batch_size // (world_size * grad_accum)``.

    Attributes:
        steps: optimizer steps of the whole run (resumes included).
        batch_size: global examples per optimizer step, summed over ranks and micro-batches.
        grad_accum: micro-batches per optimizer step on each rank.
        lr: peak learning rate (reached at the end of warm-up).
        weight_decay: AdamW decay, applied to parameters with ``ndim >= 2`` only.
        betas: AdamW ``(beta1, beta2)``.
        warmup_steps: linear warm-up length, then cosine decay.
        min_lr_ratio: the cosine decays to ``min_lr_ratio * lr`` at the last step.
        clip_norm: global gradient-norm clip; None disables clipping.
        seed: seeds torch, random and numpy (plus the rank) and the data order.
        log_every: write a metrics row every N steps (and at the last step).
        eval_every: run ``eval_fn`` every N steps; 0: only at the end.
        ckpt_every: save a checkpoint every N steps; 0: only at the end.
        keep_checkpoints: the newest checkpoints kept on disk; older ones are pruned.
        amp: ``"auto"`` (bf16 on CUDA, none on CPU), ``"bf16"``, ``"fp16"`` or ``"none"``.
        num_workers: DataLoader worker processes per rank.
        progress: a tqdm bar on rank 0 with the loss and throughput.
        find_unused_parameters: passed to ``DistributedDataParallel``.
    """

    steps: int
    batch_size: int
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    clip_norm: float | None = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    ckpt_every: int = 0
    keep_checkpoints: int = 2
    amp: str = "auto"
    num_workers: int = 0
    progress: bool = True
    find_unused_parameters: bool = False

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
        """Inverse of `to_dict`; unknown keys raise a ``ValueError`` naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}; known keys are {sorted(known)}")
        kwargs = dict(data)
        if "betas" in kwargs:
            kwargs["betas"] = tuple(kwargs["betas"])
        return cls(**kwargs)
