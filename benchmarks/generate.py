"""Generation cost of a converted Hugging Face model: Sinkhorn attention vs ``sdpa``.

``python -m benchmarks.generate`` times ``model.generate`` (greedy, transformers'
``DynamicCache``, or ``--cache static`` for a preallocated ``StaticCache``) on one randomly
initialised Llama-shaped model, once with ``attn_implementation="sdpa"`` and once converted
with `sparse_sinkhorn.hf.convert` (the same weights plus sort nets), for each prompt
length. Per case, in a fresh process:

* **prefill**: the time to the first generated token (the prompt's forward);
* **per token**: the median interval between later tokens (read by a stopping criterion that
  generate calls after every step), over ``--new-tokens`` tokens, which cover at least one
  block boundary (so the routing of a new block is inside the median's sample);
* **block start**: the longest of those intervals whose token opens a block (its position a
  multiple of ``--block-size``: Sinkhorn routes the block there), beside the median;
* **peak memory**: ``VmHWM`` during generate minus ``VmRSS`` before it (CPU; see
  ``benchmarks/case.py``), i.e. the cache and the activations, not the weights; each case runs
  with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 128 KiB (unless the environment sets it), so
  that freed large blocks go back to the system and the peak is what the run holds.

``--repeats N`` runs every case N times (sdpa and Sinkhorn alternating) and keeps the times
of each case's run with the fastest per-token time (on a loaded machine, the closest to an
idle one's) and the median of its runs' peak memory (``VmHWM`` moves by several MiB between
equal runs, which is most of the cache at 1K tokens).

The report puts the three side by side with ``sdpa``: Sinkhorn's per-token time / sdpa's,
each implementation's block-start interval / its median interval, and Sinkhorn's peak memory
/ sdpa's.

Writes ``generate.{json,md,png}`` (``generate_static.*`` with ``--cache static``) with the
machine, torch, transformers, git commit, command, date and load average into ``--out``
(default ``runs/benchmarks``; the committed results are rebuilt with
``--out benchmarks/results --overwrite``). An existing ``generate.json`` there is refused
unless ``--overwrite``, before any case runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from sparse_sinkhorn.train import memory

from .machine import machine_info

RESULTS = Path(__file__).resolve().parent / "results"  # the committed results
DEFAULT_OUT = Path("runs") / "benchmarks"
IMPLS = ("sdpa", "sinkhorn")
ROUTING = ("sort_net", "balance", "pooling")  # the convert() options a result names
CACHE_NAMES = {"dynamic": "DynamicCache", "static": "StaticCache (preallocated)"}


def _model(impl: str, args: argparse.Namespace) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparse_sinkhorn import hf

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=args.heads * 64,
        intermediate_size=args.heads * 64 * 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=max(1, args.heads // 2),
        max_position_embeddings=max(args.lengths) + args.new_tokens,
    )
    model = LlamaForCausalLM(cfg)
    model.set_attn_implementation("sdpa")
    if impl == "sinkhorn":
        routing = {k: v for k, v in (("balance", args.balance), ("pooling", args.pooling)) if v}
        hf.convert(model, block_size=args.block_size, **routing)
    return model.eval()


def run_case(impl: str, length: int, args: argparse.Namespace) -> dict[str, Any]:
    """One (implementation, prompt length) case in this process."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    model = _model(impl, args)
    prompt = torch.randint(3, 256, (1, length), generator=torch.Generator().manual_seed(1))
    stamps: list[float] = []

    class Stamp(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw: Any) -> Any:
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    kw = dict(do_sample=False, use_cache=True, pad_token_id=0, cache_implementation=args.cache)
    with torch.no_grad():
        model.generate(prompt[:, :64], max_new_tokens=2, **kw)  # warm-up
        base = memory.reset_peak("cpu")
        start = time.perf_counter()
        out = model.generate(
            prompt,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            stopping_criteria=StoppingCriteriaList([Stamp()]),
            **kw,
        )
        peak = memory.peak("cpu") - base
    assert out.shape[1] == length + args.new_tokens
    options = getattr(model.config, "sinkhorn_attention", None) or {}
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    # steps[k]: the forward on position length + k (the token generated k-th) and its sampling
    starts = [d for k, d in enumerate(steps) if (length + k) % args.block_size == 0]
    return {
        "impl": impl,
        "length": length,
        "prefill_s": stamps[0] - start,
        "per_token_s": statistics.median(steps),
        "per_token_max_s": max(steps),
        "block_start_s": max(starts),
        "tokens_per_s": 1.0 / statistics.median(steps),
        "peak_mem_mb": max(peak, 0.0),
        **({"routing": {k: options[k] for k in ROUTING}} if options else {}),
    }


def _git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "benchmarks"],
                               cwd=root, capture_output=True, text=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + (" + uncommitted changes" if dirty else "")


def _fmt_len(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def report(meta: dict[str, Any]) -> str:
    rows = {(r["impl"], r["length"]): r for r in meta["rows"]}
    lengths = meta["settings"]["lengths"]
    p = meta["provenance"]
    s = meta["settings"]
    routing = next((r["routing"] for r in meta["rows"] if "routing" in r), None)
    options = (
        "bilinear sort net"
        if routing is None
        else ", ".join(f'{k}="{routing[k]}"' for k in ROUTING)
    )
    lines = [
        "# Generation with a converted Hugging Face model (`benchmarks.generate`)",
        "",
        f"- command: `{p['command']}`",
        f"- date: {p['date']}; wall time {p['wall_s']:.0f} s; git commit: {p['git_commit']}",
        f"- machine: {p['machine']['cpu']}, {p['machine']['cores']} cores, "
        f"{p['machine']['torch_threads']} torch threads; torch {p['machine']['torch']}, "
        f"transformers {p['transformers']}; load average at start {p['load'][0]:.2f}",
        f"- model: random Llama, {s['layers']} layers, {s['heads']} query heads / "
        f"{max(1, s['heads'] // 2)} key-value heads of 64, float32, batch 1; Sinkhorn: "
        f"`hf.convert(model, block_size={s['block_size']})` ({options}); greedy "
        f"`generate` with a {CACHE_NAMES[s.get('cache', 'dynamic')]}, {s['new_tokens']} new "
        "tokens",
        "- prefill: time to the first token; per token: median interval between later tokens "
        "(max in brackets: a block's first token routes it); peak: VmHWM during generate "
        "minus VmRSS before it (cache and activations, not weights"
        + (
            f"; glibc's mmap threshold fixed at {p['mmap_threshold']} bytes)"
            if p.get("mmap_threshold")
            else ")"
        )
        + (
            f"; each case: {s['repeats']} runs (sdpa and Sinkhorn alternating), times from "
            "the one with the fastest per-token time, peak the median of the runs' peaks"
            if s.get("repeats", 1) > 1
            else ""
        ),
        "",
        "| prompt | " + " | ".join(f"{i} prefill | {i} per token | {i} peak" for i in IMPLS) + " |",
        "|---|" + "---|" * (3 * len(IMPLS)),
    ]
    for n in lengths:
        cells = [_fmt_len(n)]
        for impl in IMPLS:
            r = rows.get((impl, n))
            if r is None:
                cells += ["–"] * 3
                continue
            cells += [
                f"{r['prefill_s']:.2f} s",
                f"{1e3 * r['per_token_s']:.1f} ms ({1e3 * r['per_token_max_s']:.0f})",
                f"{r['peak_mem_mb']:.0f} MiB",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += _ratios(rows, lengths)
    first, last = lengths[0], lengths[-1]
    lines.append("")
    for impl in IMPLS:
        a, b = rows.get((impl, first)), rows.get((impl, last))
        if a and b:
            lines.append(
                f"- {impl}: per-token time at {_fmt_len(last)} / at {_fmt_len(first)} = "
                f"{b['per_token_s'] / a['per_token_s']:.2f}"
            )
    return "\n".join(lines) + "\n"


def _ratios(rows: dict[tuple[str, int], dict[str, Any]], lengths: list[int]) -> list[str]:
    """The table of Sinkhorn beside sdpa: per-token time and peak memory ratios, and each
    implementation's block-start interval over its median interval."""
    lines = [
        "",
        "| prompt | per token: sinkhorn / sdpa | block start / median: sinkhorn | "
        "block start / median: sdpa | peak: sinkhorn / sdpa |",
        "|---|---|---|---|---|",
    ]
    for n in lengths:
        sdpa, sink = rows.get(("sdpa", n)), rows.get(("sinkhorn", n))
        if sdpa is None or sink is None or "block_start_s" not in sink:
            continue
        peak = sink["peak_mem_mb"] / sdpa["peak_mem_mb"] if sdpa["peak_mem_mb"] > 0 else math.nan
        lines.append(
            f"| {_fmt_len(n)} | {sink['per_token_s'] / sdpa['per_token_s']:.2f} | "
            f"{sink['block_start_s'] / sink['per_token_s']:.1f} | "
            f"{sdpa['block_start_s'] / sdpa['per_token_s']:.1f} | {peak:.2f} |"
        )
    return lines


def plot(meta: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for impl in IMPLS:
        rows = sorted((r for r in meta["rows"] if r["impl"] == impl), key=lambda r: r["length"])
        xs = [r["length"] for r in rows]
        axes[0].plot(xs, [r["prefill_s"] for r in rows], "o-", label=impl)
        axes[1].plot(xs, [1e3 * r["per_token_s"] for r in rows], "o-", label=impl)
    for ax, title in zip(axes, ("prefill (s)", "per generated token (ms)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt length")
        ax.set_title(title)
        ax.legend()
    axes[0].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _lengths(text: str) -> list[int]:
    parts = [x.strip() for x in text.split(",") if x.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"needs at least one length, got {text!r}")
    return [_positive(x) for x in parts]


def _case(text: str) -> tuple[str, int]:
    impl, _, length = text.partition(":")
    if impl not in IMPLS:
        raise argparse.ArgumentTypeError(f"IMPL:LENGTH with IMPL one of {IMPLS}, got {text!r}")
    return impl, _positive(length)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--lengths",
        type=_lengths,
        default=_lengths("1024,2048,4096,8192,16384"),
        help="prompt lengths, a comma list (default: 1024,...,16384)",
    )
    p.add_argument("--layers", type=_positive, default=2, help="decoder layers (default: 2)")
    p.add_argument(
        "--heads",
        type=_positive,
        default=4,
        help="query heads of 64 dims; key/value heads: half (default: 4)",
    )
    p.add_argument(
        "--block-size", type=_positive, default=64, help="Sinkhorn block size (default: 64)"
    )
    p.add_argument(
        "--new-tokens",
        type=_positive,
        default=129,
        help="tokens generated per prompt; more than --block-size (default: 129)",
    )
    p.add_argument(
        "--repeats",
        type=_positive,
        default=1,
        help="runs per case, sdpa and Sinkhorn alternating; the report keeps each case's run "
        "with the fastest per-token time (for a loaded machine; default: 1)",
    )
    p.add_argument(
        "--cache",
        choices=tuple(CACHE_NAMES),
        default="dynamic",
        help="dynamic: DynamicCache (default); static: a preallocated StaticCache",
    )
    p.add_argument(
        "--balance",
        choices=("softmax", "sinkhorn", "sinkhorn-targets"),
        default=None,
        help="convert()'s balance (default: convert's own, softmax)",
    )
    p.add_argument(
        "--pooling",
        choices=("max", "sum", "mean"),
        default=None,
        help="convert()'s pooling (default: convert's own, max)",
    )
    p.add_argument(
        "--out",
        default=str(DEFAULT_OUT),
        help=f"directory for generate.{{json,md,png}} (default: {DEFAULT_OUT}; the "
        "committed results: benchmarks/results)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    p.add_argument("--case", type=_case, default=None, help=argparse.SUPPRESS)  # internal
    return p  # fmt: skip


def _check_out(out: Path, stem: str, overwrite: bool) -> None:
    """Before any case runs: ``out`` can hold the results, and holds none unless
    ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out {out} is not a directory")
    if (out / f"{stem}.json").exists() and not overwrite:
        raise SystemExit(
            f"error: {out / stem}.json exists; pass --overwrite to replace it or another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise SystemExit(f"error: --out {out} is not writable")


# glibc's malloc moves its mmap threshold up as large blocks are freed, after which freed memory
# may stay in the heap: identical runs then differ in VmHWM by up to 60 MiB at 16K tokens. A
# fixed threshold (which also turns the dynamic one off) returns every large block to the
# system when it is freed, so the peak is what the run holds (`MMAP_THRESHOLD`, bytes).
MMAP_THRESHOLD = 131072


def _run_child(argv: list[str], impl: str, length: int) -> dict[str, Any]:
    """One case in a fresh process; its own error, when it fails, as ours."""
    cmd = [sys.executable, "-m", "benchmarks.generate", *argv, "--case", f"{impl}:{length}"]
    env = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), **os.environ}  # the caller's wins
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        raise SystemExit(f"error: case {impl} at {length} tokens failed: {lines[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    args = p.parse_args(argv)
    if args.new_tokens < args.block_size + 1:
        p.error("--new-tokens must exceed --block-size (a block boundary is timed)")
    if args.case:
        impl, length = args.case
        print(json.dumps(run_case(impl, length, args)))
        return None
    out = Path(args.out)
    stem = "generate" if args.cache == "dynamic" else f"generate_{args.cache}"
    _check_out(out, stem, args.overwrite)
    t0, load = time.time(), os.getloadavg()
    rows = []
    for length in args.lengths:
        runs: dict[str, list[dict[str, Any]]] = {impl: [] for impl in IMPLS}
        for _ in range(args.repeats):  # the two implementations alternate
            for impl in IMPLS:
                row = _run_child(argv, impl, length)
                print(json.dumps(row), flush=True)
                runs[impl].append(row)
        for impl in IMPLS:  # the run with the fastest per-token time, and how many there were
            best = min(runs[impl], key=lambda r: r["per_token_s"])
            # peak memory: the median run's (VmHWM moves by several MiB between equal runs)
            peaks = sorted(r["peak_mem_mb"] for r in runs[impl])
            peak = statistics.median(peaks)
            rows.append(
                {**best, "peak_mem_mb": peak, "peak_mem_mb_runs": peaks, "runs": len(peaks)}
            )
    import transformers

    meta = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("case", "out", "overwrite")},
        "rows": rows,
        "provenance": {
            "command": "python -m benchmarks.generate" + ("" if not argv else " " + " ".join(argv)),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "wall_s": time.time() - t0,
            "git_commit": _git_commit(),
            "machine": machine_info("cpu"),
            "transformers": transformers.__version__,
            "load": list(load),
            "mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD)),
        },
    }
    (out / f"{stem}.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / f"{stem}.md").write_text(report(meta))
    plot(meta, out / f"{stem}.png")
    print(report(meta))
    return meta


if __name__ == "__main__":
    main()
