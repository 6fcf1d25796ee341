"""How ``sparse-sinkhorn recall`` scores a model: the logits of the scored positions
(`scored`), accuracy over questions or sequences (`accuracy`), how often a routing reads the
answer's block (`routing_hits`), and the same weights with hard routing (`hard_twin`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from ..data.recall import IGNORE, PAD, RecallDataset
from ..models import (
    Classifier,
    ClassifierConfig,
    LanguageModel,
    LanguageModelConfig,
    build_model,
)
from ..nn import SinkhornSelfAttention
from ..ops import block_attention_mass, sinkhorn_plan, topk_block_selection
from .recall_tasks import TASKS, answer_sources


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


def batches(data: RecallDataset, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """``data`` in order as ``(ids, targets)`` batches, each ``(B, L)``."""
    for start in range(0, len(data), batch_size):
        items = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        yield torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


@torch.no_grad()
def accuracy(model: nn.Module, data: RecallDataset, task: str, batch_size: int) -> dict[str, float]:
    """Passkey: sequences with every digit right; MQAR and the lookup: questions answered
    right."""
    right = total = 0
    for ids, targets in batches(data, batch_size):
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


def _questions(
    model: LanguageModel | Classifier, data: RecallDataset, batch_size: int
) -> Iterator[tuple[dict[int, Tensor], Tensor | None, Tensor, Tensor, Tensor, Tensor]]:
    """Per batch of held-out questions whose needle lies in another block than the question
    (in a decoder: an earlier one, with at least two earlier blocks to choose from): every
    attention layer's input ``{i: (B, L, D)}``, the key padding mask (None: no padding)
    and, per question, its batch row, position, block and the answer's blocks ``(Q, 2)``
    (`recall_tasks.answer_sources`: the needle's first token's and the next token's)."""
    causal = isinstance(model, LanguageModel)
    every = _stack(model).attentions()
    inputs: dict[int, Tensor] = {}

    def keep(i: int) -> Any:
        return lambda _module, args: inputs.__setitem__(i, args[0])

    hooks = [layer.register_forward_pre_hook(keep(i)) for i, layer in enumerate(every)]
    w = every[0].config.block_size
    try:
        for ids, targets in batches(data, batch_size):
            forward(model, ids)
            row, pos, source = answer_sources(data.task, ids, targets)
            asked = pos // w  # the question's block
            earlier = (source // w < asked) & (asked >= 2)  # an earlier block, among >= 2
            ok = earlier if causal else source // w != asked  # encoder: another block
            goal = torch.stack([source[ok] // w, (source[ok] + 1) // w], -1)  # (Q, 2)
            real = ids != PAD
            mask = None if bool(real.all()) else real  # as `forward` passes it
            yield dict(inputs), mask, row[ok], pos[ok], asked[ok], goal
    finally:
        for hook in hooks:
            hook.remove()


def _stack(model: LanguageModel | Classifier) -> Any:
    return model.encoder.layers if isinstance(model, Classifier) else model.decoder.layers


def _shares(hits: Tensor, total: int, prefix: str, per_head: bool) -> dict[str, float | None]:
    """``hits`` ``(layers, H)`` counts over ``total`` questions as % per layer (or head)."""
    share = 100.0 * hits / max(total, 1)  # (layers, H): % of questions per head
    if per_head:
        return {
            f"{prefix}{i}_head{h}": float(share[i, h]) if total else None
            for i in range(share.shape[0])
            for h in range(share.shape[1])
        }
    return {f"{prefix}{i}": float(share[i].mean()) if total else None for i in range(len(share))}


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
    stack = _stack(model)
    every = stack.attentions()
    # (the layer reported, the layer whose routing it uses: `Routing.source`)
    chosen = [
        (i, stack.routing.source(i))
        for i, m in enumerate(every)
        if m.sort_net is not None or m.config.kind == "topk"
    ]
    if not chosen:
        return {}
    hits, total = torch.zeros(len(chosen), every[0].n_heads, dtype=torch.float64), 0
    for inputs, _, row, pos, asked, goal in _questions(model, data, batch_size):
        for i, (_, by) in enumerate(chosen):
            picked = _routed_blocks(every[by], inputs[by], row, pos, asked)  # (Q, H, k)
            hit = (picked[..., None] == goal[:, None, None, :]).any(-1).any(-1)  # (Q, H)
            hits[i] += hit.sum(0)
        total += len(row)
    return _shares(hits, total, "routing_hit_layer", per_head)


@torch.no_grad()
def teacher_hits(
    model: LanguageModel | Classifier,
    data: RecallDataset,
    batch_size: int,
    *,
    reduce: str = "max",
    per_head: bool = False,
) -> dict[str, float | None]:
    """How often each layer's own dense attention, the routing distillation's teacher
    (`ops.block_attention_mass` with ``reduce``, over the blocks a routing row may take:
    strictly earlier ones in a decoder), puts its largest block mass for a question's block
    on the answer's block: ``teacher_hit_layer{i}``, % of (question, head) pairs, questions
    as `routing_hits`. It says whether distilling the routing from the layer's attention
    could teach it the answer's block; every attention layer, routed or not."""
    every = _stack(model).attentions()
    hits, total = torch.zeros(len(every), every[0].n_heads, dtype=torch.float64), 0
    for inputs, mask, row, _, asked, goal in _questions(model, data, batch_size):
        for i, layer in enumerate(every):
            q, k = _queries_keys(layer, inputs[i])
            w = layer.config.block_size
            mass = block_attention_mass(
                q, k, block_size=w, is_causal=layer.causal, key_padding_mask=mask, reduce=reduce
            )
            if layer.causal:  # a causal routing row takes strictly earlier blocks only
                mass = mass * torch.ones_like(mass[0, 0], dtype=torch.bool).tril(-1)
            top = mass[row, :, asked].argmax(-1)  # (Q, H)
            hits[i] += (top[..., None] == goal[:, None, :]).any(-1).sum(0)
        total += len(row)
    return _shares(hits, total, "teacher_hit_layer", per_head)


def _queries_keys(layer: SinkhornSelfAttention, x: Tensor) -> tuple[Tensor, Tensor]:
    """``layer``'s queries and keys ``(B, H, L, E)`` of its input ``x`` ``(B, L, D)``."""
    parts = layer.qkv(x).view(*x.shape[:2], -1, layer.n_heads, layer.d_model // layer.n_heads)
    return parts[:, :, 0].transpose(1, 2), parts[:, :, 1].transpose(1, 2)


def _routed_blocks(
    layer: SinkhornSelfAttention, x: Tensor, row: Tensor, pos: Tensor, block: Tensor
) -> Tensor:
    """``(Q, H, k)`` the blocks ``layer`` routes questions ``(row, pos)`` (in blocks ``block``)
    to, from its input ``x``: a sort net's eval plan, the largest weight of the block's row
    (``k = 1``), without attending again; a ``topk`` gate's picks at the position."""
    cfg = layer.config
    if cfg.kind == "topk":
        q, k = _queries_keys(layer, x)
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
    return build_model(replace(config, attention=replace(att, hard=True)))
