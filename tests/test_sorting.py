"""The sorting experiment: data, metrics, a tiny end-to-end run, and its errors."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_sinkhorn.cli import main
from sparse_sinkhorn.data.sorting import (
    BOS_ID,
    EOS_ID,
    FIRST_SYMBOL,
    PAD_ID,
    SortingDataset,
    collate_sorting,
    sorting_batch,
    strip_after_eos,
)
from sparse_sinkhorn.experiments.sorting import PRESETS, make_loss_fn, model_config
from sparse_sinkhorn.models import Seq2Seq
from sparse_sinkhorn.train.seq_metrics import levenshtein, sequence_metrics


def test_sorting_data_follows_the_t2t_protocol() -> None:
    """Lengths uniform in [1, L], symbols with replacement from the alphabet, EOS-terminated
    sources and sorted targets, a pure function of (seed, index)."""
    data = SortingDataset(4000, 12, 24, seed=3)
    lengths = torch.tensor([data.length_of(i) for i in range(len(data))])
    counts = torch.bincount(lengths, minlength=13)
    assert counts[0] == 0 and (counts[1:] > 0).all()  # every length 1..12, none 0 or 13
    expected = len(data) / 12
    chi2 = float(((counts[1:] - expected) ** 2 / expected).sum())
    assert chi2 < 40.0  # 11 degrees of freedom: p < 1e-4 for a uniform draw
    symbols = set()
    for i in range(200):
        src, tgt = data[i]
        assert src[-1] == tgt[-1] == EOS_ID and len(src) == len(tgt)
        assert data.length_of(i) == len(src) - 1 <= data.max_tokens - 1
        assert torch.equal(tgt[:-1], src[:-1].sort().values)
        assert (src[:-1] >= FIRST_SYMBOL).all() and (src[:-1] < data.vocab_size).all()
        symbols |= set(src[:-1].tolist())
    assert len(symbols) == 24  # the whole alphabet is used
    assert data.vocab_size == FIRST_SYMBOL + 24
    assert any(len(set(data[i][0].tolist())) < len(data[i][0]) for i in range(200))  # repeats
    assert torch.equal(SortingDataset(4000, 12, 24, seed=3)[7][0], data[7][0])
    assert not torch.equal(SortingDataset(4000, 12, 24, seed=4)[7][0], data[7][0])
    fixed = SortingDataset(10, 5, 8, min_length=5)
    assert {fixed.length_of(i) for i in range(10)} == {5}
    with pytest.raises(IndexError):
        data[4000]
    with pytest.raises(ValueError, match="n_symbols must be >= 2"):
        SortingDataset(5, 5, 1)
    with pytest.raises(ValueError, match="min_length <= max_length"):
        SortingDataset(5, 5, 4, min_length=6)


def test_special_ids_are_not_symbols() -> None:
    assert len({PAD_ID, BOS_ID, EOS_ID}) == 3 and max(PAD_ID, BOS_ID, EOS_ID) < FIRST_SYMBOL


def test_batches_are_padded_with_the_padding_id() -> None:
    data = SortingDataset(20, 9, 18, seed=1)
    src, tgt = sorting_batch(data, range(6))
    longest = max(data.length_of(i) for i in range(6)) + 1
    assert src.shape == tgt.shape == (6, longest)
    for row in range(6):
        n = data.length_of(row) + 1
        assert torch.equal(src[row, :n], data[row][0])
        assert (src[row, n:] == PAD_ID).all() and (tgt[row, n:] == PAD_ID).all()
    with pytest.raises(ValueError, match="empty batch"):
        collate_sorting([])


def test_pure_python_levenshtein_equals_rapidfuzz() -> None:
    """The fallback used where rapidfuzz is not installed (e.g. an offline GPU machine)."""
    from sparse_sinkhorn.train.seq_metrics import levenshtein_python

    rng = random.Random(0)
    for _ in range(300):
        a = [rng.randrange(4) for _ in range(rng.randrange(0, 12))]
        b = [rng.randrange(4) for _ in range(rng.randrange(0, 12))]
        assert levenshtein_python(a, b) == levenshtein(a, b)


def test_t2t_edit_distance_and_exact_match_by_hand() -> None:
    assert levenshtein([1, 2, 4], [1, 2, 3, 4]) == 1  # one deletion
    assert levenshtein([2, 1], [1, 2]) == 2  # two substitutions
    assert levenshtein([1, 1, 1, 1], [1]) == 3  # three insertions
    # Summed distances over summed reference lengths: (0 + 2 + 1) / (3 + 3 + 2), not the mean
    # of the per-sequence rates (0 + 2/3 + 1/2) / 3.
    m = sequence_metrics([[1, 2, 3], [3, 2, 1], [1]], [[1, 2, 3], [1, 2, 3], [1, 2]])
    assert m["edit_distance"] == pytest.approx(3 / 8)
    assert m["exact_match"] == pytest.approx(100 / 3)
    # A long reference weighs more than a short one.
    m = sequence_metrics([[9] * 10, [1]], [[1] * 10, [2]])
    assert m["edit_distance"] == pytest.approx(11 / 11) and m["exact_match"] == 0.0
    with pytest.raises(ValueError, match="as many predictions as targets"):
        sequence_metrics([[1]], [])
    with pytest.raises(ValueError, match="all empty"):
        sequence_metrics([[1]], [[]])


def test_strip_after_eos() -> None:
    assert strip_after_eos([5, 4, EOS_ID, 7, PAD_ID]) == [5, 4, EOS_ID]
    assert strip_after_eos([EOS_ID]) == [EOS_ID]
    assert strip_after_eos([5, 6, 7]) == [5, 6, 7]  # never ended: kept whole
    assert strip_after_eos([5, PAD_ID, PAD_ID]) == [5]


def test_greedy_decoding_stops_at_eos_and_pads_after_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Row r emits EOS at step ``ends[r]``; decoding stops once every row has ended."""
    preset = PRESETS["cpu"]
    model = Seq2Seq(model_config(preset, "sinkhorn")).eval()
    ends = [2, 4, 1]
    vocab = model.config.vocab_size
    step = {"n": 0}
    real_decode = model.decode

    def scripted(tgt_in, memory, memory_mask, *, cache=None):  # type: ignore[no-untyped-def]
        real_decode(tgt_in, memory, memory_mask, cache=cache)  # the real work still runs
        logits = torch.zeros(len(ends), tgt_in.shape[1], vocab)
        for row, end in enumerate(ends):
            logits[row, -1, EOS_ID if step["n"] == end else FIRST_SYMBOL + row] = 1.0
        step["n"] += 1
        return logits

    monkeypatch.setattr(model, "decode", scripted)
    src = torch.full((3, 5), FIRST_SYMBOL)
    out = model.generate(src, 10, eos_id=EOS_ID)
    assert out.shape == (3, 5)  # stopped after the last row's EOS at step 4, not at 10
    assert out[0].tolist() == [3, 3, EOS_ID, PAD_ID, PAD_ID]
    assert out[1].tolist() == [4, 4, 4, 4, EOS_ID]
    assert out[2].tolist() == [5, EOS_ID, PAD_ID, PAD_ID, PAD_ID]
    step["n"] = 0
    assert model.generate(src, 10).shape == (3, 10)  # without eos_id: always the full length


def test_greedy_decoding_with_eos_matches_decoding_without_it() -> None:
    """Stopping at an end token changes nothing before it. The end token is one that plain
    decoding emits (row 0's third token), so at least that row really stops early."""
    torch.manual_seed(0)
    model = Seq2Seq(model_config(PRESETS["cpu"], "sinkhorn")).eval()
    src, _ = sorting_batch(SortingDataset(8, 20, 40, seed=5), range(8))
    plain = model.generate(src, 12)
    end = int(plain[0, 2])
    stopped = model.generate(src, 12, eos_id=end)
    ended = 0
    for row in range(8):
        tokens = plain[row].tolist()
        cut = tokens.index(end) + 1 if end in tokens else len(tokens)
        got = stopped[row].tolist()
        assert got[:cut] == tokens[:cut]
        assert all(t == PAD_ID for t in got[cut:])
        ended += cut < 12
    assert ended >= 1 and stopped.shape[1] <= 12


def test_loss_ignores_padding_and_does_not_depend_on_the_split() -> None:
    """Padding targets carry no loss, and the loss of a batch is the mean of its halves' losses
    (what 2 ranks or 2 micro-batches compute), whatever the halves' token counts."""
    torch.manual_seed(0)
    preset = PRESETS["cpu"]
    model = Seq2Seq(model_config(preset, "dense")).eval()
    loss_fn = make_loss_fn(preset.length)
    data = SortingDataset(8, preset.length, preset.n_symbols, seed=2)
    whole, _ = loss_fn(model, sorting_batch(data, range(8)))
    halves = [loss_fn(model, sorting_batch(data, r))[0] for r in (range(4), range(4, 8))]
    torch.testing.assert_close(whole, sum(halves) / 2)
    # Extra padding (a longer example in the batch) does not change an example's loss.
    alone, _ = loss_fn(model, sorting_batch(data, [0]))
    src, tgt = sorting_batch(data, [0])
    pad = torch.full((1, 7), PAD_ID)
    padded, _ = loss_fn(model, (torch.cat([src, pad], 1), torch.cat([tgt, pad], 1)))
    torch.testing.assert_close(alone, padded)


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
            "12",
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
        for key in (
            "dev/exact_match",
            "dev/edit_distance",
            "dev_short/exact_match",
            "dev_short/edit_distance",
            "dev_long/exact_match",
            "dev_long/edit_distance",
            "dev_tf/exact_match",
            "dev_long_tf/edit_distance",
        ):
            values = [run["eval"][key] for run in r["runs"]]
            assert 0.0 <= r["eval"][key] <= 100.0
            assert r["eval"][key] == pytest.approx(sum(values) / 2)
            assert r["eval_std"][key] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    assert Path(results["results"][0]["sort_matrix_png"]).stat().st_size > 1000
    assert results["machine"]["torch"] == torch.__version__
    settings = results["settings"]
    assert settings["protocol"] == "t2t" and settings["length"] == 8
    assert settings["n_symbols"] == 16  # 2L by default
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
    with pytest.raises(SystemExit, match="--resume: no run directory"):
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
    # Each rank pads its half of the batch to its own longest example, so sums run in another
    # order than in one process; Adam's first steps magnify that round-off in near-zero
    # gradients to ~1e-5 (the updates themselves are ~1e-3).
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, atol=1e-4, rtol=1e-3)


@pytest.mark.usefixtures("one_thread")
def test_parallel_jobs_give_the_runs_of_one_process(tmp_path: Path) -> None:
    """--jobs 2 trains the runs in two one-thread worker processes: the same weights, bit for
    bit, and the same results as one after another in this (one-thread) process."""
    from safetensors.torch import load_file

    flags = ["--attention", "dense", "--steps", "3", "--seeds", "2", "--no-progress"]
    assert main(["sort", "--out", str(tmp_path / "serial"), "--length", "8", *flags]) == 0
    assert (
        main(["sort", "--out", str(tmp_path / "jobs"), "--length", "8", *flags, "--jobs", "2"]) == 0
    )
    results = [
        json.loads((tmp_path / d / "results.json").read_text())["results"]
        for d in ("serial", "jobs")
    ]
    assert results[0][0]["eval"] == results[1][0]["eval"]
    for seed in (0, 1):
        last = [
            sorted((tmp_path / d / "dense" / f"seed{seed}" / "checkpoints").glob("step_*"))[-1]
            for d in ("serial", "jobs")
        ]
        weights = [load_file(p / "model.safetensors") for p in last]
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
