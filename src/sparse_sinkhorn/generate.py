"""Sampling from a trained run: ``sparse-sinkhorn generate``.

Text from a ``sparse-sinkhorn lm`` run, images from a ``sparse-sinkhorn image`` run::

    sparse-sinkhorn generate --run runs/lm-char/sinkhorn --prompt "ROMEO:" --tokens 300
    sparse-sinkhorn generate --run runs/lm-char/sinkhorn --tokens 512 --no-cache  # reference
    sparse-sinkhorn generate --run runs/image-fashion-mnist/sinkhorn --samples 16

Decoding is incremental by default (`sparse_sinkhorn.nn.cache`): the prompt goes through
the model once, then each new token costs one position per layer, and the logits equal the
full causal forward's. ``--no-cache`` recomputes the whole prefix at every step (the slow,
obviously-correct reference); both print tokens/s.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .data import Tokenizer
from .errors import UsageError
from .experiments.progress import setup_logging
from .experiments.results import TASK_FILE, TOKENIZER_FILE
from .models import LanguageModel, LanguageModelConfig, config_from_dict
from .train import CheckpointError, load_model_weights, read_config, resolve_checkpoint
from .train.loading import check_shapes_match

logger = logging.getLogger(__name__)


def resolve_run_dir(run_dir: str | Path) -> Path:
    """``--run``: one run's directory, or a kind's directory, which stands for its lowest seed."""
    root = Path(run_dir)
    if not root.is_dir():
        raise UsageError(f"--run {root} is not a directory; pass --run <out>/<kind>")
    seeds = [p.parent for p in root.glob(f"seed*/{TASK_FILE}") if p.parent.name[4:].isdigit()]
    if not (root / TASK_FILE).is_file() and seeds:
        root = min(seeds, key=lambda p: int(p.name[4:]))
        logger.info("--run: using %s", root)
    return root


def load_run(run_dir: str | Path) -> tuple[LanguageModel, dict[str, Any]]:
    """The trained model (eval mode) and the task description of a run directory.

    ``run_dir`` is one run (``<out>/<kind>/seed<N>``) or a kind's directory, which stands for
    its lowest seed.

    Every file of the run directory is checked before it is used: ``run.json`` must describe
    an lm or image run, ``config.json`` must be a valid language-model config whose sizes
    match the weights actually stored (so a tampered config cannot allocate terabytes), and
    the checkpoint must pass its manifest. Any problem is a one-line error.
    """
    root = resolve_run_dir(run_dir)
    task_path = root / TASK_FILE
    if not task_path.is_file():
        raise UsageError(
            f"{root} is not a run directory of `sparse-sinkhorn lm` or `image` (no "
            f"{TASK_FILE}); pass --run <out>/<kind>[/seed<N>], e.g. runs/lm-char/sinkhorn"
        )
    task = _read_task(task_path)
    try:
        ckpt = resolve_checkpoint(root)
        config = config_from_dict(read_config(ckpt / "config.json")["model_config"])
    except (CheckpointError, FileNotFoundError) as err:
        raise UsageError(f"{root}: no usable checkpoint ({err}); train it first") from None
    except (KeyError, TypeError, ValueError) as err:
        raise UsageError(f"{ckpt / 'config.json'}: invalid model config ({err})") from None
    if not isinstance(config, LanguageModelConfig):
        raise UsageError(f"{root} holds a {type(config).__name__}, not a language model")
    check_shapes_match(ckpt, lambda: LanguageModel(config))
    model = LanguageModel(config)
    load_model_weights(ckpt, model)
    if task["task"] == "image":
        _check_image_task(task, config, task_path)
    return model.eval(), task


def _read_task(path: Path) -> dict[str, Any]:
    try:
        task = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UsageError(f"{path}: unreadable ({err})") from None
    if not isinstance(task, dict) or task.get("task") not in ("lm", "image"):
        raise UsageError(f'{path}: not a run description (need "task": lm or image)')
    if task["task"] == "lm" and task.get("level", "char") not in ("char", "subword"):
        raise UsageError(f"{path}: level must be 'char' or 'subword'")
    return task


def _check_image_task(task: dict[str, Any], config: LanguageModelConfig, path: Path) -> None:
    shape, start = task.get("image_shape"), task.get("start_id")
    if not isinstance(shape, list) or not all(type(n) is int and n > 0 for n in shape):
        raise UsageError(f"{path}: image_shape must be 2 or 3 positive ints, got {shape}")
    if not 2 <= len(shape) <= 3:
        raise UsageError(f"{path}: image_shape must be 2 or 3 positive ints, got {shape}")
    pixels = 1
    for n in shape:
        pixels *= n
    att = config.attention
    if att.length_limit is not None and pixels > att.length_limit:
        raise UsageError(
            f"{path}: image_shape {shape} needs {pixels} positions but the model "
            f"takes at most {att.max_len}"
        )
    if type(start) is not int or not 0 <= start < config.vocab_size:
        raise UsageError(
            f"{path}: start_id must be a token id in [0, {config.vocab_size}), got {start}"
        )


def encode_prompt(tokenizer: Tokenizer, prompt: str, level: str) -> list[int]:
    """Prompt ids; characters outside a character vocabulary are an error, not ``[UNK]``."""
    if not prompt:
        raise UsageError("--prompt is empty; give at least one character")
    if level == "char":
        unknown = sorted({c for c in prompt if tokenizer.token_to_id(c) is None})
        if unknown:
            raise UsageError(
                f"the prompt has characters not in this model's vocabulary: "
                f"{''.join(unknown)!r}; use only characters seen in its training text"
            )
    return tokenizer.encode(prompt)


def timed_generate(
    model: LanguageModel,
    prompt: Tensor,
    tokens: int,
    *,
    sample_temperature: float,
    sample_top_k: int | None,
    seed: int,
    use_cache: bool,
) -> tuple[Tensor, float]:
    """``(sequences (B, P + tokens), seconds)``."""
    generator = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    out = model.generate(
        prompt,
        tokens,
        sample_temperature=sample_temperature,
        sample_top_k=sample_top_k,
        generator=generator,
        use_cache=use_cache,
    )
    return out, time.perf_counter() - t0


def _check_args(args: argparse.Namespace) -> None:
    if args.tokens is not None and args.tokens <= 0:
        raise UsageError(f"--tokens must be > 0, got {args.tokens}")
    temperature = args.sample_temperature
    if not math.isfinite(temperature) or temperature < 0:
        raise UsageError(
            f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature}"
        )
    if args.sample_top_k is not None and args.sample_top_k <= 0:
        raise UsageError(f"--top-k must be > 0, got {args.sample_top_k}")
    if args.samples <= 0:
        raise UsageError(f"--samples must be > 0, got {args.samples}")


def _fits(model: LanguageModel, length: int) -> None:
    att = model.config.attention
    if att.length_limit is not None and length > att.length_limit:
        raise UsageError(
            f"prompt + tokens = {length} > this model's attention.max_len={att.max_len}; "
            f"ask for at most {att.max_len} tokens in all"
        )


def generate_text(model: LanguageModel, task: dict[str, Any], args: argparse.Namespace) -> int:
    path = Path(args.run) / TOKENIZER_FILE
    if not path.is_file():
        raise UsageError(f"{path} is missing; the run's tokenizer is needed to decode")
    try:
        tokenizer = Tokenizer.load(path)
    except Exception as err:  # the tokenizers library raises its own exception types
        raise UsageError(f"{path}: unreadable tokenizer ({err})") from None
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UsageError(
            f"{path} has {tokenizer.vocab_size} tokens but the model only "
            f"{model.config.vocab_size}; the run directory was altered"
        )
    ids = encode_prompt(tokenizer, args.prompt, task.get("level", "char"))
    tokens = args.tokens or 200
    _fits(model, len(ids) + tokens)
    prompt = torch.tensor([ids], dtype=torch.long)  # (1, P)
    out, seconds = timed_generate(
        model,
        prompt,
        tokens,
        sample_temperature=args.sample_temperature,
        sample_top_k=args.sample_top_k,
        seed=args.seed,
        use_cache=not args.no_cache,
    )
    print(tokenizer.decode(out[0].tolist()))
    mode = "no cache" if args.no_cache else "cache"
    print(f"\n[{tokens} tokens in {seconds:.2f} s: {tokens / seconds:.1f} tokens/s, {mode}]")
    return 0


def generate_images(model: LanguageModel, task: dict[str, Any], args: argparse.Namespace) -> int:
    from .experiments.image import sample_images, save_grid

    shape = tuple(task["image_shape"])
    t0 = time.perf_counter()
    images = sample_images(
        model,
        args.samples,
        shape,
        start_id=int(task["start_id"]),
        sample_temperature=args.sample_temperature,
        sample_top_k=args.sample_top_k,
        seed=args.seed,
        use_cache=not args.no_cache,
    )
    seconds = time.perf_counter() - t0
    out = Path(args.out) if args.out else Path(args.run) / "samples.png"
    save_grid(images, out, f"samples ({task.get('dataset', 'images')})")
    tokens = args.samples * images[0].numel()
    mode = "no cache" if args.no_cache else "cache"
    print(f"{args.samples} images -> {out} ({tokens / seconds:.1f} tokens/s, {mode})")
    return 0


def run(args: argparse.Namespace) -> int:
    setup_logging()
    _check_args(args)
    args.run = str(resolve_run_dir(args.run))
    model, task = load_run(args.run)
    if task.get("task") == "image":
        return generate_images(model, task, args)
    return generate_text(model, task, args)


def add_subparser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="sample text (or images) from a trained lm/image run",
        description="Sample from a trained decoder with the exact incremental-decoding cache.",
    )
    parser.add_argument("--run", required=True, help="a run directory: <out>/<attention kind>")
    parser.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens (default: 200)")
    parser.add_argument(
        "--temperature",
        dest="sample_temperature",
        type=float,
        default=1.0,
        help="sampling temperature; 0 = greedy",
    )
    parser.add_argument(
        "--top-k",
        dest="sample_top_k",
        type=int,
        default=None,
        help="sample from the k most likely",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument(
        "--no-cache", action="store_true", help="recompute the whole prefix every step"
    )
    parser.add_argument("--samples", type=int, default=8, help="images to sample (image runs)")
    parser.add_argument("--out", default=None, help="image runs: PNG path for the samples")
    parser.set_defaults(func=run)
