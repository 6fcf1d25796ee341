"""Named attention configurations, as data: `VARIANTS` (name -> `AttentionConfig` fields),
one table for every experiment that trains a configuration by name.

``recall`` takes every entry (`recall_kinds.RECALL_KINDS` is this table); the paper's decoder
experiments (``sort``, ``lm``, ``image``) take their plain kinds and `PAPER_VARIANTS`. A plain
kind's entry is just its kind, so a name that is a kind builds the same configuration it
always did.

Rule: values only, as in `presets`; `fields` is the one place a name becomes
`AttentionConfig` fields, and `is_causal` the one place that says whether a named
configuration is causal in a decoder.
"""

from __future__ import annotations

from typing import Any

from ..nn import AttentionConfig
from ..ops.routing import NOT_CAUSAL

# name -> AttentionConfig fields (block size and max_len come from the experiment). Public:
# other code (benchmarks, notebooks) builds the same configurations from this table.
VARIANTS: dict[str, dict[str, Any]] = {
    "dense": {"kind": "dense"},
    "local": {"kind": "local"},
    "sparse": {"kind": "sparse"},
    # the paper's Sinkhorn: linear sort net, 8 balancing rounds, soft routing; in a decoder its
    # prefix-causal balancing converges to "block i reads block i - 1" (docs/method.md §5)
    "sinkhorn": {"kind": "sinkhorn"},
    "mixture": {"kind": "mixture"},
    # exactly causal balancing towards column targets a causal matrix can meet: not a shift
    "sinkhorn-targets": {"kind": "sinkhorn", "balance": "sinkhorn-targets"},
    # the paper's causal balancing taken literally: NOT causal (columns normalised over later
    # rows too), a labelled comparison only; incremental decoding refuses it
    "sinkhorn-leaky": {"kind": "sinkhorn", "balance": "sinkhorn-leaky"},
    # one change at a time from the paper's configuration
    "sinkhorn-bilinear": {"kind": "sinkhorn", "sort_net": "bilinear"},
    # the same with max-pooled block summaries (one token with a large feature marks its block)
    "sinkhorn-max": {"kind": "sinkhorn", "sort_net": "bilinear", "pooling": "max"},
    "sinkhorn-hard-max": {
        "kind": "sinkhorn",
        "sort_net": "bilinear",
        "pooling": "max",
        "hard": True,
    },
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
    # softmax-max whose sort net also learns from the layer's own dense block attention: the
    # mean over a block's queries (distill), or the largest mass one of them puts on a block
    # (distill-max: one query that reads a block marks it)
    "softmax-max-distill": {
        "kind": "sinkhorn",
        "sort_net": "bilinear",
        "balance": "softmax",
        "pooling": "max",
        "routing_loss": 1.0,
    },
    "softmax-max-distill-max": {
        "kind": "sinkhorn",
        "sort_net": "bilinear",
        "balance": "softmax",
        "pooling": "max",
        "routing_loss": 1.0,
        "routing_teacher": "max",
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
    # routed by the layer's own query and key projections, max-pooled per block (no sort-net
    # weights): the paper's balancing, and rows normalised only
    "sinkhorn-qk": {"kind": "sinkhorn", "sort_net": "qk", "pooling": "max"},
    "softmax-qk": {"kind": "sinkhorn", "sort_net": "qk", "balance": "softmax", "pooling": "max"},
    # softmax-qk scored by Quest's bound at block level (per-feature minima and maxima)
    "softmax-qk-bound": {
        "kind": "sinkhorn",
        "sort_net": "qk-bound",
        "balance": "softmax",
        "pooling": "max",
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
# The variants the paper's decoder experiments (sort, lm, image) take beside their plain kinds:
# causal routing that is not the shift (sinkhorn-targets, softmax-max) and the labelled,
# non-causal literal reading of the paper (sinkhorn-leaky).
PAPER_VARIANTS = ("sinkhorn-targets", "sinkhorn-leaky", "softmax-max")
NOT_CAUSAL_LABEL = "NOT causal"


def fields(name: str) -> dict[str, Any]:
    """The `AttentionConfig` fields of ``name`` (a copy; ``kind`` included)."""
    if name not in VARIANTS:
        raise KeyError(f"no attention configuration named {name!r}")
    return dict(VARIANTS[name])


def kind_of(name: str) -> str:
    """The attention kind (`AttentionConfig.kind`) that ``name`` configures."""
    return str(fields(name)["kind"])


def is_causal(name: str) -> bool:
    """Whether ``name`` is causal as a decoder's self-attention (every entry but the ones whose
    balancing reads later blocks, `ops.routing.NOT_CAUSAL`; a name not in the table, such as
    a recall control, is judged by nothing here and counts as causal)."""
    return VARIANTS.get(name, {}).get("balance") not in NOT_CAUSAL


def decodes_causally(attention: AttentionConfig) -> bool:
    """Whether a decoder with this attention is causal, so that the incremental decoding
    cache (which refuses the others) can generate from it."""
    return attention.balance not in NOT_CAUSAL


def label(name: str) -> str:
    """``name``, marked when it is not causal (how tables and help texts show it)."""
    return name if is_causal(name) else f"{name} ({NOT_CAUSAL_LABEL})"


def not_causal_note(names: list[str]) -> str | None:
    """The line under a table that holds a non-causal configuration, or None."""
    leaky = [n for n in names if n in VARIANTS and not is_causal(n)]
    if not leaky:
        return None
    return (
        f"{', '.join(leaky)}: {NOT_CAUSAL_LABEL} (the paper's causal balancing taken literally "
        "normalises columns over later blocks too, so a position sees the future in training "
        "and teacher-forced evaluation); a labelled comparison, not a result."
    )
