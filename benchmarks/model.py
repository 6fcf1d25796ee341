"""Model level: training throughput of a causal language model, and where its time goes.

    python -m benchmarks.model                        # 4K and 16K tokens, ~10 min here
    python -m benchmarks.model --lengths 4096 --contenders sinkhorn peer

Contenders (same width, depth, heads, feed-forward and block size; batch 1; fp32; no dropout):

* ``sinkhorn``: this project's ``LanguageModel`` with causal Sinkhorn attention (b = 64);
* ``dense``: the same model with dense causal SDPA;
* ``peer``: ``sinkhorn_transformer.SinkhornTransformerLM`` 0.11.4, causal
  (``non_permutative=False, sinkhorn_iter=8, temperature=0.75``; note that its causal layers
  use ``SinkhornCausalAttention``, which routes each query block to its top-2 earlier blocks
  by a causal softmax rather than Sinkhorn balancing, so these flags do not reach them).

A step is forward + cross-entropy on random tokens + backward (all parameter gradients).
Each case runs in a fresh process (``benchmarks.case``'s timing and memory method: warm-up,
then the median of up to 3 steps; peak = ``VmHWM`` after the steps minus ``VmRSS`` at a peak
reset). Tokens/s = tokens per step / median step time.

The split: the attention op, the four ``d_model x d_model`` projections and the feed-forward
block of one layer are timed alone on the same shapes (forward + backward, each in its own
fresh process), times the number of layers; "other" is the rest of the step (embeddings,
norms, residuals, sort nets, the loss).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .machine import machine_info

RESULTS = Path(__file__).parent / "results"
LENGTHS = [4096, 16384]
CONTENDERS = ["sinkhorn", "dense", "peer"]
SIZES = dict(vocab=256, d_model=512, heads=8, layers=2, d_ff=2048, block=64, batch=1)
PEER_FLAGS = dict(non_permutative=False, sinkhorn_iter=8, temperature=0.75)


def _model(name: str, length: int) -> torch.nn.Module:
    s = SIZES
    if name == "peer":
        from sinkhorn_transformer import SinkhornTransformerLM

        return SinkhornTransformerLM(
            num_tokens=s["vocab"], dim=s["d_model"], max_seq_len=length, depth=s["layers"],
            heads=s["heads"], bucket_size=s["block"], causal=True, **PEER_FLAGS,
        )  # fmt: skip
    from sparse_sinkhorn.models import LanguageModel, LanguageModelConfig
    from sparse_sinkhorn.nn import AttentionConfig

    att = AttentionConfig(kind=name, block_size=s["block"], max_len=length)
    cfg = LanguageModelConfig(
        vocab_size=s["vocab"], d_model=s["d_model"], n_heads=s["heads"], n_layers=s["layers"],
        d_ff=s["d_ff"], dropout=0.0, attention=att,
    )  # fmt: skip
    return LanguageModel(cfg)


def _step_fn(kind: str, name: str, length: int) -> Any:
    """``(step, params)`` for a whole model step or one component of one layer."""
    s = SIZES
    b, c, h = s["batch"], s["d_model"], s["heads"]
    e = c // h
    torch.manual_seed(0)
    if kind == "model":
        model = _model(name, length).train()
        ids = torch.randint(0, s["vocab"], (b, length + 1))
        loss_fn = torch.nn.CrossEntropyLoss()

        def step() -> None:
            logits = model(ids[:, :-1])
            loss = loss_fn(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            loss.backward()
            model.zero_grad(set_to_none=True)

        return step
    if kind == "projections":  # q, k, v and output projections of one layer
        lin = torch.nn.ModuleList(torch.nn.Linear(c, c) for _ in range(4))
        x = torch.randn(b, length, c, requires_grad=True)

        def step() -> None:
            sum(layer(x) for layer in lin).square().mean().backward()  # type: ignore[union-attr]

        return step
    if kind == "feedforward":
        from sparse_sinkhorn.nn.layers import FeedForward

        ff = FeedForward(c, s["d_ff"])
        x = torch.randn(b, length, c, requires_grad=True)
        return lambda: ff(x).square().mean().backward()
    # the attention op of one layer, causal, fwd + bwd
    q, k, v = (torch.randn(b, h, length, e, requires_grad=True) for _ in range(3))
    cot = torch.randn(b, h, length, e)
    n = length // s["block"]
    if name == "sinkhorn":
        from sparse_sinkhorn.ops import sinkhorn_attention

        logits = torch.randn(b, h, n, n, requires_grad=True)
        args = [q, k, v, logits]

        def op() -> torch.Tensor:
            return sinkhorn_attention(q, k, v, logits, block_size=s["block"], is_causal=True)  # type: ignore[return-value]

    elif name == "dense":
        from sparse_sinkhorn.ops import dense_attention

        args = [q, k, v]

        def op() -> torch.Tensor:
            return dense_attention(q, k, v, is_causal=True)

    else:
        from sinkhorn_transformer.sinkhorn_transformer import SinkhornCausalAttention

        # what the peer's causal layer builds (its LM default n_top_buckets=2)
        attn = SinkhornCausalAttention(s["block"], c, e, h, length, n_top_buckets=2,
                                       temperature=PEER_FLAGS["temperature"])  # fmt: skip
        args = [q, k, v]

        def op() -> torch.Tensor:
            return attn(q, k, v)

    return lambda: torch.autograd.grad(op(), args, cot)


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    from sparse_sinkhorn.train import memory

    from .case import _timed

    step = _step_fn(spec["kind"], spec["contender"], spec["length"])
    t0 = time.perf_counter()
    step()  # warm-up
    first = time.perf_counter() - t0
    base = memory.reset_peak("cpu")
    t_med, times = _timed(step, "cpu", 0, spec.get("repeats", 3), spec["budget_s"], first=first)
    return {"time_s": t_med, "times_s": times, "peak_mem_mb": max(memory.peak("cpu") - base, 0.0)}


def in_fresh_process(spec: dict[str, Any], module: str = "benchmarks.model") -> dict[str, Any]:
    """``python -m <module> --case <spec>`` in a fresh process: the dict it prints on its
    ``RESULT`` line, or ``{"error": <its last stderr line>}``."""
    import subprocess

    cmd = [sys.executable, "-m", module, "--case", json.dumps(spec)]
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    p.add_argument("--contenders", nargs="+", default=CONTENDERS, choices=CONTENDERS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget", type=float, default=120.0, help="seconds of timed steps per case")
    p.add_argument("--no-split", action="store_true", help="whole steps only")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        print("RESULT " + json.dumps(run_case(json.loads(args.case))), flush=True)
        return
    rows: list[dict[str, Any]] = []
    kinds = ["model"] if args.no_split else ["model", "attention", "projections", "feedforward"]
    for length in args.lengths:
        for name in args.contenders:
            for kind in kinds:
                if kind in ("projections", "feedforward") and name != args.contenders[0]:
                    continue  # the same for every contender: measured once per length
                spec = dict(kind=kind, contender=name, length=length, repeats=args.repeats,
                            budget_s=args.budget)  # fmt: skip
                res = in_fresh_process(spec)
                row = {"kind": kind, "contender": name, "length": length, **res}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": machine_info("cpu"), "sizes": SIZES, "peer": PEER_FLAGS, "results": rows}
    (out / "model.json").write_text(json.dumps(meta, indent=1))
    table = report(meta)
    (out / "model.md").write_text(table)
    print(table)
    plot(meta, out / "model.png")


def report(meta: dict[str, Any]) -> str:
    """Markdown table: tokens/s, peak memory and the time split per contender and length."""
    rows = meta["results"]
    s = meta["sizes"]

    def get(kind: str, name: str, length: int) -> dict[str, Any] | None:
        for r in rows:
            if (r["kind"], r["contender"], r["length"]) == (kind, name, length) and "time_s" in r:
                return r
        return None

    lines = [
        "| model | tokens | step | tokens/s | peak memory | attention | projections "
        "| feed-forward | other |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for length in sorted({r["length"] for r in rows}):
        shared = {
            k: next((r for r in rows if (r["kind"], r["length"]) == (k, length)), None)
            for k in ("projections", "feedforward")
        }
        for name in [c for c in CONTENDERS if get("model", c, length)]:
            m = get("model", name, length)
            assert m is not None
            tok = s["batch"] * length / m["time_s"]
            cells = [name, f"{length:,}", f"{m['time_s']:.2f} s", f"{tok:,.0f}",
                     f"{m['peak_mem_mb']:.0f} MiB"]  # fmt: skip
            att = get("attention", name, length)
            parts = [att, shared["projections"], shared["feedforward"]]
            if all(parts):
                secs = [r["time_s"] * s["layers"] for r in parts if r]
                other = m["time_s"] - sum(secs)
                cells += [f"{x:.2f} s ({100 * x / m['time_s']:.0f} %)" for x in secs]
                cells.append(f"{other:.2f} s")
            else:
                cells += ["–"] * 4
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(meta: dict[str, Any], path: Path) -> None:
    """Bars: tokens/s per contender and length (left), the time split (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in meta["results"] if "time_s" in r]
    lengths = sorted({r["length"] for r in rows})
    names = [c for c in CONTENDERS if any(r["contender"] == c for r in rows)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        vals = [next((meta["sizes"]["batch"] * n / r["time_s"] for r in rows if r["kind"] ==
                      "model" and r["contender"] == name and r["length"] == n), 0.0)
                for n in lengths]  # fmt: skip
        ax1.bar([j + i * width for j in range(len(lengths))], vals, width, label=name)
    ax1.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(lengths))])
    ax1.set_xticklabels([f"{n:,} tokens" for n in lengths])
    ax1.set_ylabel("training tokens / s")
    ax1.set_yscale("log")
    ax1.legend()
    ax1.set_title("causal LM, fwd + bwd, CPU fp32")
    labels, att, proj, ff, other = [], [], [], [], []
    layers = meta["sizes"]["layers"]
    for n in lengths:
        shared = {k: next((r["time_s"] for r in rows if r["kind"] == k and r["length"] == n), 0.0)
                  for k in ("projections", "feedforward")}  # fmt: skip
        for name in names:
            m = next((r for r in rows if (r["kind"], r["contender"], r["length"]) ==
                      ("model", name, n)), None)  # fmt: skip
            a = next((r["time_s"] for r in rows if (r["kind"], r["contender"], r["length"]) ==
                      ("attention", name, n)), None)  # fmt: skip
            if m is None or a is None:
                continue
            labels.append(f"{name}\n{n // 1024}K")
            att.append(a * layers)
            proj.append(shared["projections"] * layers)
            ff.append(shared["feedforward"] * layers)
            other.append(max(m["time_s"] - (a + sum(shared.values())) * layers, 0.0))
    bottom = [0.0] * len(labels)
    for vals, label in ((att, "attention op"), (proj, "projections"), (ff, "feed-forward"),
                        (other, "other")):  # fmt: skip
        ax2.bar(labels, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax2.set_ylabel("seconds per step")
    ax2.legend(fontsize=8)
    ax2.set_title("time split (components timed alone)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
