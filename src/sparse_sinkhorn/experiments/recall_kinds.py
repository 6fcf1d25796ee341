"""The kinds ``sparse-sinkhorn recall`` trains, as data: `RECALL_KINDS` (name ->
`AttentionConfig` fields: the shared table `variants.VARIANTS`) and the controls
(`CONTROL_KINDS`, whose routing `recall_controls` changes once the model is built).

Rule: values only, as in `presets`; `attention_config` is the one place a recall name becomes
an [`AttentionConfig`][sparse_sinkhorn.nn.AttentionConfig].
"""

from __future__ import annotations

from ..nn import AttentionConfig
from .variants import VARIANTS, fields

# name -> AttentionConfig fields: every named configuration (`variants.VARIANTS`, the table
# the paper's decoder experiments read too). Public: other code (benchmarks, notebooks) builds
# the same kinds from it.
RECALL_KINDS = VARIANTS
DEFAULT_KINDS = ("dense", "local", "sinkhorn", "softmax-max", "softmax-max-layers", "topk")
# Controls, not methods: a RECALL_KINDS configuration (the value) whose routing is changed
# once the model is built, to isolate one cause (see CONTROLS for how).
# - oracle-hard (passkey and the lookup: ORACLE_TASKS): the sort logits are the answer;
#   every block that may see the needle routes to the block that holds it (passkey's KEY
#   marker; the lookup's asked needle). It separates "the routing is not learned" from
#   "right routing is not enough".
# - shared-max (a decoder's): every layer routes with the first layer's sort logits (the
#   later layers' sort nets go unused). It separates "the first layer does not learn to
#   route" from "a later layer does not".
# - shared-max-shared: shared-max on softmax-max-shared (one routing for all heads too).
CONTROL_KINDS: dict[str, str] = {
    "oracle-hard": "softmax-hard",
    "shared-max": "softmax-max",
    "shared-max-shared": "softmax-max-shared",
}
ORACLE_TASKS = ("passkey", "lookup")  # one needle per sequence: `recall_tasks.needle_source`


def attention_config(name: str, block_size: int, length: int) -> AttentionConfig:
    """The `RECALL_KINDS` (or `CONTROL_KINDS`) entry ``name`` at this block size
    and length."""
    return AttentionConfig(
        block_size=block_size, max_len=length, **fields(CONTROL_KINDS.get(name, name))
    )
