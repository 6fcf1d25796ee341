"""The controls of ``sparse-sinkhorn recall`` (`recall_kinds.CONTROL_KINDS`): each changes a
built model's routing to isolate one cause (the oracle by replacing its layers'
``sort_logits``, the shared ones through the decoder's `Routing`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.recall import Passkey
from ..models import LanguageModel
from ..nn import SinkhornSelfAttention
from ..ops import num_blocks

ORACLE_LOGIT = 30.0  # the needle block's routing logit; every other block's is 0


def install_oracle_routing(model: LanguageModel) -> None:
    """Replace every Sinkhorn layer's sort logits by the passkey answer (see
    `recall_kinds.CONTROL_KINDS`): row ``i`` scores `ORACLE_LOGIT` on the block holding the
    KEY marker when that block is earlier than ``i``, 0 everywhere else."""
    seen: dict[str, Tensor] = {}

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
            needle = (ids == Passkey.KEY).float().argmax(-1) // _w  # (B,)
            logits = x.new_zeros(ids.shape[0], _h, n, n)
            rows = torch.arange(n, device=ids.device)
            hit = F.one_hot(needle, n).to(x.dtype)[:, None, None, :]  # (B, 1, 1, N)
            later = (rows[None, :] > needle[:, None]).to(x.dtype)[:, None, :, None]  # (B,1,N,1)
            return logits + ORACLE_LOGIT * hit * later

        layer.sort_logits = oracle  # type: ignore[method-assign]


def share_first_routing(model: LanguageModel) -> None:
    """Make every Sinkhorn layer route with the first one's sort logits (``shared-max``, see
    `recall_kinds.CONTROL_KINDS`): the decoder's [`Routing`][sparse_sinkhorn.nn.Routing]
    becomes one routing for the stack whose later layers keep their (now unused) sort nets,
    so the first one's learns from every layer's loss.

    Not ``shared_routing="layers"``: that model has no later sort nets, so its parameter
    count and initialisation (the random stream its later layers draw from) differ, and
    ``"layers"`` also shares one routing across heads, which ``shared-max`` does not."""
    model.decoder.layers.share_first_routing()


CONTROLS = {
    "oracle-hard": install_oracle_routing,
    "shared-max": share_first_routing,
    "shared-max-shared": share_first_routing,
}
