"""Argument checks with early, one-line errors (``ValueError``/``TypeError`` naming the
argument, as PyTorch raises them), skipped while ``torch.compile`` traces.

The ops check their tensor arguments here; the layers (`check_layer_input`) and the models'
sampling (`check_number`) use the same checks, so one argument is refused in one wording
wherever it is passed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .blocks import num_blocks


def check_number(name: str, value: object, *, low: float, low_ok: bool = False) -> float:
    """A finite real number above ``low`` (or equal to it when ``low_ok``); returns it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < low or (value == low and not low_ok):
        bound = f">= {low:g}" if low_ok else f"> {low:g}"
        hint = "" if math.isfinite(value) else " (it must be finite)"
        raise ValueError(f"{name} must be {bound}, got {value!r}{hint}")
    return float(value)


def check_tensor(name: str, value: object, device: torch.device | None = None) -> Tensor:
    """``value`` is a tensor (on ``device`` when given); returns it."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if device is not None and value.device != device:
        raise ValueError(
            f"{name} is on {value.device} but query/key/value are on {device}; "
            f"move it with .to({str(device)!r})"
        )
    return value


def check_qkv(
    query: Tensor, key: Tensor, value: Tensor, *, same_length: bool, gqa: bool = False
) -> None:
    """Shapes ``(B, H, L, D)`` with matching batch, heads, dtype and device.

    With ``gqa``, key and value may have ``H_kv`` heads where ``H_kv`` divides ``H``
    (grouped-query / multi-query attention).
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, L, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
        if 0 in t.shape:
            raise ValueError(
                f"{name} has an empty dimension: (B, H, L, D) = {tuple(t.shape)}; every size "
                "must be >= 1"
            )
    heads, kv_heads = query.shape[1], key.shape[1]
    grouped = gqa and key.shape[:2] == value.shape[:2] and query.shape[0] == key.shape[0]
    if grouped and (kv_heads == 0 or heads % kv_heads != 0):
        raise ValueError(
            f"grouped-query attention needs the key/value heads to divide the query heads: "
            f"got H={heads} query heads and H_kv={kv_heads} key/value heads"
        )
    if not grouped and (query.shape[:2] != key.shape[:2] or key.shape[:2] != value.shape[:2]):
        raise ValueError(
            "query, key and value must share batch and heads (B, H): got "
            f"{tuple(query.shape[:2])}, {tuple(key.shape[:2])}, {tuple(value.shape[:2])}"
        )
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query and key head dims differ: {query.shape[-1]} vs {key.shape[-1]}")
    if key.shape[2] != value.shape[2]:
        raise ValueError(f"key and value lengths differ: {key.shape[2]} vs {value.shape[2]}")
    if same_length and query.shape[2] != key.shape[2]:
        raise ValueError(
            "block-sparse attention pairs query block i with key block i, so query and key "
            f"lengths must match: got {query.shape[2]} and {key.shape[2]}"
        )
    if query.dtype != key.dtype or key.dtype != value.dtype:
        raise TypeError(
            f"query, key, value dtypes differ: {query.dtype}, {key.dtype}, {value.dtype}"
        )
    if query.device != key.device or key.device != value.device:
        raise ValueError(
            f"query, key, value devices differ: {query.device}, {key.device}, {value.device}"
        )


def check_inputs(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    same_length: bool,
    key_padding_mask: Tensor | None,
    dropout_p: float,
    scale: float | None,
    gqa: bool = False,
) -> None:
    """Everything every attention op checks: `check_qkv` and `check_common`."""
    check_qkv(query, key, value, same_length=same_length, gqa=gqa)
    check_common(key, key_padding_mask=key_padding_mask, dropout_p=dropout_p, scale=scale)


def check_common(
    key: Tensor,
    *,
    key_padding_mask: Tensor | None,
    dropout_p: float,
    scale: float | None,
) -> None:
    """The arguments every attention op takes beside its tensors: `check_padding_mask` and
    `check_dropout_and_scale`."""
    check_padding_mask(key, key_padding_mask)
    check_dropout_and_scale(dropout_p, scale)


def check_padding_mask(key: Tensor, key_padding_mask: object) -> None:
    """None, or a bool ``(B, L)`` tensor on ``key``'s device (``key`` ``(B, H, L, D)``)."""
    batch, _, length, _ = key.shape
    check_mask(key_padding_mask, (batch, length), key.device)


def check_mask(key_padding_mask: object, shape: tuple[int, ...], device: torch.device) -> None:
    """None, or a bool tensor of ``shape`` ``(B, L)`` on ``device``."""
    if key_padding_mask is None:
        return
    mask = check_tensor("key_padding_mask", key_padding_mask, device)
    if mask.dtype != torch.bool:
        raise TypeError(
            f"key_padding_mask must be a bool tensor (True = real token), got dtype {mask.dtype}"
        )
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(
            f"key_padding_mask must have shape (B, L) = {tuple(shape)}, got {tuple(mask.shape)}"
        )


def check_dropout_and_scale(dropout_p: float, scale: float | None) -> None:
    """``dropout_p`` in ``[0, 1)``; ``scale`` None or a finite number > 0."""
    if check_number("dropout_p", dropout_p, low=0.0, low_ok=True) >= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None:
        check_number("scale", scale, low=0.0)


def check_sinkhorn(
    query: Tensor,
    sort_logits: Tensor,
    *,
    block_size: int,
    n_sortcut: int | None,
) -> None:
    """The routing logits and the SortCut budget against the query's shape ``(B, H, L, D)``:
    the plan has one routing matrix per query head (the options themselves are checked when
    [`SinkhornOptions`][sparse_sinkhorn.ops.SinkhornOptions] is built)."""
    check_tensor("sort_logits", sort_logits, query.device)
    batch, heads, length, _ = query.shape
    n = num_blocks(length, block_size)
    want = (batch, heads, n, n)
    if tuple(sort_logits.shape) != want:
        raise ValueError(
            f"sort_logits must have shape (B, H, N, N) = {want} for L={length}, "
            f"block_size={block_size} (N = ceil(L / block_size) = {n}); "
            f"got {tuple(sort_logits.shape)}"
        )
    if n_sortcut is not None and n_sortcut > n:
        raise ValueError(
            f"n_sortcut={n_sortcut} is larger than the number of blocks N={n} "
            f"(L={length}, block_size={block_size})"
        )


def check_balance(logits: Tensor, n_iters: int, temperature: float) -> None:
    """The arguments of [`sinkhorn_balance`][sparse_sinkhorn.ops.sinkhorn_balance] (and so of every
    Sinkhorn op)."""
    if logits.dim() < 2:
        raise ValueError(f"sort logits must have at least 2 dims (..., N, M), got {logits.shape}")
    if not logits.is_floating_point():
        raise TypeError(f"sort logits must be floating point, got {logits.dtype}")
    check_iterations(n_iters, temperature)


def check_iterations(n_iters: int, temperature: float) -> None:
    """``n_iters`` a non-negative int; ``temperature`` a finite number > 0."""
    check_number("temperature", temperature, low=0.0)
    if isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 0:
        raise ValueError(f"n_iters must be a non-negative int, got {n_iters!r}")


def check_layer_input(x: object, key_padding_mask: object, *, d_model: int, weight: Tensor) -> None:
    """The input of a self-attention layer (``SinkhornSelfAttention.forward``): ``x`` a
    non-empty ``(B, L, d_model)`` floating tensor of the parameters' dtype (under autocast any
    float) and device; ``key_padding_mask`` None or a bool ``(B, L)`` tensor beside it."""
    if torch.compiler.is_compiling():
        return
    x = check_tensor("x", x)
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise ValueError(f"expected x of shape (B, L, {d_model}), got {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(
            f"x has an empty dimension: (B, L, D) = {tuple(x.shape)}; B and L must be >= 1"
        )
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    if x.device != weight.device:
        raise ValueError(
            f"x is on {x.device} but the layer's parameters are on {weight.device}; move one "
            "of them"
        )
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"x is {x.dtype} but the layer's parameters are {weight.dtype}; convert one "
            f"(layer.to({x.dtype}) or x.to({weight.dtype})) or run under torch.autocast"
        )
    check_mask(key_padding_mask, tuple(x.shape[:2]), x.device)
