"""The SortNet ablation (the paper's Table 8): ``sparse-sinkhorn ablate``.

One Sinkhorn model per variant, everything else equal:

- ``linear``: the paper's sort net (one linear layer) at the preset's temperature (0.75) and
  balancing rounds (5 at the cpu preset, 8 at the paper preset);
- ``mlp``: a two-layer ReLU sort net;
- ``kv-tied``: keys double as values (no value projection);
- ``0-iters``: no Sinkhorn balancing (``P = exp(logits / temperature)``, unnormalised);
- ``10-iters``: 10 balancing rounds;
- ``tau-0.25``, ``tau-0.5``, ``tau-1.0``: the Gumbel-Sinkhorn temperature swept around 0.75.

The paper ran its ablation on LM1B subwords with b = 32 (perplexity): that is the ``paper``
preset (``--corpus`` pointing at LM1B's shards; see ``sparse-sinkhorn lm``). The ``cpu`` preset
runs the sorting task of ``sparse-sinkhorn sort`` (Tensor2Tensor's protocol) at a smaller budget,
where routing decides whether a sequence comes out sorted, so the variants can differ within
minutes on a CPU::

    sparse-sinkhorn ablate                                   # cpu: sorting, 3 seeds
    sparse-sinkhorn ablate --variants linear,0-iters --seeds 2
    sparse-sinkhorn ablate --preset paper --corpus /data/lm1b   # LM1B subwords, b = 32
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..train import cleanup_distributed, init_distributed
from . import lm, sorting
from .common import (
    add_common_args,
    format_table,
    mean_and_std,
    mean_std_cell,
    parse_kinds,
    positive_overrides,
    setup_logging,
    write_results,
)
from .driver import add_grid_args, grid_options, train_grid

logger = logging.getLogger(__name__)

# Variant -> AttentionConfig overrides of the Sinkhorn baseline ("linear").
VARIANTS: dict[str, dict[str, Any]] = {
    "linear": {},
    "mlp": {"sort_net": "mlp"},
    "kv-tied": {"share_kv": True},
    "0-iters": {"n_iters": 0},
    "10-iters": {"n_iters": 10},
    "tau-0.25": {"temperature": 0.25},
    "tau-0.5": {"temperature": 0.5},
    "tau-1.0": {"temperature": 1.0},
}
# The paper's Table 8 (LM1B subwords, b = 32): perplexity per variant it reports.
PAPER_PPL = {"linear": 41.29, "mlp": 41.70, "kv-tied": 42.26, "0-iters": 52.40}
PAPER_NAMES = {
    "linear": "1 linear layer (paper's SortNet)",
    "mlp": "2-layer ReLU SortNet",
    "kv-tied": "K = V tied",
    "0-iters": "0 Sinkhorn iterations",
}

# cpu: the sorting task at a smaller budget than `sort`'s cpu preset (sizes: our assumption).
SORT_PRESET = replace(sorting.PRESETS["cpu"], steps=600, n_eval=500)
# paper: Table 8's setting, LM1B subwords at b = 32 with the `lm` paper preset's sizes.
LM_PRESET = replace(lm.PRESETS[("subword", "paper")], block_size=32)
TASKS = {"cpu": "sort", "paper": "lm"}


def summarize_variant(
    name: str, runs: Sequence[dict[str, Any]], seeds: Sequence[int]
) -> dict[str, Any]:
    """Mean ± std over the seeds, and how many runs diverged (a non-finite final training loss:
    their metrics are those of broken weights, and the table says so)."""
    mean, std = mean_and_std([r["eval"] for r in runs])
    diverged = sum(not math.isfinite(r["train_loss"] or 0.0) for r in runs)
    return {"variant": name, "eval": mean, "eval_std": std, "diverged": diverged, "runs": runs}


def results_table(results: list[dict[str, Any]], task: str, n_seeds: int) -> str:
    rows: list[list[Any]] = []
    for r in results:
        mean, std, v = r["eval"], r["eval_std"], r["variant"]
        if task == "sort":
            cells = [
                mean_std_cell(mean.get(k), std.get(k), d, n_seeds)
                for k, d in (
                    ("dev/exact_match", 1),
                    ("dev/edit_distance", 3),
                    ("dev_tf/exact_match", 1),
                )
            ]
        else:
            cells = [
                mean_std_cell(mean.get(k), std.get(k), 2, n_seeds)
                for k in ("valid/perplexity", "test/perplexity")
            ]
        diverged = f"{r['diverged']} / {len(r['runs'])}"
        rows.append([v, *cells, diverged, PAPER_NAMES.get(v), PAPER_PPL.get(v)])
    if task == "sort":
        metrics = ["dev exact % ↑", "dev edit dist. ↓", "teacher-forced exact % ↑"]
    else:
        metrics = ["valid ppl ↓", "test ppl ↓"]
    headers = [
        "variant",
        *metrics,
        "runs diverged (loss NaN)",
        "paper row (Table 8)",
        "paper LM1B ppl (b=32)",
    ]
    return format_table(headers, rows)


def run(args: argparse.Namespace) -> int:
    setup_logging()
    task = args.task or TASKS[args.preset]
    variants = parse_kinds(args.variants, tuple(VARIANTS), what="variant")
    fields = {"steps": "steps", "n_seeds": "seeds"}
    if task == "sort":
        fields.update(length="length", block_size="block_size", n_eval="n_eval")
    elif any(getattr(args, f) is not None for f in ("length", "block_size", "n_eval")):
        raise UsageError("--length, --block-size and --n-eval apply to the sort task only")
    overrides = positive_overrides(args, fields)
    n_seeds = overrides.pop("n_seeds", 3 if args.preset == "cpu" else 1)
    if "length" in overrides:
        overrides["n_symbols"] = 2 * overrides["length"]  # Tensor2Tensor's alphabet: 2L
    if "n_eval" in overrides:
        overrides["eval_batch"] = min(SORT_PRESET.eval_batch, overrides["n_eval"])
    options = grid_options(args)
    dist = init_distributed()
    results: list[dict[str, Any]]
    if task == "sort":
        preset = replace(SORT_PRESET, n_seeds=n_seeds, **overrides)
        if args.preset == "paper":
            preset = replace(sorting.PRESETS["paper"], n_seeds=n_seeds, **overrides)
        runners = {
            name: partial(
                sorting.run_seed,
                "sinkhorn",
                preset,
                options,
                label=name,
                attention_options=VARIANTS[name],
            )
            for name in variants
        }
        results = train_grid(
            runners, sorting.seeds_of(preset, args), options, summarize=summarize_variant
        )
        settings: dict[str, Any] = asdict(preset)
    else:
        lm_preset = LM_PRESET if args.preset == "paper" else lm.PRESETS[("subword", "cpu")]
        lm_preset = replace(lm_preset, **overrides)
        args.level = "subword"
        corpus = lm.load_text(args, lm_preset.max_train_chars)
        streams: dict[str, Any] = {}
        runners = {
            name: partial(
                lm.run_kind,
                "sinkhorn",
                "subword",
                lm_preset,
                corpus,
                streams,
                options,
                attention_options=VARIANTS[name],
            )
            for name in variants
        }
        seeds = list(range(args.seed, args.seed + n_seeds))
        results = train_grid(runners, seeds, options, summarize=summarize_variant)
        settings = {**asdict(lm_preset), "corpus": corpus.name}
    cleanup_distributed()
    if dist.rank != 0:
        return 0
    table = results_table(results, task, n_seeds)
    print(
        f"\nSortNet ablation on the {task} task (preset {args.preset}; mean ± std over "
        f"{n_seeds} seed(s)). The paper's column is LM1B subword perplexity at b = 32.\n"
    )
    print(table)
    payload = {
        "experiment": "ablate",
        "task": task,
        "preset": args.preset,
        "settings": {**settings, "n_seeds": n_seeds},
        "variants": {name: VARIANTS[name] for name in variants},
        "results": results,
        "paper": {"perplexity": PAPER_PPL, "setting": "LM1B subwords, b = 32"},
    }
    path = write_results(Path(args.out), payload, table)
    print(f"\nresults: {path}")
    return 0


def add_subparser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ablate",
        help="SortNet ablation (paper Table 8)",
        description="Sinkhorn variants (sort net, K = V, balancing rounds, temperature), "
        "everything else equal; cpu: the sorting task, paper: LM1B subwords at b = 32.",
    )
    parser.add_argument(
        "--variants",
        default="all",
        help=f"comma list of {', '.join(VARIANTS)}, or 'all' (default)",
    )
    parser.add_argument(
        "--task",
        choices=("sort", "lm"),
        default=None,
        help="sort (the cpu preset's default) or lm (subword LM; the paper preset's default)",
    )
    for flag, what in (
        ("--length", "training length L (sort task)"),
        ("--block-size", "block size (sort task)"),
        ("--n-eval", "number of dev sequences (sort task)"),
    ):
        parser.add_argument(flag, type=int, default=None, help=f"override the {what}")
    parser.add_argument("--data-dir", default=None, help="data directory (lm task)")
    parser.add_argument(
        "--corpus", default=None, help="plain-text corpus, e.g. LM1B's shards (lm task)"
    )
    add_grid_args(parser, default_seeds="3 at the cpu preset, 1 at the paper preset")
    add_common_args(parser, default_out="runs/ablate")
    parser.set_defaults(func=run)
