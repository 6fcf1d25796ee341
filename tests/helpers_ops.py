"""Checks on the op shared by the CPU and GPU test files."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from sparse_sinkhorn.ops import sinkhorn_attention


def assert_exactly_causal(
    mode: dict[str, Any],
    *,
    length: int,
    block: int,
    heads: int = 2,
    head_dim: int = 4,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    positions: Iterable[int] | None = None,
) -> None:
    """Changing the inputs after position ``t`` (and the routing rows of blocks that start
    after ``t``) leaves every output ``<= t`` bit-identical, and does change a later one."""
    g = torch.Generator().manual_seed(1)
    n = -(-length // block)
    q, k, v = (torch.randn(2, heads, length, head_dim, generator=g) for _ in range(3))
    logits = torch.randn(2, heads, n, n, generator=g)

    def run(*xs: Tensor) -> Tensor:
        out = sinkhorn_attention(*(x.to(device, dtype) for x in xs), block_size=block, **mode)
        return out.cpu()

    out = run(q, k, v, logits)
    for t in range(length) if positions is None else positions:
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, :, t + 1 :] = torch.randn(x[:, :, t + 1 :].shape, generator=g)
        logits2 = logits.clone()
        logits2[:, :, t // block + 1 :] = torch.randn(
            logits2[:, :, t // block + 1 :].shape, generator=g
        )
        out2 = run(q2, k2, v2, logits2)
        assert torch.equal(out2[:, :, : t + 1], out[:, :, : t + 1]), f"leak into t <= {t}"
        if t < length - 1:
            assert not torch.equal(out2[:, :, t + 1 :], out[:, :, t + 1 :])
