"""Smoke run of the benchmark scripts so they never rot (CPU, tiny, a few seconds)."""

from __future__ import annotations

import csv
import json
import sys
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
