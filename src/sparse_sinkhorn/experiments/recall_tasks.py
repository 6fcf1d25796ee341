"""The tasks of ``sparse-sinkhorn recall``, as one table: how each is built from a preset, how
it is scored, and where its answer lies (the block a routing should read).

Two families, each with its own presets (`RECALL_PRESETS`, `QUERY_RECALL_PRESETS`):

* ``passkey``, ``mqar``: the answer block is the same for every question of a sequence
  (passkey: the block holding the one needle; MQAR: the pairs, all in block 0);
* ``keyed-needles``, ``mk-passkey``, ``mqar-scattered``: the answer block depends on the
  question (which needle or which pair is asked), so a routing must read the question;
* ``lookup``: the same for an encoder (``TaskSpec.encoder``): a `Classifier` reads the
  question at position 0 and names the asked needle's value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..data.recall import (
    IGNORE,
    MQAR,
    KeyedLookup,
    KeyedNeedles,
    MultiKeyPasskey,
    Passkey,
    ScatteredMQAR,
    Task,
)
from .presets import QUERY_RECALL_PRESETS, RECALL_PRESETS, RecallPreset


@dataclass(frozen=True)
class TaskSpec:
    """One task of `TASKS`."""

    build: Callable[[int, RecallPreset], Task]  # (length, preset) -> the task
    per_query: bool  # accuracy over questions (MQAR) instead of over sequences
    presets: dict[str, RecallPreset]  # by --preset name
    encoder: bool = False  # a Classifier reading position 0, instead of a causal LM


def _filler(preset: RecallPreset) -> dict[str, int]:
    return {} if preset.n_filler is None else {"n_filler": preset.n_filler}


TASKS: dict[str, TaskSpec] = {
    "passkey": TaskSpec(lambda n, p: Passkey(n, n_digits=p.n_digits), False, RECALL_PRESETS),
    "mqar": TaskSpec(lambda n, p: MQAR(n, n_pairs=p.n_pairs), True, RECALL_PRESETS),
    "keyed-needles": TaskSpec(
        lambda n, p: KeyedNeedles(n, n_needles=p.n_needles, **_filler(p)),
        False,
        QUERY_RECALL_PRESETS,
    ),
    "mk-passkey": TaskSpec(
        lambda n, p: MultiKeyPasskey(n, n_needles=p.n_needles, n_digits=p.n_digits, **_filler(p)),
        False,
        QUERY_RECALL_PRESETS,
    ),
    "mqar-scattered": TaskSpec(
        lambda n, p: ScatteredMQAR(n, n_pairs=p.n_pairs), True, QUERY_RECALL_PRESETS
    ),
    "lookup": TaskSpec(
        # no needle in the question's block, whatever the block size (the task's default
        # reserved positions at the cpu preset)
        lambda n, p: KeyedLookup(
            n,
            n_needles=p.n_needles,
            reserved=max(KeyedLookup.reserved, p.block_size),
            **_filler(p),
        ),
        True,  # one question a sequence
        QUERY_RECALL_PRESETS,
        encoder=True,
    ),
}


def answer_sources(task: Task, ids: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Where each scored question of a batch ``ids``, ``targets`` ``(B, L)`` reads its answer:
    ``(row, position, source)`` long tensors, one entry per question (its first scored
    position when it has several), ``source`` the position of the asked needle's first token
    (the ``KEY`` marker for passkey, the pair's key for MQAR)."""
    first = (targets != IGNORE) & ~torch.roll(targets != IGNORE, 1, dims=-1)
    row, pos = first.nonzero(as_tuple=True)
    if isinstance(task, Passkey):
        return row, pos, needle_source(task, ids)[row]
    if isinstance(task, (KeyedNeedles, KeyedLookup)):
        asked = ids[row, pos] - task.KEY0  # the asked key (the lookup's is at position 0)
        return row, pos, _keyed_source(task, ids[row], asked)
    # the key token names its needle or pair: its first occurrence in the sequence
    same = ids[row] == ids[row, pos][:, None]  # (Q, L)
    return row, pos, same.float().argmax(-1)


def needle_source(task: Task, ids: Tensor) -> Tensor:
    """``(B,)``: the position every question of a sequence reads its answer from, for the
    tasks where ``ids`` ``(B, L)`` alone say it: passkey (its ``KEY`` marker) and the lookup
    (the needle whose key stands at position 0). Other tasks: ValueError."""
    if isinstance(task, Passkey):
        return (ids == Passkey.KEY).float().argmax(-1)
    if isinstance(task, KeyedLookup):
        return _keyed_source(task, ids, ids[:, 0] - task.KEY0)
    raise ValueError(f"{type(task).__name__} has no one needle per sequence")


def _keyed_source(task: KeyedNeedles | KeyedLookup, ids: Tensor, asked: Tensor) -> Tensor:
    """``(Q,)``: in each row of ``ids`` ``(Q, L)``, the position of the needle whose key index
    is ``asked`` ``(Q,)``."""
    filler0 = task.needle0 + task.n_keys * task.n_values
    is_needle = (ids >= task.needle0) & (ids < filler0)
    key_of = torch.where(is_needle, (ids - task.needle0) // task.n_values, -1)
    return (key_of == asked[:, None]).float().argmax(-1)
