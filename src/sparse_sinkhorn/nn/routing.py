"""Where a stack's routed layers take their sort logits from: one small object
([`Routing`][sparse_sinkhorn.nn.Routing]) that a layer stack owns and its layers and decoding
caches read.

``AttentionConfig.shared_routing`` says it as a string (``"none"``, ``"heads"``,
``"layers"``); `Routing.from_config` turns it into the three facts the code asks about: does
one routing serve all heads of a layer (the sort net scores one matrix), does one routing
serve the whole stack (every layer routes by the first layer's logits), and which layers own
a sort net. Every layer asks `Routing.has_sort_net` at construction, the stack and the caches
ask `Routing.source` for whose logits (or whose running summaries) route a layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import AttentionConfig

SHARED_ROUTINGS = ("none", "heads", "layers")  # AttentionConfig.shared_routing


@dataclass(frozen=True)
class Routing:
    """How the routed layers (sinkhorn, mixture) of one stack get their routing.

    Attributes:
        block_size: tokens per block ``W`` the sort nets summarise.
        pooling: how a block is summarised (``"sum"``, ``"mean"``, ``"max"``).
        heads: one routing for all heads of a layer (``shared_routing`` ``"heads"`` or
            ``"layers"``): the sort net scores one matrix and every head routes by it.
        layers: one routing for the whole stack: every layer routes by the first layer's
            logits (``shared_routing="layers"``).
        idle_nets: with ``layers``, the later layers keep sort nets of their own, which the
            routing ignores (no ``shared_routing`` value asks for this: the ``recall``
            controls ``shared-max`` and ``shared-max-shared`` set it on a built model, so
            that its parameters and initialisation are those of the per-layer model).
    """

    block_size: int = 64
    pooling: str = "sum"
    heads: bool = False
    layers: bool = False
    idle_nets: bool = False

    @classmethod
    def from_config(cls, config: AttentionConfig) -> Routing:
        """The routing ``config.shared_routing`` asks for, at its block size and pooling."""
        shared = config.shared_routing
        return cls(
            block_size=config.block_size,
            pooling=config.pooling,
            heads=shared != "none",
            layers=shared == "layers",
        )

    @property
    def shared_routing(self) -> str:
        """The ``AttentionConfig.shared_routing`` value this routing is (``idle_nets`` aside)."""
        return "layers" if self.layers else "heads" if self.heads else "none"

    def shared_by_layers(self, *, idle_nets: bool = True) -> Routing:
        """This routing with every layer routed by the first layer's logits; ``idle_nets``:
        the later layers keep the sort nets they were built with (unused)."""
        return Routing(self.block_size, self.pooling, self.heads, True, idle_nets)

    def has_sort_net(self, layer: int) -> bool:
        """Whether layer ``layer`` (0-based, in its stack) of a routed kind owns a sort net."""
        return layer == 0 or not self.layers or self.idle_nets

    def source(self, layer: int) -> int:
        """The layer whose sort net (and, decoding, whose cache's running summaries) routes
        layer ``layer``: the first layer under ``layers``, else the layer itself."""
        return 0 if self.layers else layer

    def check(self, config: AttentionConfig) -> None:
        """``ValueError`` unless this routing fits ``config`` (its block size, pooling and
        ``shared_routing``; ``idle_nets`` may add ``layers`` to a ``"none"``/``"heads"``
        configuration)."""
        own = Routing.from_config(config)
        fits = (self.block_size, self.pooling, self.heads) == (
            own.block_size,
            own.pooling,
            own.heads,
        )
        if not fits or (self.layers != own.layers and not (self.layers and self.idle_nets)):
            raise ValueError(f"{self} does not fit the layer's configuration ({own})")


__all__ = ["SHARED_ROUTINGS", "Routing"]
