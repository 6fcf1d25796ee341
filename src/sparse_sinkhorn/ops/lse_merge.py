"""Local block + sorted block as two attention calls merged through their log-sum-exp.

Axes: G = B*H (batch x heads), N blocks, W block size (queries and keys per block),
D head dim, Dv value dim.

Sinkhorn attention gives query block ``i`` one softmax over ``2W`` keys: its own (local)
block and the sorted block ``sum_j P_ij K_j``. Instead of building ``[local ; sorted]``
key/value buffers (2x K and V, their gradients, and a boolean mask in the causal case), each
half is its own attention problem that returns its output and its log-sum-exp, and the two
are merged exactly::

      query block i          keys of part 1            keys of part 2
      (W queries)       [ K_i  (causal: triangle) ]  [ sum_j P_ij K_j ]
          |                      |                         |
          +--------> o1, lse1 <--+        o2, lse2 <-------+
                           \\                 /
                 lse = logaddexp(lse1, lse2)
                 out = exp(lse1 - lse) * o1 + exp(lse2 - lse) * o2   (= one softmax over 2W)

The backward needs no merge-specific maths: with ``S`` the scores of one part and
``P = exp(S - lse)`` its share of the *merged* softmax, the merged attention's gradient
restricted to that part's keys is ``dS = P * (dO V^T - rowsum(dO * out))`` -- exactly what a
flash-attention backward computes when it is handed the merged ``out`` and ``lse``. So each
part's own backward kernel is called with ``(dO, out, lse)`` and the query gradients add.

Kernels (per part, ``(G, N, W, D)`` tensors with the N blocks in the kernels' "heads" slot):

* CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward (the kernel
  ``F.scaled_dot_product_attention`` picks on CPU), with ``is_causal`` for the causal local
  block and no mask at all.
* CUDA, fp16/bf16, head dim <= 256 and a multiple of 8: ``aten._scaled_dot_product_flash_
  attention`` and its backward (FlashAttention-2), likewise mask-free.
* Anything else (CUDA fp32, other devices), or when the flash backend is switched off
  (``torch.nn.attention.sdpa_kernel`` without ``FLASH_ATTENTION``): the same maths in plain
  matmuls, which holds one ``(W, W)`` score block per query block during each call.

Both flash kernels honour ``torch.backends.cuda.flash_sdp_enabled()``, the switch
``sdpa_kernel`` sets for SDPA's flash backend on every device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

_NEG_INF = float("-inf")


def flash_parts_available(x: Tensor) -> bool:
    """Whether the parts of ``x``'s device and dtype run on a flash kernel."""
    if not torch.backends.cuda.flash_sdp_enabled():
        return False
    if x.device.type == "cpu":
        return True
    if x.device.type == "cuda":
        d = x.shape[-1]
        return x.dtype in (torch.float16, torch.bfloat16) and d <= 256 and d % 8 == 0
    return False


def part_forward(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, flash: bool
) -> tuple[Tensor, Tensor, tuple[Any, ...]]:
    """One part: ``(G, N, W, D)`` in -> ``(G, N, W, Dv)`` output, ``(G, N, W)`` float lse,
    and what the kernel's backward needs besides (CUDA flash: sequence info, RNG state)."""
    if flash and q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, scale=scale
        )
        return out, lse, ()
    if flash:
        res = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale
        )
        return res[0], res[1], tuple(res[2:8])
    scores = _scores(q, k, causal, scale)  # (G, N, W, W)
    lse = torch.logsumexp(scores, dim=-1)  # (G, N, W)
    out = (scores - lse[..., None]).exp().to(v.dtype) @ v
    return out, lse, ()


def part_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    causal: bool,
    scale: float,
    info: tuple[Any, ...],
    part: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one part's ``q, k, v`` given the *merged* ``out`` and ``lse`` and the
    forward's ``info``: ``part`` 0 is the local part (`merged_forward`'s first call),
    1 the sorted part (use `sorted_part_backward`, which also masks rows without one)."""
    flash, aux = info[0], info[1 + part]
    if flash and q.device.type == "cpu":
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=scale
        )
        return dq, dk, dv
    if flash:
        cum_q, cum_k, max_q, max_k, seed, offset = aux
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, seed, offset,
            scale=scale,
        )  # fmt: skip
        return dq, dk, dv
    scores = _scores(q, k, causal, scale)  # (G, N, W, W)
    p = (scores - lse[..., None]).exp()  # this part's share of the merged softmax
    row = (dout.to(p.dtype) * out.to(p.dtype)).sum(-1, keepdim=True)  # (G, N, W, 1)
    dv = p.to(v.dtype).transpose(-1, -2) @ dout
    ds = (p * ((dout @ v.transpose(-1, -2)).to(p.dtype) - row) * scale).to(q.dtype)
    return ds @ k, ds.transpose(-1, -2) @ q, dv


def _scores(q: Tensor, k: Tensor, causal: bool, scale: float) -> Tensor:
    """Scaled ``(G, N, W, W)`` scores in float32 (float64 for float64), causal: -inf above
    the diagonal (the future keys of a block)."""
    scores = (q @ k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32)) * scale
    if causal:
        w = q.shape[-2]
        future = torch.ones(w, w, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, _NEG_INF)
    return scores


def merged_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ks: Tensor,
    vs: Tensor,
    causal: bool,
    scale: float,
    no_sorted: Tensor | None,
) -> tuple[Tensor, Tensor, tuple[Any, ...]]:
    """Both parts and their merge; returns ``out``, ``lse`` and what the backward needs.

    Inputs: queries, local keys/values and sorted keys/values of one block per row of the
    leading dims, ``(G*N, 1, W, D)`` (each block a "batch" row: the kernels' fastest layout
    here; any 4-D layout with the block's ``W`` positions in dim 2 works). With ``causal``
    the local part is the plain causal triangle. ``no_sorted`` (bool, broadcastable to the
    ``(G*N, 1, W)`` lse; causal block 0) marks blocks that receive no sorted block: their
    sorted part is computed anyway (all-zero keys, one block's cost) and dropped from the
    merge with ``lse2 = -inf``, which keeps every tensor in one layout.
    """
    # the flash kernels need one head dim for Q, K and V; a value dim of its own takes matmuls
    flash = flash_parts_available(q) and v.shape[-1] == q.shape[-1]
    out, lse, aux1 = part_forward(q, k, v, causal, scale, flash)  # local part
    o2, l2, aux2 = part_forward(q, ks, vs, False, scale, flash)  # sorted part
    if no_sorted is not None:
        l2 = l2.masked_fill(no_sorted, _NEG_INF)
    merged = torch.logaddexp(lse, l2)  # (..., W)
    w1 = (lse - merged).exp()[..., None].to(out.dtype)
    w2 = (l2 - merged).exp()[..., None].to(out.dtype)
    out = out.mul_(w1).addcmul_(o2, w2)  # in place: the kernel's fresh output buffer
    return out, merged, (flash, aux1, aux2)


def sorted_part_backward(
    dout: Tensor,
    q: Tensor,
    ks: Tensor,
    vs: Tensor,
    out: Tensor,
    lse: Tensor,
    scale: float,
    no_sorted: Tensor | None,
    info: tuple[Any, ...],
) -> tuple[Tensor, Tensor, Tensor]:
    """``dq, dks, dvs`` of the sorted part, from the merged ``out`` and ``lse``."""
    if no_sorted is not None:  # lse = +inf: weight exp(S - lse) = 0, so zero gradients
        lse = lse.masked_fill(no_sorted, float("inf"))
    return part_backward(dout, q, ks, vs, out, lse, False, scale, info, part=1)
