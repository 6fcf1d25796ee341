"""The weights of a model saved after `sparse_sinkhorn.hf.convert`: read from its
``save_pretrained`` directory (`load_weights`) and checked against the model its saved
options build (`check_weights`), for `sparse_sinkhorn.hf.from_pretrained`."""

from __future__ import annotations

import json
import os

import torch
from torch import Tensor, nn


def load_weights(path: str | os.PathLike[str]) -> dict[str, Tensor]:
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


def check_weights(
    state: dict[str, Tensor], model: nn.Module, where: str, filled: list[str]
) -> None:
    """The saved sort-net tensors ``state`` fit ``model``, built from the saved options, and
    are finite; ``filled``: the options the saved ones lacked (set to their defaults)."""
    expected = {k: v for k, v in model.state_dict().items() if ".sort_net." in k}
    if set(state) != set(expected):
        raise ValueError(
            f"the checkpoint's sort-net weights do not match the model: missing "
            f"{sorted(set(expected) - set(state))[:3]}, unexpected "
            f"{sorted(set(state) - set(expected))[:3]}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            gone = f" (missing, so set to their defaults: {', '.join(filled)})" if filled else ""
            raise ValueError(
                f"{where} does not describe the saved weights{gone}: {name} is "
                f"{tuple(tensor.shape)} in the checkpoint but {tuple(expected[name].shape)} for "
                "these options; restore the options the model was saved with"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"the checkpoint's {name} holds NaN or infinite values")


__all__ = ["check_weights", "load_weights"]
