"""Sparse Sinkhorn attention inside Hugging Face ``transformers`` causal language models.

Needs the ``hf`` extra (``pip install ".[hf]"`` from a checkout); ``import sparse_sinkhorn``
never imports transformers, this module does.

::

    from transformers import AutoModelForCausalLM
    from sparse_sinkhorn import hf

    model = AutoModelForCausalLM.from_pretrained("path/to/llama")   # or any Llama / GPT-2 model
    hf.convert(model, block_size=64)           # every self-attention layer: Sinkhorn attention
    ...                                        # train (the sort nets are new parameters)
    model.save_pretrained("out")
    model = hf.from_pretrained("out")          # the same model, trained sort nets included

How it plugs in: :func:`register` adds the attention function :func:`sinkhorn_attention_forward`
to transformers' ``AttentionInterface`` under the name ``"sinkhorn"`` (with SDPA's boolean mask
builder in ``AttentionMaskInterface``), and :func:`convert` gives each self-attention module a
:class:`~sparse_sinkhorn.nn.SortNet` submodule (``<layer>.sort_net``) and switches the model to
``attn_implementation="sinkhorn"``; the options are stored in ``config.sinkhorn_attention``.

What the attention function computes, for queries ``(B, H, Lq, E)`` and the keys/values
``(B, H_kv, T, E)`` that transformers hands it (after rotary embeddings; during generation the
KV cache has already been applied, so ``T`` covers the whole prefix and ``Lq`` the new tokens):

* **Sort net input**: block summaries of the *values* of all ``H_kv`` heads,
  ``(B, T, H_kv*E)``. Values are a linear image of the layer input (no rotary phase, unlike
  the keys), and the KV cache holds them for every past position, so routing needs no state
  beyond transformers' own cache. Routing is per query head (``(B, H, N, N)`` logits); each
  head mixes its group's shared key/value blocks (see
  :func:`sparse_sinkhorn.ops.sinkhorn_attention`).
* **Causal** always: query rows use the leak-free prefix summaries and the op's exact
  causality, so output ``t`` depends on tokens ``<= t`` only.
* **Padding** (left, right, or anywhere) from the boolean attention mask: the real tokens of
  each sequence are moved to the front (order kept) before blocking, so block boundaries
  count from a sequence's first real token and a padded sequence attends exactly as it does
  alone; outputs are moved back afterwards.
* **Decoding** at the cost of a block: with transformers' default ``DynamicCache``, each
  attention layer keeps a :class:`~sparse_sinkhorn.nn.cache.SequenceRouting` beside its cache
  layer (the running value summaries, the current block's keys/values and its sorted
  keys/values), so one new token costs O(W + N) per head, plus one routing row per sequence
  at its blocks' first tokens (the sort net and plan on ``i+1`` summaries, which mix the
  ``i`` earlier blocks). Prefix-causal balancing makes plan row ``i`` depend on logit rows
  ``<= i`` only, so this equals the full forward (to float rounding). The state is tied to
  the cache layer's key tensor: anything that replaces it (beam reordering, cropping) makes
  the next step rebuild the state from the cached prefix, and steps the state cannot take
  (several new tokens at once, a padded new token, other cache classes, training mode)
  recompute Sinkhorn attention over the whole prefix (zero queries for the old positions,
  whose outputs are discarded), O(T·W + N²) per head; both are exact.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import fields
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .nn.cache import SequenceRouting
from .nn.config import AttentionConfig
from .nn.sortnet import SortNet
from .ops import dense_attention, sinkhorn_attention

try:
    import transformers
    from transformers import AttentionInterface, PreTrainedModel
    from transformers.cache_utils import DynamicLayer, EncoderDecoderCache
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'sparse_sinkhorn.hf needs transformers: pip install ".[hf]" (the hf extra)'
    ) from e

ATTN_IMPLEMENTATION = "sinkhorn"
CONFIG_KEY = "sinkhorn_attention"

# model_type -> the attention module class converted (its import path in transformers).
SUPPORTED_FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("transformers.models.llama.modeling_llama", "LlamaAttention"),
    "gpt2": ("transformers.models.gpt2.modeling_gpt2", "GPT2Attention"),
}

# The convert() options beyond block_size, with their defaults: AttentionConfig's fields
# that apply to a causal Sinkhorn layer (an option added there is an option here), and
# ``mixture`` for the kind.
_NOT_OPTIONS = ("kind", "block_size", "n_sortcut", "sparse_mode", "share_kv", "top_k")
OPTIONS: dict[str, Any] = {
    **{f.name: f.default for f in fields(AttentionConfig) if f.name not in _NOT_OPTIONS},
    "max_len": None,  # default: the model's max_position_embeddings / n_positions
    # length-agnostic: a linear net sized by a long model's positions would add about
    # H_kv*E x H*max_len/b weights per layer (67M for a Llama-3-8B shape at 128K positions)
    "sort_net": "bilinear",
    "mixture": False,
}
# Attention-function keyword arguments of features this integration does not implement.
_UNSUPPORTED_KWARGS = ("sliding_window", "softcap", "s_aux", "position_bias")


def register() -> None:
    """Make ``attn_implementation="sinkhorn"`` known to transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, sinkhorn_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def convert(model: PreTrainedModel, *, block_size: int, **attention_options: Any) -> Any:
    """Switch every self-attention layer of a causal LM to Sinkhorn attention, in place.

    Args:
        model: a transformers causal LM of a supported family (:data:`SUPPORTED_FAMILIES`:
            Llama-style models with any number of key/value heads, GPT-2).
        block_size: tokens per block ``W``.
        **attention_options: ``max_len`` (longest input; sizes the ``linear``/``mlp`` sort
            net; default the model's maximum positions), ``sort_net`` (``"bilinear"``, the
            default here: length-agnostic; ``"linear"``, the paper's; ``"mlp"``), ``pooling``
            (``"sum"``/``"mean"``), ``hard``, ``balance``, ``n_iters``, ``temperature``,
            ``gumbel_noise`` (training mode only), ``mixture`` (add dense attention). The
            other defaults are :class:`~sparse_sinkhorn.nn.AttentionConfig`'s.

    Returns:
        ``model``, whose attention modules now own a ``sort_net`` (new, randomly initialised
        parameters: train them) and whose ``config.sinkhorn_attention`` records the options.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"convert expects a transformers PreTrainedModel, got {type(model)}")
    config = model.config
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"model family {family!r} is not supported; supported: "
            f"{sorted(SUPPORTED_FAMILIES)} (causal LMs)"
        )
    if any(getattr(config, name, False) for name in ("add_cross_attention", "is_encoder_decoder")):
        raise ValueError("Sinkhorn attention here is for decoder-only models (no cross-attention)")
    unknown = set(attention_options) - set(OPTIONS)
    if unknown:
        raise TypeError(
            f"unknown attention option(s) {sorted(unknown)}; known: block_size, {sorted(OPTIONS)}"
        )
    options = {**OPTIONS, **attention_options, "block_size": block_size}
    if options["max_len"] is None:
        options["max_len"] = _max_positions(config)
    att = _attention_config(options)
    positions = _max_positions(config, required=False)
    if positions is not None and att.max_len > positions:
        # the sort net is sized by max_len / block_size: bound it by what the model can read
        raise ValueError(
            f"max_len={att.max_len} is longer than the model's {positions} positions; pass "
            f"max_len <= {positions} (or leave it out to use {positions})"
        )
    modules = _attention_modules(model, family)
    if any(hasattr(m, "sort_net") for m in modules):
        raise ValueError("this model is already converted (its attention layers have sort nets)")
    heads, kv_heads, head_dim = _head_shape(config)
    for module in modules:
        weight = next(module.parameters())
        module.sort_net = SortNet(kv_heads * head_dim, heads, att.max_blocks, kind=att.sort_net).to(
            device=weight.device, dtype=weight.dtype
        )
        object.__setattr__(module, "sinkhorn_config", att)  # a plain attribute, not a module
        module.register_forward_pre_hook(_note_cache_layer, with_kwargs=True)
    setattr(config, CONFIG_KEY, options)
    register()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    # Saved into config.json: a plain AutoModelForCausalLM.from_pretrained of the saved model
    # is then refused (attention "sinkhorn" unknown) instead of silently running dense
    # attention without its sort nets; sparse_sinkhorn.hf.from_pretrained loads it.
    config.attn_implementation = ATTN_IMPLEMENTATION
    return model


def from_pretrained(path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """Load a causal LM saved after :func:`convert`, with its trained sort nets.

    ``kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (``dtype``, ``device_map``, ...;
    not ``attn_implementation``). ``path`` is a local directory written by ``save_pretrained``.
    """
    if "attn_implementation" in kwargs:
        raise TypeError("from_pretrained sets attn_implementation='sinkhorn' itself")
    register()
    config = transformers.AutoConfig.from_pretrained(path)
    options = getattr(config, CONFIG_KEY, None)
    if not isinstance(options, dict):
        raise ValueError(
            f"{os.fspath(path)!r} holds no {CONFIG_KEY!r} options in its config: it was not "
            "saved from a model converted with sparse_sinkhorn.hf.convert"
        )
    options = dict(options)
    where = f"{os.fspath(path)!r}: config.json's {CONFIG_KEY!r}"
    if "block_size" not in options:
        raise ValueError(f"{where} has no 'block_size' (the options convert() saved are gone)")
    unknown = sorted(set(options) - set(OPTIONS) - {"block_size"})
    if unknown:
        raise ValueError(f"{where} has unknown option(s) {unknown}; known: {sorted(OPTIONS)}")
    block_size = options.pop("block_size")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the sort-net weights are loaded below
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, attn_implementation=ATTN_IMPLEMENTATION, **kwargs
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    delattr(model.config, CONFIG_KEY)
    convert(model, block_size=block_size, **options)
    state = {k: v for k, v in _load_weights(path).items() if ".sort_net." in k}
    expected = {k for k in model.state_dict() if ".sort_net." in k}
    if set(state) != expected:
        raise ValueError(
            f"the checkpoint's sort-net weights do not match the model: missing "
            f"{sorted(expected - set(state))[:3]}, unexpected {sorted(set(state) - expected)[:3]}"
        )
    model.load_state_dict(state, strict=False)
    return model


def calibrate(
    model: PreTrainedModel,
    batches: Iterable[Tensor | dict[str, Tensor]],
    *,
    lr: float = 1e-3,
) -> list[float]:
    """Train only the sort nets of a converted model to match its own dense attention.

    For each batch the model runs twice with the same weights: with ``sdpa`` (dense attention,
    the teacher; no gradient) and with Sinkhorn attention (the student); the loss is the KL
    divergence from the teacher's next-token distribution to the student's, averaged over the
    real (unmasked) positions, and AdamW updates the sort nets only. Every other weight is
    left bit-identical, so a pretrained model keeps its knowledge and its routing starts warm
    instead of random. The model is in eval mode while calibrating (no dropout, no Gumbel
    noise) and is given back in the mode it came in.

    Args:
        model: converted with :func:`convert`.
        batches: input ids ``(B, L)``, or dicts of model inputs (``input_ids``,
            ``attention_mask``, ...); one optimizer step each.
        lr: AdamW learning rate.

    Returns:
        The loss (nats per real position) of every step.
    """
    nets = [p for name, p in model.named_parameters() if ".sort_net." in name]
    if not nets or getattr(model.config, CONFIG_KEY, None) is None:
        raise ValueError("calibrate needs a model converted with sparse_sinkhorn.hf.convert")
    if not lr > 0 or lr == float("inf"):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    frozen = {p: p.requires_grad for p in model.parameters()}
    training = model.training
    opt = torch.optim.AdamW(nets, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in nets:
            p.requires_grad_(True)
        model.eval()
        for batch in batches:
            inputs: dict[str, Any] = (
                {"input_ids": batch} if isinstance(batch, Tensor) else dict(batch)
            )
            inputs["use_cache"] = False
            model.set_attn_implementation("sdpa")
            try:
                with torch.no_grad():
                    teacher = F.log_softmax(model(**inputs).logits.float(), dim=-1)
            finally:
                model.set_attn_implementation(ATTN_IMPLEMENTATION)
            student = F.log_softmax(model(**inputs).logits.float(), dim=-1)
            kl = (teacher.exp() * (teacher - student)).sum(-1)  # (B, L)
            mask = inputs.get("attention_mask")
            loss = kl.mean() if mask is None else (kl * mask).sum() / mask.sum().clamp_min(1)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"calibration loss is {loss.item()} at step {len(losses)}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        model.train(training)
    return losses


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
    length = key.shape[2]
    if q_len > length:
        raise ValueError(f"more queries ({q_len}) than keys ({length})")
    real = _key_padding(attention_mask, batch, q_len, length, query.device)
    step = module.__dict__.pop(_CACHE_LAYER, None)  # (cache layer, its keys before update)
    if step is not None:
        out = _decode_step(step, att, sort_net, query, key, value, real, dropout, scaling)
        if out is not None:
            return out, None
    if q_len < length:  # decoding: earlier positions' outputs are not needed, only their K/V
        old = query.new_zeros(batch, query.shape[1], length - q_len, query.shape[3])
        query = torch.cat([old, query], dim=2)  # (B, H, T, E)
    order = mask = None
    if real is not None and not bool(real.all()):
        order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)  # real tokens first
        query, key, value = (_gather(t, order) for t in (query, key, value))
        mask = torch.arange(length, device=real.device) < real.sum(1, keepdim=True)  # (B, T)
    x = _routing_input(value, sort_net)  # (B, T, H_kv*E): the values of every KV head
    logits = sort_net.route(
        x, att.block_size, causal=True, key_padding_mask=mask, pooling=att.pooling
    )
    options = att.op_options(
        is_causal=True, training=module.training, dropout_p=dropout, scale=scaling
    )
    out = sinkhorn_attention(
        query, key, value, logits.to(query.dtype), options, key_padding_mask=mask
    )
    assert isinstance(out, Tensor)
    if order is not None:
        out = _gather(out, torch.argsort(order, dim=1))  # back to the original positions
    return out[:, :, length - q_len :].transpose(1, 2).contiguous(), None


_CACHE_LAYER = "_sinkhorn_cache_layer"  # set on a converted module for one forward call
_STATE = "_sinkhorn_state"  # on a DynamicLayer: (SequenceRouting, the keys it has seen)


def _note_cache_layer(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
    """Forward pre-hook: remember the module's ``DynamicLayer`` (and its keys before this
    call's update) for the attention function, which transformers does not hand the cache."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if isinstance(cache, EncoderDecoderCache):
        cache = cache.self_attention_cache
    layers = getattr(cache, "layers", None)
    idx = getattr(module, "layer_idx", None)
    note = None
    if isinstance(layers, list) and isinstance(idx, int) and idx < len(layers):
        layer = layers[idx]
        if type(layer) is DynamicLayer:  # not sliding, static, quantized or offloaded layers
            note = (layer, getattr(layer, "keys", None))
    module.__dict__[_CACHE_LAYER] = note


def _decode_step(
    note: tuple[Any, Tensor | None],
    att: AttentionConfig,
    sort_net: SortNet,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    real: Tensor | None,
    dropout: float,
    scaling: float | None,
) -> Tensor | None:
    """One new token through the layer's :class:`SequenceRouting` (``(B, 1, H, E)``), or
    None when the step is not one it can take (the caller recomputes over the prefix)."""
    layer, before = note
    ok = query.shape[2] == 1 and key.shape[2] > 1 and not sort_net.training and not dropout
    ok = ok and (real is None or bool(real[:, -1].all()))  # the new token is real
    if not ok:
        layer.__dict__.pop(_STATE, None)
        return None
    state, held = layer.__dict__.get(_STATE, (None, None))
    prefix_real = None if real is None else real[:, :-1]
    count = key.shape[2] - 1 if prefix_real is None else prefix_real.sum(1)
    if (
        state is None
        or before is None
        or held is not before
        or not bool((state.count == count).all())
    ):
        state = SequenceRouting(att, sort_net)
        old_k, old_v = key[:, :, :-1], value[:, :, :-1]
        state.prefill(old_k, old_v, _routing_input(old_v, sort_net), prefix_real)
    x = _routing_input(value[:, :, -1:], sort_net)[:, 0]  # (B, H_kv*E)
    out = state.step(query, key[:, :, -1:], value[:, :, -1:], x, (key, value, real), scaling)
    if att.kind == "mixture":
        group = query.shape[1] // key.shape[1]  # grouped-query heads share a K/V head
        k_all, v_all = (t.repeat_interleave(group, dim=1) for t in (key, value))
        out = out + dense_attention(query, k_all, v_all, key_padding_mask=real, scale=scaling)
    layer.__dict__[_STATE] = (state, key)  # key: the tensor the cache layer holds now
    return out.transpose(1, 2).contiguous()


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


def _attention_config(options: dict[str, Any]) -> AttentionConfig:
    fields_ = {k: v for k, v in {**OPTIONS, **options}.items() if k != "mixture"}
    return AttentionConfig(kind="mixture" if options["mixture"] else "sinkhorn", **fields_)


def _attention_modules(model: nn.Module, family: str) -> list[nn.Module]:
    module_name, class_name = SUPPORTED_FAMILIES[family]
    cls = getattr(__import__(module_name, fromlist=[class_name]), class_name)
    found = [m for m in model.modules() if isinstance(m, cls)]
    if not found:
        raise ValueError(f"no {class_name} layers found in this {family!r} model")
    return found


def _head_shape(config: Any) -> tuple[int, int, int]:
    """(query heads H, key/value heads H_kv, head dim E) from a transformers config."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return heads, kv_heads, head_dim


def _max_positions(config: Any, *, required: bool = True) -> Any:
    """The model's number of positions (an int; None when unknown and not ``required``)."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    if not required:
        return None
    raise ValueError("the config has no maximum length; pass max_len=")


def _load_weights(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Every tensor of a local ``save_pretrained`` directory (single or sharded safetensors)."""
    from safetensors.torch import load_file

    root = os.fspath(path)
    single = os.path.join(root, "model.safetensors")
    if os.path.isfile(single):
        return load_file(single)
    index = os.path.join(root, "model.safetensors.index.json")
    if not os.path.isfile(index):
        raise FileNotFoundError(f"no model.safetensors(.index.json) in {root!r}")
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    state: dict[str, Tensor] = {}
    for shard in shards:
        state.update(load_file(os.path.join(root, shard)))
    return state


__all__ = [
    "ATTN_IMPLEMENTATION",
    "CONFIG_KEY",
    "OPTIONS",
    "SUPPORTED_FAMILIES",
    "calibrate",
    "convert",
    "from_pretrained",
    "register",
    "sinkhorn_attention_forward",
]
