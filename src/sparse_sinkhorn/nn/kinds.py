"""The attention kinds, one table: name -> the fields it reads, its op, its decoding step and
its float64 reference (`KINDS`).

Every place that depends on the kind reads this table instead of testing names:
[`AttentionConfig`][sparse_sinkhorn.nn.AttentionConfig] checks a configuration against
`Kind.fields` (a field a kind does not read must keep its default),
[`SinkhornSelfAttention`][sparse_sinkhorn.nn.SinkhornSelfAttention] calls `Kind.attend`, the
decoding caches call `Kind.decode`, the tests compare `Kind.attend` with `Kind.reference`,
and the experiments build configurations with `kind_fields`. Adding a kind is one entry
here, its op (``ops/baselines.py``, ``ops/topk.py`` or a new ``ops`` module) and its oracle
(``ops/reference.py``, unless it is a masked dense problem already).

Axes: B batch, H heads, H_kv key/value heads, L length, T positions so far, E head dim.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..ops import (
    SinkhornOptions,
    SinkhornPlan,
    dense_attention,
    local_attention,
    reference_dense_attention,
    reference_sinkhorn_attention,
    reference_topk_block_attention,
    sinkhorn_attention_with_plan,
    sparse_attention,
    sparse_pattern,
    topk_block_attention,
)
from ..ops.blocks import repeat_kv
from ..ops.decode import (
    attend_token,
    dense_keep_row,
    local_keep_row,
    sparse_keep_row,
    topk_keep_row,
    with_block_means,
)

if TYPE_CHECKING:
    from .config import AttentionConfig

# What a layer of every kind reads: its kind, its sizes (block size and the longest input)
# and its projections (keys double as values with share_kv).
COMMON_FIELDS = ("kind", "block_size", "max_len", "share_kv")
# What a kind routed by a sort net reads (sinkhorn and mixture).
ROUTING_FIELDS = (
    "hard", "balance", "sort_net", "pooling", "shared_routing", "n_iters", "temperature",
    "gumbel_noise", "routing_loss", "routing_teacher",
)  # fmt: skip


@dataclass(frozen=True)
class Call:
    """One forward's settings beside the tensors (the same for every kind)."""

    is_causal: bool
    key_padding_mask: Tensor | None = None
    dropout_p: float = 0.0
    training: bool = False
    logits: Tensor | None = None  # (B, H, N, N) sort logits (kinds with ``routes``)
    generator: torch.Generator | None = None
    # the op's options for these settings (kinds with ``routes``), built once by the layer;
    # None: from the config (`AttentionConfig.op_options`)
    options: SinkhornOptions | None = None


Attend = Callable[["AttentionConfig", Tensor, Tensor, Tensor, Call], tuple[Tensor, Any]]
Decode = Callable[["AttentionConfig", Tensor, Tensor, Tensor], Tensor]
Reference = Callable[["AttentionConfig", Tensor, Tensor, Tensor, Call], Tensor]


@dataclass(frozen=True)
class Kind:
    """One attention kind.

    Attributes:
        name: the ``AttentionConfig.kind`` value.
        fields: the `AttentionConfig` fields it reads beyond `COMMON_FIELDS`.
        attend: the training forward ``(config, q, k, v, call) -> (out, plan or None)`` on
            ``(B, H, L, E)`` queries and ``(B, H_kv, L, E)`` keys/values.
        decode: one causal decoding step ``(config, q, k, v) -> out``: query ``(B, H, 1, E)``
            at the newest of the ``T`` cached keys/values ``(B, H_kv, T, E)``; None for kinds
            that ``routes`` (the caches' routing path, `sparse_sinkhorn.nn.cache`).
        reference: the float64 oracle of ``attend`` (same arguments, no dropout).
        routes: it routes blocks by a sort net's logits (``call.logits``).
        mix_dense: it adds dense attention over every key (Sinkhorn Mixture).
    """

    name: str
    fields: tuple[str, ...]
    attend: Attend
    decode: Decode | None
    reference: Reference
    routes: bool = False
    mix_dense: bool = False

    @property
    def uses(self) -> frozenset[str]:
        """Every `AttentionConfig` field this kind reads."""
        return frozenset((*COMMON_FIELDS, *self.fields))


# ------------------------------------------------------------------------------ the ops
def _dense(cfg: AttentionConfig, q: Tensor, k: Tensor, v: Tensor, c: Call) -> tuple[Tensor, None]:
    mask = c.key_padding_mask
    return dense_attention(
        q, k, v, is_causal=c.is_causal, key_padding_mask=mask, dropout_p=c.dropout_p
    ), None


def _local(cfg: AttentionConfig, q: Tensor, k: Tensor, v: Tensor, c: Call) -> tuple[Tensor, None]:
    return local_attention(
        q, k, v, block_size=cfg.block_size, is_causal=c.is_causal,
        key_padding_mask=c.key_padding_mask, dropout_p=c.dropout_p,
    ), None  # fmt: skip


def _sparse(cfg: AttentionConfig, q: Tensor, k: Tensor, v: Tensor, c: Call) -> tuple[Tensor, None]:
    return sparse_attention(
        q, k, v, block_size=cfg.block_size, mode=cfg.sparse_mode, is_causal=c.is_causal,
        key_padding_mask=c.key_padding_mask, dropout_p=c.dropout_p,
    ), None  # fmt: skip


def _topk(cfg: AttentionConfig, q: Tensor, k: Tensor, v: Tensor, c: Call) -> tuple[Tensor, None]:
    return topk_block_attention(
        q, k, v, block_size=cfg.block_size, top_k=cfg.top_k, compressed=cfg.compressed,
        gate=cfg.gate, is_causal=c.is_causal, key_padding_mask=c.key_padding_mask,
        dropout_p=c.dropout_p, backend=cfg.backend,
    ), None  # fmt: skip


def _routed(
    cfg: AttentionConfig, q: Tensor, k: Tensor, v: Tensor, c: Call
) -> tuple[Tensor, SinkhornPlan]:
    if c.logits is None:
        raise ValueError(f"attention kind {cfg.kind!r} routes by sort logits; none given")
    options = c.options
    if options is None:
        options = cfg.op_options(is_causal=c.is_causal, training=c.training, dropout_p=c.dropout_p)
    return sinkhorn_attention_with_plan(
        q, k, v, c.logits, options, key_padding_mask=c.key_padding_mask, generator=c.generator
    )


# ------------------------------------------------------------------------ decoding steps
def _decode_row(keep_row: Callable[[AttentionConfig, int, torch.device], Tensor]) -> Decode:
    """A decoding step that attends under a fixed ``(T,)`` keep row of the newest position."""

    def decode(cfg: AttentionConfig, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        keep = keep_row(cfg, k.shape[2] - 1, q.device)  # (T,)
        return attend_token(q, k, v, keep[None, None, None])

    return decode


def _decode_topk(cfg: AttentionConfig, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    w = cfg.block_size
    keep = topk_keep_row(q, k, block_size=w, top_k=cfg.top_k, gate=cfg.gate)  # (B, H, 1, T)
    if cfg.compressed:
        return attend_token(q, *with_block_means(k, v, keep, block_size=w))
    return attend_token(q, k, v, keep)


# ---------------------------------------------------------------------- float64 oracles
def _reference_masked(
    pattern: Callable[[AttentionConfig, int, torch.device], Tensor | None],
) -> Reference:
    """The oracle of a kind that is dense attention under an ``(L, L)`` keep pattern."""

    def reference(cfg: AttentionConfig, q: Tensor, k: Tensor, v: Tensor, c: Call) -> Tensor:
        heads, length = q.shape[1], q.shape[2]
        k, v = repeat_kv(k, heads), repeat_kv(v, heads)
        keep = torch.ones(length, length, dtype=torch.bool, device=q.device)
        shape = pattern(cfg, length, q.device)
        if shape is not None:
            keep = keep & shape
        if c.is_causal:
            keep = keep.tril()
        full = keep[None, None]  # (1, 1, L, L)
        if c.key_padding_mask is not None:
            full = full & c.key_padding_mask[:, None, None, :]
        q64, k64, v64 = (t.double() for t in (q, k, v))
        return reference_dense_attention(q64, k64, v64, keep=full)

    return reference


def _same_block(cfg: AttentionConfig, length: int, device: torch.device) -> Tensor:
    blk = torch.arange(length, device=device) // cfg.block_size
    return blk[:, None] == blk[None, :]  # (L, L)


def _sparse_shape(cfg: AttentionConfig, length: int, device: torch.device) -> Tensor:
    return sparse_pattern(length, block_size=cfg.block_size, mode=cfg.sparse_mode, device=device)


def _reference_topk(cfg: AttentionConfig, q: Tensor, k: Tensor, v: Tensor, c: Call) -> Tensor:
    return reference_topk_block_attention(
        q, k, v, block_size=cfg.block_size, top_k=cfg.top_k, compressed=cfg.compressed,
        gate=cfg.gate, is_causal=c.is_causal, key_padding_mask=c.key_padding_mask,
    )  # fmt: skip


def _reference_routed(cfg: AttentionConfig, q: Tensor, k: Tensor, v: Tensor, c: Call) -> Tensor:
    if c.logits is None:
        raise ValueError(f"attention kind {cfg.kind!r} routes by sort logits; none given")
    options = cfg.op_options(is_causal=c.is_causal, training=c.training)
    return reference_sinkhorn_attention(
        q, k, v, c.logits, options, key_padding_mask=c.key_padding_mask, generator=c.generator
    )


# -------------------------------------------------------------------------------- table
_ROUTED = dict(attend=_routed, decode=None, reference=_reference_routed, routes=True)
KINDS: Mapping[str, Kind] = {
    kind.name: kind
    for kind in (
        # the paper: local block + the sort net's sorted block; SortCut in encoders
        Kind("sinkhorn", ("n_sortcut", *ROUTING_FIELDS), **_ROUTED),  # type: ignore[arg-type]
        # Sinkhorn plus dense attention over every key
        Kind("mixture", ROUTING_FIELDS, **_ROUTED, mix_dense=True),  # type: ignore[arg-type]
        Kind(
            "dense",
            (),
            _dense,
            _decode_row(lambda cfg, t, device: dense_keep_row(t, device=device)),
            _reference_masked(lambda cfg, length, device: None),
        ),
        Kind(
            "local",
            (),
            _local,
            _decode_row(lambda cfg, t, device: local_keep_row(t, cfg.block_size, device=device)),
            _reference_masked(_same_block),
        ),
        # Sparse Transformer (fixed or strided pattern)
        Kind(
            "sparse",
            ("sparse_mode",),
            _sparse,
            _decode_row(
                lambda cfg, t, device: sparse_keep_row(
                    t, cfg.block_size, mode=cfg.sparse_mode, device=device
                )
            ),
            _reference_masked(_sparse_shape),
        ),
        # MoBA's parameter-free block gate (Quest's bound with gate="bound")
        Kind(
            "topk", ("top_k", "compressed", "gate", "backend"), _topk, _decode_topk, _reference_topk
        ),
    )
}


def users(field: str) -> tuple[str, ...]:
    """The kinds that read `AttentionConfig` field ``field``."""
    return tuple(name for name, kind in KINDS.items() if field in kind.uses)


def kind_fields(kind: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``options`` (`AttentionConfig` fields) that ``kind`` reads: a builder
    that sets a value for every kind of a grid (a preset's balancing rounds, say) passes it
    through this, so each kind's configuration holds only what it uses."""
    uses = KINDS[kind].uses if kind in KINDS else frozenset(options)
    return {name: value for name, value in options.items() if name in uses}


__all__ = ["COMMON_FIELDS", "KINDS", "ROUTING_FIELDS", "Call", "Kind", "kind_fields", "users"]
