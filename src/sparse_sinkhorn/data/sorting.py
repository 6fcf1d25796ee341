"""Synthetic seq2seq sorting data (Tensor2Tensor's algorithmic sort problem).

Each example is a random sequence of symbols; the target is the same symbols sorted
ascending. Token ids: 0 = padding, 1 = start-of-sequence, ``2 .. 2 + n_symbols - 1`` symbols.
Examples are a pure function of ``(seed, index)``, so every rank and every resume sees the
same data without storing it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset

PAD_ID = 0
BOS_ID = 1
FIRST_SYMBOL = 2


class SortingDataset(Dataset[tuple[Tensor, Tensor]]):
    """``n_examples`` pairs ``(src, tgt)`` of LongTensors of length ``length``.

    Args:
        n_examples: dataset size (indices ``0 .. n_examples - 1``).
        length: sequence length (source and target).
        n_symbols: alphabet size.
        seed: distinct seeds give disjoint streams (use different ones for train and eval).
    """

    def __init__(self, n_examples: int, length: int, n_symbols: int, *, seed: int = 0) -> None:
        if n_examples <= 0 or length <= 0:
            raise ValueError(f"n_examples and length must be > 0, got {n_examples}, {length}")
        if n_symbols < 2:
            raise ValueError(f"n_symbols must be >= 2, got {n_symbols}")
        self.n_examples, self.length, self.n_symbols, self.seed = (
            n_examples,
            length,
            n_symbols,
            seed,
        )

    @property
    def vocab_size(self) -> int:
        return FIRST_SYMBOL + self.n_symbols

    def __len__(self) -> int:
        return self.n_examples

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < self.n_examples:
            raise IndexError(f"index {index} out of range for {self.n_examples} examples")
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        src = torch.randint(FIRST_SYMBOL, self.vocab_size, (self.length,), generator=gen)
        return src, src.sort().values


def sorting_batch(dataset: SortingDataset, indices: range | list[int]) -> tuple[Tensor, Tensor]:
    """Stack examples into ``(B, L)`` source and target tensors."""
    pairs = [dataset[i] for i in indices]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
