"""Toy model, data and losses for the training-engine tests; also a torchrun entry point.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/helpers_train.py \
        --out DIR --steps 4 --batch-size 8 --grad-accum 1 2
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from sparse_sinkhorn.train import TrainConfig, TrainResult, cleanup_distributed, train

MODEL_CONFIG = {"d_in": 4, "d_hidden": 16, "d_out": 3}


class ToyMLP(nn.Module):
    """Deterministic (dropout-free) MLP with a LayerNorm, biases and a tied pair of weights."""

    def __init__(self, d_in: int = 4, d_hidden: int = 16, d_out: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d_hidden)
        self.norm = nn.LayerNorm(d_hidden)
        self.mid = nn.Linear(d_hidden, d_hidden)
        self.mid_again = nn.Linear(d_hidden, d_hidden, bias=False)
        self.mid_again.weight = self.mid.weight  # tied: stored once in safetensors
        self.out = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.norm(self.inp(x)))
        h = torch.tanh(self.mid(h)) + 0.5 * torch.tanh(self.mid_again(h))
        return self.out(h)


def build_model(seed: int = 123, **config: int) -> ToyMLP:
    torch.manual_seed(seed)
    return ToyMLP(**{**MODEL_CONFIG, **config})


def build_dataset(n: int = 64, seed: int = 7) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    w = torch.randn(4, 3, generator=g)
    y = torch.sin(x @ w) + 0.1 * torch.randn(n, 3, generator=g)
    return TensorDataset(x, y)


def mse_loss(model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
    x, y = batch
    loss = nn.functional.mse_loss(model(x), y)
    return loss, {"mse": loss.item(), "tokens": float(x.shape[0])}


def noisy_loss(model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
    """Draws from torch's and Python's global RNGs, so resume must restore them exactly."""
    x, y = batch
    x = x + 0.05 * torch.randn_like(x)
    loss = nn.functional.mse_loss(model(x), y) * (1.0 + 0.1 * random.random())
    return loss, {"mse": loss.item()}


def run(out: Path, resume: bool | Path = False, **overrides: Any) -> TrainResult:
    settings: dict[str, Any] = dict(steps=4, batch_size=8, lr=1e-2, warmup_steps=2, log_every=1)
    settings.update(overrides)
    config = TrainConfig(progress=False, **settings)
    return train(
        build_model(),
        build_dataset(),
        mse_loss,
        config,
        out_dir=out,
        model_config=MODEL_CONFIG,
        resume=resume,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, nargs="+", default=[1])
    args = parser.parse_args()
    settings = dict(steps=args.steps, batch_size=args.batch_size, ckpt_every=2, keep_checkpoints=3)
    for accum in args.grad_accum:  # one run per grad_accum value, into OUT/accum_<k>
        run(args.out / f"accum_{accum}", grad_accum=accum, **settings)
    # and the first one again, resumed from its step-2 checkpoint, into OUT/resumed
    first = args.out / f"accum_{args.grad_accum[0]}" / "checkpoints" / "step_0000002"
    run(args.out / "resumed", grad_accum=args.grad_accum[0], resume=first, **settings)
    cleanup_distributed()  # on success only: its barrier would wait for a crashed rank


if __name__ == "__main__":
    main()
