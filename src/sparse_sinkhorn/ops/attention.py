"""Sparse Sinkhorn attention: the public entry points and the choice of compute path.

The plan (logits -> ``P``) lives in `plan`, the options in `options`, the
autograd functions in `_autograd`.

Axes: B batch, H heads, L length, D head dim, N blocks, R rows of the plan (N, or n for
SortCut), W block size, Q/K query/key positions inside a block.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, ParamSpec

import torch
from einops import rearrange
from torch import Tensor

from . import validate
from ._autograd import LocalAndSorted, SortedBlocks, TwoPartSinkhorn
from .baselines import dense_attention
from .blocks import num_blocks, pad_to_blocks, padded_mask, repeat_kv, zero_padding
from .masked import masked_sdpa
from .options import SinkhornOptions, resolve_options
from .plan import SinkhornPlan, keep_mask, sinkhorn_plan

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .options import SinkhornKwargs

_P = ParamSpec("_P")


class SinkhornOutput(NamedTuple):
    """What [`sinkhorn_attention_with_plan`][sparse_sinkhorn.ops.sinkhorn_attention_with_plan]
    returns."""

    out: Tensor  # (B, H, L, Dv)
    plan: SinkhornPlan


def sinkhorn_attention_with_plan(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    sort_logits: Tensor,
    options: SinkhornOptions | None = None,
    *,
    key_padding_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    **kwargs: Unpack[SinkhornKwargs],
) -> SinkhornOutput:
    """[`sinkhorn_attention`][sparse_sinkhorn.ops.sinkhorn_attention] that also returns its
    [`SinkhornPlan`][sparse_sinkhorn.ops.SinkhornPlan]
    (``out, plan = sinkhorn_attention_with_plan(...)``); same arguments."""
    opts = resolve_options(options, kwargs)
    if not torch.compiler.is_compiling():
        validate.check_qkv(query, key, value, same_length=True, gqa=True)
        validate.check_padding_mask(key, key_padding_mask)
        validate.check_sinkhorn(
            query, sort_logits, block_size=opts.block_size, n_sortcut=opts.n_sortcut
        )
    batch, heads, length, _ = query.shape
    key, value = repeat_kv(key, heads), repeat_kv(value, heads)  # grouped-query attention
    key_mask = padded_mask(key_padding_mask, batch, length, opts.block_size, query.device)
    plan = sinkhorn_plan(sort_logits, opts, key_mask=key_mask, generator=generator)
    out = attend_with_plan(query, key, value, plan, dropout_p=opts.dropout_p, scale=opts.scale)
    if opts.mix_dense:
        out = out + dense_attention(
            query,
            key,
            value,
            is_causal=opts.is_causal,
            key_padding_mask=key_padding_mask,
            dropout_p=opts.dropout_p,
            scale=opts.scale,
        )
    return SinkhornOutput(out, plan)


def _same_arguments(
    like: Callable[_P, Any],
) -> Callable[[Callable[..., Tensor]], Callable[_P, Tensor]]:
    """Give the decorated function ``like``'s parameters (for type checkers and ``help``)."""

    def wrap(fn: Callable[..., Tensor]) -> Callable[_P, Tensor]:
        signature = inspect.signature(like).replace(return_annotation="Tensor")
        fn.__signature__ = signature  # type: ignore[attr-defined]
        return fn

    return wrap


@_same_arguments(sinkhorn_attention_with_plan)
def sinkhorn_attention(*args: Any, **kwargs: Any) -> Tensor:
    """Sparse Sinkhorn attention (Tay et al., 2020) on ``(B, H, L, D)`` tensors.

    Each query block attends, under one softmax, to its own (local) block and to the key /
    value block sorted into its place by the Gumbel-Sinkhorn plan ``P``. Any ``L`` works
    (padded internally to a multiple of ``block_size``). Memory is O(L·W + N²) per head.

    Args:
        query, key, value: ``(B, H, L, D)`` (``value`` may have another last dim). Key and
            value may have ``H_kv`` heads where ``H_kv`` divides ``H`` (grouped-query / multi-
            query attention, as SDPA's ``enable_gqa``): query heads ``g*H/H_kv .. (g+1)*H/H_kv
            - 1`` share key/value head ``g``. The result equals the op on key/value repeated
            with ``repeat_interleave(H // H_kv, dim=1)``.
        sort_logits: ``(B, H, N, N)`` block-routing scores, ``N = ceil(L / block_size)``;
            row ``i`` scores which key block to place beside query block ``i``. Routing is
            per *query* head even with grouped key/value heads: each query head mixes its
            group's shared key/value blocks with its own plan (GQA shares the K/V
            projections and cache to save memory; routing is an O(N²) per-head choice that
            costs little, and one plan per query head keeps ``H_kv = H`` the ordinary case).
        options: a [`SinkhornOptions`][sparse_sinkhorn.ops.SinkhornOptions], or its fields as
            keywords (SDPA
            style: ``block_size=64, is_causal=True, ...``); keywords given with ``options``
            override its fields. The fields:
        block_size: tokens per block ``W``.
        is_causal: decoder attention: causal local triangle, sorted blocks strictly from the
            past, prefix-causal balancing; output ``t`` depends on inputs ``<= t`` only
            (given logits whose row ``i`` depends on positions ``<= i*W``).
        key_padding_mask: ``(B, L)`` bool, True = real token. Padding never influences a real
            output: padded keys/values are zeroed before sorting, padding-only blocks leave
            the balancing, and sorted slots holding no real key are masked.
        n_sortcut: SortCut budget ``n`` (in blocks): every query attends to the first ``n``
            sorted blocks only (``n*W`` keys). Encoders only.
        mix_dense: add dense attention (Sinkhorn Mixture; O(L²); ``mixture=``: its former
            name, accepted with a ``DeprecationWarning``).
        hard: straight-through hard routing (argmax block per row forward, soft backward).
        balance: ``"sinkhorn"`` (the paper: Gumbel-Sinkhorn balancing, each key block shared
            out over the query blocks, one-to-one in the limit) or ``"softmax"`` (each row a
            softmax over its allowed key blocks, no column normalisation: many query blocks
            may take the same key block; see `softmax_routing`), ``"sinkhorn-targets"``
            (causal: prefix balancing towards column targets a causal plan can meet,
            ``columns="reachable"`` in
            [`sinkhorn_balance`][sparse_sinkhorn.ops.sinkhorn_balance]) or
            ``"sinkhorn-leaky"`` (**not causal**: the paper's causal balancing with columns
            over all rows, ``columns="all-rows"``, a comparison only).
        n_iters, temperature, gumbel_noise, generator: see
            [`sinkhorn_balance`][sparse_sinkhorn.ops.sinkhorn_balance]
            (``n_iters`` is unused with ``balance="softmax"``).
        dropout_p: dropout on the attention weights (pass 0 in eval, like SDPA).
        scale: score scale, default ``1/sqrt(D)``.

    Returns:
        ``(B, H, L, Dv)`` in the input dtype.
        [`sinkhorn_attention_with_plan`][sparse_sinkhorn.ops.sinkhorn_attention_with_plan] also
        returns the [`SinkhornPlan`][sparse_sinkhorn.ops.SinkhornPlan].

    Equivalent PyTorch (non-causal, no padding, L a multiple of W)::

        P = sinkhorn_balance(sort_logits)                          # (B, H, N, N)
        kb = rearrange(key, "b h (n w) d -> b h n w d", w=W)       # same for value, query
        ks = einsum("bhij,bhjwd->bhiwd", P, kb)                    # sorted keys, values
        scores = cat([qb @ kb.mT, qb @ ks.mT], -1) * scale         # (B, H, N, W, 2W)
        out = softmax(scores) @ cat([vb, vs], -2)
    """
    return sinkhorn_attention_with_plan(*args, **kwargs).out


def attend_with_plan(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    plan: SinkhornPlan,
    *,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> Tensor:
    """Local + sorted attention (or SortCut) given a plan; ``(B, H, L, Dv)`` out.

    Which path a call takes (all equal the dense reference; see ``tests/test_ops_sinkhorn``):

    ============================  =====================================================
    two-part (the common path)    no padding (``L`` a multiple of ``W``, no
                                  ``key_padding_mask``), no dropout, not SortCut, not
                                  under ``torch.compile``: local and sorted blocks as two
                                  mask-free attention calls merged through their
                                  log-sum-exp (`lse_merge`); the causal local block
                                  is a plain causal call
    masked ``[local ; sorted]``   padding or dropout: one SDPA over ``2W`` keys per block
                                  with a boolean keep-mask
    SortCut                       one SDPA over the ``n*W`` sorted keys (a mask only
                                  with padding)
    ============================  =====================================================

    Hard routing (``plan.hard``) gathers the chosen blocks by index on every path (O(L·D)
    instead of the ``N x N`` mix); its backward is the soft plan's (straight-through).
    """
    w = plan.block_size
    length = query.shape[2]
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = (pad_to_blocks(t, w) for t in (query, key, value))  # (B, H, N*W, D)
    if plan.key_mask is not None:
        real = plan.key_mask[:, None, :, None]  # (B, 1, N*W, 1)
        # where, not a product: NaN/Inf at a padded position can never reach a sorted block
        k, v = zero_padding(k, real), zero_padding(v, real)
    kb = rearrange(k, "b h (n w) d -> b h n w d", w=w)
    vb = rearrange(v, "b h (n w) d -> b h n w d", w=w)
    p = plan.P.to(k.dtype)  # (B, H, R, N)
    idx = plan.indices  # (B, H, R) with hard routing: gather instead of mixing
    if plan.n_sortcut is not None:
        k_sorted = SortedBlocks.apply(p, kb, idx)  # (B, H, n, W, D)
        v_sorted = SortedBlocks.apply(p, vb, idx)  # (B, H, n, W, Dv)
        out = _sortcut(q, k_sorted, v_sorted, plan, scale, dropout_p)
    elif _two_part_applies(plan, dropout_p):
        out = TwoPartSinkhorn.apply(q, k, v, p, plan.indices, plan.is_causal, scale)
    else:
        k_pair = LocalAndSorted.apply(p, kb, idx)  # (B, H, N, 2W, D): [K_i ; sum_j P_ij K_j]
        v_pair = LocalAndSorted.apply(p, vb, idx)  # (B, H, N, 2W, Dv)
        out = _local_and_sorted(q, k_pair, v_pair, plan, scale, dropout_p)
    return out[:, :, :length].to(query.dtype)


def _two_part_applies(plan: SinkhornPlan, dropout_p: float) -> bool:
    """Whether the mask-free two-part path computes this call (see
    [`attend_with_plan`][sparse_sinkhorn.ops.attend_with_plan])."""
    return (
        plan.key_mask is None
        and dropout_p == 0.0
        and plan.n_sortcut is None
        and not torch.compiler.is_compiling()
    )


def _local_and_sorted(
    q: Tensor,
    k_pair: Tensor,
    v_pair: Tensor,
    plan: SinkhornPlan,
    scale: float,
    dropout_p: float,
) -> Tensor:
    """Each query block attends to its ``2W`` keys ``[local ; sorted]`` under one softmax.

    One fused ``scaled_dot_product_attention`` over ``B*H`` x ``N`` blocks with the
    `keep_mask`: no ``(W, 2W)`` score tensor is materialised or saved for backward.
    """
    w = plan.block_size
    batch, heads, n = k_pair.shape[:3]
    q_blocks = rearrange(q, "b h (n w) d -> (b h) n w d", w=w)  # (B*H, N, W, D)
    k_rows = rearrange(k_pair, "b h n k d -> (b h) n k d")  # (B*H, N, 2W, D)
    v_rows = rearrange(v_pair, "b h n k d -> (b h) n k d")  # (B*H, N, 2W, Dv)
    local, sorted_ = keep_mask(plan)
    keep: Tensor | None = None
    if local is not None or sorted_ is not None:
        rows = w if plan.is_causal else 1  # only the causal triangle depends on the query
        shape = (batch, heads, n, rows, w)
        ones = torch.ones(1, 1, 1, 1, w, dtype=torch.bool, device=q.device)
        keep_local = (ones if local is None else local).expand(shape)
        keep_sorted = (ones if sorted_ is None else sorted_[..., None, :]).expand(shape)
        keep = rearrange(
            torch.cat([keep_local, keep_sorted], dim=-1), "b h n q k -> (b h) n q k"
        )  # (B*H, N, W|1, 2W)
    out = masked_sdpa(q_blocks, k_rows, v_rows, keep, dropout_p, scale)  # (B*H, N, W, Dv)
    return rearrange(out, "(b h) n w d -> b h (n w) d", b=batch)


def _sortcut(
    q: Tensor,
    k_sorted: Tensor,
    v_sorted: Tensor,
    plan: SinkhornPlan,
    scale: float,
    dropout_p: float,
) -> Tensor:
    """Every query attends to the ``n*W`` sorted slots of the first ``n`` rows."""
    k_cut = rearrange(k_sorted, "b h r w d -> b h (r w) d")  # (B, H, n*W, D)
    v_cut = rearrange(v_sorted, "b h r w d -> b h (r w) d")
    _, sorted_ = keep_mask(plan)
    keep = None if sorted_ is None else rearrange(sorted_, "b h r w -> b h 1 (r w)")
    return masked_sdpa(q, k_cut, v_cut, keep, dropout_p, scale)  # (B, H, N*W, Dv)


__all__ = [
    "SinkhornOptions",
    "SinkhornOutput",
    "SinkhornPlan",
    "attend_with_plan",
    "num_blocks",
    "sinkhorn_attention",
    "sinkhorn_attention_with_plan",
    "sinkhorn_plan",
]
