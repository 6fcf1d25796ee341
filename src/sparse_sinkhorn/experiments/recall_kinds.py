"""The kinds ``sparse-sinkhorn recall`` trains, as data: `RECALL_KINDS` (name ->
`AttentionConfig` fields) and the controls (`CONTROL_KINDS`, whose routing
`recall_controls` changes once the model is built).

Rule: values only, as in `presets`; `attention_config` is the one place a name becomes an
[`AttentionConfig`][sparse_sinkhorn.nn.AttentionConfig].
"""

from __future__ import annotations

from typing import Any

from ..nn import AttentionConfig

# name -> AttentionConfig fields (block size and max_len come from the preset). Public:
# other code (benchmarks, notebooks) builds the same kinds from this table.
RECALL_KINDS: dict[str, dict[str, Any]] = {
    "dense": {"kind": "dense"},
    "local": {"kind": "local"},
    "sparse": {"kind": "sparse"},
    # the paper's Sinkhorn: linear sort net, 8 balancing rounds, soft routing
    "sinkhorn": {"kind": "sinkhorn"},
    "mixture": {"kind": "mixture"},
    # one change at a time from the paper's configuration
    "sinkhorn-bilinear": {"kind": "sinkhorn", "sort_net": "bilinear"},
    "sinkhorn-hard": {"kind": "sinkhorn", "sort_net": "bilinear", "hard": True},
    "softmax-linear-hard": {"kind": "sinkhorn", "balance": "softmax", "hard": True},
    "softmax": {"kind": "sinkhorn", "sort_net": "bilinear", "balance": "softmax"},
    "softmax-hard": {
        "kind": "sinkhorn",
        "sort_net": "bilinear",
        "balance": "softmax",
        "hard": True,
    },
    # softmax-hard whose sort net also learns from the layer's own dense block attention mass
    "softmax-hard-distill": {
        "kind": "sinkhorn",
        "sort_net": "bilinear",
        "balance": "softmax",
        "hard": True,
        "routing_loss": 1.0,
    },
    # mean-pooled block summaries: routing logits that do not grow with the prefix length
    "softmax-hard-mean": {
        "kind": "sinkhorn",
        "sort_net": "bilinear",
        "balance": "softmax",
        "hard": True,
        "pooling": "mean",
    },
    # max-pooled block summaries: one token with a large feature marks its block
    "softmax-hard-max": {
        "kind": "sinkhorn",
        "sort_net": "bilinear",
        "balance": "softmax",
        "hard": True,
        "pooling": "max",
    },
    # soft routing (every block mixed by its weight) with mean- or max-pooled summaries
    "softmax-max": {
        "kind": "sinkhorn",
        "sort_net": "bilinear",
        "balance": "softmax",
        "pooling": "max",
    },
    # softmax-max with one routing for all heads of a layer (shared_routing="heads")
    "softmax-max-shared": {
        "kind": "sinkhorn",
        "sort_net": "bilinear",
        "balance": "softmax",
        "pooling": "max",
        "shared_routing": "heads",
    },
    # softmax-max with one routing for the whole model: the first layer's, for every head of
    # every layer (shared_routing="layers")
    "softmax-max-layers": {
        "kind": "sinkhorn",
        "sort_net": "bilinear",
        "balance": "softmax",
        "pooling": "max",
        "shared_routing": "layers",
    },
    # softmax-max without Gumbel noise on the routing logits in training
    "softmax-max-nonoise": {
        "kind": "sinkhorn",
        "sort_net": "bilinear",
        "balance": "softmax",
        "pooling": "max",
        "gumbel_noise": False,
    },
    "softmax-mean": {
        "kind": "sinkhorn",
        "sort_net": "bilinear",
        "balance": "softmax",
        "pooling": "mean",
    },
    "softmax-hard-distill-mean": {
        "kind": "sinkhorn",
        "sort_net": "bilinear",
        "balance": "softmax",
        "hard": True,
        "pooling": "mean",
        "routing_loss": 1.0,
    },
    # MoBA's parameter-free gate: own block + the best earlier block(s) by q . mean(K)
    "topk": {"kind": "topk", "top_k": 1},
    "topk-2": {"kind": "topk", "top_k": 2},
    # topk with NSA's compressed branch: every query also attends to each earlier block's mean
    # key and value, which trains the block summaries the gate ranks
    "topk-compressed": {"kind": "topk", "top_k": 1, "compressed": True},
    "topk-2-compressed": {"kind": "topk", "top_k": 2, "compressed": True},
    # Quest's block score: an upper bound on q . k over the block's keys (per-feature min/max)
    "topk-bound": {"kind": "topk", "top_k": 1, "gate": "bound"},
    "topk-bound-compressed": {"kind": "topk", "top_k": 1, "gate": "bound", "compressed": True},
}
DEFAULT_KINDS = ("dense", "local", "sinkhorn", "softmax-max", "softmax-max-layers", "topk")
# Controls, not methods: a RECALL_KINDS configuration (the value) whose routing is changed
# once the model is built, to isolate one cause (see CONTROLS for how).
# - oracle-hard (passkey only): the sort logits are the answer; every query block after the
#   needle routes to the block that holds the needle's KEY marker. It separates "the routing
#   is not learned" from "right routing is not enough".
# - shared-max: every layer routes with the first layer's sort logits (the later layers' sort
#   nets go unused). It separates "the first layer does not learn to route" from "a later
#   layer does not".
# - shared-max-shared: shared-max on softmax-max-shared (one routing for all heads too).
CONTROL_KINDS: dict[str, str] = {
    "oracle-hard": "softmax-hard",
    "shared-max": "softmax-max",
    "shared-max-shared": "softmax-max-shared",
}
PASSKEY_CONTROLS = ("oracle-hard",)


def attention_config(name: str, block_size: int, length: int) -> AttentionConfig:
    """The `RECALL_KINDS` (or `CONTROL_KINDS`) entry ``name`` at this block size
    and length."""
    fields = RECALL_KINDS[CONTROL_KINDS.get(name, name)]
    return AttentionConfig(block_size=block_size, max_len=length, **fields)
