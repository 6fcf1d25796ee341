"""Document classification and NLI with SortCut (the paper's Tables 6 and 7).

Small 2-layer encoders with randomly initialised embeddings compare dense attention
(Transformer), local attention, Sinkhorn attention and SortCut with budgets 2×8, 2×16 and
2×32 (``n_sortcut = 2`` blocks of 8/16/32 tokens). Accuracy is measured on the held-out
split; the table is printed beside the paper's rows, with ``results.json``, ``results.md``
and a plot of accuracy against attention memory (analytic score entries per head).

One process::

    sparse-sinkhorn classify --dataset imdb --data-dir /tmp/ssdata   # cpu preset, all kinds
    sparse-sinkhorn classify --dataset imdb --level char --attention sortcut-2x32
    sparse-sinkhorn nli --dataset snli --preset paper

Several processes (same flags)::

    torchrun --standalone --nproc_per_node=2 -m sparse_sinkhorn.cli nli --dataset snli

The tokenizer is trained on the training split and saved as ``tokenizer.json`` in the run
directory (and in each attention kind's directory beside its checkpoints).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ..data import Tokenizer
from ..errors import UsageError
from ..models import Classifier, ClassifierConfig
from ..nn import AttentionConfig
from ..train import cleanup_distributed, init_distributed
from ..train.helpers import rank0_call
from . import flags
from .classify_common import (
    DEV_SPLIT,
    EVAL_SPLIT,
    PAPER_ROWS,
    VARIANTS,
    Variant,
    attention_memory,
    build_tokenizer,
    collate_fn,
    evaluate,
    has_split,
    held_out,
    load_pairs,
    load_texts,
    make_loss_fn,
    pair_dataset,
    plot_accuracy_vs_memory,
    subsample,
    text_dataset,
)
from .driver import Plan, Run, check_runs, fit, grid_options, model_sizes, train_grid
from .presets import SCHEDULES, TaskPreset, classify_preset
from .results import TOKENIZER_FILE, format_table, report
from .stats import mean_and_std, mean_std_cell

logger = logging.getLogger(__name__)

# Tokenizer, training data, held-out datasets by split name (the main one first), classes, pair.
Data = tuple[Tokenizer, Dataset[Any], dict[str, Dataset[Any]], int, str]


# The flags that override preset fields (`flags.Override`).
OVERRIDES = {
    "steps": flags.STEPS,
    "max_tokens": flags.Override(
        "--max-tokens",
        "override the preset's tokens kept per text (per sentence for NLI)",
        former="--max-len",
    ),
    **{
        field: flags.Override(f"--{field.replace('_', '-')}", f"override the preset's {help_}")
        for field, help_ in {
            "block_size": "block size of sinkhorn/local",
            "batch_size": "batch size",
            "train_examples": "train on a seeded subsample of this many examples",
            "eval_examples": "score a seeded subsample of the held-out split",
            "d_model": "model width (d_ff = 2 * d_model)",
        }.items()
    },
}


def sequence_length(preset: TaskPreset, pair: str) -> int:
    """Longest encoder input: ``max_tokens``, or both sentences and two specials for concat."""
    return 2 * preset.max_tokens + 2 if pair == "concat" else preset.max_tokens


def model_config(
    preset: TaskPreset, variant: Variant, vocab_size: int, n_classes: int, pair: str, pad_id: int
) -> ClassifierConfig:
    block = variant.block(preset.block_size)
    shortest = (variant.n_sortcut or 1) * block  # SortCut pads shorter inputs to n * b
    max_len = max(sequence_length(preset, pair), shortest)
    attention = AttentionConfig(
        kind=variant.kind, block_size=block, max_len=max_len, n_sortcut=variant.n_sortcut
    )
    return ClassifierConfig(
        vocab_size=vocab_size,
        **model_sizes(preset),
        pad_id=pad_id,
        attention=attention,
        n_classes=n_classes,
        pooling="mean",
        pair=pair,
    )


def _prepare_tokenizer(
    out: Path, texts: list[str], level: str, preset: TaskPreset, args: argparse.Namespace
) -> None:
    """Train the tokenizer on the training texts and save it, unless ``--resume`` finds one."""
    path = out / TOKENIZER_FILE
    if path.is_file() and not args.overwrite:
        if not args.resume:
            raise FileExistsError(
                f"{out} already holds a run ({path}); pass --resume to continue it, "
                "--overwrite to start over, or another --out"
            )
        logger.info("tokenizer: %s (saved with the run)", path)
        return
    if args.resume:
        raise FileNotFoundError(f"--resume: {path} is missing; the run cannot be continued")
    build_tokenizer(texts, level, preset.max_vocab).save(path)


def _tokenizer(
    out: Path, texts: list[str], level: str, preset: TaskPreset, args: argparse.Namespace
) -> Tokenizer:
    """The run's tokenizer, always read back from ``out/tokenizer.json`` (rank 0 writes it)."""
    try:
        rank0_call(init_distributed(), lambda: _prepare_tokenizer(out, texts, level, preset, args))
    except (FileExistsError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None
    tok = Tokenizer.load(out / TOKENIZER_FILE)
    logger.info("tokenizer: %s, %d entries", out / TOKENIZER_FILE, tok.vocab_size)
    return tok


def _datasets(args: argparse.Namespace, preset: TaskPreset, out: Path) -> Data:
    """Tokenizer, training data, held-out datasets by split (the main held-out split first),
    classes, and the pair encoding."""
    split = EVAL_SPLIT[args.dataset]
    if args.task == "nli":
        train_pairs = load_pairs(args.dataset, "train", args.data_dir)
        eval_pairs = load_pairs(args.dataset, split, args.data_dir)
        dev_split = DEV_SPLIT[args.dataset]
        train_ids = list(range(len(train_pairs)))
        if has_split(args.dataset, dev_split, args.data_dir):
            dev_pairs = load_pairs(args.dataset, dev_split, args.data_dir)
            dev_ids = list(range(len(dev_pairs)))
        else:  # no dev file (the registry copy of SNLI): hold out training pairs instead
            dev_pairs, (dev_ids, train_ids) = train_pairs, held_out(len(train_pairs))
            dev_split = f"{dev_split} (held out from train)"
        texts = [train_pairs.premises[i] for i in train_ids]
        texts += [train_pairs.hypotheses[i] for i in train_ids]
        tok = _tokenizer(out, texts, args.level, preset, args)
        keep_tr = [
            train_ids[i] for i in subsample(len(train_ids), preset.train_examples, args.seed)
        ]
        keep_ev = subsample(len(eval_pairs), preset.eval_examples, args.seed + 1)
        keep_dev = [
            dev_ids[i] for i in subsample(len(dev_ids), preset.eval_examples, args.seed + 2)
        ]
        train_p = pair_dataset(tok, train_pairs, preset.max_tokens, keep_tr, args.pair)
        evals: dict[str, Dataset[Any]] = {
            split: pair_dataset(tok, eval_pairs, preset.max_tokens, keep_ev, args.pair),
            dev_split: pair_dataset(tok, dev_pairs, preset.max_tokens, keep_dev, args.pair),
        }
        return tok, train_p, evals, 3, args.pair
    train_texts = load_texts(args.dataset, "train", args.data_dir)
    eval_texts = load_texts(args.dataset, split, args.data_dir)
    if not len(train_texts) or not len(eval_texts):
        raise UsageError(
            f"{args.dataset}: empty split ({len(train_texts)} training, "
            f"{len(eval_texts)} {split} examples)"
        )
    tok = _tokenizer(out, train_texts.texts, args.level, preset, args)
    keep_tr = subsample(len(train_texts), preset.train_examples, args.seed)
    keep_ev = subsample(len(eval_texts), preset.eval_examples, args.seed + 1)
    n_classes = max(max(train_texts.labels), max(eval_texts.labels)) + 1
    train_ds = text_dataset(tok, train_texts, preset.max_tokens, keep_tr)
    eval_ds = text_dataset(tok, eval_texts, preset.max_tokens, keep_ev)
    return tok, train_ds, {split: eval_ds}, max(n_classes, 2), "none"


def run_variant(variant: Variant, preset: TaskPreset, data: Data, run: Run) -> dict[str, Any]:
    """Train one attention variant as ``run``; score it on the held-out splits (a runner of
    `train_grid`)."""
    tok, train_ds, evals, n_classes, pair = data
    config = model_config(preset, variant, tok.vocab_size, n_classes, pair, tok.pad_id)
    model = Classifier(config)
    info = init_distributed()
    if info.is_main:
        run.dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run.out / TOKENIZER_FILE, run.dir / TOKENIZER_FILE)
    loss_fn, batches = make_loss_fn(pair), collate_fn(pair, tok.pad_id)
    plan = Plan(model, config.to_dict(), train_ds, loss_fn, collate_fn=batches)
    fitted = fit(run, plan, preset, SCHEDULES["classify"])
    by_split = {name: {"accuracy": float("nan"), "examples": 0.0} for name in evals}
    if info.is_main:  # the other ranks' results are not reported
        by_split = {
            name: evaluate(model, ds, pair, tok.pad_id, preset.eval_batch)
            for name, ds in evals.items()
        }
    scores = next(iter(by_split.values()))  # the main held-out split
    block = variant.block(preset.block_size)
    return {
        "attention": variant.name,
        "label": variant.label,
        "seed": run.seed,
        "accuracy": scores["accuracy"],
        "eval_examples": int(scores["examples"]),
        "accuracy_by_split": {name: sc["accuracy"] for name, sc in by_split.items()},
        "examples_by_split": {name: int(sc["examples"]) for name, sc in by_split.items()},
        "train_loss": fitted.train_loss,
        "train_acc": fitted.result.metrics.get("acc"),
        "train_seconds": round(fitted.seconds, 1),
        "block_size": block,
        "n_sortcut": variant.n_sortcut,
        "memory": attention_memory(variant, sequence_length(preset, pair), block),
        "parameters": fitted.params,
        "config": config.to_dict(),
    }


def summarize_variant(
    name: str, runs: Sequence[dict[str, Any]], seeds: Sequence[int]
) -> dict[str, Any]:
    """One variant's runs over the seeds: the first run's record, with accuracies replaced by
    their mean over the seeds (standard deviations beside them) and every run under ``runs``."""
    mean, std = mean_and_std([r["accuracy_by_split"] for r in runs])
    main_split = next(iter(mean))
    return {
        **runs[0],
        "seed": None if len(runs) > 1 else runs[0]["seed"],
        "accuracy": mean[main_split],
        "accuracy_std": std[main_split],
        "accuracy_by_split": mean,
        "accuracy_by_split_std": std,
        "train_seconds": round(sum(r["train_seconds"] for r in runs), 1),
        "runs": [
            {k: r[k] for k in ("seed", "accuracy_by_split", "train_loss", "train_seconds")}
            for r in runs
        ],
    }


def results_table(
    results: list[dict[str, Any]], paper: dict[str, float], preset: TaskPreset, pair: str
) -> str:
    length = sequence_length(preset, pair)
    splits = list(results[0].get("accuracy_by_split", {}))  # the main split first

    def acc(r: dict[str, Any], split: str) -> str:
        n = len(r.get("runs", [None]))
        mean, std = r.get("accuracy_by_split", {}), r.get("accuracy_by_split_std", {})
        return mean_std_cell(mean.get(split), std.get(split), 2, n)

    rows = [
        [
            r["label"],
            r["block_size"] if r["attention"] not in ("dense",) else None,
            *(acc(r, k) for k in splits),
            r["memory"],
            r["train_seconds"],
            paper.get(r["attention"]),
        ]
        for r in results
    ]
    headers = [
        "attention",
        "block b",
        *(f"{k} accuracy %" for k in splits),
        f"score entries/head @L={length}",
        "train s",
        "paper accuracy %",
    ]
    return format_table(headers, rows)


def _apply_overrides(preset: TaskPreset, args: argparse.Namespace) -> TaskPreset:
    """``preset`` with the override flags applied (``--d-model`` also sets ``d_ff``)."""
    changes: dict[str, Any] = dict(flags.positive_overrides(args, OVERRIDES))
    if "d_model" in changes:
        changes["d_ff"] = 2 * changes["d_model"]
        if changes["d_model"] % preset.n_heads:
            raise UsageError(
                f"--d-model {changes['d_model']} is not divisible by n_heads={preset.n_heads}"
            )
    return replace(preset, **changes)


def _previous_results(out: Path) -> list[dict[str, Any]]:
    path = out / "results.json"
    if not path.is_file():
        return []
    return list(json.loads(path.read_text()).get("results", []))


def run(args: argparse.Namespace) -> int:
    preset = _apply_overrides(classify_preset(args.dataset, args.level, args.preset), args)
    out_dir = args.out.replace("DATASET-LEVEL", f"{args.dataset}-{args.level}")
    options = grid_options(args, out_dir)
    out = options.out
    names = flags.parse_kinds(args.attention, tuple(VARIANTS))
    variants = [VARIANTS[n] for n in names]
    dist = init_distributed()
    seeds = flags.seed_list(args)
    check_runs(names, seeds, options)  # before the data and tokenizer are built
    out.mkdir(parents=True, exist_ok=True)
    data = _datasets(args, preset, out)
    logger.info(
        "%s %s (%s): %d training / %d held-out examples, vocabulary %d",
        args.dataset,
        args.level,
        EVAL_SPLIT[args.dataset],
        len(data[1]),  # type: ignore[arg-type]
        len(next(iter(data[2].values()))),  # type: ignore[arg-type]
        data[0].vocab_size,
    )
    results = train_grid(
        {v.name: partial(run_variant, v, preset, data) for v in variants},
        seeds,
        options,
        summarize=summarize_variant,
    )
    cleanup_distributed()  # every rank, on success
    if dist.rank != 0:
        return 0
    if args.resume or args.overwrite:  # keep the earlier run's kinds that were not rerun now
        rerun = {r["attention"] for r in results}
        results = [r for r in _previous_results(out) if r["attention"] not in rerun] + results
        results.sort(key=lambda r: list(VARIANTS).index(r["attention"]))
    _report(args, preset, out, results, data[4], len(seeds))
    return 0


def _report(
    args: argparse.Namespace,
    preset: TaskPreset,
    out: Path,
    results: list[dict[str, Any]],
    pair: str,
    n_seeds: int,
) -> None:
    """Print the table, draw accuracy against memory, write the results."""
    paper = PAPER_ROWS.get((args.dataset, args.level), {})
    split = EVAL_SPLIT[args.dataset]
    title = (
        f"{args.dataset} ({args.level} level), accuracy on {split} "
        f"({results[-1]['eval_examples']} examples), preset {args.preset}, "
        f"mean over {n_seeds} seed(s)"
    )
    plot = plot_accuracy_vs_memory(results, out / "accuracy_vs_memory.png", title)
    payload = {
        "experiment": args.task,
        "dataset": args.dataset,
        "level": args.level,
        "eval_split": split,
        "pair_encoding": pair,
        "preset": args.preset,
        "settings": asdict(preset),
        "tokenizer": str(out / TOKENIZER_FILE),
        "memory_note": "analytic score entries per head and layer at L = the encoder's longest "
        "input: dense L^2, "
        "local L*b, sinkhorn L*2b + N^2, sortcut L*n*b + N^2 (N = L/b)",
        "results": results,
        "paper": paper,
        "plot": str(plot),
    }
    note = None
    if not paper:
        note = "(no paper rows recovered for this dataset/level; the paper reports SST, not MR)"
    table = results_table(results, paper, preset, pair)
    report(out, title, table, payload, [("plot", plot)], note=note)
