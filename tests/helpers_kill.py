"""Child process for the SIGKILL resume test: trains a toy model, checkpointing every step.

    python tests/helpers_kill.py --out DIR [--die-in-checkpoint K:PHASE]

Resumes (``resume=True``) when ``DIR`` exists. ``--die-in-checkpoint K:PHASE`` sends this
process SIGKILL in the middle of its K-th checkpoint write of this launch: PHASE ``files``
(after the weights file, before the rest), ``sealed`` (all files and manifest written, not yet
renamed into place) or ``publish`` (renamed, ``latest.json`` not yet updated). Prints
``READY`` once imports are done, so the parent can kill it at a random moment of training.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers_train import MODEL_CONFIG, build_dataset, build_model, noisy_loss
from sparse_sinkhorn.train import TrainConfig, train
from sparse_sinkhorn.train import checkpoint as ckpt_module

STEPS = 40


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install_kill(spec: str) -> None:
    k, phase = spec.split(":")
    count = {"n": 0}
    write_files, write_json = ckpt_module._write_files, ckpt_module._atomic_write_json

    def files(tmp, model, config, state):  # type: ignore[no-untyped-def]
        count["n"] += 1
        if count["n"] == int(k) and phase == "files":
            from safetensors.torch import save_model

            save_model(model, str(tmp / ckpt_module.MODEL_FILE))
            _die()
        write_files(tmp, model, config, state)
        if count["n"] == int(k) and phase == "sealed":
            _die()

    def publish(path, data):  # type: ignore[no-untyped-def]
        if count["n"] == int(k) and phase == "publish" and path.name == ckpt_module.LATEST_FILE:
            _die()
        write_json(path, data)

    ckpt_module._write_files = files  # type: ignore[assignment]
    ckpt_module._atomic_write_json = publish  # type: ignore[assignment]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--die-in-checkpoint", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.die_in_checkpoint:
        _install_kill(args.die_in_checkpoint)
    config = TrainConfig(
        steps=STEPS, batch_size=8, lr=1e-2, warmup_steps=2, log_every=1, ckpt_every=1,
        keep_checkpoints=2, progress=False,
    )  # fmt: skip
    print("READY", flush=True)
    train(
        build_model(),
        build_dataset(),
        noisy_loss,
        config,
        out_dir=args.out,
        model_config=MODEL_CONFIG,
        resume=args.out.exists(),
    )


if __name__ == "__main__":
    main()
