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

How it plugs in: [`register`][sparse_sinkhorn.hf.register] adds the attention function
[`sinkhorn_attention_forward`][sparse_sinkhorn.hf.sinkhorn_attention_forward]
to transformers' ``AttentionInterface`` under the name ``"sinkhorn"`` (with SDPA's boolean mask
builder in ``AttentionMaskInterface``), and [`convert`][sparse_sinkhorn.hf.convert] gives each
self-attention module a
[`SortNet`][sparse_sinkhorn.nn.SortNet] submodule (``<layer>.sort_net``) and switches the model to
``attn_implementation="sinkhorn"``; the options are stored in ``config.sinkhorn_attention``.

What the attention function computes, for queries ``(B, H, Lq, E)`` and the keys/values
``(B, H_kv, T, E)`` that transformers hands it (after rotary embeddings; during generation the
KV cache has already been applied, so ``T`` covers the whole prefix and ``Lq`` the new tokens):

* **Sort net input**: block summaries of the *values* of all ``H_kv`` heads,
  ``(B, T, H_kv*E)``. Values are a linear image of the layer input (no rotary phase, unlike
  the keys), and the KV cache holds them for every past position, so routing needs no state
  beyond transformers' own cache. Routing is per query head (``(B, H, N, N)`` logits); each
  head mixes its group's shared key/value blocks (see
  [`sparse_sinkhorn.ops.sinkhorn_attention`][sparse_sinkhorn.ops.sinkhorn_attention]).
* **Causal** always: query rows use the leak-free prefix summaries and the op's exact
  causality, so output ``t`` depends on tokens ``<= t`` only.
* **Padding** (left, right, or anywhere) from the boolean attention mask: the real tokens of
  each sequence are moved to the front (order kept) before blocking, so block boundaries
  count from a sequence's first real token and a padded sequence attends exactly as it does
  alone; outputs are moved back afterwards.
* **Decoding** at the cost of a block, with transformers' default ``DynamicCache`` or a
  preallocated ``StaticCache`` (``generate(..., cache_implementation="static")``; only its
  filled positions are read): each attention layer keeps a routing state beside its cache
  layer (the running value summaries, the current block's keys/values and its sorted
  keys/values; `sparse_sinkhorn.hf.decoding.BlockRouting`, or ``SequenceRouting`` for a
  left-padded batch), started by the prompt's forward, so one new token costs O(W) per head,
  plus one routing row at each block's first token (with ``balance="softmax"`` one row of
  sort-net logits, O(N), otherwise the plan of the ``i+1`` blocks so far) and the mix of the
  ``i`` earlier blocks, read in place from the cache. Prefix-causal balancing makes plan row
  ``i`` depend on logit rows ``<= i`` only, so this equals the full forward (to float
  rounding). The state is tied to
  the cache layer's key tensor: anything that replaces it (beam reordering, cropping) makes
  the next step rebuild the state from the cached prefix; other static layers (sliding
  window, indexed) are refused; steps the state cannot take (several new tokens at once, a
  padded new token, other dynamic cache classes such as quantized or offloaded ones,
  training mode) recompute Sinkhorn attention over the whole prefix (zero queries for the
  old positions, whose outputs are discarded), O(T·W + N²) per head; both are exact.
* **Routing defaults** differ from the paper's: ``balance="softmax"`` and ``pooling="max"``
  (with the length-agnostic ``sort_net="bilinear"``). In a decoder the paper's causal
  Sinkhorn balancing routes every block to its previous one whatever the sort net says, and
  sum-pooled prefix summaries make the routing logits grow with the position; pass
  ``balance="sinkhorn", pooling="sum"`` (and ``sort_net="linear"``) for the paper's routing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
from dataclasses import fields
from typing import Any

from torch import nn

from ..nn.config import AttentionConfig
from ..nn.kinds import KINDS
from ..nn.sortnet import PROJECTED, SortNet
from ..renamed import renamed_keywords
from .attention import (
    ATTN_IMPLEMENTATION,
    CONFIG_KEY,
    note_cache_layer,
    sinkhorn_attention_forward,
)
from .calibrate import calibrate
from .saved import check_weights, load_weights

try:
    import transformers
    from transformers import AttentionInterface, PreTrainedModel
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'sparse_sinkhorn.hf needs transformers: pip install ".[hf]" (the hf extra)'
    ) from e

SUPPORTED_FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("transformers.models.llama.modeling_llama", "LlamaAttention"),
    "gpt2": ("transformers.models.gpt2.modeling_gpt2", "GPT2Attention"),
}

# The convert() options beyond block_size, with their defaults: the AttentionConfig fields
# the sinkhorn and mixture kinds read (`nn.kinds.KINDS`: a field added there is an option
# here), and ``mix_dense`` for the kind; not SortCut (encoders only), share_kv (the model
# keeps its own projections) or routing_loss and routing_teacher (the layers' distillation
# loss).
_NOT_OPTIONS = (
    "kind", "block_size", "n_sortcut", "share_kv", "routing_loss", "routing_teacher"
)  # fmt: skip
_ROUTED = KINDS["sinkhorn"].uses | KINDS["mixture"].uses
OPTIONS: dict[str, Any] = {
    **{
        f.name: f.default
        for f in fields(AttentionConfig)
        if f.name in _ROUTED and f.name not in _NOT_OPTIONS
    },
    "max_len": None,  # default: the model's max_position_embeddings / n_positions
    # length-agnostic: a linear net sized by a long model's positions would add about
    # H_kv*E x H*max_len/b weights per layer (67M for a Llama-3-8B shape at 128K positions)
    "sort_net": "bilinear",
    # A converted model is a decoder, where the paper's routing does not route: causal
    # Sinkhorn balancing converges to the shift "block i reads block i-1" whatever the sort
    # net says, and sum-pooled causal summaries grow with the position, so the routing
    # logits grow with it. Rows-only balancing and max pooling follow the sort net at any
    # position (docs/huggingface.md, "Routing options").
    "balance": "softmax",
    "pooling": "max",
    "mix_dense": False,
}
FORMER_OPTIONS = {"mixture": "mix_dense"}  # still read under a former name: former -> current
DIGEST_KEY = f"{CONFIG_KEY}_digest"  # config.json: a fingerprint of the options convert() saved


def register() -> None:
    """Make ``attn_implementation="sinkhorn"`` known to transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, sinkhorn_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def convert(model: PreTrainedModel, *, block_size: int, **attention_options: Any) -> Any:
    """Switch every self-attention layer of a causal LM to Sinkhorn attention, in place.

    Args:
        model: a transformers causal LM of a supported family (`SUPPORTED_FAMILIES`:
            Llama-style models with any number of key/value heads, GPT-2).
        block_size: tokens per block ``W``.
        **attention_options: ``max_len`` (longest input; sizes the ``linear``/``mlp`` sort
            net; default the model's maximum positions), ``sort_net`` (``"bilinear"``, the
            default here: length-agnostic; ``"linear"``, the paper's; ``"mlp"``), ``balance``
            (``"softmax"``, the default here: routing rows normalised only; ``"sinkhorn"``,
            the paper's, which in a causal model routes every block to its previous one),
            ``pooling`` (``"max"``, the default here; ``"sum"``, the paper's, whose causal
            summaries grow with the position; ``"mean"``), ``shared_routing`` (``"none"``, or
            ``"heads"``: one routing for all heads), ``hard``, ``n_iters``, ``temperature``,
            ``gumbel_noise`` (training mode only), ``mix_dense`` (add dense attention; its
            former name ``mixture`` is accepted with a ``DeprecationWarning``). The
            other defaults are [`AttentionConfig`][sparse_sinkhorn.nn.AttentionConfig]'s; every
            default is in `OPTIONS`.

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
    attention_options = renamed_keywords(attention_options, FORMER_OPTIONS, "hf.convert")
    unknown = set(attention_options) - set(OPTIONS)
    if unknown:
        raise TypeError(
            f"unknown attention option(s) {sorted(unknown)}; known: block_size, {sorted(OPTIONS)}"
        )
    options = {**OPTIONS, **attention_options, "block_size": block_size}
    if options["max_len"] is None:
        options["max_len"] = _max_positions(config)
    att = _attention_config(options)  # every option checked (mix_dense included)
    if att.shared_routing == "layers":
        raise ValueError(
            "shared_routing='layers' needs this project's models (a converted model's layers "
            "route one by one); use shared_routing='heads' or 'none'"
        )
    if att.sort_net in PROJECTED:
        raise ValueError(
            f"sort_net={att.sort_net!r} needs this project's models (a converted model's "
            "routing reads its value states, not the queries and keys); use 'bilinear', "
            "'linear' or 'mlp'"
        )
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
    config = _own_config(model)
    for module in modules:
        weight = next(module.parameters())
        module.sort_net = SortNet.from_config(kv_heads * head_dim, heads, att).to(
            device=weight.device, dtype=weight.dtype
        )
        object.__setattr__(module, "sinkhorn_config", att)  # a plain attribute, not a module
        module.register_forward_pre_hook(note_cache_layer, with_kwargs=True)
    setattr(config, CONFIG_KEY, options)
    setattr(config, DIGEST_KEY, _digest(options))
    register()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        # generate() compiles the forward for a static cache on GPUs; the decoding state this
        # integration keeps beside the cache layers is untested under torch.compile
        generation.disable_compile = True
    # Saved into config.json: a plain AutoModelForCausalLM.from_pretrained of the saved model
    # is then refused (attention "sinkhorn" unknown) instead of silently running dense
    # attention without its sort nets; sparse_sinkhorn.hf.from_pretrained loads it.
    config.attn_implementation = ATTN_IMPLEMENTATION
    return model


def _own_config(model: PreTrainedModel) -> Any:
    """Give ``model`` and its submodules that share its config a copy of it: models built
    from one config object share it, and `convert`'s options describe this model only."""
    shared = model.config
    own = copy.deepcopy(shared)
    for module in model.modules():
        if getattr(module, "config", None) is shared:
            module.config = own  # type: ignore[assignment]
    return own


def from_pretrained(path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """Load a causal LM saved after [`convert`][sparse_sinkhorn.hf.convert], with its trained sort
    nets.

    ``kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (``dtype``, ``device_map``, ...;
    not ``attn_implementation``). ``path`` is a local directory written by ``save_pretrained``.

    Refused with an error naming the problem: a path that is a file or no directory, options
    in ``config.json`` that are unknown, of the wrong type or out of range, options that do
    not fit the saved sort-net weights (e.g. one removed from ``config.json``), and sort-net
    weights holding NaN or infinity. Options edited by hand to other valid values (a block
    size, ``hard``, a pooling) load with a ``UserWarning``: the sort nets were trained with
    the saved ones, so the outputs differ from the saved model's.
    """
    if "attn_implementation" in kwargs:
        raise TypeError("from_pretrained sets attn_implementation='sinkhorn' itself")
    root = os.fspath(path)
    if os.path.isfile(root):
        raise ValueError(
            f"{root!r} is a file; pass the directory save_pretrained wrote (the one holding "
            "config.json and model.safetensors)"
        )
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no directory {root!r} (a local save_pretrained directory)")
    register()
    config = transformers.AutoConfig.from_pretrained(path)
    options = getattr(config, CONFIG_KEY, None)
    if not isinstance(options, dict):
        raise ValueError(
            f"{os.fspath(path)!r} holds no {CONFIG_KEY!r} options in its config: it was not "
            "saved from a model converted with sparse_sinkhorn.hf.convert"
        )
    saved = dict(options)  # as saved: what its fingerprint is of
    where = f"{os.fspath(path)!r}: config.json's {CONFIG_KEY!r}"
    options = renamed_keywords(saved, FORMER_OPTIONS, where)  # former names -> current ones
    if "block_size" not in options:
        raise ValueError(f"{where} has no 'block_size' (the options convert() saved are gone)")
    unknown = sorted(set(options) - set(OPTIONS) - {"block_size"})
    if unknown:
        raise ValueError(f"{where} has unknown option(s) {unknown}; known: {sorted(OPTIONS)}")
    filled = sorted(set(OPTIONS) - set(options))  # saved before these options existed
    try:  # before the weights load: a bad value is one error naming the option
        _attention_config({**options, "max_len": options.get("max_len") or 1})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None
    digest = getattr(config, DIGEST_KEY, None)
    if digest is not None and digest != _digest(saved):
        warnings.warn(
            f"{where} was edited after the model was saved (its options no longer match the "
            f"fingerprint saved with them): the sort nets were trained with other options, so "
            f"this model's outputs differ from the saved model's. Options now: {options}",
            UserWarning,
            stacklevel=2,
        )
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
    if hasattr(model.config, DIGEST_KEY):
        delattr(model.config, DIGEST_KEY)
    convert(model, block_size=block_size, **options)
    state = {k: v for k, v in load_weights(path).items() if ".sort_net." in k}
    check_weights(state, model, where, filled)
    model.load_state_dict(state, strict=False)
    return model


def _attention_config(options: dict[str, Any]) -> AttentionConfig:
    """The layers' [`AttentionConfig`][sparse_sinkhorn.nn.AttentionConfig] for convert()'s options
    (every option checked; ``mix_dense`` a bool: a string such as "false" would be true)."""
    mix = options.get("mix_dense", OPTIONS["mix_dense"])
    if not isinstance(mix, bool):
        raise TypeError(f"mix_dense must be True or False, got {type(mix).__name__} {mix!r}")
    fields_ = {k: v for k, v in {**OPTIONS, **options}.items() if k != "mix_dense"}
    return AttentionConfig(kind="mixture" if mix else "sinkhorn", **fields_)


def _digest(options: dict[str, Any]) -> str:
    """A fingerprint of the options convert() saved: from_pretrained tells an edited
    ``config.json`` from the options the sort nets were trained with."""
    text = json.dumps(options, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
