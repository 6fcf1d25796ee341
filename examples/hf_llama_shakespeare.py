"""A tiny Llama (grouped-query attention) trained on Shakespeare, with SDPA and with Sinkhorn
attention, from the same initial weights and the same batches; loss curves in one plot.

    sparse-sinkhorn data fetch shakespeare
    python examples/hf_llama_shakespeare.py            # about 10 minutes on a 2-core CPU

Needs the ``hf`` and ``train`` extras (transformers, matplotlib). Byte-level tokens (vocabulary
256), so no tokenizer is downloaded; the model is randomly initialised.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sparse_sinkhorn import hf
from sparse_sinkhorn.data.load import load_shakespeare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="examples/hf_llama_shakespeare.png")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    train = _bytes(load_shakespeare("train", args.data_dir))
    valid = _bytes(load_shakespeare("valid", args.data_dir))
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention: 2 query heads per K/V head
        max_position_embeddings=args.length,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    base = LlamaForCausalLM(config)
    models = {
        "sdpa": copy.deepcopy(base),
        "sinkhorn": hf.convert(copy.deepcopy(base), block_size=args.block_size, sort_net="linear"),
    }
    results: dict[str, dict] = {}
    for name, model in models.items():
        start = time.perf_counter()
        curve = _train(model, train, args)
        results[name] = {
            "train_loss": curve,
            "valid_bits_per_byte": _evaluate(model, valid, args) / math.log(2),
            "seconds": round(time.perf_counter() - start, 1),
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        print(
            f"{name}: valid {results[name]['valid_bits_per_byte']:.3f} bits/byte, "
            f"{results[name]['seconds']} s, {results[name]['parameters']:,} parameters"
        )
    prompt = torch.tensor([list(b"ROMEO:\n")])
    sample = models["sinkhorn"].generate(prompt, max_new_tokens=120, do_sample=False)
    print("sinkhorn, greedy (KV cache):", bytes(sample[0].tolist()).decode("latin-1"))
    _plot(results, args)
    summary = {
        name: {k: v for k, v in r.items() if k != "train_loss"} for name, r in results.items()
    }
    summary["machine"] = {"cpu": _cpu_name(), "threads": args.threads}
    print(json.dumps(summary, indent=1))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _bytes(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def _train(model: LlamaForCausalLM, data: torch.Tensor, args: argparse.Namespace) -> list[float]:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
        ),
    )
    losses = []
    for ids in _batches(data, args):
        loss = model(ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def _batches(data: torch.Tensor, args: argparse.Namespace) -> Iterator[torch.Tensor]:
    """``args.steps`` random ``(batch, length)`` windows, a function of ``args.seed`` (the same
    batches for every model)."""
    gen = torch.Generator().manual_seed(args.seed)
    for _ in range(args.steps):
        starts = torch.randint(0, len(data) - args.length, (args.batch,), generator=gen)
        yield torch.stack([data[s : s + args.length] for s in starts.tolist()])


@torch.no_grad()
def _evaluate(model: LlamaForCausalLM, data: torch.Tensor, args: argparse.Namespace) -> float:
    """Mean next-byte cross-entropy (nats) over evenly spaced held-out windows."""
    model.eval()
    stride = (len(data) - args.length) // args.eval_windows
    windows = torch.stack(
        [data[i * stride : i * stride + args.length] for i in range(args.eval_windows)]
    )
    total = 0.0
    for chunk in windows.split(args.batch):
        total += model(chunk, labels=chunk).loss.item() * len(chunk)
    return total / len(windows)


def _plot(results: dict[str, dict], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for name, r in results.items():
        curve = torch.tensor(r["train_loss"]) / math.log(2)
        k = 10
        smooth = curve.unfold(0, k, 1).mean(-1) if len(curve) >= k else curve
        label = f"{name} (valid {r['valid_bits_per_byte']:.2f} bits/byte)"
        ax.plot(range(len(curve) - len(smooth) + 1, len(curve) + 1), smooth, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("train bits/byte (10-step mean)")
    ax.set_title(
        f"Tiny Llama (GQA 4/2 heads) on Shakespeare, L={args.length}, b={args.block_size}",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
