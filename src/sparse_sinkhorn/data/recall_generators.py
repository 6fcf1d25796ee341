"""The synthetic long-context retrieval tasks (generators of one example each); the dataset
that draws from them is `sparse_sinkhorn.data.recall`.

Axes: L sequence length. Each example is ``(ids, targets)``, two ``(L,)`` long tensors: the
model reads ``ids`` and is scored only where ``targets != IGNORE`` (next-token prediction of
the answer tokens); everything else is context. Example ``i`` of a task is a pure function of
``(seed, i)``, so a dataset needs no storage and every run sees the same examples.

* `Passkey`: random filler with ``KEY d1 .. dn`` (n digits) at a uniformly random
  position; the sequence ends ``QUERY d1 .. dn-1`` and the model must produce the digits
  (scored on all n). Accuracy: all n digits right (chance ``10**-n``).
* `MQAR`: multi-query associative recall (Arora et al., 2023, "Zoology"): ``D``
  key-value pairs first, then each key queried once at a position drawn uniformly from the
  rest of the sequence (uniform key-query gaps, instead of Zoology's power law, so that
  recall reaches across the whole length); the model must produce the value after the key.
  Blank tokens fill the rest. Accuracy: the fraction of queries answered right.

`ScatteredMQAR` is MQAR whose answer block depends on the question (the pairs spread over
the context); the needle tasks of that kind are in `sparse_sinkhorn.data.recall_needles`:

* `ScatteredMQAR`: MQAR whose ``n_pairs`` key-value pairs lie at random positions of the
  first ``context_share`` of the sequence, each key queried once (the key, then a blank: the
  key is scored on predicting its value) at a random position after the context. Answers are
  not shown after their queries, so a query cannot be answered by elimination (the one value
  not yet shown), only by finding its key. ``n_distractors`` more pairs with other keys,
  spread evenly over the context, put pairs in every context block. Accuracy: the fraction of
  queries answered right (chance ``1/n_values``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

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


class _KeyValueVocab:
    """The vocabulary of the MQAR tasks: 0 pad, 1 blank, then ``n_keys`` keys, then
    ``n_values`` values; and the draw of their key-value pairs."""

    BLANK = 1
    KEY0 = 2
    n_keys: int
    n_values: int

    @property
    def vocab_size(self) -> int:
        return self.KEY0 + self.n_keys + self.n_values

    @property
    def chance(self) -> float:
        return 1.0 / self.n_values

    def _pairs(self, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``count`` pairs as token ids: distinct keys, and values drawn uniformly."""
        keys = torch.randperm(self.n_keys, generator=generator)[:count] + self.KEY0
        values = torch.randint(0, self.n_values, (count,), generator=generator)
        return keys, values + self.KEY0 + self.n_keys


@dataclass(frozen=True)
class MQAR(_KeyValueVocab):
    """Multi-query associative recall; token ids: 0 pad, 1 blank, then ``n_keys`` keys,
    then ``n_values`` values."""

    length: int
    n_pairs: int = 16
    n_keys: int = 64
    n_values: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.n_pairs <= self.n_keys:
            raise ValueError(f"n_pairs must be in [1, n_keys={self.n_keys}], got {self.n_pairs}")
        if (self.length - 2 * self.n_pairs) // 2 < self.n_pairs:
            raise ValueError(
                f"length {self.length} cannot hold {self.n_pairs} pairs and their queries"
            )

    def example(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        d, length = self.n_pairs, self.length
        keys, values = self._pairs(d, generator)
        ids = torch.full((length,), self.BLANK, dtype=torch.long)
        ids[0 : 2 * d : 2], ids[1 : 2 * d : 2] = keys, values
        slots = (length - 2 * d) // 2  # (key, value) query slots after the context
        where = torch.randperm(slots, generator=generator)[:d] * 2 + 2 * d  # uniform gaps
        order = torch.randperm(d, generator=generator)  # each key queried once
        ids[where], ids[where + 1] = keys[order], values[order]
        targets = torch.full((length,), IGNORE, dtype=torch.long)
        targets[where] = values[order]  # the query key predicts its value
        return ids, targets


def _free_slots(n_slots: int, taken: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` distinct slot indices in ``[0, n_slots)`` outside ``taken``, in random order."""
    free = torch.ones(n_slots, dtype=torch.bool)
    free[taken] = False
    candidates = free.nonzero().squeeze(-1)
    return candidates[torch.randperm(len(candidates), generator=generator)[:count]]


@dataclass(frozen=True)
class ScatteredMQAR(_KeyValueVocab):
    """MQAR with pairs spread over the context; token ids: 0 pad, 1 blank, then ``n_keys``
    keys, then ``n_values`` values."""

    length: int
    n_pairs: int = 8
    n_keys: int = 64
    n_values: int = 64
    n_distractors: int = 0  # further pairs (other keys, never asked), one per equal stretch
    context_share: float = 0.5  # the pairs lie in this leading share of the sequence

    def __post_init__(self) -> None:
        if self.n_pairs < 1 or self.n_distractors < 0:
            raise ValueError("n_pairs must be >= 1 and n_distractors >= 0")
        if self.n_pairs + self.n_distractors > self.n_keys:
            raise ValueError(
                f"n_pairs + n_distractors = {self.n_pairs + self.n_distractors} needs as many "
                f"distinct keys; n_keys is {self.n_keys}"
            )
        if not 0.0 < self.context_share < 1.0:
            raise ValueError(f"context_share must be in (0, 1), got {self.context_share}")
        if self.context_slots < self.n_pairs + self.n_distractors:
            raise ValueError(f"length {self.length} cannot hold the pairs in its context")
        if self.length // 2 - self.context_slots < self.n_pairs:
            raise ValueError(f"length {self.length} cannot hold {self.n_pairs} queries")

    @property
    def context_slots(self) -> int:
        return int(self.length * self.context_share) // 2

    def example(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        d, extra, slots = self.n_pairs, self.n_distractors, self.context_slots
        keys, values = self._pairs(d + extra, generator)
        # distractor i in stretch i of the context, then the asked pairs in free slots
        stretch = torch.arange(extra) * slots // max(extra, 1)
        width = (torch.arange(1, extra + 1) * slots // max(extra, 1)) - stretch
        offset = (torch.rand(extra, generator=generator) * width).long()
        distractor_slots = stretch + offset
        pair_slots = _free_slots(slots, distractor_slots, d, generator)
        ids = torch.full((self.length,), self.BLANK, dtype=torch.long)
        where = torch.cat([pair_slots, distractor_slots]) * 2
        ids[where], ids[where + 1] = keys, values
        query_slots = self.length // 2 - slots  # (key, value) slots after the context
        at = (torch.randperm(query_slots, generator=generator)[:d] + slots) * 2
        order = torch.randperm(d, generator=generator)  # each asked key queried once
        ids[at] = keys[order]  # the value is never shown after a query (see the class)
        targets = torch.full((self.length,), IGNORE, dtype=torch.long)
        targets[at] = values[order]
        return ids, targets
