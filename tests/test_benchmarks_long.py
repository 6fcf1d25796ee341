"""Smoke run of ``benchmarks.long`` (cost at length) at tiny lengths, in-process, a few seconds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` lives at the root

from benchmarks import long


def test_long_smoke_exponents_and_extrapolation(tmp_path: Path) -> None:
    argv = ["--lengths", "128", "256", "512", "--layer-lengths", "128", "256",
            "--heads", "2", "--heads-at", "512:1", "--head-dim", "16", "--dense-max", "256",
            "--soft-max", "256", "--repeats", "1", "--warmup", "0", "--in-process",
            "--out", str(tmp_path)]  # fmt: skip
    meta = long.main(argv)
    rows = meta["results"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(r["time_s"] > 0 and r["peak_mem_mb"] >= 0 for r in ok)
    # dense measured up to --dense-max, extrapolated (quadratic, per head) beyond, never mixed
    dense = {r["length"]: r for r in rows if (r["level"], r["contender"]) == ("op", "dense_sdpa")}
    assert dense[256]["status"] == "ok" and dense[512]["status"] == "extrapolated"
    assert "peak_mem_mb" not in dense[512]
    assert dense[512]["time_s"] == dense[256]["time_s"] * 4 * 1 / 2
    # soft routing stops at --soft-max; 512 runs with the lowered head count
    assert {r["length"] for r in rows if r["contender"] == "sinkhorn"} == {128, 256}
    assert all(r["heads"] == 1 for r in rows if r["length"] == 512 and not r.get("heads_check"))
    assert any(r.get("heads_check") and r["heads"] == 1 and r["length"] == 256 for r in rows)
    exp = meta["exponents"]["op/sinkhorn_hard"]
    assert len(exp["pairs"]) == 2 and exp["overall"]["from"] == 128
    assert exp["overall"]["to"] == 512 and exp["pairs"][1]["like_for_like"]  # heads check
    assert not exp["pairs"][1]["per_head"] and meta["exponents"]["op/local"]["pairs"][1]["per_head"]
    again = long.main(["--from-json", str(tmp_path / "long.json"), "--note", "re-rendered"])
    assert again["exponents"] == meta["exponents"]
    md = (tmp_path / "long.md").read_text()
    assert "re-rendered" in md and "‡" in md and "†" in md
    md = (tmp_path / "long.md").read_text()
    assert "Growth exponent of time (op)" in md and "Growth exponent of time (layer)" in md
    assert "*extrapolated" in md and "512 (H=1)" in md and "load average at start" in md
    assert "git commit" in md and "python -m benchmarks.long" in md and "Heads check" in md
    saved = json.loads((tmp_path / "long.json").read_text())
    assert saved["provenance"]["machine"]["torch"] and "load_start" in saved["provenance"]


def test_block_size_rule() -> None:
    assert [long.block_for(n) for n in (4096, 16384, 32768, 65536, 262144, 1048576)] == [
        64, 64, 128, 128, 256, 256,
    ]  # fmt: skip
