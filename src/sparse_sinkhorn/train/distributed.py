"""Process-group helpers: one code path for a single process and for ``torchrun``.

``torchrun --nproc_per_node=N script.py`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``;
[`init_distributed`][sparse_sinkhorn.train.init_distributed] reads them and joins the group (nccl
on CUDA, gloo on CPU). Without them it is a no-op that describes a world of one process.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        rank: global rank, ``0 .. world_size - 1``.
        world_size: the number of processes.
        local_rank: the rank on this machine (selects the CUDA device).
        device: ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _device_for(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed() -> DistInfo:
    """Join the torchrun process group if the torchrun env vars are set (idempotent)."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return DistInfo(rank=0, world_size=1, local_rank=0, device=_device_for(0))
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device_for(local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def cleanup_distributed() -> None:
    """Leave the process group, if any: call it once on every rank at the end of a torchrun script.

    It first frees garbage (tensors in reference cycles that gloo work objects may still hold
    would otherwise be destroyed during interpreter shutdown, which can abort the process with
    "terminate called without an active exception") and waits for every rank, so no rank tears
    its connections down while another still talks to it.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """``dist.barrier()`` when running distributed, else nothing."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` over ranks in place (identity without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values
