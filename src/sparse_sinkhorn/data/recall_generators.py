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

Tasks whose answer lies in a block that depends on the question (RULER's multi-key needles,
MQAR with the pairs spread over the context); the block to read differs between queries, so a
routing that only finds "the marked block" cannot solve them:

* `MultiKeyPasskey`: random filler with ``n_needles`` needles ``KEYk v1 .. vn`` (distinct
  keys ``k``, values drawn from ``n_values`` symbols) at random positions; one question
  ``QUERY KEYj v1 .. vn-1`` at a random position of the last ``query_window`` tokens (so not
  aligned to a block start), random filler after it; the model must produce needle ``j``'s
  values. Accuracy: all n values right (chance ``n_values**-n``).
* `ScatteredMQAR`: MQAR whose ``n_pairs`` key-value pairs lie at random positions of the
  first ``context_share`` of the sequence, each key queried once (the key, then a blank: the
  key is scored on predicting its value) at a random position after the context. Answers are
  not shown after their queries, so a query cannot be answered by elimination (the one value
  not yet shown), only by finding its key. ``n_distractors`` more pairs with other keys,
  spread evenly over the context, put pairs in every context block. Accuracy: the fraction of
  queries answered right (chance ``1/n_values``).

And one for an encoder, the paper's non-causal setting, where a block's routing sees the
block's own tokens:

* `KeyedLookup`: the asked key at position 0, one-token needles (key and value in one
  symbol) in later blocks; a classifier reading position 0 must name the asked needle's
  value.
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


def _check_counts(task: MultiKeyPasskey | KeyedNeedles | KeyedLookup) -> None:
    """Needles with distinct keys, and at least one value and filler symbol."""
    if not 1 <= task.n_needles <= task.n_keys:
        raise ValueError(f"n_needles must be in [1, n_keys={task.n_keys}], got {task.n_needles}")
    if min(task.n_values, task.n_filler) < 1:
        raise ValueError("n_values and n_filler must be >= 1")


def _check_needles(task: MultiKeyPasskey | KeyedNeedles, slots: int) -> None:
    """The sizes the keyed-needle tasks share: `_check_counts`, a question window that holds
    the question, and ``slots`` needle places before it for every needle."""
    _check_counts(task)
    if task.query_window < task.question_length:
        raise ValueError(f"query_window must be >= {task.question_length} (the question)")
    if slots < task.n_needles:
        raise ValueError(
            f"length {task.length} cannot hold {task.n_needles} needles before a "
            f"{task.query_window}-token question window"
        )


@dataclass(frozen=True)
class MultiKeyPasskey:
    """Multi-key needles, one asked; token ids: 0 pad, 1 QUERY, then ``n_keys`` keys, then
    ``n_values`` value symbols, then ``n_filler`` filler symbols."""

    length: int
    n_needles: int = 4
    n_keys: int = 16
    n_values: int = 16
    n_digits: int = 1  # value symbols per needle
    n_filler: int = 16
    query_window: int = 64  # the question starts at a random position of the last tokens

    QUERY = 1
    KEY0 = 2

    def __post_init__(self) -> None:
        if self.n_digits < 1:
            raise ValueError(f"n_digits must be >= 1, got {self.n_digits}")
        _check_needles(self, self.context_slots)

    @property
    def question_length(self) -> int:
        return self.n_digits + 2  # QUERY KEYj v1 .. vn (the last value is only predicted)

    @property
    def context_slots(self) -> int:
        return (self.length - self.query_window) // (self.n_digits + 1)

    @property
    def vocab_size(self) -> int:
        return self.KEY0 + self.n_keys + self.n_values + self.n_filler

    @property
    def chance(self) -> float:
        return float(self.n_values) ** -self.n_digits

    def example(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        n, length, width = self.n_digits, self.length, self.n_digits + 1
        value0 = self.KEY0 + self.n_keys
        filler0 = value0 + self.n_values
        ids = torch.randint(filler0, filler0 + self.n_filler, (length,), generator=generator)
        keys = torch.randperm(self.n_keys, generator=generator)[: self.n_needles] + self.KEY0
        values = torch.randint(0, self.n_values, (self.n_needles, n), generator=generator)
        values = values + value0
        slots = _free_slots(
            self.context_slots, torch.empty(0, dtype=torch.long), self.n_needles, generator
        )
        for slot, key, vals in zip(slots.tolist(), keys, values, strict=True):
            ids[slot * width] = key
            ids[slot * width + 1 : slot * width + width] = vals
        asked = int(torch.randint(0, self.n_needles, (1,), generator=generator))
        window0 = length - self.query_window
        span = self.query_window - self.question_length + 1
        at = window0 + int(torch.randint(0, span, (1,), generator=generator))
        ids[at], ids[at + 1] = self.QUERY, keys[asked]
        ids[at + 2 : at + 1 + n] = values[asked, :-1]
        targets = torch.full((length,), IGNORE, dtype=torch.long)
        targets[at + 1 : at + 1 + n] = values[asked]  # KEYj predicts v1, v1 predicts v2, ...
        return ids, targets


@dataclass(frozen=True)
class KeyedNeedles:
    """Multi-key needles of one token each; token ids: 0 pad, 1 QUERY, then ``n_keys`` keys,
    then ``n_values`` values (answers only), then ``n_keys * n_values`` needles (needle
    ``(k, v)`` is ``NEEDLE0 + k * n_values + v``), then ``n_filler`` filler symbols."""

    length: int
    n_needles: int = 4
    n_keys: int = 16
    n_values: int = 16
    n_filler: int = 16
    query_window: int = 64  # the question starts at a random position of the last tokens

    QUERY = 1
    KEY0 = 2

    def __post_init__(self) -> None:
        _check_needles(self, self.length - self.query_window)  # one token a needle

    @property
    def question_length(self) -> int:
        return 2  # QUERY KEYj

    @property
    def needle0(self) -> int:
        return self.KEY0 + self.n_keys + self.n_values

    @property
    def vocab_size(self) -> int:
        return self.needle0 + self.n_keys * self.n_values + self.n_filler

    @property
    def chance(self) -> float:
        return 1.0 / self.n_values

    def example(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        length = self.length
        ids, keys, values, asked = _one_token_needles(
            self, 0, length - self.query_window, generator
        )
        at = (
            length
            - self.query_window
            + int(torch.randint(0, self.query_window - 1, (1,), generator=generator))
        )
        ids[at], ids[at + 1] = self.QUERY, self.KEY0 + keys[asked]
        targets = torch.full((length,), IGNORE, dtype=torch.long)
        targets[at + 1] = self.KEY0 + self.n_keys + values[asked]  # KEYj predicts the value
        return ids, targets


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


@dataclass(frozen=True)
class KeyedLookup:
    """The encoder lookup: a key at position 0, one-token needles in the rest; token ids:
    0 pad, then ``n_keys`` keys, then ``n_keys * n_values`` needles (needle ``(k, v)`` is
    ``needle0 + k * n_values + v``), then ``n_filler`` filler symbols.

    Position 0 holds the asked key ``KEYj``; ``n_needles`` needles with distinct keys lie at
    random positions from ``reserved`` on (so with blocks of at most ``reserved`` tokens the
    asked needle is in another block than the question), random filler elsewhere. The
    target is a class, not a token: ``targets[0]`` is needle ``j``'s value ``v`` in
    ``[0, n_values)`` (a classifier reads position 0), every other position `IGNORE`.
    Accuracy: the value right (chance ``1/n_values``)."""

    length: int
    n_needles: int = 4
    n_keys: int = 16
    n_values: int = 16
    n_filler: int = 16
    reserved: int = 64  # positions 0 .. reserved - 1 hold no needle

    KEY0 = 1

    def __post_init__(self) -> None:
        _check_counts(self)
        if self.reserved < 1:
            raise ValueError(
                f"reserved must be >= 1 (position 0 is the question), got {self.reserved}"
            )
        if self.length - self.reserved < self.n_needles:
            raise ValueError(
                f"length {self.length} cannot hold {self.n_needles} needles after the first "
                f"{self.reserved} positions"
            )

    @property
    def needle0(self) -> int:
        return self.KEY0 + self.n_keys

    @property
    def vocab_size(self) -> int:
        return self.needle0 + self.n_keys * self.n_values + self.n_filler

    @property
    def n_classes(self) -> int:
        return self.n_values

    @property
    def chance(self) -> float:
        return 1.0 / self.n_values

    def example(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        ids, keys, values, asked = _one_token_needles(self, self.reserved, self.length, generator)
        ids[0] = self.KEY0 + keys[asked]
        targets = torch.full((self.length,), IGNORE, dtype=torch.long)
        targets[0] = values[asked]  # a class index
        return ids, targets


def _one_token_needles(
    task: KeyedNeedles | KeyedLookup, start: int, stop: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Filler of ``task.length`` tokens with ``task.n_needles`` one-token needles (distinct
    keys) at random positions of ``[start, stop)``: ``(ids, keys, values, asked)``, keys and
    values as indices, ``asked`` the index of the needle the question names."""
    filler0 = task.needle0 + task.n_keys * task.n_values
    ids = torch.randint(filler0, filler0 + task.n_filler, (task.length,), generator=generator)
    keys = torch.randperm(task.n_keys, generator=generator)[: task.n_needles]
    values = torch.randint(0, task.n_values, (task.n_needles,), generator=generator)
    where = torch.randperm(stop - start, generator=generator)[: task.n_needles] + start
    ids[where] = task.needle0 + keys * task.n_values + values
    asked = int(torch.randint(0, task.n_needles, (1,), generator=generator))
    return ids, keys, values, asked
