"""Seq2seq sorting (the paper's Table 1): ``sparse-sinkhorn sort``.

The task and its metrics follow Tensor2Tensor's ``algorithmic_sort_problem``, which the paper
ran: training sequences have lengths uniform in ``[1, L]``, the dev set lengths uniform in
``[1, 2L]``, symbols come from an alphabet of ``2L`` (with replacement), and inputs and targets
end in EOS (see `sparse_sinkhorn.data.sorting`). An encoder-decoder reads the sequence and
writes it sorted. The headline is greedy decoding until EOS (at most ``2L + 1`` tokens), scored
by exact match and by Tensor2Tensor's edit distance (summed Levenshtein distances over summed
reference lengths, EOS included in both sequences); Tensor2Tensor's own eval metrics are
teacher-forced, so the teacher-forced figures are reported beside them. Each metric is also split
into dev sequences of length ``<= L`` (``dev_short``) and ``> L`` (``dev_long``).

One process::

    sparse-sinkhorn sort                      # cpu preset, all four attention kinds
    sparse-sinkhorn sort --attention sinkhorn --preset paper

Several processes (same flags)::

    torchrun --standalone --nproc_per_node=2 -m sparse_sinkhorn.cli sort --attention dense
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.sorting import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SortingDataset,
    collate_sorting,
    sorting_batch,
    strip_after_eos,
    vocab_size,
)
from ..models import Seq2Seq, Seq2SeqConfig
from ..nn import AttentionConfig, TransformerLayer
from ..nn import kinds as registry
from ..train import cleanup_distributed, init_distributed
from ..train.seq_metrics import sequence_metrics
from . import flags, routing_shape, variants
from .driver import Plan, Run, fit, grid_options, model_sizes, train_grid
from .plots import plot_sort_matrices
from .presets import SCHEDULES, SORT_PRESETS, SortPreset
from .ranking import Ranking
from .results import format_table, report
from .stats import mean_and_std, mean_std_cell

logger = logging.getLogger(__name__)

KINDS = ("sinkhorn", "dense", "local", "sparse", "mixture")
DEFAULT_KINDS = ("sinkhorn", "dense", "local", "sparse")
NAMES = (*KINDS, *variants.PAPER_VARIANTS)  # what --attention takes
PROTOCOL = "t2t"  # Tensor2Tensor's algorithmic_sort_problem (see the module docstring)
DEV_SEED = 20_200_713  # the dev set is the same for every kind, seed and --seed

# The paper's Table 1 (Tensor2Tensor's sort problem, train length 256, dev up to 512, b = 32):
# edit distance, exact match %.
PAPER_ROWS = {
    "dense": ("Transformer", 0.4252, 45.69),
    "local": ("Local Attention", 0.4340, 21.12),
    "sparse": ("Sparse Transformer", 0.4176, 46.88),
    "sinkhorn": ("Sinkhorn (b=32)", 0.4054, 49.24),
}
SPLITS = ("dev", "dev_short", "dev_long")  # all dev sequences, length <= L, length > L
RANKING = Ranking("dev/exact_match", higher_is_better=True)  # the headline: greedy exact match


PRESETS = SORT_PRESETS
# The flags that override preset fields (`flags.Override`).
OVERRIDES = {
    "steps": flags.STEPS,
    "length": flags.Override("--length", "override the training length L (dev lengths go to 2L)"),
    "block_size": flags.BLOCK_SIZE,
    "n_symbols": flags.Override(
        "--n-symbols", "override the alphabet size (default: the preset's, or 2 * --length)"
    ),
    "n_eval": flags.Override("--n-eval", "override the number of dev sequences"),
    "n_seeds": flags.SEEDS,
}


def with_overrides(
    base: SortPreset, changes: dict[str, int], *, eval_batch: int | None = None
) -> SortPreset:
    """``base`` with the flags' ``changes`` (`positive_overrides`) applied.

    A new ``length`` L also sets Tensor2Tensor's alphabet of ``2L`` symbols unless
    ``n_symbols`` is given; ``n_eval`` caps the eval batch (at ``eval_batch``, default the
    base's).
    """
    changes = dict(changes)
    if "length" in changes and "n_symbols" not in changes:
        changes["n_symbols"] = 2 * changes["length"]  # Tensor2Tensor's alphabet: 2L symbols
    if "n_eval" in changes:
        changes["eval_batch"] = min(eval_batch or base.eval_batch, changes["n_eval"])
    return replace(base, **changes)


def max_input_length(preset: SortPreset) -> int:
    """The longest source (2L symbols + EOS); decoding is capped at the same length."""
    return 2 * preset.length + 1


def model_config(preset: SortPreset, name: str, **attention_options: Any) -> Seq2SeqConfig:
    """The model for one attention kind or named variant (`variants.VARIANTS`; the variant's
    fields apply to every self-attention layer, encoder and decoder); ``attention_options``
    override AttentionConfig fields."""
    routing = {"temperature": preset.temperature, "n_iters": preset.n_iters}  # routed kinds
    named = variants.fields(name)
    options = {**registry.kind_fields(named["kind"], routing), **named, **attention_options}
    attention = AttentionConfig(
        block_size=preset.block_size, max_len=max_input_length(preset), **options
    )
    return Seq2SeqConfig(
        vocab_size=vocab_size(preset.n_symbols),
        **model_sizes(preset),
        n_decoder_layers=preset.n_layers,
        pad_id=PAD_ID,
        bos_id=BOS_ID,
        attention=attention,
    )


def make_loss_fn(
    length: int,
) -> Callable[[nn.Module, tuple[Tensor, Tensor]], tuple[Tensor, dict[str, float]]]:
    """Teacher-forced cross-entropy over the real target tokens (EOS included, padding not).

    The token sum is divided by a fixed count, ``examples * (length + 1)``, rather than by the
    batch's own token count, so any split of a global batch over ranks and micro-batches gives
    the same gradient as one process.
    """

    def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, float]]:
        src, tgt = batch  # (B, S), (B, T)
        tgt_in = torch.cat([torch.full_like(tgt[:, :1], BOS_ID), tgt[:, :-1]], dim=1)
        logits = model(src, tgt_in)  # (B, T, V)
        total = F.cross_entropy(
            logits.flatten(0, 1).float(), tgt.flatten(), ignore_index=PAD_ID, reduction="sum"
        )
        return total / (tgt.shape[0] * (length + 1)), {"tokens": float((tgt != PAD_ID).sum())}

    return loss_fn


def _split_metrics(
    preds: list[list[int]], targets: list[list[int]], lengths: list[int], length: int
) -> dict[str, float]:
    """``{split}/{metric}`` over all dev sequences and over those of length <= L and > L."""
    out: dict[str, float] = {}
    for split in SPLITS:
        keep = [
            i
            for i, n in enumerate(lengths)
            if split == "dev" or (n <= length) == (split == "dev_short")
        ]
        if not keep:
            continue
        metrics = sequence_metrics([preds[i] for i in keep], [targets[i] for i in keep])
        out.update({f"{split}/{k}": v for k, v in metrics.items()})
    return out


@torch.no_grad()
def evaluate(
    model: Seq2Seq, dataset: SortingDataset, batch_size: int, length: int
) -> dict[str, float]:
    """Greedy decoding until EOS, and teacher-forced argmax, over the whole dev set.

    Keys ``dev/exact_match``, ``dev_short/edit_distance`` ... (greedy) and the same with a
    ``_tf`` suffix on the split (``dev_tf/exact_match`` ...) for the teacher-forced figures;
    for a decoder that routes blocks, the shape of its causal routing in the teacher-forced
    pass (`routing_shape`). A decoder that is not causal (``sinkhorn-leaky``) decodes
    greedily without the incremental cache, which refuses it: each step recomputes the
    prefix, so a generated token never reads a later one.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    use_cache = variants.decodes_causally(model.config.attention)
    shape = routing_shape.RoutingShape(model.decoder)
    order = sorted(range(len(dataset)), key=dataset.length_of)  # batches of similar lengths
    greedy: dict[int, list[int]] = {}
    forced: dict[int, list[int]] = {}
    targets: dict[int, list[int]] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        src, tgt = (t.to(device) for t in sorting_batch(dataset, idx))  # (B, S), (B, T)
        out = model.generate(
            src, dataset.max_tokens, eos_id=EOS_ID, use_cache=use_cache
        )  # (B, <= 2L+1)
        tgt_in = torch.cat([torch.full_like(tgt[:, :1], BOS_ID), tgt[:, :-1]], dim=1)
        with shape:
            argmax = model(src, tgt_in).argmax(-1)  # (B, T)
        for row, i in enumerate(idx):
            real = tgt[row] != PAD_ID
            targets[i] = tgt[row][real].tolist()
            forced[i] = argmax[row][real].tolist()
            greedy[i] = strip_after_eos(out[row].tolist())
    model.train(was_training)
    ids = range(len(dataset))
    lengths = [len(targets[i]) - 1 for i in ids]
    tgts = [targets[i] for i in ids]
    result = _split_metrics([greedy[i] for i in ids], tgts, lengths, length)
    tf = _split_metrics([forced[i] for i in ids], tgts, lengths, length)
    result.update({k.replace("/", "_tf/", 1): v for k, v in tf.items()})
    result.update(shape.metrics())
    return result


def dev_set(preset: SortPreset) -> SortingDataset:
    """Dev sequences of lengths U[1, 2L], the same for every kind and seed."""
    return SortingDataset(preset.n_eval, 2 * preset.length, preset.n_symbols, seed=DEV_SEED)


def results_table(results: list[dict[str, Any]], preset: SortPreset) -> str:
    """Mean (± standard deviation over seeds, when there are several) beside the paper."""
    n = preset.length

    def cell(r: dict[str, Any], key: str, digits: int) -> str:
        return mean_std_cell(r["eval"].get(key), r["eval_std"].get(key), digits, preset.n_seeds)

    shape = routing_shape.has_shape(results)
    rows: list[list[Any]] = []
    for r in results:
        paper = PAPER_ROWS.get(r["kind"])
        rows.append(
            [
                variants.label(r["kind"]),
                cell(r, "dev/exact_match", 1),
                cell(r, "dev/edit_distance", 3),
                cell(r, "dev_short/exact_match", 1),
                cell(r, "dev_long/exact_match", 1),
                cell(r, "dev_tf/exact_match", 1),
                cell(r, "dev_tf/edit_distance", 3),
                paper[2] if paper else None,
                paper[1] if paper else None,
                *(routing_shape.cells(r) if shape else ()),
            ]
        )
    headers = [
        "attention",
        "exact % ↑",
        "edit dist. ↓",
        f"exact % (len ≤ {n})",
        f"exact % (len > {n})",
        "teacher-forced exact %",
        "teacher-forced edit dist.",
        "paper exact %",
        "paper edit dist.",
        *(routing_shape.HEADERS if shape else ()),
    ]
    return format_table(headers, rows)


def summarize_kind(
    kind: str, runs: Sequence[dict[str, Any]], seeds: Sequence[int], *, preset: SortPreset
) -> dict[str, Any]:
    """One attention kind's runs (one per seed): mean and standard deviation of each metric."""
    mean, std = mean_and_std([r["eval"] for r in runs])
    return {
        "kind": kind,
        "eval": mean,
        "eval_std": std,
        "runs": runs,
        "sort_matrix_png": runs[0]["sort_matrix_png"],
        "config": model_config(preset, kind).to_dict(),
    }


def run_seed(
    kind: str,
    preset: SortPreset,
    run: Run,
    *,
    label: str | None = None,
    attention_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one attention kind as ``run``; evaluate it on the dev set (a runner of
    `train_grid`).

    ``label`` (default: the kind) names the sort-matrix plot of the first seed;
    ``attention_options`` override [`AttentionConfig`][sparse_sinkhorn.nn.AttentionConfig] fields
    (the ablation's variants).
    """
    config = model_config(preset, kind, **(attention_options or {}))
    model = Seq2Seq(config)
    train_data = SortingDataset(
        preset.steps * preset.batch_size, preset.length, preset.n_symbols, seed=run.seed * 10 + 1
    )
    dev = dev_set(preset)

    def eval_fn(m: nn.Module) -> dict[str, float]:
        assert isinstance(m, Seq2Seq)
        return evaluate(m, dev, preset.eval_batch, preset.length)

    plan = Plan(
        model, config.to_dict(), train_data, make_loss_fn(preset.length), eval_fn, collate_sorting
    )
    fitted = fit(run, plan, preset, SCHEDULES["sort"])
    plan_png = None
    if config.attention.uses_sorting and run.keeps_plots:
        plan_png = save_sort_matrix(model, dev, run.out, label or kind)
    return {
        "seed": run.seed,
        "train_loss": fitted.train_loss,
        "eval": fitted.eval,
        "sort_matrix_png": plan_png,
    }


@torch.no_grad()
def save_sort_matrix(model: Seq2Seq, data: SortingDataset, out: Path, kind: str) -> str:
    """Heat map of the first encoder layer's learned sort matrices on the longest dev example."""
    model.eval()
    longest = max(range(len(data)), key=data.length_of)
    src, _ = sorting_batch(data, [longest])
    src = src.to(next(model.parameters()).device)
    layer = model.encoder.layers[0]
    assert isinstance(layer, TransformerLayer)
    x = layer.norm1(model.embed(src))
    _, plan = layer.attn(x, src != PAD_ID, return_plan=True)
    assert plan is not None
    path = out / f"sort_matrix_{kind}.png"
    n = data.length_of(longest)
    plot_sort_matrices(plan.P[0], path, f"{kind}: encoder layer 0 sort matrix P (eval, length {n})")
    return str(path)


def run(args: argparse.Namespace) -> int:
    preset = with_overrides(PRESETS[args.preset], flags.positive_overrides(args, OVERRIDES))
    kinds = flags.parse_kinds(args.attention, NAMES, DEFAULT_KINDS)
    dist = init_distributed()
    options = grid_options(args)
    results = train_grid(
        {kind: partial(run_seed, kind, preset) for kind in kinds},
        flags.seed_list(args, preset.n_seeds),
        options,
        summarize=partial(summarize_kind, preset=preset),
    )
    cleanup_distributed()  # every rank, on success (see its docstring)
    if dist.rank != 0:
        return 0
    title = (
        f"Sorting (Tensor2Tensor protocol): train lengths U[1, {preset.length}], "
        f"{preset.n_eval} dev sequences of lengths U[1, {2 * preset.length}], "
        f"{preset.n_symbols} symbols; greedy decoding until EOS (teacher-forced beside it); "
        f"mean over {preset.n_seeds} seed(s)"
    )
    payload = {
        "experiment": "sort",
        "preset": args.preset,
        "settings": {**asdict(preset), "protocol": PROTOCOL, "dev_seed": DEV_SEED},
        "results": results,
        "paper": {
            k: {"name": v[0], "edit_distance": v[1], "exact_match": v[2]}
            for k, v in PAPER_ROWS.items()
        },
        "ranking": RANKING.to_dict(),
    }
    heat_maps = [("sort matrix heat map", r["sort_matrix_png"]) for r in results]
    heat_maps = [(what, png) for what, png in heat_maps if png]
    table = results_table(results, preset)
    note = variants.not_causal_note(kinds)
    report(Path(args.out), title, table, payload, heat_maps, note=note)
    return 0
