"""A torchrun worker for ``test_gpu.py``: join a process group (``nccl`` on CUDA, or ``gloo``),
train a DDP-wrapped Sinkhorn language model for a few steps under bf16 autocast, all-reduce,
and print ``OK backend=<name>``.

    torchrun --standalone --nproc_per_node=1 tests/helpers_gpu_ddp.py nccl
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from sparse_sinkhorn.models import LanguageModel, LanguageModelConfig
from sparse_sinkhorn.nn import AttentionConfig


def main() -> None:
    backend = sys.argv[1] if len(sys.argv) > 1 else "nccl"
    local_rank = int(os.environ["LOCAL_RANK"])
    cuda = backend == "nccl"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        dist.init_process_group(backend, device_id=device)
    else:
        dist.init_process_group(backend)
    torch.manual_seed(0)
    att = AttentionConfig(kind="sinkhorn", block_size=16, max_len=128)
    cfg = LanguageModelConfig(
        vocab_size=64, d_model=64, n_heads=2, n_layers=2, d_ff=128, attention=att
    )
    model = DistributedDataParallel(
        LanguageModel(cfg).to(device), device_ids=[local_rank] if cuda else None
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        ids = torch.randint(0, 64, (4, 129), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    world = dist.get_world_size()
    total = torch.full((1,), float(dist.get_rank() + 1), device=device)
    dist.all_reduce(total)
    assert total.item() == world * (world + 1) / 2, total
    assert all(torch.isfinite(torch.tensor(losses))), losses
    print(f"OK backend={dist.get_backend()} world={world} losses={losses}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
