"""Slow, readable oracles for every fast path (tests run them in float64).

Axes: B batch, H heads, L length, D head dim, N blocks, R plan rows, W block size.

Nothing here is blocked: Sinkhorn balancing is written as explicit loops over rows, and
Sinkhorn attention as one dense problem per head — the sorted keys are built with the
``(R*W, N*W)`` token-level permutation ``kron(P, I_W)``, and every query scores all ``N*W``
original keys and all ``R*W`` sorted keys, with an ``(L, N*W + R*W)`` mask saying which of
them it may see. Use it on small shapes only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .blocks import num_blocks, repeat_kv
from .options import SinkhornOptions, resolve_options
from .routing import SINKHORN_COLUMNS
from .sinkhorn import COLUMNS, sample_gumbel

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .options import SinkhornKwargs


def reference_sinkhorn_balance(
    logits: Tensor,
    *,
    n_iters: int = 8,
    temperature: float = 0.75,
    causal: bool = False,
    allowed: Tensor | None = None,
    noise: Tensor | None = None,
    columns: str = "unit",
) -> Tensor:
    """Sinkhorn balancing by the definition, one row / column at a time (float64).

    ``allowed`` (broadcastable bool) restricts the support; ``causal`` adds ``j < i``.
    Causal columns are normalised over rows ``<= i`` only (prefix-causal balancing), to 1
    (``columns="unit"``), or (``"reachable"``) to ``t(i, j) = R(i) n(i, j) / sum_k n(i, k)``:
    ``n(i, j)`` the rows ``<= i`` allowed to read column ``j``, ``R(i)`` the rows ``<= i``
    with any allowed entry. ``"all-rows"``: causal entries, but the paper's rounds (rows,
    then columns over all rows; not causal).
    """
    if columns not in COLUMNS:
        raise ValueError(f"columns must be one of {COLUMNS}, got {columns!r}")
    s = logits.double() + (0 if noise is None else noise.double())
    s = s / temperature
    n_rows, n_cols = s.shape[-2:]
    ok = torch.ones(s.shape, dtype=torch.bool, device=s.device)
    if allowed is not None:
        ok = ok & allowed
    if causal:
        i = torch.arange(n_rows)[:, None]
        j = torch.arange(n_cols)[None, :]
        ok = ok & (j < i)
    s = torch.where(ok, s, torch.zeros_like(s))  # masked entries are ignored below

    def lse(x: Tensor, keep: Tensor, dim: int) -> Tensor:
        """log of the sum of exp over kept entries (0 where nothing is kept)."""
        total = torch.where(keep, x.exp(), torch.zeros_like(x)).sum(dim=dim, keepdim=True)
        return torch.log(torch.where(total > 0, total, torch.ones_like(total)))

    log_t = torch.zeros_like(s)  # the prefix column targets, t = 1 unless "reachable"
    if causal and columns == "reachable":
        for row in range(n_rows):
            reach = ok[..., : row + 1, :].double().sum(-2, keepdim=True)  # n(i, j)
            mass = ok[..., : row + 1, :].any(-1).double().sum(-1)[..., None, None]  # R(i)
            t = mass * reach / reach.sum(-1, keepdim=True).clamp_min(1.0)
            log_t[..., row : row + 1, :] = torch.where(t > 0, t, torch.ones_like(t)).log()

    for _ in range(n_iters):
        if causal and columns != "all-rows":  # column sums over rows <= i only, then rows
            cols = [lse(s[..., : i + 1, :], ok[..., : i + 1, :], dim=-2) for i in range(n_rows)]
            s = torch.where(ok, s - torch.cat(cols, dim=-2) + log_t, s)
            s = torch.where(ok, s - lse(s, ok, dim=-1), s)
        else:
            s = torch.where(ok, s - lse(s, ok, dim=-1), s)
            s = torch.where(ok, s - lse(s, ok, dim=-2), s)
    return torch.where(ok, s.exp(), torch.zeros_like(s))


def reference_softmax_routing(
    logits: Tensor,
    *,
    temperature: float = 0.75,
    causal: bool = False,
    allowed: Tensor | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """Row-softmax routing by the definition (float64): ``P[i, j] = exp(s_ij) / sum_k
    exp(s_ik)`` over the allowed ``k`` of row ``i``; 0 elsewhere and on rows with none."""
    s = (logits.double() + (0 if noise is None else noise.double())) / temperature
    n_rows, n_cols = s.shape[-2:]
    ok = torch.ones(s.shape, dtype=torch.bool, device=s.device)
    if allowed is not None:
        ok = ok & allowed
    if causal:
        ok = ok & (torch.arange(n_cols)[None, :] < torch.arange(n_rows)[:, None])
    e = torch.where(ok, (s - s.detach().amax(-1, keepdim=True)).exp(), torch.zeros_like(s))
    total = e.sum(-1, keepdim=True)
    return e / torch.where(total > 0, total, torch.ones_like(total))


def reference_dense_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    keep: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """``softmax(q kᵀ · scale, masked by keep) v``; rows with no kept key give 0."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = query @ key.transpose(-1, -2) * scale
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    attn = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return attn @ value


def reference_sinkhorn_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    sort_logits: Tensor,
    options: SinkhornOptions | None = None,
    *,
    key_padding_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    **kwargs: Unpack[SinkhornKwargs],
) -> Tensor:
    """The oracle for
    [`sparse_sinkhorn.ops.sinkhorn_attention`][sparse_sinkhorn.ops.sinkhorn_attention] (same
    arguments; no dropout), in float64 on the ``(L, L)`` token grid."""
    opts = resolve_options(options, kwargs)
    if opts.dropout_p != 0.0:
        raise ValueError("the reference has no dropout; pass dropout_p=0")
    key, value = repeat_kv(key, query.shape[1]), repeat_kv(value, query.shape[1])  # GQA
    batch, heads, length, _ = query.shape
    w = opts.block_size
    n = num_blocks(length, w)
    lp = n * w
    dt = torch.float64
    q, k, v = (_pad(t.to(dt), lp) for t in (query, key, value))  # (B, H, Lp, D)
    real = torch.ones(batch, length, dtype=torch.bool, device=query.device)
    if key_padding_mask is not None:
        real = key_padding_mask
    real = torch.cat([real, real.new_zeros(batch, lp - length)], dim=1)  # (B, Lp)

    p = _reference_plan(sort_logits, real.view(batch, n, w).any(-1), opts, generator)
    rows = p.shape[-2]

    # Token-level permutation: sorted slot (r, s) = sum_j P[r, j] * token (j, s).
    eye = torch.eye(w, dtype=dt, device=query.device)
    perm = torch.einsum("bhrn,st->bhrsnt", p, eye).reshape(batch, heads, rows * w, lp)
    realf = real[:, None, :, None].to(dt)  # (B, 1, Lp, 1)
    k_sorted = perm @ (k * realf)  # (B, H, R*W, D)
    v_sorted = perm @ (v * realf)
    slot_real = (perm.detach() @ realf).squeeze(-1) > 0  # (B, H, R*W)

    pos = torch.arange(lp, device=query.device)
    q_blk = pos[:, None] // w  # (Lp, 1)
    slot_blk = torch.arange(rows * w, device=query.device)[None, :] // w  # (1, R*W)
    if opts.n_sortcut is None:
        local = (q_blk == pos[None, :] // w) & real[:, None, None, :]  # (B, 1, Lp, Lp)
        if opts.is_causal:
            local = local & (pos[None, :] <= pos[:, None])
        sorted_ok = (q_blk == slot_blk) & slot_real[:, :, None, :]  # (B, H, Lp, R*W)
    else:
        local = torch.zeros(1, 1, lp, lp, dtype=torch.bool, device=query.device)
        sorted_ok = slot_real[:, :, None, :].expand(batch, heads, lp, rows * w)
    keep = torch.cat([local.expand(batch, heads, lp, lp), sorted_ok], dim=-1)
    keys = torch.cat([k, k_sorted], dim=-2)  # (B, H, Lp + R*W, D)
    values = torch.cat([v, v_sorted], dim=-2)
    out = reference_dense_attention(q, keys, values, keep=keep, scale=opts.scale)
    if opts.mix_dense:
        dense_keep = real[:, None, None, :].expand(batch, heads, lp, lp)
        if opts.is_causal:
            dense_keep = dense_keep & (pos[None, :] <= pos[:, None])
        out = out + reference_dense_attention(q, k, v, keep=dense_keep, scale=opts.scale)
    return out[:, :, :length]


def _reference_plan(
    sort_logits: Tensor,
    block_real: Tensor,
    opts: SinkhornOptions,
    generator: torch.Generator | None,
) -> Tensor:
    """The ``(B, H, R, N)`` plan: routing over the blocks holding a real token
    (``block_real`` ``(B, N)``), the first ``n`` rows with SortCut, one-hot with hard
    routing (straight-through)."""
    allowed = (block_real[:, :, None] & block_real[:, None, :])[:, None]  # (B, 1, N, N)
    noise = None
    if opts.gumbel_noise:
        noise = sample_gumbel(sort_logits.shape, device=sort_logits.device, generator=generator)
    where: dict[str, Any] = dict(
        temperature=opts.temperature, causal=opts.is_causal, allowed=allowed, noise=noise
    )
    if opts.balance != "softmax":  # (B, H, N, N)
        p = reference_sinkhorn_balance(
            sort_logits, n_iters=opts.n_iters, columns=SINKHORN_COLUMNS[opts.balance], **where,
        )  # fmt: skip
    else:
        p = reference_softmax_routing(sort_logits, **where)  # rows only
    if opts.n_sortcut is not None:
        p = p[..., : opts.n_sortcut, :]
    if opts.hard:
        one_hot = torch.zeros_like(p)
        has = p.sum(-1) > 0
        one_hot.scatter_(-1, p.argmax(-1, keepdim=True), 1.0)
        p = one_hot * has[..., None] + (p - p.detach())
    return p


def _pad(x: Tensor, length: int) -> Tensor:
    extra = length - x.shape[-2]
    if extra == 0:
        return x
    return torch.cat([x, x.new_zeros(*x.shape[:-2], extra, x.shape[-1])], dim=-2)


def reference_topk_block_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    block_size: int,
    top_k: int = 1,
    is_causal: bool = False,
    compressed: bool = False,
    gate: str = "mean",
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """The oracle for
    [`sparse_sinkhorn.ops.topk_block_attention`][sparse_sinkhorn.ops.topk_block_attention]: dense
    attention in
    float64 under the ``(L, L)`` mask "own block (causal triangle) or a block the gate chose"
    (the gate is [`topk_block_selection`][sparse_sinkhorn.ops.topk_block_selection]'s, written out
    per query); with ``compressed``, over ``N`` more keys and values, block ``j``'s mean real
    key and value, which query ``t`` sees when ``j`` is a gate candidate for it; with
    ``gate="bound"``, block ``j``'s score is ``sum_d max(q_d min_d, q_d max_d)`` over its real
    keys, written out."""
    batch, heads, length, _ = query.shape
    key, value = repeat_kv(key, heads), repeat_kv(value, heads)
    w = block_size
    q, k, v = (t.double() for t in (query, key, value))
    real = torch.ones(batch, length, dtype=torch.bool, device=query.device)
    if key_padding_mask is not None:
        real = key_padding_mask
    k, v = (torch.where(real[:, None, :, None], t, torch.zeros_like(t)) for t in (k, v))
    blk = torch.arange(length, device=query.device) // w  # (L,)
    n = num_blocks(length, w)
    keep = torch.zeros(batch, heads, length, length, dtype=torch.bool, device=query.device)
    summaries_k, summaries_v, summaries_ok = [], [], []

    def block_score(j: int) -> tuple[Tensor, Tensor, Tensor]:
        """(every query's gate score for block j (B, H, L), its real-key count (B,), its
        mean real key (B, H, D))."""
        in_j = real & (blk == j)[None]  # (B, L)
        has = in_j.sum(-1)  # (B,)
        mean = (k * in_j[:, None, :, None]).sum(2) / has.clamp_min(1)[:, None, None]
        if gate == "mean":
            return torch.einsum("bhld,bhd->bhl", q, mean), has, mean
        sel = in_j[:, None, :, None]  # bound: per feature, the extreme of the real keys
        k_max = torch.where(sel, k, torch.full_like(k, float("-inf"))).amax(2)  # (B, H, D)
        k_min = torch.where(sel, k, torch.full_like(k, float("inf"))).amin(2)
        k_max = torch.where((has > 0)[:, None, None], k_max, torch.zeros_like(k_max))
        k_min = torch.where((has > 0)[:, None, None], k_min, torch.zeros_like(k_min))
        score = torch.maximum(q * k_max[:, :, None], q * k_min[:, :, None]).sum(-1)
        return score, has, mean

    for j in range(n):
        in_j = blk == j  # (L,)
        score, has, mean = block_score(j)
        ok = (blk > j) if is_causal else (blk != j)  # (L,)
        ok = ok[None, None] & (has > 0)[:, None, None]  # (B, 1, L)
        # block j is chosen iff fewer than top_k allowed blocks score strictly higher
        # (ties broken towards the lower index, as torch.topk does on these inputs)
        better = torch.zeros_like(score, dtype=torch.long)
        for m in range(n):
            if m == j:
                continue
            score_m, has_m, _ = block_score(m)
            ok_m = ((blk > m) if is_causal else (blk != m))[None, None] & (has_m > 0)[:, None, None]
            beats = (score_m > score) | ((score_m == score) & (m < j))
            better = better + (ok_m & beats).long()
        chosen = ok & (better < top_k)  # (B, H, L)
        keep = keep | (chosen[..., None] & in_j[None, None, None, :])
        mean_v = (v * (real & in_j)[:, None, :, None]).sum(2) / has.clamp_min(1)[:, None, None]
        summaries_k.append(mean)
        summaries_v.append(mean_v)
        summaries_ok.append(ok.expand(batch, heads, length))
    own = blk[:, None] == blk[None, :]  # (L, L)
    if is_causal:
        own = own & (torch.arange(length)[None, :] <= torch.arange(length)[:, None])
    keep = (keep | own[None, None]) & real[:, None, None, :]
    if compressed:  # block j's mean key and value as one more key and value
        k = torch.cat([k, torch.stack(summaries_k, dim=2)], dim=2)  # (B, H, L + N, D)
        v = torch.cat([v, torch.stack(summaries_v, dim=2)], dim=2)
        keep = torch.cat([keep, torch.stack(summaries_ok, dim=-1)], dim=-1)  # (B, H, L, L + N)
    return reference_dense_attention(q, k, v, keep=keep, scale=scale)
