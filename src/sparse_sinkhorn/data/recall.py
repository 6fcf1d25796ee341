"""Synthetic long-context retrieval tasks, generated in-process: the dataset
(`RecallDataset`), mixed lengths and the length curriculum. The task generators live in
`sparse_sinkhorn.data.recall_generators` (`Passkey`, `MQAR`, `ScatteredMQAR`) and
`sparse_sinkhorn.data.recall_needles` (`MultiKeyPasskey`, `KeyedNeedles`, and the encoder's
`KeyedLookup`) and are re-exported here.

Axes: L sequence length. Each example is ``(ids, targets)``, two ``(L,)`` long tensors: the
model reads ``ids`` and is scored only where ``targets != IGNORE`` (next-token prediction of
the answer tokens); everything else is context. Example ``i`` of a task is a pure function of
``(seed, i)``, so a dataset needs no storage and every run sees the same examples.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .recall_generators import IGNORE, MQAR, PAD, Passkey, ScatteredMQAR
from .recall_needles import KeyedLookup, KeyedNeedles, MultiKeyPasskey

Task = Passkey | MQAR | MultiKeyPasskey | KeyedNeedles | ScatteredMQAR | KeyedLookup


def length_curriculum(
    steps: Tensor, total: int, min_span: int, length: int, *, hold: float, reach: float
) -> Tensor:
    """Spans for examples consumed at optimizer ``steps`` of ``total``: ``min_span`` until
    ``hold`` of the run, growing geometrically to ``length`` at ``reach`` of it, then
    ``length``; examples of one step share a span, a multiple of ``min_span`` (or ``length``)."""
    if not 0.0 <= hold < reach <= 1.0:
        raise ValueError(f"need 0 <= hold < reach <= 1, got hold={hold}, reach={reach}")
    frac = ((steps.double() / total - hold) / (reach - hold)).clamp(0.0, 1.0)
    spans = (min_span * (length / min_span) ** frac).long() // min_span * min_span
    return spans.clamp(min_span, length)  # multiples of min_span: few distinct shapes


def at_length(task: Task, length: int) -> Task:
    """``task`` at another ``length``; a question window longer than a quarter of it is cut
    to that quarter (at least the question), so a short example keeps room for its needles."""
    if isinstance(task, (KeyedNeedles, MultiKeyPasskey)):
        window = max(task.question_length, min(task.query_window, length // 4))
        return replace(task, length=length, query_window=window)
    return replace(task, length=length)


def shortest_length(task: Task, least: int) -> int:
    """The shortest of ``least, 2 * least, 4 * least, ...`` at which `at_length` can build
    ``task`` (a task with several pairs or needles needs room for them), at most
    ``task.length``: the shortest span of mixed lengths or of a curriculum."""
    if least <= 0:
        raise ValueError(f"the shortest span must be > 0, got {least}")
    length = least
    while length < task.length:
        try:
            at_length(task, length)
        except ValueError:
            length *= 2
        else:
            return length
    return task.length


class RecallDataset(Dataset[tuple[Tensor, Tensor]]):
    """``size`` examples of ``task``; example ``i`` is generated from ``(seed, i)`` on demand.

    ``min_span``: mixed lengths. Example ``i`` is the task at a length drawn log-uniformly
    from ``[min_span, task.length]`` (from the same generator), left-padded with `PAD`
    (targets `IGNORE`) to ``task.length`` (right-padded for `KeyedLookup`, whose question is
    at position 0): the model, given ``ids != PAD`` as its key
    padding mask, learns on short examples, where the needle is one of few tokens, and long
    ones alike. Every batch keeps one shape.

    ``spans``: ``(size,)`` lengths, example ``i`` generated at ``spans[i]`` tokens and not
    padded (a curriculum gives the examples of one step one span: `length_curriculum`).
    """

    def __init__(
        self,
        task: Task,
        size: int,
        seed: int,
        *,
        min_span: int | None = None,
        spans: Tensor | None = None,
    ) -> None:
        if size <= 0:
            raise ValueError(f"size must be > 0, got {size}")
        if min_span is not None and spans is not None:
            raise ValueError("give min_span (mixed lengths) or spans (set lengths), not both")
        if spans is not None and (spans.shape != (size,) or spans.dtype != torch.long):
            raise ValueError(f"spans must be a ({size},) long tensor, got {tuple(spans.shape)}")
        shortest = min_span if spans is None else int(spans.min())
        if shortest is not None:
            longest = task.length if spans is None else int(spans.max())
            if not 0 < shortest <= longest <= task.length:
                raise ValueError(f"spans must be in [1, {task.length}], got {shortest}..{longest}")
            at_length(task, shortest)  # a span the task cannot use fails here
        self.task, self.size, self.seed = task, size, seed
        self.min_span, self.spans = min_span, spans

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        if self.spans is not None:  # the example at its set length, unpadded
            return at_length(self.task, int(self.spans[index])).example(generator)
        if self.min_span is None:
            return self.task.example(generator)
        low, high = math.log(self.min_span), math.log(self.task.length)
        draw = float(torch.rand((), generator=generator, dtype=torch.float64))
        span = min(self.task.length, max(self.min_span, round(math.exp(low + draw * (high - low)))))
        ids, targets = at_length(self.task, span).example(generator)
        pad_ids = ids.new_full((self.task.length - span,), PAD)
        pad_targets = targets.new_full(pad_ids.shape, IGNORE)
        if isinstance(self.task, KeyedLookup):  # its question stays at position 0
            return torch.cat([ids, pad_ids]), torch.cat([targets, pad_targets])
        return torch.cat([pad_ids, ids]), torch.cat([pad_targets, targets])


__all__ = [
    "IGNORE",
    "MQAR",
    "PAD",
    "KeyedLookup",
    "KeyedNeedles",
    "MultiKeyPasskey",
    "Passkey",
    "RecallDataset",
    "ScatteredMQAR",
    "Task",
    "at_length",
    "length_curriculum",
]
