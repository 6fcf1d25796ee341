"""The sorting experiment: data, metrics, a tiny end-to-end run, and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_sinkhorn.cli import main
from sparse_sinkhorn.data.sorting import BOS_ID, FIRST_SYMBOL, SortingDataset, sorting_batch
from sparse_sinkhorn.train.seq_metrics import edit_distance, sequence_metrics


def test_sorting_data_is_sorted_deterministic_and_seeded() -> None:
    data = SortingDataset(50, 13, 5, seed=3)
    src, tgt = data[7]
    assert src.shape == tgt.shape == (13,)
    assert torch.equal(tgt, src.sort().values)
    assert src.min() >= FIRST_SYMBOL and src.max() < FIRST_SYMBOL + 5 == data.vocab_size
    assert torch.equal(SortingDataset(50, 13, 5, seed=3)[7][0], src)  # pure function of index
    assert not torch.equal(SortingDataset(50, 13, 5, seed=4)[7][0], src)
    assert not torch.equal(data[8][0], src)
    batch_src, batch_tgt = sorting_batch(data, range(4))
    assert batch_src.shape == (4, 13) and torch.equal(batch_tgt[2], data[2][1])
    with pytest.raises(IndexError):
        data[50]
    with pytest.raises(ValueError, match="n_symbols must be >= 2"):
        SortingDataset(5, 5, 1)


def test_edit_distance_and_exact_match_by_hand() -> None:
    assert edit_distance([1, 2, 3, 4], [1, 2, 3, 4]) == 0.0
    assert edit_distance([1, 2, 4], [1, 2, 3, 4]) == 0.25  # one deletion
    assert edit_distance([2, 1], [1, 2]) == 1.0  # two substitutions over length 2
    assert edit_distance([], [5, 5, 5]) == 1.0
    assert edit_distance([1, 1, 1, 1, 1, 1], [1, 1, 1]) == 1.0  # three insertions
    m = sequence_metrics([[1, 2, 3], [3, 2, 1], [1, 2]], [[1, 2, 3], [1, 2, 3], [1, 2, 3]])
    assert m["exact_match"] == pytest.approx(100 / 3)
    assert m["edit_distance"] == pytest.approx((0 + 2 / 3 + 1 / 3) / 3)
    with pytest.raises(ValueError, match="as many predictions as targets"):
        sequence_metrics([[1]], [])


def _sort(tmp_path: Path, *extra: str) -> int:
    return main(
        [
            "sort",
            "--out",
            str(tmp_path / "run"),
            "--length",
            "8",
            "--block-size",
            "4",
            "--n-eval",
            "4",
            "--no-progress",
            *(() if "--seeds" in extra else ("--seeds", "1")),
            *extra,
        ]
    )


def test_tiny_sort_run_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _sort(tmp_path, "--attention", "sinkhorn,local", "--steps", "4", "--seeds", "2") == 0
    printed = capsys.readouterr().out
    assert "| sinkhorn |" in printed and "| local |" in printed and "0.4054" in printed
    assert " ± " in printed
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["kind"] for r in results["results"]] == ["sinkhorn", "local"]
    for r in results["results"]:
        assert [run["seed"] for run in r["runs"]] == [0, 1]
        for key in ("L=8/edit_distance", "L=8/exact_match", "L=16/edit_distance"):
            values = [run["eval"][key] for run in r["runs"]]
            assert 0.0 <= r["eval"][key] <= 100.0
            assert r["eval"][key] == pytest.approx(sum(values) / 2)
            assert r["eval_std"][key] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    assert Path(results["results"][0]["sort_matrix_png"]).stat().st_size > 1000
    assert results["machine"]["torch"] == torch.__version__
    # Resuming a finished run continues from its checkpoint and trains 2 more steps.
    assert _sort(tmp_path, "--attention", "sinkhorn", "--steps", "6", "--resume") == 0
    lines = (tmp_path / "run" / "sinkhorn" / "seed0" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 6
    with pytest.raises(SystemExit, match="already holds a run; pass --resume"):
        _sort(tmp_path, "--attention", "sinkhorn", "--steps", "2")
    assert _sort(tmp_path, "--attention", "sinkhorn", "--steps", "2", "--overwrite") == 0
    lines = (tmp_path / "run" / "sinkhorn" / "seed0" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 2


def test_sort_bad_input(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="unknown attention kind 'flash'"):
        _sort(tmp_path, "--attention", "flash")
    with pytest.raises(SystemExit, match="--resume: no checkpoints in"):
        _sort(tmp_path, "--attention", "dense", "--resume")
    with pytest.raises(SystemExit, match="--steps must be > 0"):
        _sort(tmp_path, "--steps", "0")
    with pytest.raises(SystemExit, match="--seeds must be > 0"):
        _sort(tmp_path, "--seeds", "0")


def test_resume_with_another_config_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _sort(tmp_path, "--attention", "dense", "--steps", "2") == 0
    capsys.readouterr()
    code = main(
        [
            "sort",
            "--out",
            str(tmp_path / "run"),
            "--length",
            "8",
            "--block-size",
            "2",
            "--n-eval",
            "4",
            "--no-progress",
            "--attention",
            "dense",
            "--steps",
            "3",
            "--seeds",
            "1",
            "--resume",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("sparse-sinkhorn: error: checkpoint") and "\n" not in err
    assert "'block_size': 4" in err and "'block_size': 2" in err and "new out_dir" in err


def test_bos_is_not_a_symbol() -> None:
    assert BOS_ID < FIRST_SYMBOL


def test_two_process_torchrun_matches_one_process(tmp_path: Path) -> None:
    """The same global batch over 2 gloo ranks ends with the weights of one process."""
    from safetensors.torch import load_file

    flags = [
        "sort",
        "--attention",
        "dense",
        "--steps",
        "3",
        "--length",
        "8",
        "--block-size",
        "4",
        "--n-eval",
        "2",
        "--seeds",
        "1",
        "--no-progress",
    ]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "sparse_sinkhorn.cli",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [*torchrun, *flags, "--out", str(tmp_path / "two")],
        check=True,
        env=env,
        timeout=240,
        capture_output=True,
    )
    assert main([*flags, "--out", str(tmp_path / "one")]) == 0
    last = [
        sorted((tmp_path / run / "dense" / "seed0" / "checkpoints").glob("step_*"))[-1]
        for run in ("one", "two")
    ]
    assert [p.name for p in last] == ["step_0000003"] * 2
    weights = [load_file(p / "model.safetensors") for p in last]
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, atol=1e-5, rtol=1e-4)
