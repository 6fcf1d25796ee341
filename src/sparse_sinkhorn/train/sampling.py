"""Deterministic data order shared by every rank, so results do not depend on the world size.

Epoch ``e`` visits ``torch.randperm(len(dataset))`` drawn from a generator seeded with
``seed + e`` (as ``DistributedSampler`` does). Each epoch holds ``len(dataset) // batch_size``
optimizer steps (the remainder is dropped). The global batch of step ``s`` (0-based) is the
slice ``[p * batch_size, (p + 1) * batch_size)`` of epoch ``s // steps_per_epoch``'s permutation,
with ``p = s % steps_per_epoch``. That global batch is cut into ``world_size * grad_accum``
equal micro-batches; rank ``r`` takes the contiguous chunks ``r * grad_accum .. (r + 1) *
grad_accum - 1``. Hence the union of all ranks' micro-batches at step ``s`` is the same set of
examples for any (world_size, grad_accum) with the same ``batch_size``, and the order is a pure
function of the step, which makes resuming exact.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full global batches in one pass over the data (``ValueError`` if there is none)."""
    if num_examples < batch_size:
        raise ValueError(
            f"the dataset has {num_examples} examples, fewer than batch_size={batch_size}; "
            "lower batch_size or use more data"
        )
    return num_examples // batch_size


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of ``epoch`` (int64 indices, same on every rank)."""
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(num_examples, generator=generator)


def first_epoch_steps(num_examples: int, batch_size: int, seed: int) -> torch.Tensor:
    """``(num_examples,)`` int64: the optimizer step that consumes each example in the first
    epoch (``steps_per_epoch`` for the remainder the epoch drops), so that a dataset can make
    an example depend on when it is trained on (a curriculum)."""
    per_epoch = steps_per_epoch(num_examples, batch_size)
    steps = torch.full((num_examples,), per_epoch, dtype=torch.long)
    order = epoch_permutation(num_examples, seed, 0)[: per_epoch * batch_size]
    steps[order] = torch.arange(per_epoch * batch_size) // batch_size
    return steps


def global_batch_indices(
    step: int, *, num_examples: int, batch_size: int, seed: int
) -> torch.Tensor:
    """Indices of the global batch consumed by optimizer step ``step`` (0-based)."""
    per_epoch = steps_per_epoch(num_examples, batch_size)
    epoch, position = divmod(step, per_epoch)
    order = epoch_permutation(num_examples, seed, epoch)
    return order[position * batch_size : (position + 1) * batch_size]


def micro_batch_indices(
    step: int,
    *,
    rank: int,
    world_size: int,
    grad_accum: int,
    num_examples: int,
    batch_size: int,
    seed: int,
) -> list[list[int]]:
    """The ``grad_accum`` micro-batches (lists of indices) of ``rank`` at step ``step``."""
    micro = batch_size // (world_size * grad_accum)
    batch = global_batch_indices(step, num_examples=num_examples, batch_size=batch_size, seed=seed)
    first = rank * grad_accum
    return [
        batch[(first + m) * micro : (first + m + 1) * micro].tolist() for m in range(grad_accum)
    ]


class MicroBatchSampler(Sampler[list[int]]):
    """Batch sampler yielding this rank's micro-batches for steps ``start_step .. steps - 1``.

    Use it as ``DataLoader(dataset, batch_sampler=...)``; one iterator spans all epochs.
    """

    def __init__(
        self,
        *,
        num_examples: int,
        batch_size: int,
        grad_accum: int,
        rank: int,
        world_size: int,
        seed: int,
        start_step: int,
        steps: int,
    ) -> None:
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start_step = start_step
        self.steps = steps
        self.steps_per_epoch = steps_per_epoch(num_examples, batch_size)

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step) * self.grad_accum

    def __iter__(self) -> Iterator[list[int]]:
        micro = self.batch_size // (self.world_size * self.grad_accum)
        first = self.rank * self.grad_accum
        cached_epoch, order = -1, torch.empty(0, dtype=torch.long)
        for step in range(self.start_step, self.steps):
            epoch, position = divmod(step, self.steps_per_epoch)
            if epoch != cached_epoch:
                cached_epoch, order = epoch, epoch_permutation(self.num_examples, self.seed, epoch)
            batch = order[position * self.batch_size : (position + 1) * self.batch_size]
            for m in range(self.grad_accum):
                yield batch[(first + m) * micro : (first + m + 1) * micro].tolist()
