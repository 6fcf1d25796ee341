"""Smoke run of the benchmark scripts so they never rot (CPU, tiny, a few seconds)."""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` lives at the root

from benchmarks import sweep
from benchmarks.contenders import peer_available
from benchmarks.plots import plot_all
from benchmarks.throughput import op_flops


def test_sweep_smoke(tmp_path: Path) -> None:
    contenders = ["sinkhorn", "sortcut", "dense_sdpa", "dense_materialised"]
    if peer_available():
        contenders.append("peer")
    argv = ["--lengths", "128", "256", "--contenders", *contenders, "--repeats", "1",
            "--warmup", "0", "--heads", "2", "--head-dim", "16", "--block", "32",
            "--in-process", "--no-plots", "--out", str(tmp_path)]  # fmt: skip
    sweep.main(argv)
    with open(tmp_path / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(contenders) * 2 * 2  # levels x contenders x lengths x modes
    assert all(r["status"] == "ok" and float(r["time_s"]) > 0 for r in rows)
    meta = json.loads((tmp_path / "sweep.json").read_text())
    assert meta["machine"]["torch"] and meta["dtype"] == "fp32"
    pngs = plot_all(tmp_path / "sweep.json", tmp_path)
    assert all(p.stat().st_size > 0 for p in pngs)


def test_fresh_process_case_and_budget(tmp_path: Path) -> None:
    spec = dict(level="op", contender="local", length=64, modes=["fwd", "fwdbwd"],
                sizes=dict(heads=1, head_dim=8, block=16), repeats=1)  # fmt: skip
    rows = sweep.run_subprocess(spec, timeout=120)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert sweep.run_subprocess(spec, timeout=0.01)[0]["status"] == "timeout"


def test_flop_count() -> None:
    # L=16384, N=256: sorting 2*2*N^2*W*D + attention 4*2*L*W*D, times 8 heads.
    assert op_flops(16384) == 8 * (4 * 256**2 * 64 * 64 + 8 * 16384 * 64 * 64)


def test_model_level_and_perf_tables(tmp_path: Path) -> None:
    """benchmarks.model's step and component cases run; the report and plot are written."""
    from benchmarks import model, perf

    rows = []
    for kind in ("model", "attention", "projections", "feedforward"):
        spec = dict(kind=kind, contender="sinkhorn", length=128, repeats=1, budget_s=30.0)
        res = model.run_case(spec)
        assert res["time_s"] > 0 and res["peak_mem_mb"] >= 0
        rows.append({"kind": kind, "contender": "sinkhorn", "length": 128, **res})
    meta = {"sizes": model.SIZES, "results": rows}
    table = model.report(meta)
    assert "| sinkhorn | 128 |" in table
    model.plot(meta, tmp_path / "model.png")
    assert (tmp_path / "model.png").stat().st_size > 0
    sweep_rows = [
        {"level": "op", "contender": "sinkhorn", "length": 128, "mode": "fwdbwd",
         "status": "ok", "time_s": 0.5, "peak_mem_mb": 3.0},
        {"level": "op", "contender": "peer", "length": 128, "mode": "fwdbwd",
         "status": "timeout"},
    ]  # fmt: skip
    md = perf.table(sweep_rows, "op")
    assert "0.5 s / 3 MiB" in md and "timeout" in md


def _generate(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.generate", *argv],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--lengths", "abc"], "--lengths: not an integer: 'abc'"),
        (["--lengths", ""], "--lengths: needs at least one length"),
        (["--lengths", "0"], "--lengths: must be > 0, got 0"),
        (["--heads", "0"], "--heads: must be > 0, got 0"),
        (["--case", "foo"], "--case: IMPL:LENGTH"),
        (["--balance", "sinkhorn-leaky"], "--balance: invalid choice"),
    ],
)
def test_generate_flags_are_checked_in_one_line(
    tmp_path: Path, argv: list[str], match: str
) -> None:
    done = _generate(*argv, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert match in done.stderr.strip().splitlines()[-1], done.stderr
    assert list(tmp_path.iterdir()) == []


def test_generate_help_and_where_it_writes(tmp_path: Path) -> None:
    """Every flag has help; the default --out is not the committed results; an existing result
    in --out is refused before any case runs (unless --overwrite); a failing case says why."""
    from benchmarks import generate

    shown = [a for a in generate.parser()._actions if a.help != argparse.SUPPRESS]
    assert {a.dest for a in shown} >= {"lengths", "heads", "out", "overwrite"}
    assert all(a.help for a in shown), [a.dest for a in shown if not a.help]
    assert generate.parser().parse_args([]).out == str(Path("runs") / "benchmarks")
    out = tmp_path / "out"
    out.mkdir()
    (out / "generate.json").write_text("{}")
    start = time.monotonic()
    done = _generate("--out", str(out), "--lengths", "64", cwd=tmp_path)
    assert done.returncode != 0 and "pass --overwrite" in done.stderr, done.stderr
    assert time.monotonic() - start < 60 and (out / "generate.json").read_text() == "{}"
    # a case that fails in its process: its own error, not CalledProcessError
    with pytest.raises(SystemExit, match=r"case sdpa at 0 tokens failed: .*--case: must be > 0"):
        generate._run_child(["--lengths", "64"], "sdpa", 0)


def test_generate_report_puts_the_ratios_beside_sdpa() -> None:
    """Per-token time and peak memory of Sinkhorn over sdpa's, and each one's block-start
    interval over its median, in one table; results without block-start times still render."""
    from benchmarks import generate

    committed = json.loads((generate.RESULTS / "generate_static.json").read_text())
    assert "| 16K |" in generate.report(committed)
    meta = json.loads(json.dumps(committed))
    for row in meta["rows"]:
        row["block_start_s"] = 4 * row["per_token_s"]
    text = generate.report(meta)
    assert "| prompt | per token: sinkhorn / sdpa |" in text
    sdpa, sink = (next(r for r in meta["rows"] if r["impl"] == i and r["length"] == 1024)
                  for i in ("sdpa", "sinkhorn"))  # fmt: skip
    ratio = sink["per_token_s"] / sdpa["per_token_s"]
    peak = sink["peak_mem_mb"] / sdpa["peak_mem_mb"]
    assert f"| 1K | {ratio:.2f} | 4.0 | 4.0 | {peak:.2f} |" in text


def test_generate_runs_alternate_and_keep_the_fastest(tmp_path: Path) -> None:
    """A tiny end-to-end run: with --repeats each case runs that often, the report keeps the
    fastest per-token run of each (and the median of their peaks) and puts the ratios beside
    sdpa."""
    argv = ["--lengths", "16", "--layers", "1", "--heads", "2", "--block-size", "8",
            "--new-tokens", "9", "--cache", "static", "--repeats", "2",
            "--out", str(tmp_path)]  # fmt: skip
    done = _generate(*argv, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    meta = json.loads((tmp_path / "generate_static.json").read_text())
    assert [(r["impl"], r["runs"]) for r in meta["rows"]] == [("sdpa", 2), ("sinkhorn", 2)]
    assert meta["rows"][1]["routing"]["balance"] == "softmax"
    assert all(r["block_start_s"] > 0 for r in meta["rows"])
    for row in meta["rows"]:  # peak: the median of the runs' peaks
        assert len(row["peak_mem_mb_runs"]) == 2
        assert row["peak_mem_mb"] == statistics.median(row["peak_mem_mb_runs"])
    text = (tmp_path / "generate_static.md").read_text()
    assert "2 runs (sdpa and Sinkhorn alternating)" in text
    assert meta["provenance"]["mmap_threshold"] == "131072"  # freed blocks leave the peak
    assert "mmap threshold fixed at 131072 bytes" in text
    assert "| 16 |" in text.split("per token: sinkhorn / sdpa")[1]


def test_recall_step_times_kinds_side_by_side(tmp_path: Path) -> None:
    """Each kind's training step in a fresh process, divided by dense's at the same length."""
    from benchmarks import recall_step

    recall_step.main(["--lengths", "64", "--kinds", "dense", "topk-compressed", "--repeats", "1",
                      "--out", str(tmp_path)])  # fmt: skip
    meta = json.loads((tmp_path / "recall_step.json").read_text())
    rows = {r["kind"]: r for r in meta["results"]}
    assert set(rows) == {"dense", "topk-compressed"}
    assert all(r["time_s"] > 0 and "error" not in r for r in rows.values())
    table = (tmp_path / "recall_step.md").read_text()
    assert "| dense | " in table and "1.00×" in table
    ratio = rows["topk-compressed"]["time_s"] / rows["dense"]["time_s"]
    assert f"{ratio:.2f}×" in table
