"""Render ``benchmarks/results/cuda/``: markdown tables, plots, and the README's GPU section.

    python -m benchmarks.cuda_report             # reads cuda.json (+ gpu_check.json) if present
    python -m benchmarks.cuda_report --no-readme # only cuda.md and the plots

The README's section between ``<!-- GPU:START -->`` and ``<!-- GPU:END -->`` is rewritten from
these files alone; without ``cuda.json`` it says the GPU figures are still unmeasured.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "cuda"
README = ROOT / "README.md"
START, END = "<!-- GPU:START -->", "<!-- GPU:END -->"
TARGET_LENGTH = 65536
SPEED_TARGETS = (("sinkhorn", "sdpa_flash", 5.0), ("sinkhorn_causal", "sdpa_flash_causal", 3.0))

UNMEASURED = """### GPU (CUDA)

**The GPU figures are still unmeasured**: `make gpu-check` has not yet run on a GPU; every figure
above is from a CPU. When it runs (see [Development](#development)) it writes
`benchmarks/results/cuda/` and regenerates this section from it: device, torch and CUDA versions,
the `gpu`-marked tests' outcome, op- and layer-level forward+backward time, peak memory and TFLOP/s
in bf16 (D = 64, 128; L = 4K … 256K) for Sinkhorn attention (soft, hard, causal, SortCut) and
causal per-token routing (`topk`: the project's kernel, FlexAttention) against SDPA's flash kernel
and `sinkhorn-transformer` 0.11.4, with the targets at L = 64K: ≥ 5× faster than SDPA flash
(non-causal), ≥ 3× (causal), peak memory ≤ SDPA's plus one copy of K and V.
"""


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "–"
    if row["status"] != "ok":
        return row["status"]
    text = f"{_fmt_time(row['time_s'])} / {row['peak_mem_mb']:,.0f} MiB"
    if row.get("tflops") is not None:
        text += f" / {row['tflops']:.3g} TF/s"
    return text


def _index(rows: list[dict[str, Any]]) -> dict[tuple[str, int, str, int], dict[str, Any]]:
    return {(r["level"], r["head_dim"], r["contender"], r["length"]): r for r in rows}


def tables(meta: dict[str, Any]) -> str:
    rows = meta["results"]
    idx = _index(rows)
    lengths = sorted({r["length"] for r in rows})
    names = list(dict.fromkeys(r["contender"] for r in rows))
    out = []
    for level in ("op", "layer"):
        for d in sorted({r["head_dim"] for r in rows if r["level"] == level}):
            what = "time / peak memory / TFLOP/s" if level == "op" else "time / peak memory"
            width = f"d_model {meta.get('heads', 8) * d}, " if level == "layer" else ""
            out.append(f"**{level} level, D = {d}** ({width}forward + backward; {what})\n")
            out.append("| contender | " + " | ".join(f"{x:,}" for x in lengths) + " |")
            out.append("|---" * (len(lengths) + 1) + "|")
            for name in names:
                cells = [_cell(idx.get((level, d, name, x))) for x in lengths]
                out.append(f"| {name} | " + " | ".join(cells) + " |")
            out.append("")
    return "\n".join(out)


def targets(meta: dict[str, Any]) -> str:
    """The issue's targets at L = 64K, op level, per head dim: met / missed / unmeasured."""
    idx = _index(meta["results"])
    dims = sorted({r["head_dim"] for r in meta["results"] if r["level"] == "op"})
    if not dims:
        return ""

    def get(d: int, name: str) -> dict[str, Any] | None:
        r = idx.get(("op", d, name, TARGET_LENGTH))
        return r if r is not None and r["status"] == "ok" else None

    lines = ["| target (op level, L = 65,536, fwd+bwd) | " + " | ".join(f"D = {d}" for d in dims)
             + " |", "|---" * (len(dims) + 1) + "|"]  # fmt: skip
    for ours, theirs, want in SPEED_TARGETS:
        cells = []
        for d in dims:
            a, b = get(d, ours), get(d, theirs)
            if a is None or b is None:
                cells.append("unmeasured")
                continue
            x = b["time_s"] / a["time_s"]
            verdict = "met" if x >= want else "missed"
            cells.append(
                f"{_fmt_time(a['time_s'])} vs {_fmt_time(b['time_s'])} = **{x:.2f}×**, {verdict}"
            )
        lines.append(f"| `{ours}` ≥ {want:g}× faster than `{theirs}` | " + " | ".join(cells) + " |")
    for ours, theirs, _ in SPEED_TARGETS:
        cells = []
        for d in dims:
            a, b = get(d, ours), get(d, theirs)
            if a is None or b is None:
                cells.append("unmeasured")
                continue
            allowed = b["peak_mem_mb"] + a["kv_mb"]
            verdict = "met" if a["peak_mem_mb"] <= allowed else "missed"
            mine, base, kv = a["peak_mem_mb"], b["peak_mem_mb"], a["kv_mb"]
            cells.append(f"{mine:,.0f} vs {base:,.0f} + {kv:,.0f} MiB, {verdict}")
        lines.append(
            f"| `{ours}` peak memory ≤ `{theirs}`'s + one copy of K and V | "
            + " | ".join(cells)
            + " |"
        )
    for name in SINKHORN_ROWS:
        cells = []
        for d in dims:
            a = get(d, name)
            cells.append("unmeasured" if a is None or "tflops" not in a else f"{a['tflops']:.3g}")
        lines.append(
            f"| `{name}` achieved TFLOP/s (its own FLOP count) | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


SINKHORN_ROWS = ("sinkhorn", "sinkhorn_causal", "sortcut")


def _tests_line(check: dict[str, Any] | None) -> str:
    if not check or "tests" not in check:
        return "The `gpu`-marked tests' outcome was not recorded."
    t = check["tests"]
    parts = [f"{t.get(k, 0)} {k}" for k in ("passed", "failed", "errors", "skipped") if t.get(k)]
    text = f"`gpu`-marked tests: {', '.join(parts) or 'none ran'}"
    if t.get("status") == "timeout":
        text += " (stopped at their time limit)"
    if t.get("failed_ids"):
        shown = ", ".join(f"`{x}`" for x in t["failed_ids"][:8])
        more = len(t["failed_ids"]) - 8
        text += f"; failing: {shown}" + (f" and {more} more" if more > 0 else "")
    return text + f" ({t.get('wall_s', 0):.0f} s)."


def section(meta: dict[str, Any] | None, check: dict[str, Any] | None, images: str) -> str:
    """The README's GPU section (``images``: the path prefix of the PNGs from the file)."""
    if meta is None:
        return UNMEASURED
    m = meta["machine"]
    total = (
        f"; `make gpu-check` ran its tests and this benchmark in {check['total_wall_s']:.0f} s"
        if check and "total_wall_s" in check
        else ""
    )
    head = (
        f"### GPU (CUDA)\n\n"
        f"Measured by `make gpu-check` on **{m.get('gpu', 'an unnamed GPU')}** "
        f"({m.get('gpu_memory_gib', '?')} GiB, compute capability {m.get('capability', '?')}), "
        f"torch {m.get('torch')}, CUDA {m.get('cuda')}, {meta.get('date', '')}{total}. "
        f"bf16, batch 1, {meta.get('heads', 8)} heads, block {meta.get('block', 64)}, "
        f"forward + backward (`torch.autograd.grad` against a fixed cotangent), median of up to "
        f"{meta.get('repeats', 3)} runs after a warm-up; peak memory = "
        f"`max_memory_allocated` during the runs minus what was allocated before (inputs, "
        f"weights); TFLOP/s = the op's own forward FLOPs × 3 over the time. SDPA is forced onto "
        f'its flash kernel ("error" where flash refuses the case); `peer` = '
        f"{meta.get('peer') or 'sinkhorn-transformer (not installed)'}. "
        f'Raw rows: `benchmarks/results/cuda/cuda.json`. "skipped" = predicted over the '
        f"per-case budget ({meta.get('case_budget_s', '?')} s) or the time left.\n\n"
        f"{_tests_line(check)}\n\n"
    )
    body = targets(meta) + "\n" + tables(meta)
    plots = f"![GPU time]({images}cuda_time.png)\n![GPU peak memory]({images}cuda_memory.png)\n"
    return head + body + "\n" + plots


def plot(meta: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in meta["results"] if r["status"] == "ok"]  # log axes: positive values
    panels = sorted({(r["level"], r["head_dim"]) for r in rows}, key=lambda x: (x[0] != "op", x[1]))
    paths = []
    for key, label, name in (("time_s", "time (s)", "cuda_time.png"),
                             ("peak_mem_mb", "peak memory (MiB)", "cuda_memory.png")):  # fmt: skip
        if not panels:
            break
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
        for ax, (level, d) in zip(axes[0], panels, strict=True):
            series: dict[str, list[tuple[int, float]]] = {}
            for r in rows:
                if (r["level"], r["head_dim"]) == (level, d) and r[key] > 0:
                    series.setdefault(r["contender"], []).append((r["length"], r[key]))
            for contender, pts in sorted(series.items()):
                pts.sort()
                style = "--" if contender.startswith("sdpa") or contender == "peer" else "-"
                ax.plot(*zip(*pts, strict=True), style, marker="o", ms=3, label=contender)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{level} level, D = {d}, fwd+bwd, bf16")
            ax.set_xlabel("sequence length L")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(meta["machine"].get("gpu", "GPU"))
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def update_readme(text: str, readme: Path = README) -> bool:
    """Replace the GPU section; returns False (and changes nothing) without both markers."""
    doc = readme.read_text()
    if START not in doc or END not in doc:
        return False
    before, rest = doc.split(START, 1)
    _, after = rest.split(END, 1)
    readme.write_text(f"{before}{START}\n{text.rstrip()}\n{END}{after}")
    return True


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--readme", default=str(README))
    p.add_argument("--no-readme", action="store_true")
    args = p.parse_args(argv)
    res = Path(args.results)
    meta, check = _load(res / "cuda.json"), _load(res / "gpu_check.json")
    if meta is not None:
        plot(meta, res)
        (res / "cuda.md").write_text(section(meta, check, images=""))
        print(f"wrote {res / 'cuda.md'}", file=sys.stderr)
    if not args.no_readme:
        readme = Path(args.readme)
        prefix = res.resolve().relative_to(readme.resolve().parent).as_posix() + "/"
        if not update_readme(section(meta, check, images=prefix), readme):
            print(f"{readme}: no {START} / {END} markers; not updated", file=sys.stderr)
            return 1
        print(f"updated the GPU section of {readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
