"""Training step of the retrieval models, per attention kind, side by side.

    python -m benchmarks.recall_step                         # 1K, 2K and 4K tokens
    python -m benchmarks.recall_step --lengths 1024 --kinds dense topk-compressed

The model is ``sparse-sinkhorn recall``'s for the questions whose answer block depends on the
question (the ``cpu`` preset of ``keyed-needles``: 2 layers, d_model 64, 4 heads, d_ff 256,
b = 32, batch 16), each kind as `RECALL_KINDS` builds it; one torch thread, as each run of
``recall --jobs 2`` trains. A step is forward + cross-entropy on random tokens + backward.
Each case runs in a fresh process (`benchmarks.model`'s method: one warm-up step, then the
median of up to ``--repeats`` steps; peak memory above the inputs). The ratio column divides
by dense attention's step at the same length, measured in the same run.

Results: ``recall_step.json`` and ``recall_step.md`` under ``--out`` (default
``runs/benchmarks``; ``--out benchmarks/results`` rebuilds the committed files), with the
machine, commit and load average at the start.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .machine import machine_info
from .model import in_fresh_process

LENGTHS = [1024, 2048, 4096]
KINDS = ["dense", "local", "sinkhorn", "softmax-max-layers", "topk", "topk-compressed"]


def _step(kind: str, length: int) -> Any:
    from sparse_sinkhorn.experiments.recall import attention_config
    from sparse_sinkhorn.experiments.recall_tasks import TASKS
    from sparse_sinkhorn.models import LanguageModel, LanguageModelConfig

    p = TASKS["keyed-needles"].presets["cpu"]
    torch.manual_seed(0)
    config = LanguageModelConfig(
        vocab_size=64, d_model=p.d_model, n_heads=p.n_heads, n_layers=p.n_layers, d_ff=p.d_ff,
        dropout=0.0, attention=attention_config(kind, p.block_size, length),
    )  # fmt: skip
    model = LanguageModel(config).train()
    ids = torch.randint(1, 64, (p.batch_size, length + 1))

    def step() -> None:
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    from sparse_sinkhorn.train import memory

    from .case import _timed

    torch.set_num_threads(1)
    step = _step(spec["kind"], spec["length"])
    t0 = time.perf_counter()
    step()  # warm-up
    first = time.perf_counter() - t0
    base = memory.reset_peak("cpu")
    t_med, times = _timed(step, "cpu", 0, spec["repeats"], spec["budget_s"], first=first)
    return {"time_s": t_med, "times_s": times, "peak_mem_mb": max(memory.peak("cpu") - base, 0.0)}


def report(meta: dict[str, Any]) -> str:
    rows, lengths = meta["results"], meta["lengths"]
    lines = [
        "# Training step of the retrieval models (`benchmarks.recall_step`)",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; git commit {meta['git_commit']}",
        f"- machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores, one torch "
        f"thread per case; torch {meta['machine']['torch']}; float32; 1-minute load average "
        f"{meta['load_start']:.2f} at the start, {meta['load_end']:.2f} at the end",
        f"- model: {meta['sizes']}; forward + cross-entropy + backward, median of up to "
        f"{meta['repeats']} steps after one warm-up, fresh process per case",
        "",
        "| kind | " + " | ".join(f"{n:,} tokens: step / × dense / peak" for n in lengths) + " |",
        "|---|" + "---|" * len(lengths),
    ]
    for kind in meta["kinds"]:
        cells = []
        for n in lengths:
            row = next(r for r in rows if r["kind"] == kind and r["length"] == n)
            dense = next((r for r in rows if r["kind"] == "dense" and r["length"] == n), None)
            if "error" in row:
                cells.append(f"error: {row['error']}")
                continue
            ratio = (
                "–"
                if dense is None or "error" in dense
                else f"{row['time_s'] / dense['time_s']:.2f}×"
            )
            cells.append(f"{row['time_s']:.3f} s / {ratio} / {row['peak_mem_mb']:,.0f} MiB")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from sparse_sinkhorn.experiments.recall import RECALL_KINDS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=LENGTHS, help="sequence lengths")
    p.add_argument("--kinds", nargs="+", default=KINDS, choices=list(RECALL_KINDS),
                   help="attention kinds (recall's names)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=3, help="timed steps per case (at most)")
    p.add_argument("--budget", type=float, default=120.0, help="seconds of timed steps per case")
    p.add_argument("--out", default="runs/benchmarks", help="output directory")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        print("RESULT " + json.dumps(run_case(json.loads(args.case))), flush=True)
        return
    if any(n <= 0 for n in args.lengths) or args.repeats <= 0:
        p.error("--lengths and --repeats must be positive")
    from .long import _git_commit

    meta: dict[str, Any] = {
        "command": "python -m benchmarks.recall_step " + " ".join(argv or sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_commit": _git_commit(),
        "load_start": os.getloadavg()[0],
        "machine": machine_info("cpu"),
        "lengths": args.lengths,
        "kinds": args.kinds,
        "repeats": args.repeats,
    }
    from sparse_sinkhorn.experiments.recall_tasks import TASKS

    pre = TASKS["keyed-needles"].presets["cpu"]
    meta["sizes"] = (
        f"{pre.n_layers} layers, d_model {pre.d_model}, {pre.n_heads} heads, d_ff {pre.d_ff}, "
        f"b = {pre.block_size}, batch {pre.batch_size}"
    )
    rows = []
    for length in args.lengths:
        for kind in args.kinds:
            spec = {
                "kind": kind,
                "length": length,
                "repeats": args.repeats,
                "budget_s": args.budget,
            }
            row = {
                "kind": kind,
                "length": length,
                **in_fresh_process(spec, "benchmarks.recall_step"),
            }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    meta["load_end"] = os.getloadavg()[0]
    meta["results"] = rows
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recall_step.json").write_text(json.dumps(meta, indent=1))
    table = report(meta)
    (out / "recall_step.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
