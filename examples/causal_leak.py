"""How much a causal model sees the future, per balancing: the paper's causal balancing taken
literally (``balance="sinkhorn-leaky"``: columns normalised over all rows) against the exact
ones (prefix-causal ``"sinkhorn"``, ``"sinkhorn-targets"``, rows-only ``"softmax"``).

For each cut ``k`` (a block boundary), the tokens of blocks ``>= k`` are resampled and the
outputs of positions before the cut compared: the leak is ``mean |change|`` there divided by
``mean |output|`` there, averaged (and maximised) over the cuts. An exactly causal model gives
0 exactly. Measured on a causal Sinkhorn attention layer and a small language model, both at
random initialisation, in eval mode; prints a markdown table.

    python examples/causal_leak.py
"""

from __future__ import annotations

import time

import torch

from sparse_sinkhorn.models import LanguageModel, LanguageModelConfig
from sparse_sinkhorn.nn import AttentionConfig, SinkhornSelfAttention

BALANCES = ("sinkhorn", "sinkhorn-targets", "softmax", "sinkhorn-leaky")
BLOCK, BLOCKS, VOCAB, WIDTH = 8, 16, 32, 32


def _attention(balance: str) -> AttentionConfig:
    return AttentionConfig(
        kind="sinkhorn", block_size=BLOCK, max_len=BLOCK * BLOCKS, balance=balance,
        sort_net="bilinear", gumbel_noise=False,
    )  # fmt: skip


def leak(
    balance: str, *, model: str = "layer", seed: int = 0, batch: int = 4
) -> tuple[float, float]:
    """``(mean, max)`` over the cuts of the relative change of the outputs before a cut when
    every token from the cut on is resampled (see the module docstring)."""
    torch.manual_seed(seed)
    length = BLOCK * BLOCKS
    if model == "layer":
        net: torch.nn.Module = SinkhornSelfAttention(
            WIDTH, 4, causal=True, config=_attention(balance)
        )
        inputs = torch.randn(batch, length, WIDTH, dtype=torch.float64)
    else:
        cfg = LanguageModelConfig(
            vocab_size=VOCAB, d_model=WIDTH, n_heads=4, n_layers=2, d_ff=64,
            attention=_attention(balance),
        )  # fmt: skip
        net = LanguageModel(cfg)
        inputs = torch.randint(0, VOCAB, (batch, length))
    net = net.double().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        out = net(inputs)
        ratios = []
        for cut in range(1, BLOCKS):
            changed = inputs.clone()
            t = cut * BLOCK
            if model == "layer":
                changed[:, t:] = torch.randn(changed[:, t:].shape, generator=g, dtype=torch.float64)
            else:
                changed[:, t:] = torch.randint(0, VOCAB, changed[:, t:].shape, generator=g)
            before = out[:, :t]
            change = (net(changed)[:, :t] - before).abs().mean()
            ratios.append(float(change / before.abs().mean()))
    return sum(ratios) / len(ratios), max(ratios)


def main() -> None:
    start = time.perf_counter()
    print(
        f"{BLOCKS} blocks of {BLOCK} tokens, width {WIDTH}, 8 rounds, tau 0.75, random init, eval"
    )
    print()
    print(
        "| balance | causal | layer: mean leak | layer: max leak | LM (2 layers): mean | LM: max |"
    )
    print("|---|---|---|---|---|---|")
    for balance in BALANCES:
        layer = leak(balance, model="layer")
        lm = leak(balance, model="lm")
        causal = "no" if balance == "sinkhorn-leaky" else "yes"
        figures = " | ".join(f"{x:.3g}" for x in (*layer, *lm))
        print(f"| `{balance}` | {causal} | {figures} |")
    print()
    print(f"wall time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
