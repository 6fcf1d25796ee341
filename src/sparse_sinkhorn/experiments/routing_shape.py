"""The shape of a decoder's learned block routing at evaluation: how much of each causal routing
row goes to the block just before it, and how spread out the rows are.

The paper's prefix-causal Sinkhorn balancing converges, in a decoder, to the shift "block ``i``
reads block ``i - 1``" (docs/method.md §5): mass on ``i - 1`` near 1 and row entropy near 0
whatever the sort net says. Routing that is causal but not a shift (``sinkhorn-targets``,
``softmax-max``) puts its mass elsewhere too. `RoutingShape` measures both on the held-out data
an experiment already scores, so every routed row of a results table says which it learned.

Rule: read-only. Forward pre-hooks on the causal self-attention layers that route by a sort
net recompute each forward's eval plan from the layer input (the sort logits, then the layer's
own balancing; no Gumbel noise in eval mode) and never change an output. Forwards with a
decoding cache (incremental decoding) are not counted.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..nn import SinkhornSelfAttention
from ..ops import sinkhorn_plan
from ..ops.blocks import padded_mask
from .stats import seeds_cell

PREV_MASS = "routing/prev_block_mass"  # mean weight of row i (i >= 1) on block i - 1
ENTROPY = "routing/row_entropy"  # mean entropy (nats) of rows i >= 1, each normalised to sum 1


def causal_routed_layers(model: nn.Module) -> list[SinkhornSelfAttention]:
    """The causal self-attention layers of ``model`` whose kind routes blocks (sinkhorn,
    mixture): a decoder's, not an encoder's."""
    return [
        m
        for m in model.modules()
        if isinstance(m, SinkhornSelfAttention) and m.causal and m.config.uses_sorting
    ]


def row_shape(p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(mass on i - 1, entropy, counted)`` of the rows ``i >= 1`` of causal plans ``p``
    ``(..., N, N)``, each ``(..., N - 1)``: rows are normalised to sum 1 first, and a row with
    no weight (a padding-only block) is not counted."""
    p = p.double()[..., 1:, :]  # rows 1 .. N-1 (row 0 has no earlier block)
    total = p.sum(-1)
    counted = total > 0
    p = p / total.clamp_min(torch.finfo(p.dtype).tiny)[..., None]
    prev = torch.diagonal(p, dim1=-2, dim2=-1)  # P[i, i - 1] for rows i = 1 .. N-1
    entropy = torch.special.entr(p).sum(-1)
    return prev, entropy, counted


class RoutingShape:
    """``with RoutingShape(model) as shape: <forwards>`` then ``shape.metrics()``: the mean
    `PREV_MASS` and `ENTROPY` over every counted row, head, example and causal routed layer
    of those forwards (``{}`` when ``model`` has no such layer or nothing was counted)."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = causal_routed_layers(model)
        self.prev = self.entropy = 0.0
        self.rows = 0
        self._hooks: list[RemovableHandle] = []

    def __enter__(self) -> RoutingShape:
        for layer in self.layers:
            hook = self._hook(layer)
            self._hooks.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _hook(self, layer: SinkhornSelfAttention) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if kwargs.get("cache") is not None:
                return
            x = args[0]
            mask = args[1] if len(args) > 1 else kwargs.get("key_padding_mask")
            with torch.no_grad():
                self.add(layer, x, mask, kwargs.get("routing"))

        return hook

    def add(
        self,
        layer: SinkhornSelfAttention,
        x: Tensor,
        mask: Tensor | None,
        routing: Tensor | None = None,
    ) -> None:
        """Count the eval plan ``layer`` makes for input ``x`` ``(B, L, D)`` (``routing``: the
        sort logits it is given instead of its own, ``shared_routing="layers"``)."""
        if routing is None and layer.sort_net is None:
            return
        cfg = layer.config
        logits = layer.sort_logits(x, mask) if routing is None else routing  # (B, H, N, N)
        batch, length = x.shape[:2]
        key_mask = padded_mask(mask, batch, length, cfg.block_size, x.device)
        plan = sinkhorn_plan(logits, cfg.op_options(is_causal=True), key_mask=key_mask)
        prev, entropy, counted = row_shape(plan.P)
        self.prev += float(prev[counted].sum())
        self.entropy += float(entropy[counted].sum())
        self.rows += int(counted.sum())

    def metrics(self) -> dict[str, float]:
        """``{PREV_MASS: ..., ENTROPY: ...}``, or ``{}`` when no row was counted."""
        if not self.rows:
            return {}
        return {PREV_MASS: self.prev / self.rows, ENTROPY: self.entropy / self.rows}


# The results tables' routing columns (shown when some row has them).
HEADERS = ("decoder routing: mass on i−1", "routing row entropy (nats)")


def has_shape(results: list[dict[str, Any]]) -> bool:
    """Whether any row of ``results`` (`summarize_seeds` records) measured its routing."""
    return any(PREV_MASS in r.get("eval", {}) for r in results)


def cells(result: dict[str, Any]) -> list[str]:
    """A `summarize_seeds` record's routing columns, ``"mean ± std"`` ("–" for a kind that
    does not route)."""
    return [seeds_cell(result, PREV_MASS, 3), seeds_cell(result, ENTROPY, 3)]
