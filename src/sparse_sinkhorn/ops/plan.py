"""The sort *plan* of Sparse Sinkhorn attention: routing logits -> the block matrix ``P``,
and which keys each query may see given a plan (`keep_mask`).

Axes: B batch, H heads, N blocks, R rows of the plan (N, or n for SortCut), W block size.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from einops import rearrange
from torch import Tensor

from .blocks import block_validity, num_blocks, repeat_kv
from .options import SinkhornOptions, resolve_options
from .routing import SINKHORN_COLUMNS, softmax_routing
from .sinkhorn import allowed_entries, hard_routing, sinkhorn_balance

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .options import SinkhornKwargs


@dataclass(frozen=True, repr=False)
class SinkhornPlan:
    """Where every block's keys and values come from.

    Attributes:
        P: ``(B, H, R, N)`` float32 sort matrix; row ``r`` mixes key blocks into slot ``r``
            (``R = N``, or ``n`` with SortCut). With ``hard=True`` its forward value is 0/1
            and its gradient the soft matrix's (straight-through).
        indices: with hard routing, ``(B, H, R)`` long: the block each row takes, -1 where a
            row receives no block (causal row 0, padding-only blocks); None for a soft plan
            (every row mixes blocks by ``P``; a row with no block is a zero row of ``P``).
        block_size: tokens per block ``W``.
        is_causal, n_sortcut, hard: how the plan was made.
        key_mask: ``(B, N*W)`` bool, True = real key (after internal padding), or None.
    """

    P: Tensor
    indices: Tensor | None
    block_size: int
    is_causal: bool
    n_sortcut: int | None
    hard: bool
    key_mask: Tensor | None

    def __repr__(self) -> str:
        b, h, r, n = self.P.shape
        return (
            f"SinkhornPlan(batch={b}, heads={h}, rows={r}, blocks={n}, "
            f"block_size={self.block_size}, causal={self.is_causal}, "
            f"sortcut={self.n_sortcut}, hard={self.hard}, padded={self.key_mask is not None})"
        )

    def to_dense(self, length: int) -> Tensor:
        """The token-level attention pattern, ``(B, H, L, L)`` float32 (for plots and tests).

        Entry ``[t, s]`` is how much key position ``s`` enters query ``t``'s key set: 1 for
        its local block (causal triangle, real keys), plus ``P[i, j]`` for each position of
        key block ``j`` mixed into query block ``i``'s sorted block (for SortCut: the summed
        weight of ``j`` over the first ``n`` rows, for every query). O(L²): small L only.
        """
        w = self.block_size
        b, h, _, n = self.P.shape
        pos = torch.arange(n * w, device=self.P.device)
        blk = pos // w
        if self.n_sortcut is None:
            local = (blk[:, None] == blk[None, :]).float()  # (NW, NW)
            if self.is_causal:
                local = local * (pos[None, :] <= pos[:, None]).float()
            p_tok = self.P.detach().repeat_interleave(w, -2).repeat_interleave(w, -1)
            pattern = local + p_tok  # (B, H, NW, NW)
        else:
            col = self.P.detach().sum(-2).repeat_interleave(w, -1)  # (B, H, NW)
            pattern = col[..., None, :].expand(b, h, n * w, n * w)
        if self.key_mask is not None:
            pattern = pattern * self.key_mask[:, None, None, :].float()
        return pattern[..., :length, :length].contiguous()


def sinkhorn_plan(
    sort_logits: Tensor,
    options: SinkhornOptions | None = None,
    *,
    key_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    **kwargs: Unpack[SinkhornKwargs],
) -> SinkhornPlan:
    """Balance ``(B, H, N, N)`` routing logits into a
    [`SinkhornPlan`][sparse_sinkhorn.ops.SinkhornPlan].

    ``options`` (or its fields as keywords, see
    [`SinkhornOptions`][sparse_sinkhorn.ops.SinkhornOptions]) say how:
    ``block_size``, ``is_causal``, ``n_sortcut``, ``hard``, ``balance`` (``"softmax"``:
    normalise rows only; ``"sinkhorn-targets"``: causal column targets, and
    ``"sinkhorn-leaky"``: not causal, a comparison, see ``columns`` in
    [`sinkhorn_balance`][sparse_sinkhorn.ops.sinkhorn_balance]), ``n_iters``, ``temperature``,
    ``gumbel_noise``; ``generator`` draws the Gumbel noise. ``key_mask`` is the ``(B, N*W)``
    bool mask of real tokens after internal padding (see
    `sparse_sinkhorn.ops.blocks.padded_mask`); padding-only blocks are dropped from the
    balancing (rows and columns), so whole-block padding never changes the plan.
    """
    opts = resolve_options(options, kwargs)
    n = sort_logits.shape[-1]
    allowed = allowed_entries(
        n,
        n,
        causal=opts.is_causal,
        block_valid=block_validity(key_mask, opts.block_size),
        device=sort_logits.device,
    )
    route = (  # "softmax": rows only, a key block may serve many query blocks
        partial(sinkhorn_balance, n_iters=opts.n_iters, columns=SINKHORN_COLUMNS[opts.balance])
        if opts.balance in SINKHORN_COLUMNS
        else softmax_routing
    )
    p = route(
        sort_logits,
        temperature=opts.temperature,
        causal=opts.is_causal,
        gumbel_noise=opts.gumbel_noise,
        generator=generator,
        allowed=allowed,
    )  # (B, H, N, N) float32
    if opts.n_sortcut is not None:
        p = p[..., : opts.n_sortcut, :]  # (B, H, n, N): only the first n sorted blocks are kept
        if allowed is not None:
            allowed = allowed[..., : opts.n_sortcut, :]
    indices: Tensor | None = None
    if opts.hard:
        p, indices = hard_routing(p, allowed)
    return SinkhornPlan(
        p, indices, opts.block_size, opts.is_causal, opts.n_sortcut, opts.hard, key_mask
    )


def keep_mask(plan: SinkhornPlan) -> tuple[Tensor | None, Tensor | None]:
    """Which keys each query may see, as ``(local, sorted)`` bool keep-masks (None = all).

    Query block ``i`` (``W`` queries) attends, under one softmax, to ``2W`` keys: its own block
    (local) and the block sorted into its place (slot ``w`` of it mixes position ``w`` of
    every key block ``j`` with weight ``P[i, j]``)::

                      local: K_i  (W keys)        sorted: sum_j P_ij K_j  (W slots)
                   +----------------------------+----------------------------------+
        query q    | causal: key s <= q         | slot w holds real weight:        |
        of block i | padding: key s is real     |   sum_j P_ij [key (j, w) real]>0 |
                   +----------------------------+----------------------------------+

    * ``local``: ``(1, 1, 1, W, W)`` causal triangle and/or ``(B, 1, N, 1, W)`` real keys,
      combined to ``(B|1, 1, N|1, W|1, W)``; None without causality and padding.
    * ``sorted``: ``(B, H, R, W)`` per slot, with ``R = N`` rows (``n`` with SortCut); a slot
      is masked when no real key reaches it (a padding-only mix, or causal row 0, which has
      no earlier block). None without causality and padding (every slot has weight 1).

    SortCut uses only the sorted part (every query sees the ``n*W`` slots of the first ``n``
    rows). The reference
    ([`reference_sinkhorn_attention`][sparse_sinkhorn.ops.reference_sinkhorn_attention]) states the
    same rule on the ``(L, L)`` token grid.
    """
    w = plan.block_size
    local: Tensor | None = None
    if plan.is_causal:
        pos = torch.arange(w, device=plan.P.device)
        local = (pos[None, :] <= pos[:, None])[None, None, None]  # (1, 1, 1, W, W)
    if plan.key_mask is not None:
        real = rearrange(plan.key_mask, "b (n w) -> b 1 n 1 w", w=w)  # (B, 1, N, 1, W)
        local = real if local is None else local & real
    if plan.key_mask is None and not plan.is_causal:
        return local, None
    p = plan.P.detach()  # (B, H, R, N)
    if plan.key_mask is None:
        weight = p.sum(-1)[..., None].expand(*p.shape[:-1], w)  # (B, H, R, W)
    else:
        real_kw = rearrange(plan.key_mask, "b (n w) -> b n w", w=w).to(p.dtype)
        weight = torch.einsum("bhrn,bnw->bhrw", p, real_kw)  # real weight per slot
    return local, weight > 0


TEACHERS = ("mean", "max")  # block_attention_mass's reduction over a block's queries


def block_attention_mass(
    query: Tensor,
    key: Tensor,
    *,
    block_size: int,
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    reduce: str = "mean",
) -> Tensor:
    """Where dense attention puts its weight, per pair of blocks: ``(B, H, N, N)``.

    Entry ``[i, j]`` is the mean (``reduce="mean"``) or the largest (``reduce="max"``), over
    the real queries of block ``i``, of the softmax weight ``softmax(q kᵀ · scale)`` puts on
    the real keys of block ``j`` (causal: keys ``<= t``): with ``"max"`` one query that reads
    block ``j`` marks it, however many queries of block ``i`` read elsewhere. A routing target
    (what a sort net row should score), computed without gradient. O(L²): for training-time
    distillation at moderate lengths.
    """
    if reduce not in TEACHERS:
        raise ValueError(f"reduce must be one of {TEACHERS}, got {reduce!r}")
    w = block_size
    batch, heads, length, _ = query.shape
    key = repeat_kv(key, heads)  # grouped-query attention
    with torch.no_grad():
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        scores = (query @ key.transpose(-1, -2)).float() * scale  # (B, H, L, L)
        keep = torch.ones(length, length, dtype=torch.bool, device=query.device)
        if is_causal:
            keep = keep.tril()
        real = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        keep4 = keep[None, None] if real is None else keep[None, None] & real  # (B|1, 1, L, L)
        probs = scores.masked_fill(~keep4, float("-inf")).softmax(-1).nan_to_num(0.0)
        n = num_blocks(length, w)
        pad = n * w - length
        probs = torch.nn.functional.pad(probs, (0, pad, 0, pad))  # (B, H, N*W, N*W)
        mass = rearrange(probs, "b h q (n w) -> b h q n w", w=w).sum(-1)  # (B, H, N*W, N)
        if key_padding_mask is None:
            q_real = torch.ones(batch, length, device=query.device)
        else:
            q_real = key_padding_mask.float()
        q_real = torch.nn.functional.pad(q_real, (0, pad)).view(batch, 1, n, w, 1)
        mass = rearrange(mass, "b h (n w) m -> b h n w m", w=w) * q_real  # weights >= 0
        if reduce == "max":
            return mass.amax(3)  # (B, H, N, N); a padded query's row is 0 here
        return mass.sum(3) / q_real.sum(3).clamp_min(1.0)  # (B, H, N, N)


__all__ = ["SinkhornPlan", "block_attention_mass", "keep_mask", "sinkhorn_plan"]
