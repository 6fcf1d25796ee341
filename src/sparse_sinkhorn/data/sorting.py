"""Synthetic seq2seq sorting data, as Tensor2Tensor's ``algorithmic_sort_problem`` makes it.

Tensor2Tensor (1.15.7, ``data_generators/algorithmic.py``) draws every example's length
uniformly from ``[1, max_length]`` (``max_length`` = the training length L for training, 2L for
its dev set), draws the symbols with replacement from an alphabet of ``max(L, 2L) = 2L``
symbols, sorts them for the target, and appends an end-of-sequence id to both.

Token ids here: 0 = padding, 1 = start-of-sequence (fed to the decoder first), 2 = EOS,
``3 .. 3 + n_symbols - 1`` = symbols. Examples are a pure function of ``(seed, index)``, so
every rank and every resume sees the same data without storing it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
FIRST_SYMBOL = 3


def vocab_size(n_symbols: int) -> int:
    """Token ids in use: padding, BOS, EOS and the symbols."""
    return FIRST_SYMBOL + n_symbols


class SortingDataset(Dataset[tuple[Tensor, Tensor]]):
    """``n_examples`` pairs ``(src, tgt)`` of 1-D LongTensors, each ending in ``EOS_ID``.

    Args:
        n_examples: dataset size (indices ``0 .. n_examples - 1``).
        max_length: longest sequence (EOS not counted); lengths are uniform in
            ``[min_length, max_length]``.
        n_symbols: alphabet size (Tensor2Tensor uses twice the training length).
        seed: distinct seeds give disjoint streams (use different ones for train and dev).
        min_length: shortest sequence; ``min_length == max_length`` gives one fixed length.
    """

    def __init__(
        self,
        n_examples: int,
        max_length: int,
        n_symbols: int,
        *,
        seed: int = 0,
        min_length: int = 1,
    ) -> None:
        if n_examples <= 0:
            raise ValueError(f"n_examples must be > 0, got {n_examples}")
        if not 1 <= min_length <= max_length:
            raise ValueError(
                f"need 1 <= min_length <= max_length, got min_length={min_length}, "
                f"max_length={max_length}"
            )
        if n_symbols < 2:
            raise ValueError(f"n_symbols must be >= 2, got {n_symbols}")
        self.n_examples, self.max_length, self.min_length = n_examples, max_length, min_length
        self.n_symbols, self.seed = n_symbols, seed

    @property
    def vocab_size(self) -> int:
        return vocab_size(self.n_symbols)

    def __len__(self) -> int:
        return self.n_examples

    @property
    def max_tokens(self) -> int:
        """The longest example in tokens: ``max_length`` symbols and EOS."""
        return self.max_length + 1

    def _draw_length(self, index: int) -> tuple[int, torch.Generator]:
        if not 0 <= index < self.n_examples:
            raise IndexError(f"index {index} out of range for {self.n_examples} examples")
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return int(torch.randint(self.min_length, self.max_length + 1, (), generator=gen)), gen

    def length_of(self, index: int) -> int:
        """The number of symbols of example ``index`` (EOS not counted), without drawing them."""
        return self._draw_length(index)[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        n, gen = self._draw_length(index)
        symbols = torch.randint(FIRST_SYMBOL, self.vocab_size, (n,), generator=gen)
        eos = torch.tensor([EOS_ID])
        return torch.cat([symbols, eos]), torch.cat([symbols.sort().values, eos])


def collate_sorting(pairs: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Pad examples with ``PAD_ID`` to the longest in the batch: ``(B, S)`` sources, ``(B, T)``
    targets (``S == T``: a sorted target is as long as its source)."""
    if not pairs:
        raise ValueError("cannot collate an empty batch")
    srcs = torch.nn.utils.rnn.pad_sequence([p[0] for p in pairs], True, PAD_ID)
    tgts = torch.nn.utils.rnn.pad_sequence([p[1] for p in pairs], True, PAD_ID)
    return srcs, tgts


def sorting_batch(dataset: SortingDataset, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
    """The examples at ``indices``, padded into one batch (see `collate_sorting`)."""
    return collate_sorting([dataset[i] for i in indices])


def strip_after_eos(tokens: Sequence[int]) -> list[int]:
    """A decoded sequence up to and including its first ``EOS_ID``, without padding.

    A sequence that never emits EOS is kept whole (its missing EOS counts as an error).
    """
    out: list[int] = []
    for t in tokens:
        if t == PAD_ID:
            continue
        out.append(int(t))
        if t == EOS_ID:
            break
    return out
