"""The options of Sparse Sinkhorn attention: one frozen, validated object.

[`SinkhornOptions`][sparse_sinkhorn.ops.SinkhornOptions] is the one place the op's options are
listed; every entry point ([`sinkhorn_attention`][sparse_sinkhorn.ops.sinkhorn_attention],
[`sinkhorn_plan`][sparse_sinkhorn.ops.sinkhorn_plan], the float64
reference, the layer, the Hugging Face forward, the decoding caches) takes it, or the same
names as keywords (`SinkhornKwargs`, checked against the dataclass by a test), and
builds it once with `resolve_options`. Adding an option: a field here (and in
`SinkhornKwargs`), the code that reads it, and, for layers, the same-named field of
[`AttentionConfig`][sparse_sinkhorn.nn.AttentionConfig] (copied over by name).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypedDict, cast

import torch

from ..renamed import renamed_keywords
from . import validate
from .blocks import check_block_size
from .routing import BALANCES


@dataclass(frozen=True)
class SinkhornOptions:
    """How Sparse Sinkhorn attention attends (validated on construction).

    Attributes:
        block_size: tokens per block ``W`` (``b`` in the docs).
        is_causal: decoder attention: causal local triangle, sorted blocks strictly from the
            past, prefix-causal balancing.
        n_sortcut: SortCut budget ``n`` in blocks (encoders only), or None.
        mix_dense: add dense attention over every key (Sinkhorn Mixture, the ``"mixture"``
            attention kind; O(L²)). ``mixture=``, its former name, is accepted as a keyword
            of the entry points with a ``DeprecationWarning``.
        hard: straight-through hard routing (argmax block per row forward, soft backward).
        balance: ``"sinkhorn"`` (the paper), ``"softmax"`` (rows only, no balancing),
            ``"sinkhorn-targets"`` (causal: prefix balancing towards column targets a causal
            matrix can meet, not the shift the paper's causal balancing tends to) or
            ``"sinkhorn-leaky"`` (the paper's causal balancing taken literally, columns over
            all rows: **not causal**, a measured comparison; decoding refuses it).
        n_iters: Sinkhorn balancing rounds (unused with ``balance="softmax"``).
        temperature: Gumbel-Sinkhorn temperature ``tau`` (> 0).
        gumbel_noise: add Gumbel noise to the routing logits (training only).
        dropout_p: dropout on the attention weights, in ``[0, 1)`` (pass 0 in eval).
        scale: score scale, default ``1/sqrt(D)``.
    """

    block_size: int
    is_causal: bool = False
    n_sortcut: int | None = None
    mix_dense: bool = False
    hard: bool = False
    balance: str = "sinkhorn"
    n_iters: int = 8
    temperature: float = 0.75
    gumbel_noise: bool = False
    dropout_p: float = 0.0
    scale: float | None = None

    def __post_init__(self) -> None:
        if torch.compiler.is_compiling():
            return
        check_block_size(self.block_size)
        if self.n_sortcut is not None:
            if self.is_causal:
                raise ValueError(
                    "SortCut (n_sortcut) is for encoders only: every query sees the first n "
                    "sorted blocks, which would include the future; use is_causal=False"
                )
            n = self.n_sortcut
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise ValueError(f"n_sortcut must be a positive int, got {n!r}")
        if self.balance not in BALANCES:
            raise ValueError(f"balance must be one of {BALANCES}, got {self.balance!r}")
        validate.check_iterations(self.n_iters, self.temperature)
        validate.check_dropout_and_scale(self.dropout_p, self.scale)


class SinkhornKwargs(TypedDict, total=False):
    """The fields of [`SinkhornOptions`][sparse_sinkhorn.ops.SinkhornOptions] as keyword arguments
    (for type checkers)."""

    block_size: int  # required unless options= is given
    is_causal: bool
    n_sortcut: int | None
    mix_dense: bool
    hard: bool
    balance: str
    n_iters: int
    temperature: float
    gumbel_noise: bool
    dropout_p: float
    scale: float | None


def resolve_options(
    options: SinkhornOptions | None, kwargs: Mapping[str, object]
) -> SinkhornOptions:
    """``options`` with ``kwargs`` overriding its fields, or a new object from ``kwargs``
    (``mixture=``, the former name of ``mix_dense=``, accepted with a warning)."""
    fields = cast(dict[str, Any], kwargs)
    if "mixture" in fields:
        fields = renamed_keywords(
            fields, {"mixture": "mix_dense"}, "Sinkhorn attention", stacklevel=4
        )
    if options is None:
        if "block_size" not in kwargs:
            raise TypeError("Sinkhorn attention needs block_size=... (or options=...)")
        return SinkhornOptions(**fields)
    if not isinstance(options, SinkhornOptions):
        raise TypeError(f"options must be a SinkhornOptions, got {type(options).__name__}")
    return dataclasses.replace(options, **fields) if fields else options


__all__ = ["SinkhornKwargs", "SinkhornOptions", "resolve_options"]
