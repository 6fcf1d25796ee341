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
from ..ops import sinkhorn_plan, topk_block_selection
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
        for ids, targets in batches(data, batch_size):
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
    return build_model(replace(config, attention=replace(att, hard=True)))
