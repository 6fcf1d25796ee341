"""The attention function transformers calls for ``attn_implementation="sinkhorn"``, and
its decoding path through the model's ``DynamicCache`` (see `sparse_sinkhorn.hf`)."""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from ..nn.cache import SequenceRouting
from ..nn.config import AttentionConfig
from ..nn.kinds import KINDS
from ..nn.sortnet import SortNet, routing_summaries
from ..ops import dense_attention, sinkhorn_attention
from ..ops.blocks import repeat_kv
from ..ops.options import SinkhornOptions
from .decoding import BlockRouting

try:
    from transformers.cache_utils import DynamicLayer, EncoderDecoderCache, StaticLayer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'sparse_sinkhorn.hf needs transformers: pip install ".[hf]" (the hf extra)'
    ) from e

ATTN_IMPLEMENTATION = "sinkhorn"
CONFIG_KEY = "sinkhorn_attention"

# Attention-function keyword arguments of features this integration does not implement.
_UNSUPPORTED_KWARGS = ("sliding_window", "softcap", "s_aux", "position_bias")


def sinkhorn_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The transformers attention function (registered as ``"sinkhorn"``).

    Args:
        module: a converted attention module (has ``sort_net`` and ``sinkhorn_config``).
        query: ``(B, H, Lq, E)``; key, value: ``(B, H_kv, T, E)`` with ``H_kv`` dividing ``H``
            and ``Lq <= T`` (``Lq < T`` while decoding with a KV cache).
        attention_mask: None (causal, no padding) or the ``(B, 1, Lq, T)`` boolean mask
            transformers builds for ``"sinkhorn"`` (causal and key padding, True = attend).

    Returns:
        ``(B, Lq, H, E)`` and None (no attention weights).
    """
    att: AttentionConfig | None = getattr(module, "sinkhorn_config", None)
    sort_net: SortNet | None = getattr(module, "sort_net", None)
    if att is None or sort_net is None:
        raise ValueError(
            f"{type(module).__name__} has no sort net: convert the model first with "
            "sparse_sinkhorn.hf.convert(model, block_size=...), or load a converted model "
            "with sparse_sinkhorn.hf.from_pretrained"
        )
    if is_causal is False or not getattr(module, "is_causal", True):
        raise ValueError("Sinkhorn attention in transformers models is causal self-attention only")
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise ValueError(f"Sinkhorn attention does not support {name!r}")
    batch, _, q_len, _ = query.shape
    step = module.__dict__.pop(_CACHE_LAYER, None)  # (cache layer, its keys, filled length)
    if step is not None and step[2] is not None:  # a static layer: positions past it are unset
        key, value = (t[:, :, : step[2] + q_len] for t in (key, value))
        if attention_mask is not None:
            attention_mask = attention_mask[..., : step[2] + q_len]
    length = key.shape[2]
    if q_len > length:
        raise ValueError(f"more queries ({q_len}) than keys ({length})")
    real = _key_padding(attention_mask, batch, q_len, length, query.device)
    if real is not None and bool(real.all()):
        real = None  # no padding
    if step is not None:
        out = _decode_step(step, att, sort_net, query, key, value, real, dropout, scaling)
        if out is not None:
            return out, None
    if q_len < length:  # decoding: earlier positions' outputs are not needed, only their K/V
        old = query.new_zeros(batch, query.shape[1], length - q_len, query.shape[3])
        query = torch.cat([old, query], dim=2)  # (B, H, T, E)
    order = mask = None
    if real is not None:
        order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)  # real tokens first
        query, key, value = (_gather(t, order) for t in (query, key, value))
        mask = torch.arange(length, device=real.device) < real.sum(1, keepdim=True)  # (B, T)
    x = _routing_input(value, sort_net)  # (B, T, H_kv*E): the values of every KV head
    summaries = routing_summaries(
        x, att.block_size, causal=True, key_padding_mask=mask, pooling=att.pooling
    )
    logits = sort_net(*summaries)  # what sort_net.route gives
    options = att.op_options(
        is_causal=True, training=module.training, dropout_p=dropout, scale=scaling
    )
    if step is not None and q_len == length and real is None:
        # before the op: the state's small, long-lived buffers then lie below the op's
        # temporaries in the heap, which the allocator can give back once they are freed
        _keep_state(step[0], att, sort_net, key, value, x, summaries, dropout)
    out = _attend(query, key, value, logits.to(query.dtype), options, mask)
    if order is not None:
        out = _gather(out, torch.argsort(order, dim=1))  # back to the original positions
    return out[:, :, length - q_len :].transpose(1, 2).contiguous(), None


_CACHE_LAYER = "_sinkhorn_cache_layer"  # set on a converted module for one forward call
# on a cache layer: (BlockRouting or SequenceRouting, the keys tensor it has seen)
_STATE = "_sinkhorn_state"


def _keep_state(
    layer: Any,
    att: AttentionConfig,
    sort_net: SortNet,
    key: Tensor,
    value: Tensor,
    x: Tensor,
    summaries: tuple[Tensor, Tensor],
    dropout: float,
) -> None:
    """After a prompt's forward without padding: start the layer's decoding state from the
    routing summaries that forward computed, so the first new token does not rebuild it."""
    if sort_net.training or dropout:
        layer.__dict__.pop(_STATE, None)
        return
    state = BlockRouting(att, sort_net)
    state.prefill(key, value, x, summaries)
    layer.__dict__[_STATE] = (state, layer.keys)  # the tensor the cache layer holds now


def note_cache_layer(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
    """Forward pre-hook: remember the module's cache layer for the attention function, which
    transformers does not hand the cache: ``(layer, its keys tensor before this call's update,
    the positions it holds if it is a static layer)``.

    A ``DynamicLayer`` holds exactly the positions seen; a ``StaticLayer`` holds preallocated
    tensors whose positions past the filled length are not set (the attention function reads
    only the filled ones). Other static layers (sliding window, indexed) are refused; other
    dynamic kinds (quantized, offloaded) hold every position and take the recomputing path.
    """
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if isinstance(cache, EncoderDecoderCache):
        cache = cache.self_attention_cache
    layers = getattr(cache, "layers", None)
    idx = getattr(module, "layer_idx", None)
    note: tuple[Any, Tensor | None, int | None] | None = None
    if isinstance(layers, list) and isinstance(idx, int) and idx < len(layers):
        layer = layers[idx]
        if type(layer) is DynamicLayer:  # not sliding, quantized or offloaded layers
            note = (layer, getattr(layer, "keys", None), None)
        elif type(layer) is StaticLayer:
            note = (layer, getattr(layer, "keys", None), int(layer.get_seq_length()))
        elif isinstance(layer, StaticLayer):
            raise ValueError(
                f"Sinkhorn attention does not support {type(layer).__name__} caches; use a "
                "DynamicCache or a StaticCache"
            )
    module.__dict__[_CACHE_LAYER] = note


def _decode_step(
    note: tuple[Any, Tensor | None, int | None],
    att: AttentionConfig,
    sort_net: SortNet,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    real: Tensor | None,
    dropout: float,
    scaling: float | None,
) -> Tensor | None:
    """One new token through the layer's `BlockRouting` (no padding) or `SequenceRouting`
    (``(B, 1, H, E)``), or
    None when the step is not one it can take (the caller recomputes over the prefix)."""
    layer, before, _ = note
    ok = query.shape[2] == 1 and key.shape[2] > 1 and not sort_net.training and not dropout
    ok = ok and (real is None or bool(real[:, -1].all()))  # the new token is real
    if not ok:
        layer.__dict__.pop(_STATE, None)
        return None
    state, held = layer.__dict__.get(_STATE, (None, None))
    fresh = before is not None and held is before  # the cache layer's tensor it has seen
    new_k, new_v = key[:, :, -1:], value[:, :, -1:]
    x = new_v[:, :, 0].flatten(1)  # (B, H_kv*E): _routing_input of the new token
    if real is None:  # every sequence at the same position: one block phase for the batch
        if not (fresh and isinstance(state, BlockRouting) and state.t == key.shape[2] - 1):
            state = BlockRouting(att, sort_net)
            old_k, old_v = key[:, :, :-1], value[:, :, :-1]
            state.prefill(old_k, old_v, _routing_input(old_v, sort_net))
        out = state.step(query, new_k, new_v, x.to(state.dtype), (key, value), scaling)
    else:
        prefix_real = real[:, :-1]
        count = prefix_real.sum(1)
        same = isinstance(state, SequenceRouting) and state.count is not None
        if not (fresh and same and bool(torch.equal(state.count, count))):
            state = SequenceRouting(att, sort_net)
            old_k, old_v = key[:, :, :-1], value[:, :, :-1]
            state.prefill(old_k, old_v, _routing_input(old_v, sort_net), prefix_real)
        x = x.to(next(sort_net.parameters()).dtype)
        out = state.step(query, new_k, new_v, x, (key, value, real), scaling)
    if KINDS[att.kind].mix_dense:
        k_all, v_all = (repeat_kv(t, query.shape[1]) for t in (key, value))  # GQA
        out = out + dense_attention(query, k_all, v_all, key_padding_mask=real, scale=scaling)
    layer.__dict__[_STATE] = (state, layer.keys)  # the tensor the cache layer holds now
    return out.transpose(1, 2).contiguous()


def _attend(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    logits: Tensor,
    options: SinkhornOptions,
    mask: Tensor | None,
) -> Tensor:
    """`sinkhorn_attention` ``(B, H, T, E)``; without autograd or randomness (Gumbel noise,
    dropout) one query head at a time (heads are independent), so the op's working memory is
    one head's, and each head's output is written where ``(B, T, H, E)``, what the model
    reads next, keeps it."""
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (query, key, value, logits)
    )
    random = options.gumbel_noise or options.dropout_p > 0
    heads = query.shape[1]
    if needs_grad or random or heads == 1:
        out = sinkhorn_attention(query, key, value, logits, options, key_padding_mask=mask)
        assert isinstance(out, Tensor)
        return out
    batch, _, length, e = query.shape
    group = heads // key.shape[1]  # query heads per key/value head
    out = query.new_empty(batch, length, heads, e).transpose(1, 2)  # (B, H, T, E) view
    for h in range(heads):
        kv = slice(h // group, h // group + 1)
        one = sinkhorn_attention(
            query[:, h : h + 1],
            key[:, kv],
            value[:, kv],
            logits[:, h : h + 1],
            options,
            key_padding_mask=mask,
        )
        assert isinstance(one, Tensor)
        out[:, h] = one[:, 0]
    return out


def _routing_input(value: Tensor, sort_net: SortNet) -> Tensor:
    """``(B, T, H_kv*E)``: what the sort net summarises, the values of every KV head."""
    x = rearrange(value, "b h t e -> b t (h e)")
    return x.to(next(sort_net.parameters()).dtype)


def _key_padding(
    attention_mask: Tensor | None, batch: int, q_len: int, length: int, device: torch.device
) -> Tensor | None:
    """``(B, T)`` bool real-key mask from the 4-D causal mask (None: no padding).

    The mask must be exactly causal (end-aligned) and key padding; anything else (sliding
    windows, packed sequences, custom masks) is refused rather than silently ignored.
    """
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool:
        raise TypeError(
            "Sinkhorn attention expects the boolean mask transformers builds for "
            f"attn_implementation='sinkhorn', got dtype {attention_mask.dtype}"
        )
    if attention_mask.dim() != 4 or tuple(attention_mask.shape[-2:]) != (q_len, length):
        raise ValueError(
            f"attention_mask must be (B, 1, {q_len}, {length}), got {tuple(attention_mask.shape)}"
        )
    mask = attention_mask[:, 0].expand(batch, q_len, length)  # (B, Lq, T)
    real = mask[:, -1]  # the last query sees every real key
    if q_len == 1:  # one query, at the end: every key mask is causal
        return real
    pos = torch.arange(length, device=device)
    causal = pos[None, :] <= pos[length - q_len :, None]  # (Lq, T)
    if not torch.equal(mask, causal[None] & real[:, None, :]):
        raise ValueError(
            "Sinkhorn attention supports causal attention with key padding only; this mask has "
            "another pattern (sliding window, packed sequences or a custom mask?)"
        )
    return real


def _gather(x: Tensor, order: Tensor) -> Tensor:
    """``x`` ``(B, H, T, E)`` with positions reordered by ``order`` ``(B, T)``."""
    return x.gather(2, order[:, None, :, None].expand(x.shape[0], x.shape[1], -1, x.shape[3]))
