"""Attention configuration shared by layers and models (a frozen, validated dataclass)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ..ops.blocks import POOLINGS, num_blocks
from ..ops.options import SinkhornOptions
from ..ops.plan import TEACHERS
from ..ops.topk import BACKENDS, GATES
from .kinds import KINDS, users
from .routing import SHARED_ROUTINGS
from .sortnet import LENGTH_AGNOSTIC, PROJECTED, SORT_NETS

ATTENTION_KINDS = tuple(KINDS)  # the names in the kind registry (`nn.kinds.KINDS`)


def _type_ok(value: Any, annotation: str) -> bool:
    if annotation.endswith(" | None"):
        return value is None or _type_ok(value, annotation.removesuffix(" | None"))
    if annotation == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok and math.isfinite(value)
    if annotation == "bool":
        return isinstance(value, bool)
    if annotation == "str":
        return isinstance(value, str)
    return True  # nested configs and anything else: checked by their own class


def check_field_types(config: Any) -> None:
    """Every int/float/bool/str field of a config dataclass holds that type (float: finite).

    Configs are rebuilt from JSON files a user may have edited; a wrong type is a
    ``TypeError`` naming the field (a NaN or infinite float: a ``ValueError`` saying so)
    instead of a failure deep inside a layer.
    """
    for f in fields(config):
        value = getattr(config, f.name)
        if not _type_ok(value, str(f.type)):
            if isinstance(value, float) and str(f.type).startswith("float"):
                raise ValueError(
                    f"{type(config).__name__}.{f.name} must be a finite number, got {value!r}"
                )
            raise TypeError(
                f"{type(config).__name__}.{f.name} must be {f.type}, got "
                f"{type(value).__name__} {value!r}"
            )


@dataclass(frozen=True)
class AttentionConfig:
    """How a self-attention layer attends. Every field is used by at least one kind; a field
    the kind does not read (`nn.kinds.KINDS`) must keep its default, else a ``ValueError``
    names the field and the kinds that read it (`from_dict`, for saved configurations, drops
    such a field with a warning instead).

    Attributes:
        kind: one of `ATTENTION_KINDS`: ``"sinkhorn"`` (the paper), ``"mixture"`` (Sinkhorn
            plus dense attention), ``"dense"``, ``"local"``, ``"sparse"`` (Sparse
            Transformer), ``"topk"`` (MoBA's parameter-free block gate).
        block_size: tokens per block ``W`` (sinkhorn, mixture, local, the sparse stride, topk).
        max_len: the attention's length bound, in tokens: it sizes the ``linear``/``mlp``
            sort net (``N_max = max_len / W``), which then takes no longer sequence (see
            [`length_limit`][sparse_sinkhorn.nn.AttentionConfig.length_limit]; the other
            kinds and the ``bilinear``, ``qk`` and ``qk-bound`` nets take any length).
        n_sortcut: SortCut budget in blocks (``"sinkhorn"`` encoders only), or None.
        hard: straight-through hard routing (the argmax block of each row forward, the soft
            plan's gradient backward).
        balance: ``"sinkhorn"`` (the paper's balancing), ``"softmax"`` (routing rows
            normalised only; in a decoder, causal Sinkhorn balancing routes every block to its
            previous one, see `docs/method.md` §5), ``"sinkhorn-targets"`` (decoders: prefix
            balancing towards column targets ``2 (i - j) / (i + 1)`` a causal plan can meet,
            exactly causal and not the shift) or ``"sinkhorn-leaky"`` (the paper's causal
            balancing with columns over all rows: **not causal**, a comparison only;
            ``generate`` refuses it).
        sort_net: ``"linear"`` (the paper's), ``"mlp"`` (two layers), ``"bilinear"``
            (length-agnostic), ``"qk"`` (length-agnostic, no parameters: the layer's own
            query and key projections pooled per block score the pairs; needs ``pooling``
            ``"mean"`` or ``"max"`` and no ``routing_loss``) or ``"qk-bound"`` (the same
            projections scored by Quest's bound, the largest ``q · k`` their per-feature
            minima and maxima allow; needs ``pooling="max"``).
        pooling: block summaries read by the sort net: ``"sum"`` (the paper's), ``"mean"``
            over the real tokens, or ``"max"`` (per feature, so one token marks its block).
        shared_routing: sinkhorn and mixture: ``"none"`` (the paper: every head of every layer
            routes by its own sort logits), ``"heads"`` (one routing per layer, for all its
            heads) or ``"layers"`` (one routing for the whole stack: the first layer's, for all
            heads; later layers have no sort net). A stack reads it as a
            [`Routing`][sparse_sinkhorn.nn.Routing].
        n_iters: Sinkhorn balancing rounds.
        temperature: Gumbel-Sinkhorn temperature ``tau``.
        gumbel_noise: add Gumbel noise to the routing logits in training mode (never in eval).
        sparse_mode: Sparse Transformer pattern, ``"fixed"`` or ``"strided"``.
        share_kv: keys double as values (one projection fewer; the paper's ablation).
        top_k: topk: the earlier blocks each query reads beside its own.
        compressed: topk: every query also attends to each gate candidate block's mean key and
            value (NSA's compressed branch), which trains the block summaries the gate ranks.
        gate: topk: how the gate scores a block, ``"mean"`` (MoBA's ``q · mean(K)``) or
            ``"bound"`` (Quest's upper bound on ``q · k`` over the block's keys, from their
            per-feature minimum and maximum).
        backend: topk: the kernels of the picked blocks, ``"grouped"`` (the project's, forward
            and backward on every device) or ``"flex"`` (PyTorch's FlexAttention: compiled on
            CUDA; forward only on the CPU; no ``compressed`` branch, no attention dropout).
        routing_loss: sinkhorn and mixture, training only: the weight of a loss pulling each
            sort-net row towards the layer's own dense block attention mass (see
            [`routing_losses`][sparse_sinkhorn.nn.routing_losses]).
        routing_teacher: with ``routing_loss``, how the target row of block ``i`` reads the
            dense attention of block ``i``'s queries: ``"mean"`` (their mean mass on each
            block) or ``"max"`` (the largest mass one of them puts on each block, so one
            query that reads a block marks it; SeerAttention's gate is distilled from block
            maxima too).
    """

    kind: str = "sinkhorn"
    block_size: int = 64
    max_len: int = 4096
    n_sortcut: int | None = None
    hard: bool = False
    balance: str = "sinkhorn"
    sort_net: str = "linear"
    pooling: str = "sum"
    shared_routing: str = "none"
    n_iters: int = 8
    temperature: float = 0.75
    gumbel_noise: bool = True
    sparse_mode: str = "fixed"
    share_kv: bool = False
    top_k: int = 1
    compressed: bool = False
    gate: str = "mean"
    backend: str = "grouped"
    routing_loss: float = 0.0
    routing_teacher: str = "mean"

    def __post_init__(self) -> None:
        check_field_types(self)
        self._check_kind()
        if self.max_len <= 0:
            raise ValueError(f"max_len must be > 0, got {self.max_len}")
        self.op_options(is_causal=False)  # block_size, n_sortcut, balance, n_iters, temperature
        if self.sort_net not in SORT_NETS:
            raise ValueError(f"sort_net must be one of {SORT_NETS}, got {self.sort_net!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if not self.routing_loss >= 0:
            raise ValueError(f"routing_loss must be >= 0, got {self.routing_loss}")
        if self.routing_teacher not in TEACHERS:
            raise ValueError(
                f"routing_teacher must be one of {TEACHERS}, got {self.routing_teacher!r}"
            )
        if self.routing_teacher != "mean" and not self.routing_loss:
            raise ValueError(
                "routing_teacher chooses routing_loss's target; it does nothing with routing_loss=0"
            )
        if self.sort_net in PROJECTED:  # only routed kinds may set sort_net (_check_kind)
            self._check_projected_sort_net()
        if self.shared_routing not in SHARED_ROUTINGS:
            raise ValueError(
                f"shared_routing must be one of {SHARED_ROUTINGS}, got {self.shared_routing!r}"
            )
        if self.shared_routing == "layers" and self.routing_loss:
            raise ValueError(
                "routing_loss trains each layer's own sort net; with shared_routing='layers' "
                "only the first layer has one"
            )
        if self.top_k <= 0:
            raise ValueError(f"top_k must be > 0, got {self.top_k}")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "flex" and self.compressed:
            raise ValueError("backend='flex' has no compressed branch; use backend='grouped'")
        if self.sparse_mode not in ("fixed", "strided"):
            raise ValueError(f"sparse_mode must be 'fixed' or 'strided', got {self.sparse_mode!r}")

    def _check_projected_sort_net(self) -> None:
        net = self.sort_net
        if net == "qk" and self.pooling == "sum":
            raise ValueError(
                "sort_net='qk' scores pooled queries against pooled keys; summed over a "
                "block they grow as block_size squared: use pooling='mean' or 'max'"
            )
        if net == "qk-bound" and self.pooling != "max":
            raise ValueError(
                "sort_net='qk-bound' bounds q . k by per-feature minima and maxima: it needs "
                "pooling='max'"
            )
        if self.routing_loss:
            raise ValueError(
                f"routing_loss trains a sort net's own weights; sort_net={net!r} has none "
                "(it routes by the layer's query and key projections)"
            )

    def _check_kind(self) -> None:
        """A known kind, and every field it does not read at its default."""
        if self.kind not in KINDS:
            raise ValueError(
                f"AttentionConfig: unknown attention kind {self.kind!r}; choose one of "
                f"{ATTENTION_KINDS}"
            )
        unused = _unused_fields(self.kind, {f.name: getattr(self, f.name) for f in fields(self)})
        if unused:
            name = unused[0]
            raise ValueError(
                f"AttentionConfig: kind={self.kind!r} does not use {name} (set it only with "
                f"kind in {users(name)})"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AttentionConfig:
        """A configuration saved as JSON (``config.json``, ``results.json``). Configurations
        saved before unused fields were refused may set one (the ``sort`` experiment gave
        every kind its preset's balancing rounds): such a field is dropped, with a warning
        naming it, since the kind never read it."""
        values = dict(data)
        kind = values.get("kind", cls.kind)
        unused = _unused_fields(kind, values) if isinstance(kind, str) and kind in KINDS else []
        if unused:
            warnings.warn(
                f"AttentionConfig: kind={kind!r} does not use {', '.join(unused)}; dropped "
                "from the saved configuration",
                UserWarning,
                stacklevel=2,
            )
        return cls(**{k: v for k, v in values.items() if k not in unused})

    def op_options(
        self,
        *,
        is_causal: bool,
        training: bool = False,
        dropout_p: float = 0.0,
        scale: float | None = None,
    ) -> SinkhornOptions:
        """The op's [`SinkhornOptions`][sparse_sinkhorn.ops.SinkhornOptions] for this configuration:
        same-named fields are copied; Gumbel noise only in ``training``; ``mix_dense`` from
        the kind."""
        same = {name: getattr(self, name) for name in _OWN}
        return SinkhornOptions(
            **same,
            is_causal=is_causal,
            mix_dense=KINDS[self.kind].mix_dense,
            gumbel_noise=self.gumbel_noise and training,
            dropout_p=dropout_p,
            scale=scale,
        )

    @property
    def uses_sorting(self) -> bool:
        """The kind routes blocks by a sort net (`Kind.routes`: sinkhorn, mixture)."""
        return KINDS[self.kind].routes

    @property
    def length_limit(self) -> int | None:
        """The longest sequence this attention takes: ``max_len`` when a sort net with one
        weight row per block bounds it (``linear``/``mlp`` in ``sinkhorn``/``mixture``), None
        when any length works (the baselines, or a length-agnostic sort net: ``bilinear``,
        ``qk``, ``qk-bound``)."""
        if self.uses_sorting and self.sort_net not in LENGTH_AGNOSTIC:
            return self.max_len
        return None

    @property
    def max_blocks(self) -> int:
        return num_blocks(self.max_len, self.block_size)


# The op options an AttentionConfig holds under the same name (the rest are set per call).
_OWN = tuple(
    f.name
    for f in fields(SinkhornOptions)
    if f.name not in ("is_causal", "mix_dense", "gumbel_noise", "dropout_p", "scale")
)


_DEFAULTS = {f.name: f.default for f in fields(AttentionConfig)}


def _unused_fields(kind: str, values: Mapping[str, Any]) -> list[str]:
    """The fields in ``values`` that ``kind`` does not read, set to other than their default."""
    uses = KINDS[kind].uses
    return [
        name
        for name, value in values.items()
        if name in _DEFAULTS and name not in uses and value != _DEFAULTS[name]
    ]
