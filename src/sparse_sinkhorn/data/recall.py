"""Synthetic long-context retrieval tasks for causal language models, generated in-process.

Axes: L sequence length. Each example is ``(ids, targets)``, two ``(L,)`` long tensors: the
model reads ``ids`` and is scored only where ``targets != IGNORE`` (next-token prediction of
the answer tokens); everything else is context. Example ``i`` of a task is a pure function of
``(seed, i)``, so a dataset needs no storage and every run sees the same examples.

* :class:`Passkey`: random filler with ``KEY d1 .. dn`` (n digits) at a uniformly random
  position; the sequence ends ``QUERY d1 .. dn-1`` and the model must produce the digits
  (scored on all n). Accuracy: all n digits right (chance ``10**-n``).
* :class:`MQAR`: multi-query associative recall (Arora et al., 2023, "Zoology"): ``D``
  key-value pairs first, then each key queried once at a position drawn uniformly from the
  rest of the sequence (uniform key-query gaps, instead of Zoology's power law, so that
  recall reaches across the whole length); the model must produce the value after the key.
  Blank tokens fill the rest. Accuracy: the fraction of queries answered right.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

IGNORE = -100  # target of a position that is not scored (F.cross_entropy's ignore_index)
PAD = 0  # never produced; the models' padding id


@dataclass(frozen=True)
class Passkey:
    """Single-needle passkey retrieval; token ids: 0 pad, 1 KEY, 2 QUERY, 3..12 digits,
    then ``n_filler`` filler symbols."""

    length: int
    n_digits: int = 2
    n_filler: int = 51

    KEY = 1
    QUERY = 2
    DIGIT0 = 3

    def __post_init__(self) -> None:
        if self.n_digits < 1 or self.n_filler < 1:
            raise ValueError("n_digits and n_filler must be >= 1")
        if self.length < 2 * self.n_digits + 2:
            raise ValueError(
                f"length {self.length} is too short for a {self.n_digits}-digit passkey"
            )

    @property
    def vocab_size(self) -> int:
        return self.DIGIT0 + 10 + self.n_filler

    @property
    def chance(self) -> float:
        return 10.0**-self.n_digits

    def example(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        n, length = self.n_digits, self.length
        first_filler = self.DIGIT0 + 10
        ids = torch.randint(
            first_filler, first_filler + self.n_filler, (length,), generator=generator
        )
        digits = torch.randint(0, 10, (n,), generator=generator) + self.DIGIT0
        # the needle KEY d1..dn anywhere before the query QUERY d1..d(n-1)
        query_at = length - n  # QUERY, then n - 1 digits fill the sequence to its end
        pos = int(torch.randint(0, query_at - n, (1,), generator=generator))
        ids[pos] = self.KEY
        ids[pos + 1 : pos + 1 + n] = digits
        ids[query_at] = self.QUERY
        ids[query_at + 1 :] = digits[:-1]
        targets = torch.full((length,), IGNORE, dtype=torch.long)
        targets[query_at:] = digits  # QUERY predicts d1, d1 predicts d2, ...
        return ids, targets


@dataclass(frozen=True)
class MQAR:
    """Multi-query associative recall; token ids: 0 pad, 1 blank, then ``n_keys`` keys,
    then ``n_values`` values."""

    length: int
    n_pairs: int = 16
    n_keys: int = 64
    n_values: int = 64

    BLANK = 1
    KEY0 = 2

    def __post_init__(self) -> None:
        if not 1 <= self.n_pairs <= self.n_keys:
            raise ValueError(f"n_pairs must be in [1, n_keys={self.n_keys}], got {self.n_pairs}")
        if (self.length - 2 * self.n_pairs) // 2 < self.n_pairs:
            raise ValueError(
                f"length {self.length} cannot hold {self.n_pairs} pairs and their queries"
            )

    @property
    def vocab_size(self) -> int:
        return self.KEY0 + self.n_keys + self.n_values

    @property
    def chance(self) -> float:
        return 1.0 / self.n_values

    def example(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        d, length = self.n_pairs, self.length
        keys = torch.randperm(self.n_keys, generator=generator)[:d] + self.KEY0  # distinct
        values = torch.randint(0, self.n_values, (d,), generator=generator)
        values = values + self.KEY0 + self.n_keys
        ids = torch.full((length,), self.BLANK, dtype=torch.long)
        ids[0 : 2 * d : 2], ids[1 : 2 * d : 2] = keys, values
        slots = (length - 2 * d) // 2  # (key, value) query slots after the context
        where = torch.randperm(slots, generator=generator)[:d] * 2 + 2 * d  # uniform gaps
        order = torch.randperm(d, generator=generator)  # each key queried once
        ids[where], ids[where + 1] = keys[order], values[order]
        targets = torch.full((length,), IGNORE, dtype=torch.long)
        targets[where] = values[order]  # the query key predicts its value
        return ids, targets


Task = Passkey | MQAR


class RecallDataset(Dataset[tuple[Tensor, Tensor]]):
    """``size`` examples of ``task``; example ``i`` is generated from ``(seed, i)`` on demand."""

    def __init__(self, task: Task, size: int, seed: int) -> None:
        if size <= 0:
            raise ValueError(f"size must be > 0, got {size}")
        self.task, self.size, self.seed = task, size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return self.task.example(generator)


__all__ = ["IGNORE", "MQAR", "PAD", "Passkey", "RecallDataset", "Task"]
