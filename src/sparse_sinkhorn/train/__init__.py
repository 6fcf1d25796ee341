"""The training engine: one loop (single process or torchrun/DDP), checkpoints, metrics.

Example::

    from sparse_sinkhorn.train import TrainConfig, train

    def loss_fn(model, batch):
        x, y = batch
        loss = torch.nn.functional.mse_loss(model(x), y)
        return loss, {"mse": loss.item()}

    config = TrainConfig(steps=200, batch_size=32, warmup_steps=10, ckpt_every=50)
    result = train(model, dataset, loss_fn, config, out_dir="runs/toy", model_config={"d": 16})
"""

from __future__ import annotations

from .checkpoint import (
    CheckpointError,
    ConfigMismatchError,
    save_checkpoint,
    unwrap_model,
)
from .config import TrainConfig
from .distributed import DistInfo, cleanup_distributed, init_distributed
from .loading import (
    load_checkpoint,
    load_model_weights,
    read_config,
    resolve_checkpoint,
    verify_checkpoint,
    warm_start,
)
from .loop import TrainResult, train
from .metrics import plot_metrics, read_metrics
from .optim import build_optimizer, build_scheduler, lr_multiplier
from .rng import seed_everything
from .sampling import micro_batch_indices
from .state import NonFiniteLossError

__all__ = [
    "CheckpointError",
    "ConfigMismatchError",
    "DistInfo",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "build_optimizer",
    "build_scheduler",
    "cleanup_distributed",
    "init_distributed",
    "load_checkpoint",
    "load_model_weights",
    "lr_multiplier",
    "micro_batch_indices",
    "plot_metrics",
    "read_config",
    "read_metrics",
    "resolve_checkpoint",
    "save_checkpoint",
    "seed_everything",
    "train",
    "unwrap_model",
    "verify_checkpoint",
    "warm_start",
]
