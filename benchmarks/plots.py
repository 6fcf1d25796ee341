"""Plots of a sweep's JSON: time and peak memory vs length (log-log), speed-up over dense SDPA.

python -m benchmarks.plots benchmarks/results/perf_sweep.json   # PNGs beside the JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

BASELINE = "dense_sdpa"


def _series(rows: list[dict[str, Any]], level: str, mode: str, key: str):
    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in rows:
        if (r["level"], r["mode"], r["status"]) != (level, mode, "ok") or r.get(key) is None:
            continue
        xs, ys = out.setdefault(r["contender"], ([], []))
        xs.append(r["length"])
        ys.append(r[key])
    return out


def _grid(meta: dict[str, Any], key: str, ylabel: str, path: Path, speedup: bool = False) -> None:
    rows = meta["results"]
    levels = sorted({r["level"] for r in rows}, key=["op", "layer"].index)
    modes = sorted({r["mode"] for r in rows})
    fig, axes = plt.subplots(
        len(levels), len(modes), figsize=(6 * len(modes), 4.2 * len(levels)), squeeze=False
    )
    for i, level in enumerate(levels):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            series = _series(rows, level, mode, key)
            base = dict(zip(*series.get(BASELINE, ([], [])), strict=True))
            for name, (xs, ys) in sorted(series.items()):
                if speedup:
                    pts = [(x, base[x] / y) for x, y in zip(xs, ys, strict=True) if x in base]
                    if name == BASELINE or not pts:
                        continue
                    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                style = "--" if name in ("dense_sdpa", "dense_materialised", "peer") else "-"
                ax.plot(xs, ys, style, marker="o", ms=3, label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{level} level, {'forward' if mode == 'fwd' else 'forward+backward'}")
            ax.set_xlabel("sequence length L")
            ax.set_ylabel(ylabel)
            if speedup:
                ax.axhline(1.0, color="grey", lw=0.8)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    m = meta["machine"]
    fig.suptitle(
        f"{m['cpu']} ({m['cores']} cores), torch {m['torch']}, {meta['dtype']}, "
        f"B={meta['sizes']['batch']} H={meta['sizes']['heads']} D={meta['sizes']['head_dim']} "
        f"b={meta['sizes']['block']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_all(json_path: Path | str, out_dir: Path | str) -> list[Path]:
    meta = json.loads(Path(json_path).read_text())
    out = Path(out_dir)
    stem = Path(json_path).stem
    paths = [out / f"{stem}_time.png", out / f"{stem}_memory.png", out / f"{stem}_speedup.png"]
    _grid(meta, "time_s", "median time (s)", paths[0])
    _grid(meta, "peak_mem_mb", "peak memory (MiB)", paths[1])
    _grid(meta, "time_s", f"speed-up over {BASELINE}", paths[2], speedup=True)
    return paths


if __name__ == "__main__":
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/perf_sweep.json")
    for p in plot_all(src, src.parent):
        print(p)
