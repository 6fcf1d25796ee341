"""``make gpu-check``'s pieces, exercised on the CPU so they are ready when a GPU is at hand:
the no-CUDA exit, the committed wheels, the CUDA benchmark's group runner (on the CPU), the
report and the README's GPU section."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` lives at the root

from benchmarks import cuda, cuda_report, gpu_check
from benchmarks.contenders import CUDA_ONLY

ROOT = Path(__file__).resolve().parents[1]

PEER_WHEELS = {
    "sinkhorn_transformer",
    "local_attention",
    "hyper_connections",
    "torch_einops_utils",
    "axial_positional_embedding",
    "product_key_memory",
    "colt5_attention",
}


def test_gpu_check_without_cuda_prints_one_line_and_exits_0() -> None:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1 and "nothing to run" in proc.stdout


def test_gpu_check_collects_every_file_with_gpu_tests() -> None:
    files = gpu_check.gpu_test_files()
    assert "tests/test_gpu.py" in files and "tests/test_hf.py" not in files
    for f in (ROOT / "tests").glob("test_*.py"):
        assert (f"tests/{f.name}" in files) == ("pytest.mark.gpu" in f.read_text())


def test_committed_wheels_are_pure_python_and_pinned() -> None:
    wheels = sorted((ROOT / "benchmarks" / "wheels").glob("*.whl"))
    assert {w.name.split("-")[0] for w in wheels} == PEER_WHEELS
    assert all(w.name.endswith("-py3-none-any.whl") for w in wheels)
    assert sum(w.stat().st_size for w in wheels) < 1_000_000
    pins = (ROOT / "benchmarks" / "wheels" / "requirements.txt").read_text()
    for w in wheels:
        name, version = w.name.split("-")[:2]
        assert f"{name.replace('_', '-')}=={version}" in pins.lower()
        with zipfile.ZipFile(w) as z:
            assert not [n for n in z.namelist() if n.endswith((".so", ".pyd"))]


def test_unpacked_wheels_import_the_peer_first(tmp_path: Path) -> None:
    """The peer imports from the unpacked wheels alone (PYTHONPATH before site-packages)."""
    site = tmp_path / "site"
    names = gpu_check.unpack_wheels(ROOT / "benchmarks" / "wheels", site)
    assert len(names) == len(PEER_WHEELS)
    code = (
        "import sinkhorn_transformer, local_attention; "
        "from sinkhorn_transformer.sinkhorn_transformer import SinkhornAttention; "
        "print(sinkhorn_transformer.__file__)"
    )
    env = dict(os.environ, PYTHONPATH=str(site))
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().startswith(str(site))


def test_flop_counts() -> None:
    # L=4096, b=64 -> N=64; sorting 2*2*N^2*W*D + attention 2*2*L*2W*D, times 8 heads.
    n, w, d = 64, 64, 64
    expected = 8 * (4 * n * n * w * d + 8 * 4096 * w * d)
    assert cuda.forward_flops("sinkhorn", 4096, 8, d, w) == expected
    assert cuda.forward_flops("sdpa_flash", 4096, 8, d, w) == 8 * 4 * 4096**2 * d
    assert cuda.forward_flops("sdpa_flash_causal", 4096, 8, d, w) == 8 * 2 * 4096**2 * d
    assert cuda.forward_flops("peer", 4096, 8, d, w) is None
    assert cuda.forward_flops("sinkhorn_hard", 4096, 8, d, w) == 8 * 8 * 4096 * w * d  # a gather
    gate, attend = 8 * 4 * 4096 * n * d, 8 * 8 * 4096 * w * d  # the bound on N blocks; 2 blocks
    for topk in ("topk_causal", "topk_flex_causal"):
        assert cuda.forward_flops(topk, 4096, 8, d, w) == gate + attend
        assert cuda.fwdbwd_flops(topk, 4096, 8, d, w) == gate + 3 * attend  # no gate backward
    assert cuda.fwdbwd_flops("sinkhorn", 4096, 8, d, w) == 3 * expected
    assert cuda.fwdbwd_flops("peer", 4096, 8, d, w) is None


@pytest.fixture(scope="module")
def group_rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The CUDA benchmark's group runner on the CPU at toy sizes (op and layer level)."""
    rows_path = tmp_path_factory.mktemp("cuda") / "cuda.jsonl"
    contenders = [c for c in cuda.CONTENDERS if c not in (cuda.PEER, *CUDA_ONLY)]
    if cuda._peer_version() is not None:
        contenders.append(cuda.PEER)
    for level in ("op", "layer"):
        spec = dict(level=level, head_dim=16, heads=2, block=32, lengths=[128],
                    contenders=contenders, repeats=1, case_budget_s=30, time_s=120,
                    rows_path=str(rows_path), device="cpu")  # fmt: skip
        cuda.run_group(spec)
    groups = [("op", 16), ("layer", 16)]
    return cuda._gather(rows_path, groups, [128, 512], contenders)


def test_cuda_group_runner_on_cpu(group_rows: list[dict]) -> None:
    measured = [r for r in group_rows if r["length"] < 512]
    bad = [(r["level"], r["contender"], r.get("note")) for r in measured if r["status"] != "ok"]
    assert not bad
    assert all(r["time_s"] > 0 and r["kv_mb"] > 0 for r in measured)
    assert all("tflops" in r for r in measured if r["level"] == "op" and r["contender"] != "peer")
    unreached = [r for r in group_rows if r["length"] == 512]
    assert unreached and all(r["status"] == "not run" for r in unreached)


def test_cuda_benchmark_driver_on_cpu(tmp_path: Path) -> None:
    """The driver end to end (a group in its own process, rows gathered into cuda.json)."""
    argv = ["-m", "benchmarks.cuda", "--device", "cpu", "--levels", "op", "--head-dims", "16",
            "--heads", "2", "--block", "32", "--lengths", "128", "--repeats", "1",
            "--contenders", "sinkhorn", "sdpa_flash", "--time-limit", "60",
            "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((tmp_path / "cuda.json").read_text())
    assert meta["device"] == "cpu" and meta["machine"]["torch"]
    assert [(r["contender"], r["status"]) for r in meta["results"]] == [
        ("sinkhorn", "ok"),
        ("sdpa_flash", "ok"),
    ]


def test_report_and_readme_section(group_rows: list[dict], tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n\n{cuda_report.START}\nold\n{cuda_report.END}\n\nafter\n")
    results = tmp_path / "results"
    results.mkdir()
    argv = ["--results", str(results), "--readme", str(readme)]
    assert cuda_report.main(argv) == 0  # no cuda.json: the figures are unmeasured
    text = readme.read_text()
    assert "still unmeasured" in text and "old" not in text
    assert text.startswith("# x\n\nbefore\n") and text.endswith("\n\nafter\n")

    rows = [dict(r, length=65536) if r["length"] == 128 else r for r in group_rows]
    meta = {"machine": {"gpu": "Test GPU", "torch": "2.x", "cuda": "13.0"}, "heads": 2,
            "block": 32, "repeats": 1, "results": rows}  # fmt: skip
    (results / "cuda.json").write_text(json.dumps(meta))
    check = {"tests": {"passed": 5, "failed": 1, "failed_ids": ["t1"], "wall_s": 9.0,
                       "status": "failed"}, "total_wall_s": 300.0}  # fmt: skip
    (results / "gpu_check.json").write_text(json.dumps(check))
    assert cuda_report.main(argv) == 0
    text = readme.read_text()
    assert "Test GPU" in text and "still unmeasured" not in text
    assert "5 passed, 1 failed" in text and "`t1`" in text
    assert "≥ 5× faster than `sdpa_flash`" in text and "**op level, D = 16**" in text
    assert "results/cuda_time.png" in text
    assert (results / "cuda.md").exists() and (results / "cuda_time.png").stat().st_size > 0
    assert text.count(cuda_report.START) == 1 and text.count(cuda_report.END) == 1


def test_readme_gpu_section_is_generated_from_the_committed_results() -> None:
    """The README's GPU section is exactly what ``benchmarks.cuda_report`` renders from
    ``benchmarks/results/cuda/`` (the "unmeasured" text while there are no GPU results)."""
    text = (ROOT / "README.md").read_text()
    assert text.count(cuda_report.START) == 1 and text.count(cuda_report.END) == 1
    current = text.split(cuda_report.START, 1)[1].split(cuda_report.END, 1)[0]
    res = ROOT / "benchmarks" / "results" / "cuda"
    meta = cuda_report._load(res / "cuda.json")
    expected = cuda_report.section(meta, cuda_report._load(res / "gpu_check.json"),
                                   images="benchmarks/results/cuda/")  # fmt: skip
    assert current.strip() == expected.strip(), "run: python -m benchmarks.cuda_report"
    assert "make gpu-check" in text.split("## Development", 1)[1]
