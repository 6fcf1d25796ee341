"""Where causal Sinkhorn balancing sends each query block, for random routing logits.

A causal plan is strictly lower triangular; balancing it towards rows and columns that sum to 1
leaves one such matrix, the shift "block i takes block i-1". This script measures how close
the paper's 8 rounds come to it: the mass each row puts on its previous block, and how often
that block is the row's argmax (what hard routing takes). Beside it, ``"sinkhorn-targets"``
(columns balanced towards targets ``2 (i - j) / (i + 1)`` a causal plan can meet): the same
two figures, how many blocks back the argmax reaches on average, and the L1 distance of the
column loads to the targets of the last row (rows-only softmax for scale).

    python examples/causal_balancing.py
"""

from __future__ import annotations

import torch

from sparse_sinkhorn.ops import sinkhorn_plan
from sparse_sinkhorn.ops.sinkhorn import causal_block_mask, causal_log_targets

BLOCKS = 16


def _figures(p: torch.Tensor) -> list[float]:
    """Mass on block i-1, share of rows whose argmax is i-1, mean blocks back of the argmax
    (rows 1..15), L1 distance of the column loads to the last row's targets."""
    previous = torch.diagonal(p, offset=-1, dim1=-2, dim2=-1)  # (64, 4, N-1)
    back = torch.arange(1, BLOCKS) - p[..., 1:, :].argmax(-1)
    targets = causal_log_targets(causal_block_mask(BLOCKS)).exp()[-1]
    loads = (p.sum(-2) - targets).abs().sum(-1)
    return [float(x.float().mean()) for x in (previous, back == 1, back, loads)]


def main() -> None:
    g = torch.Generator().manual_seed(0)
    balances = ("sinkhorn", "sinkhorn-targets", "softmax")
    print("Per balancing: mass on block i-1 / rows whose argmax is i-1 / mean blocks back of")
    print("the argmax / L1 distance of the column loads to t(15, j) = 2 (15 - j) / 16")
    print()
    print("| logit scale | rounds | " + " | ".join(f"`{b}`" for b in balances) + " |")
    print("|---|---|---|---|---|")
    for scale in (1.0, 3.0, 10.0):
        for rounds in (1, 8, 20):
            logits = torch.randn(64, 4, BLOCKS, BLOCKS, generator=g) * scale
            cells = []
            for balance in balances:
                p = sinkhorn_plan(
                    logits, block_size=32, is_causal=True, n_iters=rounds, balance=balance
                ).P
                cells.append(" / ".join(f"{x:.2f}" for x in _figures(p)))
            print(f"| {scale:g} | {rounds} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
