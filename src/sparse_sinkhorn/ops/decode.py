"""One decoding step of the attention ops: the output at a new position from cached keys and
values, equal to the full causal forward there (the algorithms behind the decoding caches
of `sparse_sinkhorn.nn.cache`, which own the state).

Axes: B batch, H heads, H_kv key/value heads, T positions so far, E head dim, N blocks,
W block size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .baselines import sparse_pattern
from .blocks import repeat_kv
from .masked import masked_sdpa
from .options import SinkhornOptions
from .plan import sinkhorn_plan
from .routing import NOT_CAUSAL, softmax_routing
from .sinkhorn import hard_routing
from .topk import topk_block_selection


def check_decodable(balance: str) -> None:
    """Refuse a balancing whose causal plan rows depend on later blocks (no cache can be exact)."""
    if balance in NOT_CAUSAL:
        raise ValueError(f"balance={balance!r} is not causal; incremental decoding needs another")


# Balancings whose causal plan row ``i`` depends on logits row ``i`` alone (no column step):
# decoding can compute that one row instead of the ``(i+1) x (i+1)`` prefix plan.
ROW_LOCAL = ("softmax",)


def plan_row(logits: Tensor, block: int, options: SinkhornOptions) -> Tensor:
    """Row ``block`` (``i >= 1``) of the causal plan: ``(B, H, i)`` weights on the earlier blocks.

    Args:
        logits: ``(B, H, i+1, i+1)`` routing logits of the prefix (prefix-causal balancing
            makes row ``i`` of the plan depend on logit rows ``<= i`` only), or, for a
            balancing in `ROW_LOCAL`, only their row ``i``, ``(B, H, 1, i+1)`` (O(N) instead
            of O(N²)). Column ``i``, the block itself, is never taken.
        options: the layer's op options (causal).
    """
    check_decodable(options.balance)
    if logits.shape[-2] == logits.shape[-1]:
        return sinkhorn_plan(logits, options).P[:, :, block, :block]
    if logits.shape[-2] != 1 or options.balance not in ROW_LOCAL:
        raise ValueError(
            f"a single logits row needs a balancing in {ROW_LOCAL}, got {options.balance!r} "
            f"and logits {tuple(logits.shape)}"
        )
    allowed = torch.arange(logits.shape[-1], device=logits.device) < block  # (i+1,): j < i
    p = softmax_routing(logits, temperature=options.temperature, allowed=allowed)
    if options.hard:
        p, _ = hard_routing(p, allowed)
    return p[:, :, 0, :block]


def mix_blocks(p_row: Tensor, k: Tensor, v: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """The sorted keys and values ``(B, H, W, E)`` that the weights ``p_row`` ``(B, H, i)``
    mix from the first ``i`` blocks of ``k, v`` ``(B, H_kv, >= i*W, E)``.

    Grouped heads read their shared key/value head in place (no ``repeat_kv`` copy), and a
    slice of a preallocated cache is read where it lies: one matrix product per key/value
    head over the ``i*W`` positions.
    """
    batch, heads, i = p_row.shape
    kv_heads, e = k.shape[1], k.shape[-1]
    p = p_row.to(k.dtype).reshape(batch, kv_heads, heads // kv_heads, i)  # head = kv*G + g

    def mix(x: Tensor) -> Tensor:
        blocks = x[:, :, : i * block_size].reshape(batch, kv_heads, i, block_size * e)
        return torch.matmul(p, blocks).reshape(batch, heads, block_size, e)

    return mix(k), mix(v)


def sorted_row(
    logits: Tensor, block: int, k: Tensor, v: Tensor, options: SinkhornOptions
) -> tuple[Tensor, Tensor, Tensor]:
    """Row ``block`` (``i >= 1``) of the causal plan -> block ``i``'s sorted keys and values.

    Args:
        logits: ``(B, H, i+1, i+1)`` routing logits of the prefix, or their row ``i`` alone
            (`plan_row`).
        k, v: ``(B, H_kv, >= i*W, E)`` keys/values of the earlier blocks, in block order.
        options: the layer's op options (causal).

    Returns:
        sorted keys and values ``(B, H, W, E)`` and the ``(B, H)`` weight row ``i`` puts on
        earlier blocks (0: the sorted slots hold nothing).
    """
    p_row = plan_row(logits, block, options)  # (B, H, i); per query head, also with GQA
    sorted_k, sorted_v = mix_blocks(p_row, k, v, options.block_size)
    return sorted_k, sorted_v, p_row.detach().sum(-1)


def dense_keep_row(t: int, *, device: torch.device | None = None) -> Tensor:
    """``(t+1,)`` bool: query ``t`` of causal dense attention sees every key ``s <= t``."""
    return torch.ones(t + 1, dtype=torch.bool, device=device)


def local_keep_row(t: int, block_size: int, *, device: torch.device | None = None) -> Tensor:
    """``(t+1,)`` bool: query ``t`` of causal local attention sees the keys of its own block
    ([`local_attention`][sparse_sinkhorn.ops.local_attention])."""
    return torch.arange(t + 1, device=device) // block_size == t // block_size


def sparse_keep_row(
    t: int, block_size: int, *, mode: str = "fixed", device: torch.device | None = None
) -> Tensor:
    """``(t+1,)`` bool: row ``t`` of the causal
    [`sparse_pattern`][sparse_sinkhorn.ops.sparse_pattern]."""
    row = torch.tensor([t], device=device)
    return sparse_pattern(
        t + 1, block_size=block_size, is_causal=True, mode=mode, device=device, queries=row
    )[0]


def topk_keep_row(
    q: Tensor, k: Tensor, *, block_size: int, top_k: int, gate: str = "mean"
) -> Tensor:
    """``(B, H, 1, T)`` bool: the keys the newest query ``q`` ``(B, H, 1, E)`` sees in a
    ``topk`` layer: its own block's (causal) and those of the blocks the gate picks for it
    ([`topk_block_selection`][sparse_sinkhorn.ops.topk_block_selection], asked for the last row
    only)."""
    keys = repeat_kv(k, q.shape[1])  # (B, H, T, E)
    t, w = keys.shape[2] - 1, block_size
    rows = torch.cat([q.new_zeros(*q.shape[:2], t, q.shape[-1]), q], dim=2)  # query at t
    picked = topk_block_selection(rows, keys, block_size=w, top_k=top_k, is_causal=True, gate=gate)[
        :, :, t
    ]  # (B, H, k)
    blk = torch.arange(t + 1, device=q.device) // w  # (T,)
    keep = (blk[None, None, :, None] == picked[:, :, None, :]).any(-1)  # (B, H, T)
    return (keep | (blk == t // w))[:, :, None, :]


def with_block_means(
    k: Tensor, v: Tensor, keep: Tensor, *, block_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """A compressed ``topk`` row: keys ``(B, H_kv, T, E)``, values and the keep-mask
    ``(B, H, 1, T)`` of the newest position ``t = T - 1``, each extended by the mean key and
    value of every complete block before ``t``'s (all kept), as in
    [`topk_block_attention`][sparse_sinkhorn.ops.topk_block_attention] with ``compressed``."""
    w = block_size
    complete = (k.shape[2] - 1) // w
    if complete == 0:
        return k, v, keep
    k_mean, v_mean = (
        x[:, :, : complete * w].unflatten(2, (complete, w)).sum(3) / w for x in (k, v)
    )
    ones = torch.ones(*keep.shape[:-1], complete, dtype=torch.bool, device=keep.device)
    return (
        torch.cat([k, k_mean], dim=2),
        torch.cat([v, v_mean], dim=2),
        torch.cat([keep.expand(*keep.shape[:-1], k.shape[2]), ones], dim=-1),
    )


def attend_token(
    q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, scale: float | None = None
) -> Tensor:
    """Attention of ``(B, H, 1, E)`` queries to ``(B, H_kv, S, E)`` keys/values with a
    ``(., ., 1, S)`` keep-mask (None: all); rows with no kept key give 0."""
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])  # grouped-query K/V
    if keep is not None:
        # where, not a zero weight: a NaN/Inf value at a masked position must not reach the output
        v = torch.where(keep.any(-2)[..., None], v, v.new_zeros(()))
    return masked_sdpa(q, k, v, keep, 0.0, scale)


def local_and_sorted_token(
    q: Tensor,
    local: tuple[Tensor, Tensor, Tensor],
    sorted_: tuple[Tensor, Tensor, Tensor] | None,
    scale: float | None = None,
) -> Tensor:
    """One token of Sinkhorn attention: ``q`` ``(B, H, 1, E)`` attends, under one softmax, to
    its block's keys so far and to the block's sorted keys.

    Args:
        local: keys, values ``(B, H_kv, S, E)`` of the block's positions and their
            ``(B, H|1, 1, S)`` keep-mask (the causal triangle's row).
        sorted_: sorted keys, values ``(B, H, W, E)`` and their ``(B, H, 1, W)`` keep-mask
            (slots with weight), or None (block 0 receives no sorted block).
    """
    heads = q.shape[1]
    keys, values, keep = repeat_kv(local[0], heads), repeat_kv(local[1], heads), local[2]
    keep = keep.expand(keys.shape[0], heads, 1, keys.shape[2])
    if sorted_ is not None:
        keys = torch.cat([keys, sorted_[0]], dim=2)  # (B, H, S + W, E)
        values = torch.cat([values, sorted_[1]], dim=2)
        keep = torch.cat([keep, sorted_[2]], dim=-1)
    return attend_token(q, keys, values, keep, scale)


__all__ = [
    "ROW_LOCAL",
    "attend_token",
    "dense_keep_row",
    "local_and_sorted_token",
    "local_keep_row",
    "mix_blocks",
    "plan_row",
    "sorted_row",
    "sparse_keep_row",
    "topk_keep_row",
    "with_block_means",
]
