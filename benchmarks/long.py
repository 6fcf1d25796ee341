"""Cost at length: Sinkhorn attention forward + backward at 16K, 64K, 256K and 1M tokens.

    python -m benchmarks.long             # CPU, fp32, op 16K..1M + layer 16K..256K; ~25 min here
    python -m benchmarks.long --lengths 16384 65536 --layer-lengths   # op level only, 2 lengths

Each case is one ``benchmarks.case`` run in a fresh process (``benchmarks.sweep``'s runner:
1 warm-up, median of up to ``--repeats`` runs within ``--budget`` s, peak memory per case),
with the block size the README recommends, b ≈ √(L/4): 64 up to 16K, 128 at 32K-64K, 256
beyond (``block_for``). B = 1, D = 64, float32; H = 8 except where ``--heads-at`` lowers it
(default: nowhere; the 1M case at H = 8 takes about 19 GiB with its inputs, within the default
``--mem-cap-mb`` of 0.9 x the memory available at the start on a 24 GiB machine).

Rows: Sinkhorn with hard routing (all lengths), soft routing (up to ``--soft-max``, default
64K: its ``N x N`` mix is quadratic), local attention (the linear-cost reference) and dense
SDPA, which is measured only up to ``--dense-max`` and *extrapolated* beyond (time ×
(L / L_max)², × H / H_max) — extrapolated cells are labelled so and kept apart from measured
ones (``"status": "extrapolated"``).

The growth exponent of time is the slope of log time vs log L, between consecutive lengths and
from the first to the last measured length. Where H differs between two lengths the times are
compared per head (time × 8 / H; the heads are independent batched work) and the exponent is
marked so; ``--heads-check`` measures that assumption (hard routing at the length before the
first lowered-H one, with the lowered H).

Results: ``long.json`` and ``long.md`` under ``--out`` (default ``benchmarks/results/``), with
the machine, torch version, git commit, command, date and load average at the start.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .contenders import Sizes
from .machine import machine_info
from .sweep import RESULTS, _mem_available_mb, run_inprocess, run_subprocess

LENGTHS = [16384, 65536, 262144, 1048576]
LAYER_LENGTHS = [16384, 65536, 262144]
OP_CONTENDERS = ["sinkhorn_hard", "sinkhorn", "local", "dense_sdpa"]
LAYER_CONTENDERS = ["sinkhorn_hard", "local", "dense_sdpa"]
REF_HEADS = 8  # exponents compare time per REF_HEADS heads


def block_for(length: int) -> int:
    """The README's recommended block size, b ≈ √(L/4): 64 up to 16K, 128 to 64K, 256 beyond."""
    if length <= 16384:
        return 64
    if length <= 65536:
        return 128
    return 256


def heads_for(length: int, args: argparse.Namespace) -> int:
    lowered = [h for n, h in args.heads_at if length >= n]
    return min(lowered) if lowered else args.heads


def _git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root,
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + (f" + uncommitted changes in src/ (diff sha1 {_src_diff()})" if dirty else "")


def _src_diff() -> str:
    """sha1 of ``git diff HEAD -- src`` (untracked files not included): which working tree ran."""
    root = Path(__file__).resolve().parent.parent
    diff = subprocess.run(["git", "diff", "HEAD", "--", "src"], cwd=root, capture_output=True)
    return hashlib.sha1(diff.stdout).hexdigest()[:12]


def _case(args: argparse.Namespace, level: str, name: str, length: int, heads: int):
    sizes = Sizes(1, heads, args.head_dim, block_for(length))
    spec = dict(
        level=level, contender=name, length=length, modes=["fwdbwd"], device="cpu",
        dtype="fp32", sizes=sizes.__dict__, warmup=args.warmup, repeats=args.repeats,
        budget_s=args.budget, mem_cap_mb=args.mem_cap_mb,
    )  # fmt: skip
    runner = run_inprocess if args.in_process else run_subprocess
    load = os.getloadavg()[0]  # 1-minute load average: other jobs on the same cores inflate times
    t0 = time.perf_counter()
    (res,) = runner(spec, args.budget + 60)
    row = {"level": level, "contender": name, "length": length, "heads": heads,
           "block": sizes.block, **res, "wall_s": time.perf_counter() - t0,
           "load_before": load, "load_after": os.getloadavg()[0]}  # fmt: skip
    cell = f"{row['time_s']:.3f} s {row['peak_mem_mb']:.0f} MiB" if "time_s" in row else ""
    print(f"{level:5s} {name:14s} L={length:8d} H={heads} b={sizes.block} {row['status']} "
          f"{cell} (wall {row['wall_s']:.0f} s, load {load:.2f} -> {row['load_after']:.2f})",
          file=sys.stderr, flush=True)  # fmt: skip
    return row


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    plan = [("op", c, args.lengths) for c in args.op_contenders]
    plan += [("layer", c, args.layer_lengths) for c in args.layer_contenders]
    for level, name, lengths in plan:
        dead: str | None = None
        for length in lengths:
            heads = heads_for(length, args)
            cap = {"dense_sdpa": args.dense_max, "sinkhorn": args.soft_max}.get(name)
            if cap is not None and length > cap:
                if name == "dense_sdpa":
                    rows.append(_extrapolate(rows, level, length, heads))
                continue
            if dead:
                b = block_for(length)
                rows.append({"level": level, "contender": name, "length": length,
                             "heads": heads, "block": b, "status": dead})  # fmt: skip
                continue
            row = _case(args, level, name, length, heads)
            rows.append(row)
            if row["status"] in ("oom", "timeout"):
                dead = row["status"]
    if args.heads_check:
        low = [(n, h) for n, h in args.heads_at if h < args.heads]
        before = [n for n in args.lengths if low and n < min(n for n, _ in low)]
        if before and "sinkhorn_hard" in args.op_contenders:
            row = _case(args, "op", "sinkhorn_hard", before[-1], min(h for _, h in low))
            rows.append({**row, "heads_check": True})
    return rows


def _extrapolate(rows: list[dict[str, Any]], level: str, length: int, heads: int):
    """Dense SDPA beyond the longest measured length: quadratic in L, linear in H."""
    measured = [r for r in rows if (r["level"], r["contender"], r["status"])
                == (level, "dense_sdpa", "ok") and not r.get("heads_check")]  # fmt: skip
    row = {"level": level, "contender": "dense_sdpa", "length": length, "heads": heads,
           "block": None, "status": "extrapolated"}  # fmt: skip
    if measured:
        base = max(measured, key=lambda r: r["length"])
        row["time_s"] = base["time_s"] * (length / base["length"]) ** 2 * heads / base["heads"]
        row["from_length"] = base["length"]
    return row


def exponents(rows: list[dict[str, Any]], level: str, name: str) -> dict[str, Any]:
    """Slopes of log time vs log L (measured cells only): consecutive pairs, and overall as
    the chain of the pairs (the length-weighted mean of their slopes). A pair whose lengths ran
    with different H uses a heads-check row (the shorter length at the longer one's H) when
    there is one (``like_for_like``), else time per REF_HEADS heads (``per_head``)."""
    ok = [r for r in rows if (r["level"], r["contender"], r["status"]) == (level, name, "ok")]
    main = sorted((r for r in ok if not r.get("heads_check")), key=lambda r: r["length"])
    checks = {(r["length"], r["heads"]): r for r in ok if r.get("heads_check")}
    out: dict[str, Any] = {"pairs": [], "overall": None}
    for r0, r1 in itertools.pairwise(main):
        n0, n1 = r0["length"], r1["length"]
        pair = {"from": n0, "to": n1, "per_head": False, "like_for_like": False}
        if r0["heads"] != r1["heads"] and (n0, r1["heads"]) in checks:
            r0 = checks[(n0, r1["heads"])]
            pair["like_for_like"] = True
        t0, t1 = r0["time_s"] / r0["heads"], r1["time_s"] / r1["heads"]
        pair["per_head"] = r0["heads"] != r1["heads"]
        pair["exponent"] = math.log(t1 / t0) / math.log(n1 / n0)
        out["pairs"].append(pair)
    if out["pairs"]:
        a, b = out["pairs"][0]["from"], out["pairs"][-1]["to"]
        logs = sum(x["exponent"] * math.log(x["to"] / x["from"]) for x in out["pairs"])
        pairs = out["pairs"]
        out["overall"] = {"from": a, "to": b, "exponent": logs / math.log(b / a),
                          "per_head": any(x["per_head"] for x in pairs),
                          "like_for_like": any(x["like_for_like"] for x in pairs)}  # fmt: skip
    return out


def _all_exponents(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        f"{level}/{name}": exponents(rows, level, name)
        for level, name in dict.fromkeys((r["level"], r["contender"]) for r in rows)
    }


def _fmt_len(n: int) -> str:
    return f"{n // 1048576}M" if n % 1048576 == 0 else f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "–"
    if r["status"] == "extrapolated":
        return f"*extrapolated {r['time_s']:.3g} s*" if "time_s" in r else "*extrapolated: –*"
    if r["status"] != "ok":
        return r["status"]
    return f"{r['time_s']:.3g} s / {r['peak_mem_mb']:.0f} MiB"


def report(meta: dict[str, Any]) -> str:
    rows = [r for r in meta["results"] if not r.get("heads_check")]
    p = meta["provenance"]
    md = [
        "# Cost at length (`benchmarks.long`)\n",
        f"- command: `{p['command']}`",
        f"- date: {p['date']}; wall time {p.get('wall_s', 0):.0f} s",
        f"- machine: {p['machine']['cpu']}, {p['machine']['cores']} cores, "
        f"{p['machine']['torch_threads']} torch threads; torch {p['machine']['torch']}",
        f"- git commit: {p['git_commit']}"
        + ("" if p.get("git_commit_end", p["git_commit"]) == p["git_commit"] else
           f"; at the end: {p['git_commit_end']} (src/ changed during the run)"),
        f"- load average at start: {p['load_start']:.2f} (at end: {p.get('load_end', 0):.2f}); "
        "what else ran on the machine, if anything, is in the notes at the end (times measured "
        "beside other jobs are upper bounds of an idle machine's).",
        f"- float32, B = 1, D = {meta['head_dim']}, forward + backward (`torch.autograd.grad` "
        "against a fixed cotangent), "
        + ("in one process (--in-process), " if meta.get("in_process") else
           "fresh process per case, ")
        + f"{meta['warmup']} warm-up, median of up to {meta['repeats']} runs within "
        f"{meta['budget_s']:.0f} s; peak memory: VmHWM after the "
        "runs minus VmRSS at the reset (inputs allocated before it are not counted)",
        "- block size b ≈ √(L/4): " + ", ".join(
            f"{_fmt_len(n)}: b = {block_for(n)}" for n in meta["lengths"]) + "; heads: "
        + ", ".join(f"{_fmt_len(int(n))}: H = {h}" for n, h in meta["heads"].items()),
        "",
    ]  # fmt: skip
    for level in ("op", "layer"):
        sel = [r for r in rows if r["level"] == level]
        if not sel:
            continue
        lengths = sorted({r["length"] for r in sel})
        names = list(dict.fromkeys(r["contender"] for r in sel))
        title = "op" if level == "op" else f"layer (d_model = H × {meta['head_dim']})"
        md += [f"## {title}, forward + backward (median time / peak memory)\n",
               "| contender | " + " | ".join(f"{_fmt_len(n)} (H={sel_h})" for n, sel_h in
                                               ((n, meta["heads"][str(n)]) for n in lengths))
               + " |", "|---" * (len(lengths) + 1) + "|"]  # fmt: skip
        for name in names:
            cells = [
                _cell(next((r for r in sel if (r["contender"], r["length"]) == (name, n)), None))
                for n in lengths
            ]
            md.append(f"| {name} | " + " | ".join(cells) + " |")
        loaded = [r for r in sel if "load_before" in r]
        if loaded:
            md += ["", f"1-minute load average before → after each case ({level}; the machine "
                   "has " + str(p["machine"]["cores"]) + " cores):", ""]  # fmt: skip
            md += [f"- {r['contender']} {_fmt_len(r['length'])}: {r['load_before']:.2f} → "
                   f"{r['load_after']:.2f}" for r in loaded]  # fmt: skip
        md += ["", f"**Growth exponent of time ({level})**: slope of log time vs log L "
               "(where H changes: ‡ the shorter length re-measured at the longer one's H (heads "
               "check), † time per head; overall: the chain of the pairs)\n",
               "| contender | " + " | ".join(f"{_fmt_len(a)}→{_fmt_len(b)}" for a, b in
                                               itertools.pairwise(lengths))
               + " | overall |", "|---" * len(lengths) + "|---|"]  # fmt: skip
        for name in names:
            if name == "dense_sdpa":
                continue
            e = exponents(meta["results"], level, name)
            by = {(x["from"], x["to"]): x for x in e["pairs"]}
            cells = [_exp(by.get((a, b))) for a, b in itertools.pairwise(lengths)]
            over = e["overall"]
            total = (f"{_exp(over)} ({_fmt_len(over['from'])}→{_fmt_len(over['to'])})"
                     if over else "–")  # fmt: skip
            md.append(f"| {name} | " + " | ".join(cells) + f" | {total} |")
        dense = [r for r in sel if r["contender"] == "dense_sdpa"]
        if dense:
            md += ["", "dense_sdpa: measured up to "
                   f"{_fmt_len(max([r['length'] for r in dense if r['status'] == 'ok'] or [0]))};"
                   " the *extrapolated* cells are that time × (L / L_measured)² × H / H_measured"
                   " (time only), not measurements."]  # fmt: skip
            e = exponents(sel, level, "dense_sdpa")
            if e["pairs"]:
                md.append(f"Measured dense exponent: {_exp(e['overall'])}.")
        md.append("")
    checks = [r for r in meta["results"] if r.get("heads_check")]
    for c in checks:
        key = ("op", "sinkhorn_hard", c["length"], "ok")
        ref = next((r for r in rows if (r["level"], r["contender"], r["length"], r["status"])
                    == key), None)  # fmt: skip
        if ref and c["status"] == "ok":
            md.append(f"Heads check (op, sinkhorn_hard, {_fmt_len(c['length'])}): H = "
                      f"{ref['heads']}: {ref['time_s']:.3g} s, H = {c['heads']}: "
                      f"{c['time_s']:.3g} s / {c['peak_mem_mb']:.0f} MiB; time ratio "
                      f"{ref['time_s'] / c['time_s']:.2f} for a head ratio of "
                      f"{ref['heads'] / c['heads']:.2f}.\n")  # fmt: skip
    for note in meta.get("notes", []):
        md.append(note + "\n")
    return "\n".join(md)


def _exp(e: dict[str, Any] | None) -> str:
    if e is None:
        return "–"
    return (
        f"{e['exponent']:.2f}"
        + ("†" if e["per_head"] else "")
        + ("‡" if e.get("like_for_like") else "")
    )


def _pairs(values: list[str]) -> list[tuple[int, int]]:
    return [(int(v.split(":")[0]), int(v.split(":")[1])) for v in values]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    p.add_argument("--layer-lengths", type=int, nargs="*", default=LAYER_LENGTHS)
    p.add_argument("--op-contenders", nargs="*", default=OP_CONTENDERS)
    p.add_argument("--layer-contenders", nargs="*", default=LAYER_CONTENDERS)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--heads-at", nargs="*", default=[], metavar="LENGTH:HEADS",
                   help="fewer heads from this length on (memory)")  # fmt: skip
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dense-max", type=int, default=16384, help="longest measured dense length")
    p.add_argument("--soft-max", type=int, default=65536, help="longest soft-routing length")
    p.add_argument("--no-heads-check", dest="heads_check", action="store_false")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget", type=float, default=900.0, help="seconds per case")
    p.add_argument("--mem-cap-mb", type=float, default=round(0.9 * _mem_available_mb()))
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--in-process", action="store_true", help="no fresh process per case")
    p.add_argument("--note", action="append", default=[], help="a line for long.md's end")
    p.add_argument("--from-json", help="only re-render long.md from this long.json")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    raw = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(raw)
    if args.from_json:  # re-render long.md (and the exponents) from a finished run's json
        path = Path(args.from_json)
        meta = json.loads(path.read_text())
        meta["notes"] = meta.get("notes", []) + args.note
        meta["exponents"] = _all_exponents(meta["results"])
        path.write_text(json.dumps(meta, indent=1))
        md = report(meta)
        (path.parent / "long.md").write_text(md)
        print(md)
        return meta
    args.heads_at = _pairs(args.heads_at)
    start = time.perf_counter()
    prov = {
        "command": " ".join(["python -m benchmarks.long", *raw]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info("cpu"),
        "git_commit": _git_commit(),
        "load_start": os.getloadavg()[0],
        "load_start_1_5_15": list(os.getloadavg()),
    }
    print(f"load average at start: {prov['load_start']:.2f}", file=sys.stderr, flush=True)
    rows = measure(args)
    prov["wall_s"] = time.perf_counter() - start
    prov["load_end"] = os.getloadavg()[0]
    prov["git_commit_end"] = _git_commit()
    all_lengths = sorted(set(args.lengths) | set(args.layer_lengths))
    meta: dict[str, Any] = {
        "provenance": prov,
        "dtype": "fp32",
        "head_dim": args.head_dim,
        "lengths": all_lengths,
        "heads": {str(n): heads_for(n, args) for n in all_lengths},
        "warmup": args.warmup,
        "repeats": args.repeats,
        "in_process": args.in_process,
        "budget_s": args.budget,
        "mem_cap_mb": args.mem_cap_mb,
        "results": rows,
        "exponents": _all_exponents(rows),
        "notes": args.note,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "long.json").write_text(json.dumps(meta, indent=1))
    md = report(meta)
    (out / "long.md").write_text(md)
    print(md)
    return meta


if __name__ == "__main__":
    main()
