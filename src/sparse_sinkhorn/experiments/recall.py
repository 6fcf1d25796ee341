"""Long-context retrieval: ``sparse-sinkhorn recall`` (passkey, multi-query associative recall
and multi-key needles in a causal LM; tasks in `sparse_sinkhorn.data.recall`, the table of
them with their presets in ``recall_tasks``).

Where does learned block routing find what dense attention finds? Every kind in
`RECALL_KINDS` is trained from scratch on one task at each length, with the same model,
data and budget, and scored on the same held-out examples::

    sparse-sinkhorn recall --task passkey --seeds 3 --jobs 2        # cpu preset: 512 and 1K
    sparse-sinkhorn recall --task mqar --attention dense,local,softmax-hard --seeds 3
    sparse-sinkhorn recall --task passkey --preset paper --lengths 8192,65536   # a GPU
    sparse-sinkhorn recall --task keyed-needles --seeds 3 --jobs 2  # the answer block
                                                                    # depends on the question
    sparse-sinkhorn recall --task lookup --lengths 512 --seeds 3    # the same in an encoder

Accuracy: passkey, mk-passkey and keyed-needles, every answer token right (chance 1 %,
1/16, 1/16); MQAR and mqar-scattered, the fraction of questions answered right (chance
1/64); lookup, the class right (chance 1/16). ``results.json`` holds every run's accuracy,
its training time per step and the wall time; ``accuracy.png`` plots accuracy against length
and ``cost.png`` accuracy against time per step. How a model is scored: ``recall_scoring``.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.recall import (
    PAD,
    KeyedLookup,
    RecallDataset,
    Task,
    length_curriculum,
    shortest_length,
)
from ..errors import UsageError
from ..models import Classifier, ClassifierConfig, LanguageModel, LanguageModelConfig
from ..nn import routing_losses
from ..train import init_distributed
from ..train.sampling import first_epoch_steps
from . import flags
from .driver import Plan, Run, fit, grid_options, model_sizes, train_grid
from .presets import SCHEDULES, RecallPreset
from .recall_controls import CONTROLS
from .recall_init import check_sources, check_started_as, mark_start, start_from, the_length
from .recall_kinds import (
    CONTROL_KINDS,
    DEFAULT_KINDS,
    ORACLE_TASKS,
    RECALL_KINDS,
    attention_config,
)
from .recall_report import HARD, plot, results_table, summarize
from .recall_scoring import accuracy, hard_twin, routing_hits, scored
from .recall_tasks import TASKS
from .results import report
from .variants import not_causal_note

logger = logging.getLogger(__name__)

# The flags that override preset fields (`flags.Override`; --d-model also sets d_ff).
OVERRIDES = {
    "steps": flags.STEPS,
    "block_size": flags.BLOCK_SIZE,
    "batch_size": flags.BATCH_SIZE,
    "d_model": flags.Override(
        "--d-model", "override the model width (d_ff follows at 4 * d_model)"
    ),
    "n_heads": flags.Override("--n-heads", "override the number of heads"),
    "token_conv": flags.Override(
        "--token-conv",
        "width k of a causal convolution added to the embeddings (each position also reads "
        "the k - 1 before it; at least 2; default: the preset's, which has none)",
    ),
}
EVAL_SEED = 1_000_000  # held-out examples come from another stream than any training seed
MAX_LENGTH = 1 << 20  # longest --lengths: 16 x the paper preset's longest


def make_task(task: str, length: int, preset: RecallPreset) -> Task:
    return TASKS[task].build(length, preset)


TRAINING_LENGTHS = ("full", "mixed", "curriculum")
CURRICULUM = (0.3, 0.7)  # --lengths-in-training curriculum on a preset without one


def training_lengths(choice: str | None, preset: RecallPreset) -> dict[str, Any]:
    """The preset changes of ``--lengths-in-training`` (`TRAINING_LENGTHS`; None: none)."""
    if choice is None:
        return {}
    if choice == "full":
        return {"min_span": None, "curriculum": None}
    if preset.min_span is None:
        raise UsageError(f"--lengths-in-training {choice} needs a preset with a min_span")
    if choice == "mixed":
        return {"curriculum": None}
    return {"curriculum": preset.curriculum or CURRICULUM}


def training_data(task: Task, preset: RecallPreset, seed: int) -> RecallDataset:
    """``steps * batch_size`` examples of ``task``: at its length, at mixed lengths
    (``min_span``) or at the lengths of a curriculum (``min_span`` and ``curriculum``); the
    shortest span is raised to one that holds the task's pairs or needles (`shortest_length`).
    """
    size = preset.steps * preset.batch_size
    if preset.min_span is None:
        return RecallDataset(task, size, seed)
    min_span = shortest_length(task, preset.min_span)
    if preset.curriculum is None:
        return RecallDataset(task, size, seed, min_span=min_span)
    hold, reach = preset.curriculum
    steps = first_epoch_steps(size, preset.batch_size, seed)  # the sampler's order
    spans = length_curriculum(steps, preset.steps, min_span, task.length, hold=hold, reach=reach)
    return RecallDataset(task, size, seed, spans=spans)


def recall_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy on the scored positions only (the answers), plus the layers' routing
    distillation losses where a kind has them."""
    ids, targets = batch
    logits, gold = scored(model, ids, targets)
    loss = F.cross_entropy(logits.float(), gold)
    metrics = {"tokens": float(ids.numel())}
    routing = routing_losses(model)
    if routing is not None:
        metrics["routing_loss"] = float(routing.detach())
        loss = loss + routing
    return loss, metrics


def model_config(
    task: str, length: int, kind: str, preset: RecallPreset
) -> LanguageModelConfig | ClassifierConfig:
    """The model ``run_recall`` trains for ``kind`` on ``task`` at ``length``."""
    spec = make_task(task, length, preset)
    sizes = {
        "vocab_size": spec.vocab_size,
        **model_sizes(preset),
        "pad_id": PAD,
        "attention": attention_config(kind, preset.block_size, length),
    }
    if TASKS[task].encoder:  # a classifier reading position 0
        assert isinstance(spec, KeyedLookup)  # the one encoder task
        return ClassifierConfig(**sizes, n_classes=spec.n_classes, pooling="first")
    return LanguageModelConfig(**sizes, token_conv=preset.token_conv)


def run_recall(task: str, length: int, kind: str, preset: RecallPreset, run: Run) -> dict[str, Any]:
    """Train one kind at one length as ``run``; a runner of `train_grid`."""
    spec = make_task(task, length, preset)
    config = model_config(task, length, kind, preset)
    model = Classifier(config) if isinstance(config, ClassifierConfig) else LanguageModel(config)
    if preset.init_from is not None:
        start_from(model, Path(preset.init_from) / f"seed{run.seed}")
    mark_start(run.dir, preset.init_from, run.resume)
    if kind in CONTROLS:  # `run` refuses a control where its task or model has no use for it
        CONTROLS[kind](model, spec)
    train_data = training_data(spec, preset, run.seed)
    held_out = RecallDataset(spec, preset.n_eval, EVAL_SEED)

    def eval_fn(m: nn.Module) -> dict[str, float]:
        metrics = accuracy(m, held_out, task, 2 * preset.batch_size)
        hits = routing_hits(model, held_out, 2 * preset.batch_size)
        metrics.update({k: v for k, v in hits.items() if v is not None})  # n/a: left out
        with torch.random.fork_rng():  # building it leaves the training's random stream alone
            twin = hard_twin(config) if kind not in CONTROL_KINDS else None
        if twin is not None:  # the same weights, routed by argmax
            twin.load_state_dict(model.state_dict())
            hard = accuracy(twin.eval(), held_out, task, 2 * preset.batch_size)
            metrics[HARD] = hard["accuracy"]
        return metrics

    fitted = fit(
        run,
        Plan(model, config.to_dict(), train_data, recall_loss, eval_fn),
        preset,
        SCHEDULES["recall"],
    )
    tokens_per_s = fitted.result.metrics.get("tokens_per_s")
    per_step = (
        preset.batch_size * length / tokens_per_s if tokens_per_s else fitted.seconds / preset.steps
    )
    return {**fitted.record(kind=kind, task=task, length=length), "seconds_per_step": per_step}


def parse_lengths(value: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    if value is None:
        return default
    try:
        lengths = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"--lengths must be a comma list of ints, got {value!r}") from None
    if not lengths or any(n <= 0 for n in lengths):
        raise UsageError(f"--lengths must be positive ints, got {value!r}")
    if len(set(lengths)) < len(lengths):
        raise UsageError(f"--lengths names a length twice: {value!r}")
    if max(lengths) > MAX_LENGTH:  # before any run directory is made
        raise UsageError(f"--lengths: {max(lengths):,} is longer than {MAX_LENGTH:,} tokens")
    return lengths


def run(args: argparse.Namespace) -> int:
    if args.task not in TASKS:
        raise UsageError(f"unknown --task {args.task!r}; choose one of {', '.join(TASKS)}")
    preset = TASKS[args.task].presets[args.preset]
    changes: dict[str, Any] = {"lengths": parse_lengths(args.lengths, preset.lengths)}
    changes.update(flags.positive_overrides(args, OVERRIDES))
    changes.update(training_lengths(args.lengths_in_training, preset))
    if "d_model" in changes:
        changes["d_ff"] = 4 * changes["d_model"]
    preset = replace(preset, **changes)
    if preset.d_model % preset.n_heads:
        raise UsageError(f"--d-model {preset.d_model} is not a multiple of {preset.n_heads} heads")
    if preset.token_conv == 1:
        raise UsageError(
            "--token-conv must be a width >= 2 (a convolution over 1 position mixes none)"
        )
    for length in preset.lengths:
        make_task(args.task, length, preset)  # a length the task cannot use fails here
    seeds = flags.seed_list(args)
    options = grid_options(args, args.out or f"runs/recall-{args.task}")
    kinds = flags.parse_kinds(args.attention, (*RECALL_KINDS, *CONTROL_KINDS), DEFAULT_KINDS)
    if args.init_from is not None:
        length = the_length(preset)
        wanted = {k: model_config(args.task, length, k, preset).to_dict() for k in kinds}
        writes = [options.out / f"{args.task}-{length}" / k for k in kinds]
        check_sources(args.init_from, f"{args.task}-{length}", wanted, seeds, writes)
        preset = replace(preset, init_from=args.init_from)
    if args.task not in ORACLE_TASKS and "oracle-hard" in kinds:
        raise UsageError(f"oracle-hard is a control for --task {' or '.join(ORACLE_TASKS)}")
    if TASKS[args.task].encoder:
        if preset.token_conv:
            raise UsageError(f"--token-conv is a decoder's; --task {args.task} is an encoder")
        shared = [k for k in kinds if k in CONTROL_KINDS and k != "oracle-hard"]
        if shared:
            raise UsageError(f"the controls {', '.join(shared)} are a decoder's")
    names = [f"{args.task}-{n}/{k}" for n in preset.lengths for k in kinds]
    if options.resume:
        check_started_as(options.out, names, seeds, preset.init_from)
    runners = {
        f"{args.task}-{length}/{kind}": partial(run_recall, args.task, length, kind, preset)
        for length in preset.lengths
        for kind in kinds
    }
    t0 = time.perf_counter()
    results = train_grid(runners, seeds, options, summarize=summarize)
    wall = time.perf_counter() - t0
    if init_distributed().rank != 0:
        return 0
    chance = f"{100 * make_task(args.task, preset.lengths[0], preset).chance:.3g} %"
    title = (
        f"{args.task} (preset {args.preset}, b={preset.block_size}, {preset.steps} steps of "
        f"{preset.batch_size}, mean ± std over {len(seeds)} seed(s); wall {wall:.0f} s)"
    )
    if preset.init_from is not None:
        title += f"; each run started from the weights of {preset.init_from}/seed<s>"
    out = options.out
    figures = plot(results, out, f"{args.task}, {len(seeds)} seed(s)")
    payload = {
        "experiment": f"recall-{args.task}",
        "preset": args.preset,
        "settings": asdict(preset),
        "kinds": {k: RECALL_KINDS[CONTROL_KINDS.get(k, k)] for k in kinds},
        "control_kinds": {k: v for k, v in CONTROL_KINDS.items() if k in kinds},
        "wall_seconds": wall,
        "results": results,
        "plots": [str(p) for p in figures],
    }
    table = results_table(results, preset.lengths, chance)
    files = [("plots", ", ".join(str(p) for p in figures))]
    note = None if TASKS[args.task].encoder else not_causal_note(kinds)
    report(out, title, table, payload, files, note=note)
    return 0
