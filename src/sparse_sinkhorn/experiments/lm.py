"""Language modelling (the paper's Tables 2 and 4): ``sparse-sinkhorn lm``.

Decoder-only LMs with dense (Transformer), local, Sparse Transformer, Sinkhorn and Sinkhorn
Mixture attention, trained on a plain-text corpus at the character level (bits per
character) or on byte-level BPE subwords (perplexity per subword token)::

    sparse-sinkhorn data fetch shakespeare
    sparse-sinkhorn lm --level char                      # cpu preset, all five kinds
    sparse-sinkhorn lm --level subword --attention sinkhorn,dense
    sparse-sinkhorn lm --level char --corpus /data/lm1b --preset paper   # LM1B shards
    sparse-sinkhorn generate --run runs/lm-char/sinkhorn --prompt "ROMEO:"

Data: Shakespeare's plays from the data directory (split by play into train/valid/test by
the fetch step), or any plain-text corpus given with ``--corpus`` (see `load_corpus`).
The tokenizer (characters, or BPE with the preset's vocabulary) is trained on the training
split only and saved with each run as ``<out>/<kind>/seed<N>/tokenizer.json``; ``--resume`` and
``generate`` reuse that file. Evaluation: the held-out text is cut into non-overlapping
windows of the training length (each window starts without context), evenly spaced windows
up to the preset's ``eval_windows`` are scored, and every target token counts:
``bits/char = mean cross-entropy (nats) / ln 2`` and ``perplexity = exp(mean cross-entropy)``.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..data import DatasetNotFoundError, Tokenizer, TokenWindows, load_shakespeare
from ..data.corpus import Corpus, load_corpus
from ..data.tokenize import train_bpe, train_char_level
from ..errors import UsageError
from ..models import LanguageModel, LanguageModelConfig
from ..nn import AttentionConfig
from ..train import init_distributed
from ..train.helpers import rank0_call
from . import flags, routing_shape, variants
from .driver import Plan, Run, fit, grid_options, model_sizes, train_grid
from .plots import plot_loss_curves
from .presets import LM_PRESETS, SCHEDULES, LMPreset
from .ranking import Ranking
from .results import KIND_NAMES, TABLE_KINDS, TASK_FILE, TOKENIZER_FILE, format_table, report
from .stats import bits_per_unit, evenly_spaced, perplexity, seeds_cell

logger = logging.getLogger(__name__)

LEVELS = ("char", "subword")
KINDS = TABLE_KINDS
NAMES = (*KINDS, *variants.PAPER_VARIANTS)  # what --attention takes
# The headline of each level's table (lower is better).
RANKINGS = {
    "char": Ranking("test/bits_per_char", higher_is_better=False),
    "subword": Ranking("test/perplexity", higher_is_better=False),
}
# Paper Table 2 (LM1B subword perplexity; Base, Big) and Table 4 (LM1B bits/char, Big).
PAPER_SUBWORD: dict[str, tuple[float | None, float | None]] = {
    "dense": (41.57, 27.59),
    "local": (44.23, None),
    "sparse": (41.89, None),
    "sinkhorn": (40.79, 28.39),
    "mixture": (40.11, 27.34),
}
PAPER_CHAR: dict[str, float | None] = {
    "dense": 1.121,
    "local": None,
    "sparse": 1.134,
    "sinkhorn": 1.132,
    "mixture": 1.119,
}


PRESETS = LM_PRESETS
# The flags that override preset fields (`flags.Override`).
OVERRIDES = {
    "steps": flags.STEPS,
    "seq_len": flags.Override("--length", "override the window length"),
    "block_size": flags.BLOCK_SIZE,
    "batch_size": flags.BATCH_SIZE,
    "vocab_size": flags.Override("--vocab-size", "override the BPE vocab"),
    "eval_windows": flags.Override("--eval-windows", "override held-out windows per split"),
    "max_train_chars": flags.Override("--max-train-chars", "read at most this much training text"),
}


# ----------------------------------------------------------------------------- metrics
def lm_loss(
    model: nn.Module, batch: tuple[Tensor, Tensor], *, outputs: int | None = None
) -> tuple[Tensor, dict[str, float]]:
    """Next-token cross-entropy (mean over every target token of the batch), over the first
    ``outputs`` logits when given (pixel models score pixel values only)."""
    inputs, targets = batch
    logits = model(inputs)[..., :outputs]  # (B, L, V)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    return loss, {"tokens": float(targets.numel())}


@torch.no_grad()
def total_nll(
    model: nn.Module,
    data: Dataset[tuple[Tensor, Tensor]],
    batch_size: int,
    *,
    outputs: int | None = None,
) -> tuple[float, int]:
    """``(sum of next-token cross-entropies in nats, number of targets)`` over ``data``
    (over the first ``outputs`` logits when given)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    n = len(data)  # type: ignore[arg-type]
    for start in range(0, n, batch_size):
        items = [data[i] for i in range(start, min(start + batch_size, n))]
        inputs = torch.stack([x for x, _ in items]).to(device)  # (B, L)
        targets = torch.stack([y for _, y in items]).to(device)
        logits = model(inputs)[..., :outputs].float()  # (B, L, V)
        total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += targets.numel()
    model.train(was_training)
    return total, count


def load_text(corpus: str | None, data_dir: str | None, max_chars: int | None) -> Corpus:
    """The plain-text ``corpus`` (a file or directory), or else Shakespeare from ``data_dir``;
    at most ``max_chars`` of training text."""
    if corpus:
        return load_corpus(corpus, max_chars)
    try:
        splits = [load_shakespeare(s, data_dir) for s in ("train", "valid", "test")]
    except DatasetNotFoundError as err:
        raise UsageError(str(err)) from None
    train_text = splits[0] if max_chars is None else splits[0][:max_chars]
    return Corpus("shakespeare", train_text, splits[1], splits[2], "by play (the fetch step)")


def build_tokenizer(level: str, text: str, vocab_size: int) -> Tokenizer:
    """Characters of ``text``, or byte-level BPE with ``vocab_size`` entries trained on it."""
    if level == "char":
        return train_char_level(text)
    chunks = text.splitlines()  # BPE trains from an iterator of lines
    return train_bpe(chunks, vocab_size)


def encode(tokenizer: Tokenizer, text: str) -> Tensor:
    """The whole text as one 1-D id stream (encoded line by line, in parallel)."""
    lines = text.splitlines(keepends=True)
    ids = [i for line in tokenizer.encode_batch(lines) for i in line]
    return torch.tensor(ids, dtype=torch.long)


# ----------------------------------------------------------------------------- runs
def model_config(
    preset: LMPreset, name: str, vocab_size: int, **attention_options: Any
) -> LanguageModelConfig:
    """The LM for one attention kind or named variant (`variants.VARIANTS`);
    ``attention_options`` override AttentionConfig fields."""
    options = {**variants.fields(name), **attention_options}
    attention = AttentionConfig(
        block_size=preset.block_size, max_len=4 * preset.seq_len, **options
    )  # max_len > seq_len lets `generate` continue past the training length
    return LanguageModelConfig(
        vocab_size=vocab_size,
        **model_sizes(preset),
        pad_id=0,  # [PAD]: never in the token stream
        attention=attention,
    )


def run_tokenizer(
    run_dir: Path, level: str, corpus: Corpus, preset: LMPreset, resume: bool
) -> Tokenizer:
    """The run's tokenizer: reused from ``run_dir`` when resuming, else trained and saved.

    Rank 0 trains and writes it; every rank then reads the same file back.
    """
    path = run_dir / TOKENIZER_FILE
    if not (resume and path.is_file()):

        def build_and_save() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            build_tokenizer(level, corpus.train, preset.vocab_size).save(path)

        rank0_call(init_distributed(), build_and_save)  # also a barrier
    return Tokenizer.load(path)


def token_streams(
    tokenizer: Tokenizer, corpus: Corpus, streams: dict[str, tuple[Tensor, ...]]
) -> tuple[Tensor, ...]:
    """The train, valid and test text as id streams; ``streams`` keeps the last vocabulary's,
    so the text is encoded once per distinct vocabulary."""
    key = json.dumps(tokenizer.backend.get_vocab(), sort_keys=True)
    if key not in streams:
        streams.clear()
        streams[key] = tuple(
            encode(tokenizer, t) for t in (corpus.train, corpus.valid, corpus.test)
        )
    return streams[key]


def run_kind(
    kind: str,
    level: str,
    preset: LMPreset,
    corpus: Corpus,
    streams: dict[str, tuple[Tensor, ...]],
    run: Run,
    *,
    attention_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one attention kind as ``run``; valid/test metrics on held-out windows.

    ``attention_options`` override [`AttentionConfig`][sparse_sinkhorn.nn.AttentionConfig] fields
    (the SortNet ablation's variants). A runner of `train_grid`.
    """
    tokenizer = run_tokenizer(run.dir, level, corpus, preset, run.resume)
    train_ids, valid_ids, test_ids = token_streams(tokenizer, corpus, streams)
    (run.dir / TASK_FILE).write_text(
        json.dumps({"task": "lm", "level": level, "corpus": corpus.name}, indent=2) + "\n"
    )
    config = model_config(preset, kind, tokenizer.vocab_size, **(attention_options or {}))
    model = LanguageModel(config)
    train_data = TokenWindows(train_ids, preset.seq_len)
    evals = {
        name: evenly_spaced(_windows(ids, preset.seq_len, name), preset.eval_windows)
        for name, ids in (("valid", valid_ids), ("test", test_ids))
    }

    def eval_fn(m: nn.Module) -> dict[str, float]:
        out: dict[str, float] = {}
        shape = routing_shape.RoutingShape(m)
        for name, data in evals.items():
            with shape:
                nats, count = total_nll(m, data, preset.eval_batch)
            out[f"{name}/nll"] = nats / count
            if level == "char":
                out[f"{name}/bits_per_char"] = bits_per_unit(nats, count)
            else:
                out[f"{name}/perplexity"] = perplexity(nats, count)
        return {**out, **shape.metrics()}

    plan = Plan(model, config.to_dict(), train_data, lm_loss, eval_fn)
    fitted = fit(run, plan, preset, SCHEDULES["lm"])
    return {
        **fitted.record(kind=kind),
        "tokens_per_s": fitted.result.metrics.get("tokens_per_s"),
        "eval_tokens": {k: len(d) * preset.seq_len for k, d in evals.items()},
    }


def _windows(ids: Tensor, seq_len: int, split: str) -> TokenWindows:
    if ids.numel() < seq_len + 1:
        raise UsageError(
            f"the {split} split has {ids.numel()} tokens, fewer than one window of "
            f"{seq_len + 1}; use a larger corpus or a smaller preset"
        )
    return TokenWindows(ids, seq_len)


def results_table(results: list[dict[str, Any]], level: str) -> str:
    shape = routing_shape.has_shape(results)
    rows: list[list[Any]] = []
    for r in results:
        if level == "char":
            paper = PAPER_CHAR.get(r["kind"])
            rows.append(
                [
                    KIND_NAMES[r["kind"]],
                    seeds_cell(r, "valid/bits_per_char", 3),
                    seeds_cell(r, "test/bits_per_char", 3),
                    paper,
                    r["params"],
                    round(r["train_seconds"]),
                    *(routing_shape.cells(r) if shape else ()),
                ]
            )
        else:
            base, big = PAPER_SUBWORD.get(r["kind"], (None, None))
            rows.append(
                [
                    KIND_NAMES[r["kind"]],
                    seeds_cell(r, "valid/perplexity", 2),
                    seeds_cell(r, "test/perplexity", 2),
                    base,
                    big,
                    r["params"],
                    round(r["train_seconds"]),
                    *(routing_shape.cells(r) if shape else ()),
                ]
            )
    if level == "char":
        headers = [
            "attention",
            "valid bits/char ↓",
            "test bits/char ↓",
            "paper LM1B bits/char (Big, T4)",
            "params",
            "train s",
        ]
    else:
        headers = [
            "attention",
            "valid ppl ↓",
            "test ppl ↓",
            "paper LM1B ppl Base (T2)",
            "paper Big (T2)",
            "params",
            "train s",
        ]
    return format_table([*headers, *(routing_shape.HEADERS if shape else ())], rows)


def run(args: argparse.Namespace) -> int:
    if args.level not in LEVELS:
        raise UsageError(f"unknown --level {args.level!r}; choose char or subword")
    preset = PRESETS[(args.level, args.preset)]
    preset = replace(preset, **flags.positive_overrides(args, OVERRIDES))
    options = grid_options(args, args.out or f"runs/lm-{args.level}")
    kinds = flags.parse_kinds(args.attention, NAMES, KINDS)
    corpus = load_text(args.corpus, args.data_dir, preset.max_train_chars)
    logger.info(
        "corpus %s: %d train / %d valid / %d test chars",
        corpus.name,
        len(corpus.train),
        len(corpus.valid),
        len(corpus.test),
    )
    dist = init_distributed()
    streams: dict[str, tuple[Tensor, ...]] = {}
    seeds = flags.seed_list(args)
    results = train_grid(
        {kind: partial(run_kind, kind, args.level, preset, corpus, streams) for kind in kinds},
        seeds,
        options,
    )
    if dist.rank != 0:
        return 0
    metric = "bits/char" if args.level == "char" else "perplexity per subword token"
    title = (
        f"{args.level} LM on {corpus.name} ({metric}; preset {args.preset}, length "
        f"{preset.seq_len}, b={preset.block_size}, {preset.steps} steps, mean over {len(seeds)} "
        "seed(s)). The paper's columns "
        "are LM1B with far larger models and 300K steps: compare the ranking, not the values."
    )
    curves = plot_loss_curves(results, options.out / "loss_curves.png", f"{args.level} LM")
    chars = {"train": len(corpus.train), "valid": len(corpus.valid), "test": len(corpus.test)}
    payload = {
        "experiment": f"lm-{args.level}",
        "preset": args.preset,
        "corpus": {"name": corpus.name, "split": corpus.split, "chars": chars},
        "settings": asdict(preset),
        "metric": metric,
        "results": results,
        "loss_curves_png": str(curves),
        "paper": {"subword_ppl_base_big": PAPER_SUBWORD, "char_bits_per_char_big": PAPER_CHAR},
        "ranking": RANKINGS[args.level].to_dict(),
    }
    table = results_table(results, args.level)
    note = variants.not_causal_note(kinds)
    report(options.out, title, table, payload, [("loss curves", curves)], note=note)
    return 0
