"""How large a fresh sort net's routing logits are in the `recall` experiment's model, with
sum-pooled (the paper's), mean-pooled and max-pooled block summaries.

A causal routing row sums every token before its block, so with ``pooling="sum"`` its logits
grow with the position; divided by the temperature they make each row's softmax all but
one-hot from the first step. Mean and max pooling keep them O(1).

    python examples/routing_logit_scale.py
"""

from __future__ import annotations

import torch

from sparse_sinkhorn.experiments.recall import attention_config
from sparse_sinkhorn.models import LanguageModel, LanguageModelConfig
from sparse_sinkhorn.nn import SinkhornSelfAttention


def main() -> None:
    print("| length | pooling | mean abs logit | largest range, last row | top weight, last row |")
    print("|---|---|---|---|---|")
    for length in (512, 1024):
        for name, pooling in (
            ("softmax-hard", "sum"),
            ("softmax-hard-mean", "mean"),
            ("softmax-hard-max", "max"),
        ):
            torch.manual_seed(0)
            cfg = LanguageModelConfig(
                vocab_size=64,
                d_model=32,
                n_heads=2,
                n_layers=2,
                d_ff=128,
                dropout=0.0,
                pad_id=0,
                attention=attention_config(name, 32, length),
            )  # fmt: skip  (the recall cpu preset's model)
            model = LanguageModel(cfg).eval()
            layer = next(m for m in model.modules() if isinstance(m, SinkhornSelfAttention))
            ids = torch.randint(1, 64, (8, length), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                x = model.embed(ids)  # the first layer's input (before its norm, as in training)
                x = model.decoder.layers[0].norm1(x)
                logits = layer.sort_logits(x)  # (B, H, N, N)
            n = logits.shape[-1]
            last = logits[..., n - 1, : n - 1]  # the last block's row over earlier blocks
            spread = (last.max(-1).values - last.min(-1).values).max()
            top = torch.softmax(last / layer.config.temperature, -1).max(-1).values.mean()
            print(
                f"| {length} | {pooling} | {logits.abs().mean():.3g} | {spread:.3g} | {top:.3f} |"
            )


if __name__ == "__main__":
    main()
