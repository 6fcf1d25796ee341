"""The controls of ``sparse-sinkhorn recall`` (`recall_kinds.CONTROL_KINDS`): each changes a
built model's routing to isolate one cause (the oracle by replacing its layers'
``sort_logits``, the shared ones through the decoder's `Routing`). Each takes the model and
the task."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.recall import Task
from ..models import Classifier, LanguageModel
from ..nn import SinkhornSelfAttention
from ..ops import num_blocks
from .recall_tasks import needle_source

ORACLE_LOGIT = 30.0  # the needle block's routing logit; every other block's is 0


def install_oracle_routing(model: LanguageModel | Classifier, task: Task) -> None:
    """Replace every Sinkhorn layer's sort logits by the answer (see
    `recall_kinds.CONTROL_KINDS`): row ``i`` scores `ORACLE_LOGIT` on the block holding the
    needle every question reads (`recall_tasks.needle_source`: passkey's KEY marker, the
    lookup's asked needle) when row ``i`` may see that block and is not that block (in a
    decoder: when the block is earlier than ``i``), 0 everywhere else."""
    seen: dict[str, Tensor] = {}
    causal = isinstance(model, LanguageModel)

    def keep_ids(_module: nn.Module, args: tuple[Any, ...]) -> None:
        seen["ids"] = args[0]

    model.register_forward_pre_hook(keep_ids)
    for layer in model.modules():
        if not isinstance(layer, SinkhornSelfAttention) or layer.sort_net is None:
            continue
        block_size, n_heads = layer.config.block_size, layer.n_heads

        def oracle(x: Tensor, key_padding_mask: Tensor | None = None, *, _w=block_size, _h=n_heads):
            ids = seen["ids"]  # (B, L)
            n = num_blocks(ids.shape[1], _w)
            needle = needle_source(task, ids) // _w  # (B,)
            logits = x.new_zeros(ids.shape[0], _h, n, n)
            rows = torch.arange(n, device=ids.device)[None, :]
            hit = F.one_hot(needle, n).to(x.dtype)[:, None, None, :]  # (B, 1, 1, N)
            sees = rows > needle[:, None] if causal else rows != needle[:, None]
            return logits + ORACLE_LOGIT * hit * sees.to(x.dtype)[:, None, :, None]

        layer.sort_logits = oracle  # type: ignore[method-assign]


def share_first_routing(model: LanguageModel | Classifier, task: Task) -> None:
    """Make every Sinkhorn layer route with the first one's sort logits (``shared-max``, see
    `recall_kinds.CONTROL_KINDS`): the decoder's [`Routing`][sparse_sinkhorn.nn.Routing]
    becomes one routing for the stack whose later layers keep their (now unused) sort nets,
    so the first one's learns from every layer's loss.

    Not ``shared_routing="layers"``: that model has no later sort nets, so its parameter
    count and initialisation (the random stream its later layers draw from) differ, and
    ``"layers"`` also shares one routing across heads, which ``shared-max`` does not."""
    if not isinstance(model, LanguageModel):
        raise ValueError("shared-max is a control of a decoder (a LanguageModel)")
    model.decoder.layers.share_first_routing()


CONTROLS = {
    "oracle-hard": install_oracle_routing,
    "shared-max": share_first_routing,
    "shared-max-shared": share_first_routing,
}
