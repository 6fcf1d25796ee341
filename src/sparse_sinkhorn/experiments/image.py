"""Pixel-wise image generation (the paper's Table 5): ``sparse-sinkhorn image``.

Images become sequences of 256-level (sub-)pixel tokens in raster order (channels of a pixel
interleaved, R G B R G B ...), preceded by a start token; a decoder-only model predicts each
sub-pixel from the ones before it. The metric is bits per dimension on the test split:
``mean cross-entropy over every sub-pixel (nats, 256-way softmax over pixel values) / ln 2``.

    sparse-sinkhorn data fetch fashion-mnist
    sparse-sinkhorn image                                # Fashion-MNIST, cpu preset, all kinds
    sparse-sinkhorn image --dataset cifar10 --preset paper --attention sinkhorn

The paper's numbers are CIFAR-10 (3072 sub-pixels, b=256); CIFAR-10 cannot be fetched on
machines without the web, so the cpu preset runs Fashion-MNIST (784 pixels): a different
dataset, so only the ranking of the attention kinds is comparable. Each run saves a PNG grid
of samples (drawn with the incremental-decoding cache) above real test images.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..data import DatasetNotFoundError, ImageTokens, load_images
from ..errors import UsageError
from ..models import LanguageModel, LanguageModelConfig
from ..models.common import next_token_sampler
from ..nn import AttentionConfig
from ..train import init_distributed
from . import flags, routing_shape, variants
from .driver import Plan, Run, fit, grid_options, model_sizes, train_grid
from .lm import lm_loss, total_nll
from .plots import plot_loss_curves
from .presets import IMAGE_PRESETS, SCHEDULES, ImagePreset
from .ranking import Ranking
from .results import KIND_NAMES, TABLE_KINDS, TASK_FILE, format_table, report
from .stats import bits_per_unit, evenly_spaced, seeds_cell

logger = logging.getLogger(__name__)

DATASETS = ("fashion-mnist", "mnist", "cifar10")
KINDS = TABLE_KINDS
NAMES = (*KINDS, *variants.PAPER_VARIANTS)  # what --attention takes
RANKING = Ranking("test/bits_per_dim", higher_is_better=False)
N_LEVELS = 256  # pixel values 0..255 are the token ids
START_ID = 256  # begins every image
PAD_ID = 257  # never occurs (kept out of the pixel ids so that value 0 trains normally)
# Paper Table 5: CIFAR-10 bits/dim.
PAPER_ROWS: dict[str, float | None] = {
    "dense": 3.198,
    "local": None,
    "sparse": 3.227,
    "sinkhorn": 3.197,
    "mixture": 3.199,
}


PRESETS = IMAGE_PRESETS
# The flags that override preset fields (`flags.Override`).
OVERRIDES = {
    "steps": flags.STEPS,
    "block_size": flags.BLOCK_SIZE,
    "batch_size": flags.BATCH_SIZE,
    "eval_images": flags.Override("--eval-images", "test images scored"),
    "n_samples": flags.Override("--samples", "images sampled for the PNG"),
}


class PixelSequences(Dataset[tuple[Tensor, Tensor]]):
    """``(inputs, targets)``: ``[start, x_0 .. x_{D-2}]`` and ``[x_0 .. x_{D-1}]``, ``(D,)``."""

    def __init__(self, images: ImageTokens) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        pixels = self.images[index]  # (D,)
        inputs = torch.cat([torch.tensor([START_ID]), pixels[:-1]])
        return inputs, pixels


def pixel_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Mean cross-entropy over sub-pixels, 256-way (the start/pad ids are not pixel values)."""
    return lm_loss(model, batch, outputs=N_LEVELS)


def pixel_nll(
    model: nn.Module, data: Dataset[tuple[Tensor, Tensor]], batch_size: int
) -> tuple[float, int]:
    """``(sum of sub-pixel cross-entropies in nats, number of sub-pixels)``."""
    return total_nll(model, data, batch_size, outputs=N_LEVELS)


@torch.no_grad()
def sample_images(
    model: LanguageModel,
    n: int,
    shape: tuple[int, ...],
    *,
    start_id: int = START_ID,
    sample_temperature: float = 1.0,
    sample_top_k: int | None = None,
    seed: int = 0,
    use_cache: bool = True,
    **former: Any,
) -> Tensor:
    """``n`` images ``(n, *shape)`` uint8, sampled pixel by pixel (only values 0..255);
    ``temperature=``, ``top_k=``: the former names of the sampling arguments."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    pick = next_token_sampler(sample_temperature, sample_top_k, generator, former, "sample_images")
    model.eval()
    dims = int(np.prod(shape))
    out = torch.full((n, 1), start_id, dtype=torch.long, device=device)  # (n, 1)
    cache = model.new_cache() if use_cache else None
    step = out
    for _ in range(dims):
        logits = model(step if use_cache else out, cache=cache)[:, -1, :N_LEVELS]  # (n, 256)
        nxt = pick(logits)  # (n,)
        out = torch.cat([out, nxt[:, None]], dim=1)
        step = nxt[:, None]
    return out[:, 1:].reshape(n, *shape).to(torch.uint8).cpu()


def save_grid(samples: Tensor, path: Path, title: str, real: Tensor | None = None) -> Path:
    """Samples on the top row(s), real images (if given) below; one PNG."""
    from matplotlib.figure import Figure

    rows = [("sample", samples)] + ([("real", real)] if real is not None else [])
    cols = max(len(r[1]) for r in rows)
    fig = Figure(figsize=(1.2 * cols, 1.35 * len(rows) + 0.4))
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(images):
                img = images[c].numpy()
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
        axes[r, 0].set_title(label, fontsize=8, loc="left")
    fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def results_table(results: list[dict[str, Any]]) -> str:
    shape = routing_shape.has_shape(results)
    rows = [
        [
            KIND_NAMES[r["kind"]],
            seeds_cell(r, "test/bits_per_dim", 3),
            PAPER_ROWS.get(r["kind"]),
            r["params"],
            round(r["train_seconds"]),
            *(routing_shape.cells(r) if shape else ()),
        ]
        for r in results
    ]
    headers = [
        "attention",
        "test bits/dim ↓ (this dataset)",
        "paper CIFAR-10 bits/dim (T5)",
        "params",
        "train s",
        *(routing_shape.HEADERS if shape else ()),
    ]
    return format_table(headers, rows)


def block_size_for(preset: ImagePreset, shape: tuple[int, ...]) -> int:
    """The preset's block size, or two image rows of sub-pixels."""
    if preset.block_size is not None:
        return preset.block_size
    row = int(np.prod(shape[1:]))  # sub-pixels per image row
    return 2 * row


def model_config(preset: ImagePreset, name: str, dims: int, block: int) -> LanguageModelConfig:
    """The pixel model for one attention kind or named variant (`variants.VARIANTS`)."""
    return LanguageModelConfig(
        vocab_size=N_LEVELS + 2,  # 256 pixel values, start, pad
        **model_sizes(preset),
        pad_id=PAD_ID,
        attention=AttentionConfig(block_size=block, max_len=dims, **variants.fields(name)),
    )


def load_split(name: str, split: str, data_dir: str | None) -> ImageTokens:
    try:
        images, labels = load_images(name, split, data_dir)
    except DatasetNotFoundError as err:
        raise UsageError(str(err)) from None
    return ImageTokens(images, labels)


def run_kind(
    kind: str,
    dataset: str,
    preset: ImagePreset,
    train_set: ImageTokens,
    test_set: ImageTokens,
    run: Run,
) -> dict[str, Any]:
    """Train one attention kind as ``run``, then sample a grid of images from it (a runner
    of `train_grid`)."""
    shape = train_set.image_shape
    dims = train_set.seq_len
    block = block_size_for(preset, shape)
    run.dir.mkdir(parents=True, exist_ok=True)
    task = {"task": "image", "dataset": dataset, "image_shape": list(shape)}
    (run.dir / TASK_FILE).write_text(json.dumps({**task, "start_id": START_ID}, indent=2) + "\n")
    config = model_config(preset, kind, dims, block)
    model = LanguageModel(config)
    evals = evenly_spaced(PixelSequences(test_set), preset.eval_images)

    def eval_fn(m: nn.Module) -> dict[str, float]:
        with routing_shape.RoutingShape(m) as shape:
            nats, count = pixel_nll(m, evals, preset.eval_batch)
        return {"test/bits_per_dim": bits_per_unit(nats, count), **shape.metrics()}

    plan = Plan(model, config.to_dict(), PixelSequences(train_set), pixel_loss, eval_fn)
    fitted = fit(run, plan, preset, SCHEDULES["image"])
    t1 = time.perf_counter()
    # a non-causal decoder (sinkhorn-leaky) samples without the decoding cache, which refuses
    # it: each pixel from a forward over the pixels before it
    use_cache = variants.decodes_causally(config.attention)
    samples = sample_images(model, preset.n_samples, shape, seed=run.seed, use_cache=use_cache)
    sample_seconds = time.perf_counter() - t1
    real = torch.stack([test_set.pixels[i] for i in range(preset.n_samples)]).reshape(-1, *shape)
    title = f"{dataset}, {KIND_NAMES[kind]}: samples / real"
    grid = save_grid(samples, run.dir / "samples.png", title, real)
    return {
        **fitted.record(kind=kind, block_size=block),
        "sample_tokens_per_s": preset.n_samples * dims / sample_seconds,
        "samples_png": str(grid),
    }


def run(args: argparse.Namespace) -> int:
    if args.dataset not in DATASETS:
        raise UsageError(f"unknown --dataset {args.dataset!r}; choose from {', '.join(DATASETS)}")
    preset = replace(PRESETS[args.preset], **flags.positive_overrides(args, OVERRIDES))
    options = grid_options(args, args.out or f"runs/image-{args.dataset}")
    kinds = flags.parse_kinds(args.attention, NAMES, KINDS)
    train_set = load_split(args.dataset, "train", args.data_dir)
    test_set = load_split(args.dataset, "test", args.data_dir)
    if args.train_images is not None:
        train_set = ImageTokens(
            train_set.pixels[: args.train_images].reshape(-1, *train_set.image_shape).numpy()
        )
    dist = init_distributed()
    seeds = flags.seed_list(args)
    results = train_grid(
        {
            kind: partial(run_kind, kind, args.dataset, preset, train_set, test_set)
            for kind in kinds
        },
        seeds,
        options,
    )
    if dist.rank != 0:
        return 0
    n_eval = min(len(test_set), preset.eval_images)
    title = (
        f"Pixel-wise generation on {args.dataset} {train_set.image_shape} "
        f"({train_set.seq_len} sub-pixel tokens, bits/dim on {n_eval} "
        f"test images; preset {args.preset}, {preset.steps} steps, mean over {len(seeds)} "
        "seed(s)). NOTE: the paper's column is "
        "CIFAR-10, a different dataset: compare the ranking, not the values."
    )
    curves = plot_loss_curves(results, options.out / "loss_curves.png", f"{args.dataset} pixels")
    payload = {
        "experiment": f"image-{args.dataset}",
        "preset": args.preset,
        "dataset": args.dataset,
        "image_shape": list(train_set.image_shape),
        "settings": asdict(preset),
        "metric": "bits/dim: mean 256-way cross-entropy per sub-pixel / ln 2, test split",
        "results": results,
        "loss_curves_png": str(curves),
        "paper": {"cifar10_bits_per_dim": PAPER_ROWS},
        "ranking": RANKING.to_dict(),
    }
    files = [("loss curves", curves), *(("samples", r["samples_png"]) for r in results)]
    note = variants.not_causal_note(kinds)
    report(options.out, title, results_table(results), payload, files, note=note)
    return 0
