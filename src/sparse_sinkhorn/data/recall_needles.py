"""The needle tasks whose answer lies in a block that depends on the question (RULER's
multi-key needles); the block to read differs between questions, so a routing that only finds
"the marked block" cannot solve them. Examples as in `sparse_sinkhorn.data.recall_generators`
(``(ids, targets)``, a pure function of ``(seed, i)``).

* `MultiKeyPasskey`: random filler with ``n_needles`` needles ``KEYk v1 .. vn`` (distinct
  keys ``k``, values drawn from ``n_values`` symbols) at random positions; one question
  ``QUERY KEYj v1 .. vn-1`` at a random position of the last ``query_window`` tokens (so not
  aligned to a block start), random filler after it; the model must produce needle ``j``'s
  values. Accuracy: all n values right (chance ``n_values**-n``).
* `KeyedNeedles`: the same with one-token needles (a token stands for a key-value pair) and
  the question ``QUERY KEYj``: finding the asked needle answers it.

And one for an encoder, the paper's non-causal setting, where a block's routing sees the
block's own tokens:

* `KeyedLookup`: the asked key at position 0, one-token needles in later blocks; a classifier
  reading position 0 must name the asked needle's value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .recall_generators import IGNORE, _free_slots


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
