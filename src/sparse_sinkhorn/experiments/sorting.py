"""Seq2seq sorting (the paper's Table 1): ``sparse-sinkhorn sort``.

An encoder-decoder reads a random sequence of symbols and writes it sorted. Models train at
length L and are evaluated by greedy decoding at L and at 2L (length generalisation), on
normalised edit distance (lower is better) and exact match (% of perfect outputs).

One process::

    sparse-sinkhorn sort                      # cpu preset, all four attention kinds
    sparse-sinkhorn sort --attention sinkhorn --preset paper

Several processes (same flags)::

    torchrun --standalone --nproc_per_node=2 -m sparse_sinkhorn.cli sort --attention dense
"""

from __future__ import annotations

import argparse
import itertools
import logging
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.sorting import BOS_ID, PAD_ID, SortingDataset, sorting_batch
from ..models import Seq2Seq, Seq2SeqConfig
from ..nn import AttentionConfig, TransformerEncoderLayer
from ..train import TrainConfig, cleanup_distributed, init_distributed, train
from ..train.distributed import barrier
from ..train.seq_metrics import sequence_metrics
from .common import (
    add_common_args,
    format_table,
    parse_kinds,
    plot_sort_matrices,
    positive_overrides,
    prepare_run_dir,
    setup_logging,
    write_results,
)

logger = logging.getLogger(__name__)

KINDS = ("sinkhorn", "dense", "local", "sparse", "mixture")
DEFAULT_KINDS = ("sinkhorn", "dense", "local", "sparse")

# The paper's Table 1 (train at 256, evaluate at 512): edit distance, exact match %.
PAPER_ROWS = {
    "dense": ("Transformer", 0.4252, 45.69),
    "local": ("Local Attention", 0.4340, 21.12),
    "sparse": ("Sparse Transformer", 0.4176, 46.88),
    "sinkhorn": ("Sinkhorn (b=32)", 0.4054, 49.24),
}


@dataclass(frozen=True)
class SortPreset:
    length: int  # training length L (evaluated at L and 2L)
    n_symbols: int  # alphabet size
    block_size: int  # attention block size b
    d_model: int
    n_heads: int
    n_layers: int  # encoder and decoder layers each
    d_ff: int
    dropout: float
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    n_eval: int  # evaluation examples per length
    eval_batch: int
    n_seeds: int  # training runs per kind (different seeds); the table shows mean ± std


PRESETS = {
    # Minutes on a 2-core CPU for all four kinds.
    "cpu": SortPreset(
        length=32,
        n_symbols=8,
        block_size=8,
        d_model=64,
        n_heads=4,
        n_layers=2,
        d_ff=128,
        dropout=0.0,
        steps=500,
        batch_size=32,
        lr=2e-3,
        warmup_steps=50,
        n_eval=500,
        eval_batch=250,
        n_seeds=3,
    ),
    # The paper's setting: length 256 -> 512, b = 32, Transformer-base-sized model.
    "paper": SortPreset(
        length=256,
        n_symbols=64,
        block_size=32,
        d_model=512,
        n_heads=8,
        n_layers=6,
        d_ff=2048,
        dropout=0.1,
        steps=50_000,
        batch_size=64,
        lr=5e-4,
        warmup_steps=4_000,
        n_eval=1_000,
        eval_batch=50,
        n_seeds=1,
    ),
}


def model_config(preset: SortPreset, kind: str) -> Seq2SeqConfig:
    attention = AttentionConfig(kind=kind, block_size=preset.block_size, max_len=2 * preset.length)
    return Seq2SeqConfig(
        vocab_size=SortingDataset(1, 1, preset.n_symbols).vocab_size,
        d_model=preset.d_model,
        n_heads=preset.n_heads,
        n_layers=preset.n_layers,
        n_decoder_layers=preset.n_layers,
        d_ff=preset.d_ff,
        dropout=preset.dropout,
        pad_id=PAD_ID,
        bos_id=BOS_ID,
        attention=attention,
    )


def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Teacher-forced cross-entropy of the sorted target."""
    src, tgt = batch
    tgt_in = torch.cat([torch.full_like(tgt[:, :1], BOS_ID), tgt[:, :-1]], dim=1)
    logits = model(src, tgt_in)  # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten())
    return loss, {"tokens": float(tgt.numel())}


@torch.no_grad()
def evaluate(model: Seq2Seq, dataset: SortingDataset, batch_size: int) -> dict[str, float]:
    """Greedy decoding of every example; edit distance and exact match."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds: list[list[int]] = []
    targets: list[list[int]] = []
    for start in range(0, len(dataset), batch_size):
        src, tgt = sorting_batch(dataset, range(start, min(start + batch_size, len(dataset))))
        out = model.generate(src.to(device), dataset.length)
        preds += out.tolist()
        targets += tgt.tolist()
    model.train(was_training)
    return sequence_metrics(preds, targets)


def run_kind(kind: str, preset: SortPreset, args: argparse.Namespace) -> dict[str, Any]:
    """Train one attention kind once per seed; mean and standard deviation of each metric."""
    runs = [run_seed(kind, preset, args, seed) for seed in seeds_of(preset, args)]
    metrics = runs[0]["eval"].keys()
    stats = {
        k: (
            statistics.fmean(r["eval"][k] for r in runs),
            statistics.stdev(r["eval"][k] for r in runs) if len(runs) > 1 else 0.0,
        )
        for k in metrics
    }
    return {
        "kind": kind,
        "eval": {k: mean for k, (mean, _) in stats.items()},
        "eval_std": {k: std for k, (_, std) in stats.items()},
        "runs": runs,
        "sort_matrix_png": runs[0]["sort_matrix_png"],
        "config": model_config(preset, kind).to_dict(),
    }


def seeds_of(preset: SortPreset, args: argparse.Namespace) -> list[int]:
    return [args.seed + i for i in range(preset.n_seeds)]


def run_dir(out: str, kind: str, seed: int) -> Path:
    return Path(out) / kind / f"seed{seed}"


def run_seed(kind: str, preset: SortPreset, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Train one attention kind with one seed and evaluate it at L and 2L."""
    torch.manual_seed(seed)
    config = model_config(preset, kind)
    model = Seq2Seq(config)
    train_data = SortingDataset(
        preset.steps * preset.batch_size, preset.length, preset.n_symbols, seed=seed * 10 + 1
    )
    evals = {  # the same evaluation sets for every seed
        f"L={n}": SortingDataset(preset.n_eval, n, preset.n_symbols, seed=args.seed * 10 + 2)
        for n in (preset.length, 2 * preset.length)
    }

    def eval_fn(m: nn.Module) -> dict[str, float]:
        assert isinstance(m, Seq2Seq)
        return {
            f"{name}/{k}": v
            for name, data in evals.items()
            for k, v in evaluate(m, data, preset.eval_batch).items()
        }

    train_cfg = TrainConfig(
        steps=preset.steps,
        batch_size=preset.batch_size,
        lr=preset.lr,
        warmup_steps=preset.warmup_steps,
        seed=seed,
        log_every=25,
        ckpt_every=max(1, preset.steps // 4),
        progress=not args.no_progress,
    )
    result = train(
        model,
        train_data,
        loss_fn,
        train_cfg,
        out_dir=run_dir(args.out, kind, seed),
        eval_fn=eval_fn,
        resume=args.resume,
        model_config=config.to_dict(),
    )
    plan_png = None
    if kind in ("sinkhorn", "mixture") and seed == args.seed:
        plan_png = save_sort_matrix(model, evals[f"L={preset.length}"], Path(args.out), kind)
    return {
        "seed": seed,
        "train_loss": result.metrics.get("loss"),
        "eval": {k.removeprefix("eval/"): v for k, v in result.eval_metrics.items()},
        "sort_matrix_png": plan_png,
    }


@torch.no_grad()
def save_sort_matrix(model: Seq2Seq, data: SortingDataset, out: Path, kind: str) -> str:
    """Heat map of the first encoder layer's learned sort matrices on one example."""
    model.eval()
    src, _ = sorting_batch(data, [0])
    src = src.to(next(model.parameters()).device)
    layer = model.encoder.layers[0]
    assert isinstance(layer, TransformerEncoderLayer)
    x = layer.norm1(model.embed(src))
    _, plan = layer.attn(x, src != PAD_ID, return_plan=True)
    assert plan is not None
    path = out / f"sort_matrix_{kind}.png"
    plot_sort_matrices(plan.P[0], path, f"{kind}: encoder layer 0 sort matrix P (eval)")
    return str(path)


def results_table(results: list[dict[str, Any]], preset: SortPreset) -> str:
    """Mean (± standard deviation over seeds, when there are several) beside the paper."""
    n1, n2 = preset.length, 2 * preset.length

    def cell(r: dict[str, Any], key: str, digits: int) -> str:
        mean, std = r["eval"][key], r["eval_std"][key]
        return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if preset.n_seeds > 1 else "")

    rows: list[list[Any]] = []
    for r in results:
        paper = PAPER_ROWS.get(r["kind"])
        rows.append(
            [
                r["kind"],
                cell(r, f"L={n1}/edit_distance", 4),
                cell(r, f"L={n1}/exact_match", 1),
                cell(r, f"L={n2}/edit_distance", 4),
                cell(r, f"L={n2}/exact_match", 1),
                paper[1] if paper else None,
                paper[2] if paper else None,
            ]
        )
    headers = [
        "attention",
        f"edit dist. @{n1} ↓",
        f"exact % @{n1} ↑",
        f"edit dist. @{n2} ↓",
        f"exact % @{n2} ↑",
        "paper edit dist. (256→512)",
        "paper exact %",
    ]
    return format_table(headers, rows)


def run(args: argparse.Namespace) -> int:
    setup_logging()
    preset = PRESETS[args.preset]
    changes = positive_overrides(
        args,
        {
            "steps": "steps",
            "length": "length",
            "block_size": "block_size",
            "n_seeds": "seeds",
            "n_eval": "n_eval",
        },
    )
    if "n_eval" in changes:
        changes["eval_batch"] = min(preset.eval_batch, changes["n_eval"])
    preset = replace(preset, **changes)
    kinds = parse_kinds(args.attention, KINDS, DEFAULT_KINDS)
    dist = init_distributed()
    for kind, seed in itertools.product(kinds, seeds_of(preset, args)):
        prepare_run_dir(
            run_dir(args.out, kind, seed),
            resume=args.resume,
            overwrite=args.overwrite,
            is_main=dist.rank == 0,
        )
    barrier()
    results = [run_kind(kind, preset, args) for kind in kinds]
    cleanup_distributed()  # every rank, on success (see its docstring)
    if dist.rank != 0:
        return 0
    table = results_table(results, preset)
    print(
        f"\nSorting, train length {preset.length}, evaluated at {preset.length} and "
        f"{2 * preset.length} ({preset.n_eval} examples each, greedy decoding; mean over "
        f"{preset.n_seeds} seed(s))\n"
    )
    print(table)
    payload = {
        "experiment": "sort",
        "preset": args.preset,
        "settings": asdict(preset),
        "results": results,
        "paper": {
            k: {"name": v[0], "edit_distance": v[1], "exact_match": v[2]}
            for k, v in PAPER_ROWS.items()
        },
    }
    path = write_results(Path(args.out), payload, table)
    print(f"\nresults: {path}")
    for r in results:
        if r["sort_matrix_png"]:
            print(f"sort matrix heat map: {r['sort_matrix_png']}")
    return 0


def add_subparser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sort",
        help="seq2seq sorting (paper Table 1)",
        description="Train encoder-decoders to sort random sequences; evaluate at L and 2L.",
    )
    parser.add_argument(
        "--attention",
        default="all",
        help=f"one of {', '.join(KINDS)}, a comma list, or 'all' "
        f"(= {', '.join(DEFAULT_KINDS)}; default)",
    )
    parser.add_argument("--length", type=int, default=None, help="override the training length")
    parser.add_argument("--block-size", type=int, default=None, help="override the block size")
    parser.add_argument("--n-eval", type=int, default=None, help="override eval examples")
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="train each kind with this many seeds (--seed, --seed+1, ...) and report mean ± std",
    )
    add_common_args(parser, default_out="runs/sort")
    parser.set_defaults(func=run)
