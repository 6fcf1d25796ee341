"""What a run trains with: its [`TrainConfig`][sparse_sinkhorn.train.TrainConfig], from its
preset and its experiment's `Schedule` (`train_config`, the one warm-up rule), and, when it
resumes, the model configuration it is checked against (`resumed_model_config`).
`driver.fit` asks both.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from ..models import config_from_dict
from ..train import TrainConfig
from ..train.checkpoint import CONFIG_FILE, list_checkpoints
from .presets import Preset, Schedule


def _share(steps: int, share: int) -> int:
    """A ``1/share`` part of ``steps``, at least 1; 0 when ``share`` is 0 (never)."""
    return max(1, steps // share) if share else 0


def train_config(preset: Preset, schedule: Schedule, *, seed: int, progress: bool) -> TrainConfig:
    """A run's training hyper-parameters: the preset's steps, batch, learning rate and
    warm-up, the warm-up clamped, and logs, evaluations and checkpoints spaced, by the
    experiment's `Schedule` (the one warm-up rule)."""
    steps = preset.steps
    longest = steps // schedule.warmup_share - schedule.warmup_margin
    return TrainConfig(
        steps=steps,
        batch_size=preset.batch_size,
        lr=preset.lr,
        weight_decay=schedule.weight_decay,
        warmup_steps=min(preset.warmup_steps, max(schedule.warmup_least, longest)),
        seed=seed,
        log_every=max(1, min(schedule.log_cap, steps // schedule.log_share)),
        eval_every=_share(steps, schedule.eval_share),
        ckpt_every=_share(steps, schedule.ckpt_share),
        progress=progress,
    )


def resumed_model_config(run_dir: Path, current: dict[str, Any]) -> dict[str, Any]:
    """The model configuration a resumed run is checked against and saves: its newest
    checkpoint's, when that describes the same model as ``current`` (a configuration saved
    before a model field with a default existed lacks the field, e.g.
    ``LanguageModelConfig.token_conv``), else ``current`` (the checkpoint's check then names
    every difference)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # this only compares; the runner built the model
            model = config_from_dict(current)
    except (ValueError, TypeError):
        return current  # not a model configuration of `sparse_sinkhorn.models`
    for _, checkpoint in reversed(list_checkpoints(run_dir / "checkpoints")):
        try:  # the newest readable one (the train loop skips a corrupt one too)
            saved = json.loads((checkpoint / CONFIG_FILE).read_text(encoding="utf-8"))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                same = config_from_dict(saved["model_config"]) == model
        except (OSError, ValueError, TypeError, KeyError):
            continue
        return saved["model_config"] if same else current
    return current
