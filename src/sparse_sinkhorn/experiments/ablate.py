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
from collections.abc import Sequence
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..train import NonFiniteLossError, cleanup_distributed, init_distributed
from . import flags, lm, sorting
from .driver import Run, Runner, grid_options, train_grid
from .presets import (
    ABLATE_LM_PRESET,
    ABLATE_SEEDS,
    ABLATE_SORT_PRESET,
    ABLATE_TASKS,
    LM_PRESETS,
    SORT_PRESETS,
)
from .results import format_table, report
from .stats import mean_and_std, mean_std_cell

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


def summarize_variant(
    name: str, runs: Sequence[dict[str, Any]], seeds: Sequence[int]
) -> dict[str, Any]:
    """Mean ± std over the runs that finished, and how many runs diverged (training stopped
    at a non-finite loss: `train_or_diverge`; such a run has no evaluation)."""
    finished = [r for r in runs if "diverged" not in r]
    mean, std = mean_and_std([r["eval"] for r in finished]) if finished else ({}, {})
    return {
        "variant": name,
        "eval": mean,
        "eval_std": std,
        "finished": len(finished),
        "diverged": len(runs) - len(finished),
        "runs": runs,
    }


def train_or_diverge(runner: Runner, run: Run) -> dict[str, Any]:
    """``runner(run)``, or the record of a run that diverged: a variant of the ablation may
    make training unstable (0 balancing rounds), and that is one of its results, not a reason
    to stop the others."""
    try:
        return runner(run)
    except NonFiniteLossError as error:
        return {"seed": run.seed, "train_loss": None, "eval": {}, "diverged": str(error)}


def results_table(results: list[dict[str, Any]], task: str) -> str:
    rows: list[list[Any]] = []
    for r in results:
        mean, std, v = r["eval"], r["eval_std"], r["variant"]
        finished = r["finished"]
        if task == "sort":
            cells = [
                mean_std_cell(mean.get(k), std.get(k), d, finished)
                for k, d in (
                    ("dev/exact_match", 1),
                    ("dev/edit_distance", 3),
                    ("dev_tf/exact_match", 1),
                )
            ]
        else:
            cells = [
                mean_std_cell(mean.get(k), std.get(k), 2, finished)
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
        "runs diverged (stopped at a non-finite loss; no metrics)",
        "paper row (Table 8)",
        "paper LM1B ppl (b=32)",
    ]
    return format_table(headers, rows)


# The flags that override preset fields (`flags.Override`); the last three: sort task only.
OVERRIDES = {
    "steps": flags.STEPS,
    "n_seeds": flags.SEEDS,
    "length": flags.Override("--length", "override the training length L (sort task)"),
    "block_size": flags.Override("--block-size", "override the block size (sort task)"),
    "n_eval": flags.Override("--n-eval", "override the number of dev sequences (sort task)"),
}
SORT_FLAGS = ("length", "block_size", "n_eval")  # flags of the sort task only
Runners = dict[str, Runner]


def _sort_runners(
    preset_name: str, changes: dict[str, int], variants: list[str], n_seeds: int
) -> tuple[Runners, dict[str, Any]]:
    """The sort task: one `run_seed` runner per variant, and the settings."""
    base = ABLATE_SORT_PRESET if preset_name == "cpu" else SORT_PRESETS["paper"]
    # --n-eval caps the eval batch at the cpu preset's, whichever preset runs
    preset = sorting.with_overrides(base, changes, eval_batch=ABLATE_SORT_PRESET.eval_batch)
    preset = replace(preset, n_seeds=n_seeds)
    runners: Runners = {
        name: partial(
            sorting.run_seed, "sinkhorn", preset, label=name, attention_options=VARIANTS[name]
        )
        for name in variants
    }
    return runners, asdict(preset)


def _lm_runners(
    args: argparse.Namespace, changes: dict[str, int], variants: list[str]
) -> tuple[Runners, dict[str, Any]]:
    """The lm task (subwords): one `run_kind` runner per variant, and the settings."""
    base = ABLATE_LM_PRESET if args.preset == "paper" else LM_PRESETS[("subword", "cpu")]
    preset = replace(base, **changes)
    corpus = lm.load_text(args.corpus, args.data_dir, preset.max_train_chars)
    streams: dict[str, Any] = {}
    runners: Runners = {
        name: partial(
            lm.run_kind,
            "sinkhorn",
            "subword",
            preset,
            corpus,
            streams,
            attention_options=VARIANTS[name],
        )
        for name in variants
    }
    return runners, {**asdict(preset), "corpus": corpus.name}


def run(args: argparse.Namespace) -> int:
    task = args.task or ABLATE_TASKS[args.preset]
    variants = flags.parse_kinds(args.variants, tuple(VARIANTS), what="variant")
    fields = {f: o for f, o in OVERRIDES.items() if task == "sort" or f not in SORT_FLAGS}
    if task != "sort" and any(getattr(args, OVERRIDES[f].dest) is not None for f in SORT_FLAGS):
        raise UsageError("--length, --block-size and --n-eval apply to the sort task only")
    changes = flags.positive_overrides(args, fields)
    changes.pop("n_seeds", None)  # the seeds come from seed_list
    seeds = flags.seed_list(args, ABLATE_SEEDS[args.preset])
    options = grid_options(args)
    dist = init_distributed()
    if task == "sort":
        runners, settings = _sort_runners(args.preset, changes, variants, len(seeds))
    else:
        runners, settings = _lm_runners(args, changes, variants)
    tolerant = {name: partial(train_or_diverge, runner) for name, runner in runners.items()}
    results = train_grid(tolerant, seeds, options, summarize=summarize_variant)
    cleanup_distributed()
    if dist.rank != 0:
        return 0
    title = (
        f"SortNet ablation on the {task} task (preset {args.preset}; mean ± std over "
        f"{len(seeds)} seed(s)). The paper's column is LM1B subword perplexity at b = 32."
    )
    payload = {
        "experiment": "ablate",
        "task": task,
        "preset": args.preset,
        "settings": {**settings, "n_seeds": len(seeds)},
        "variants": {name: VARIANTS[name] for name in variants},
        "results": results,
        "paper": {"perplexity": PAPER_PPL, "setting": "LM1B subwords, b = 32"},
    }
    report(Path(args.out), title, results_table(results, task), payload)
    return 0
