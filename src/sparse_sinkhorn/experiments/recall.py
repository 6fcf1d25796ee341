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
1/64); lookup, the class right (chance 1/16). ``results.json`` holds every run's accuracy, its training
time per step and the wall time; ``accuracy.png`` plots accuracy against length and
``cost.png`` accuracy against time per step.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.recall import (
    IGNORE,
    PAD,
    KeyedLookup,
    RecallDataset,
    Task,
    length_curriculum,
    shortest_length,
)
from ..errors import UsageError
from ..models import Classifier, ClassifierConfig, LanguageModel, LanguageModelConfig
from ..nn import SinkhornSelfAttention, routing_losses
from ..ops import sinkhorn_plan, topk_block_selection
from ..train import init_distributed
from ..train.sampling import first_epoch_steps
from . import flags
from .driver import Plan, Run, fit, grid_options, model_sizes, train_grid
from .presets import SCHEDULES, RecallPreset
from .recall_controls import CONTROLS
from .recall_kinds import (
    CONTROL_KINDS,
    DEFAULT_KINDS,
    PASSKEY_CONTROLS,
    RECALL_KINDS,
    attention_config,
)
from .recall_report import HARD, plot, results_table, summarize
from .recall_tasks import TASKS, answer_sources
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


def forward(model: nn.Module, ids: Tensor) -> Tensor:
    """``model(ids)``, with ``ids != PAD`` as the key padding mask when a sequence is padded
    (mixed lengths: `RecallDataset`'s ``min_span`` pads with `PAD`)."""
    real = ids != PAD
    return model(ids) if bool(real.all()) else model(ids, real)


def scored(model: nn.Module, ids: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``(logits, gold)``: ``(Q, V)`` and ``(Q,)`` for the ``Q`` scored positions of a batch,
    in order; a `Classifier` (the encoder lookup) is scored once a sequence, on the class
    ``targets[:, 0]``."""
    logits = forward(model, ids)
    if isinstance(model, Classifier):  # (B, C)
        return logits, targets[:, 0]
    keep = targets != IGNORE  # (B, L, V) -> the scored positions
    return logits[keep], targets[keep]


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


def _batches(data: RecallDataset, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """``data`` in order as ``(ids, targets)`` batches, each ``(B, L)``."""
    for start in range(0, len(data), batch_size):
        items = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        yield torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


@torch.no_grad()
def accuracy(model: nn.Module, data: RecallDataset, task: str, batch_size: int) -> dict[str, float]:
    """Passkey: sequences with every digit right; MQAR and the lookup: questions answered
    right."""
    right = total = 0
    for ids, targets in _batches(data, batch_size):
        logits, gold = scored(model, ids, targets)
        hit = logits.argmax(-1) == gold  # (Q,)
        if TASKS[task].per_query:
            right, total = right + int(hit.sum()), total + len(hit)
        else:  # a sequence is right when all its scored positions are
            rows = (targets != IGNORE).nonzero()[:, 0]  # the sequence of each position
            wrong = torch.zeros(ids.shape[0], dtype=torch.bool)
            wrong[rows[~hit]] = True
            right, total = right + int((~wrong).sum()), total + ids.shape[0]
    return {"accuracy": 100.0 * right / total}


@torch.no_grad()
def routing_hits(
    model: LanguageModel | Classifier,
    data: RecallDataset,
    batch_size: int,
    *,
    per_head: bool = False,
) -> dict[str, float | None]:
    """How often each routing layer sends a question to its answer's block.

    For the ``i``-th routing layer (a sort net's: one under ``shared_routing="layers"``; or a
    ``topk`` gate's), ``routing_hit_layer{i}`` is the % of (held-out question, head) pairs
    whose routing reads a block holding the asked needle's first token or the token after it
    (`recall_tasks.answer_sources`): for a sort net, the largest weight of the question
    block's routing row; for a ``topk`` gate, any block it picks at the question's position.
    Questions whose needle lies in their own block (seen locally) are left out, and so, in a
    decoder, are questions with fewer than two earlier blocks to choose from, where any
    routing would score 100 %. ``per_head``: ``routing_hit_layer{i}_head{h}`` instead.
    Empty for kinds without routing; None (n/a) when no question qualifies."""
    causal = isinstance(model, LanguageModel)
    stack = model.encoder.layers if isinstance(model, Classifier) else model.decoder.layers
    every = stack.attentions()
    # (the layer reported, the layer whose routing it uses: `Routing.source`)
    chosen = [
        (i, stack.routing.source(i))
        for i, m in enumerate(every)
        if m.sort_net is not None or m.config.kind == "topk"
    ]
    if not chosen:
        return {}
    layers = [every[i] for i, _ in chosen]
    inputs: dict[int, Tensor] = {}

    def keep(i: int) -> Any:
        return lambda _module, args: inputs.__setitem__(i, args[0])

    hooks = [layer.register_forward_pre_hook(keep(i)) for i, layer in enumerate(every)]
    w = layers[0].config.block_size
    hits, total = torch.zeros(len(layers), layers[0].n_heads, dtype=torch.float64), 0
    try:
        for ids, targets in _batches(data, batch_size):
            forward(model, ids)
            row, pos, source = answer_sources(data.task, ids, targets)
            asked = pos // w  # the question's block
            earlier = (source // w < asked) & (asked >= 2)  # an earlier block, among >= 2
            ok = earlier if causal else source // w != asked  # encoder: another block
            row, pos, asked = row[ok], pos[ok], asked[ok]
            goal = torch.stack([source[ok] // w, (source[ok] + 1) // w], -1)  # (Q, 2)
            for i, (_, by) in enumerate(chosen):
                picked = _routed_blocks(every[by], inputs[by], row, pos, asked)  # (Q, H, k)
                hit = (picked[..., None] == goal[:, None, None, :]).any(-1).any(-1)  # (Q, H)
                hits[i] += hit.sum(0)
            total += int(ok.sum())
    finally:
        for hook in hooks:
            hook.remove()
    share = 100.0 * hits / max(total, 1)  # (layers, H): % of questions per head
    if per_head:
        return {
            f"routing_hit_layer{i}_head{h}": float(share[i, h]) if total else None
            for i in range(len(layers))
            for h in range(share.shape[1])
        }
    return {
        f"routing_hit_layer{i}": float(share[i].mean()) if total else None
        for i in range(len(layers))
    }


def _routed_blocks(
    layer: SinkhornSelfAttention, x: Tensor, row: Tensor, pos: Tensor, block: Tensor
) -> Tensor:
    """``(Q, H, k)`` the blocks ``layer`` routes questions ``(row, pos)`` (in blocks ``block``)
    to, from its input ``x``: a sort net's eval plan, the largest weight of the block's row
    (``k = 1``), without attending again; a ``topk`` gate's picks at the position."""
    cfg = layer.config
    if cfg.kind == "topk":
        parts = layer.qkv(x).view(*x.shape[:2], -1, layer.n_heads, layer.d_model // layer.n_heads)
        q, k = parts[:, :, 0].transpose(1, 2), parts[:, :, 1].transpose(1, 2)  # (B, H, L, E)
        picks = topk_block_selection(
            q, k, block_size=cfg.block_size, top_k=cfg.top_k, is_causal=layer.causal, gate=cfg.gate
        )
        return picks[row, :, pos]  # (Q, H, k)
    plan = sinkhorn_plan(layer.sort_logits(x), cfg.op_options(is_causal=layer.causal))
    return plan.P[row, :, block].argmax(-1, keepdim=True)  # (Q, H, 1)


def hard_twin(config: LanguageModelConfig | ClassifierConfig) -> nn.Module | None:
    """For a kind with soft routing, a model of the same configuration but hard (argmax)
    routing, to score the trained weights with hard routing at evaluation (its accuracy is
    ``accuracy_hard_routing``); None for every other kind."""
    att = config.attention
    if not att.uses_sorting or att.hard:
        return None
    twin = replace(config, attention=replace(att, hard=True))
    return Classifier(twin) if isinstance(twin, ClassifierConfig) else LanguageModel(twin)


def run_recall(task: str, length: int, kind: str, preset: RecallPreset, run: Run) -> dict[str, Any]:
    """Train one kind at one length as ``run``; a runner of `train_grid`."""
    spec = make_task(task, length, preset)
    sizes = {
        "vocab_size": spec.vocab_size,
        **model_sizes(preset),
        "pad_id": PAD,
        "attention": attention_config(kind, preset.block_size, length),
    }
    config: LanguageModelConfig | ClassifierConfig
    model: LanguageModel | Classifier
    if isinstance(spec, KeyedLookup):  # the encoder: a classifier reading position 0
        config = ClassifierConfig(**sizes, n_classes=spec.n_classes, pooling="first")
        model = Classifier(config)
    else:
        config = LanguageModelConfig(**sizes, token_conv=preset.token_conv)
        model = LanguageModel(config)
        if kind in CONTROLS:  # the decoder's (`run` refuses them for the encoder)
            CONTROLS[kind](model)
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
    options = grid_options(args, args.out or f"runs/recall-{args.task}")
    kinds = flags.parse_kinds(args.attention, (*RECALL_KINDS, *CONTROL_KINDS), DEFAULT_KINDS)
    if args.task != "passkey" and any(k in PASSKEY_CONTROLS for k in kinds):
        raise UsageError(f"{', '.join(PASSKEY_CONTROLS)} is a control for --task passkey")
    if TASKS[args.task].encoder:
        if preset.token_conv:
            raise UsageError(f"--token-conv is a decoder's; --task {args.task} is an encoder")
        if any(k in CONTROL_KINDS for k in kinds):
            raise UsageError(f"the controls ({', '.join(CONTROL_KINDS)}) are the decoder's")
    seeds = flags.seed_list(args)
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
