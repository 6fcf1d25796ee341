"""Where causal Sinkhorn balancing sends each query block, for random routing logits.

A causal plan is strictly lower triangular; balancing it towards rows and columns that sum to 1
leaves one such matrix, the shift "block i takes block i-1". This script measures how close
the paper's 8 rounds come to it: the mass each row puts on its previous block, and how often
that block is the row's argmax (what hard routing takes).

    python examples/causal_balancing.py
"""

from __future__ import annotations

import torch

from sparse_sinkhorn.ops import sinkhorn_plan

BLOCKS = 16


def main() -> None:
    g = torch.Generator().manual_seed(0)
    print("| logit scale | rounds | mass on block i-1 (rows 1..15) | rows whose argmax is i-1 |")
    print("|---|---|---|---|")
    for scale in (1.0, 3.0, 10.0):
        for rounds in (1, 8, 20):
            logits = torch.randn(64, 4, BLOCKS, BLOCKS, generator=g) * scale
            p = sinkhorn_plan(logits, block_size=32, is_causal=True, n_iters=rounds).P
            previous = torch.diagonal(p, offset=-1, dim1=-2, dim2=-1)  # (64, 4, N-1)
            argmax = p[..., 1:, :].argmax(-1) == torch.arange(BLOCKS - 1)
            print(f"| {scale:g} | {rounds} | {previous.mean():.3f} | {argmax.float().mean():.3f} |")


if __name__ == "__main__":
    main()
