"""No data loss: --overwrite validates before it replaces, --resume of a finished run rebuilds
its results, results.json merges kinds, one writer per run dir (a dead writer's lock is free),
and a failed write (full disk) leaves the previous state intact with a one-line error."""

from __future__ import annotations

import errno
import json
import pathlib
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers_cli import assert_one_line_error, run_cli
from helpers_train import run as train_toy
from sparse_sinkhorn.train.rundir import RunLockedError

WORDS = ["the", "king", "and", "queen", "of", "fair", "verona", "speak", "to", "thee"]
TINY = ["--length", "16", "--block-size", "4", "--batch-size", "4", "--eval-windows", "2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 40), ("valid", 6), ("test", 6)):
        d = root / "shakespeare" / split
        d.mkdir(parents=True)
        lines = [
            " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (6,), generator=g).tolist())
            for _ in range(n)
        ]
        (d / "play.txt").write_text("\n".join(lines) + "\n")
    return root


def _lm(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "lm", "--level", "char", "--data-dir", str(data), "--out", str(out), "--steps", "2",
        *TINY, "--no-progress", *extra,
    ]  # fmt: skip


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_overwrite_with_missing_data_leaves_the_run_intact(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert run_cli(_lm(data_dir, out, "--attention", "dense"), capsys)[0] == 0
    before = sorted(p.name for p in (out / "dense" / "seed0" / "checkpoints").iterdir())
    empty = tmp_path / "no-data"
    empty.mkdir()
    assert_one_line_error(_lm(empty, out, "--attention", "dense", "--overwrite"), capsys)
    assert sorted(p.name for p in (out / "dense" / "seed0" / "checkpoints").iterdir()) == before
    assert _results(out)["results"][0]["kind"] == "dense"


def test_resume_of_a_finished_run_rebuilds_its_results(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = _lm(data_dir, out, "--attention", "sinkhorn")
    assert run_cli(argv, capsys)[0] == 0
    first = _results(out)["results"][0]
    (out / "results.json").unlink()  # killed between its last checkpoint and results.json
    assert run_cli([*argv, "--resume"], capsys)[0] == 0
    again = _results(out)["results"][0]
    assert again["eval"] == first["eval"] and again["eval"]  # same, and not empty
    assert again["train_loss"] == first["train_loss"]


def test_results_json_keeps_kinds_not_rerun_and_replaces_incompatible(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert run_cli(_lm(data_dir, out, "--attention", "sinkhorn"), capsys)[0] == 0
    assert run_cli(_lm(data_dir, out, "--attention", "dense"), capsys)[0] == 0
    assert [r["kind"] for r in _results(out)["results"]] == ["sinkhorn", "dense"]
    assert "sinkhorn" in (out / "results.md").read_text()
    # Other settings (a longer run of dense): the old file is kept aside, not merged or lost.
    assert run_cli([*_lm(data_dir, out, "--attention", "dense"), "--overwrite", "--steps", "3"],
                   capsys)[0] == 0  # fmt: skip
    assert [r["kind"] for r in _results(out)["results"]] == ["dense"]
    previous = json.loads((out / "results.previous.json").read_text())
    assert [r["kind"] for r in previous["results"]] == ["sinkhorn", "dense"]


def _hold_lock(directory: Path) -> subprocess.Popen[str]:
    code = (
        "import sys, time\n"
        "from sparse_sinkhorn.train.rundir import hold_run_lock\n"
        f"hold_run_lock({str(directory)!r})\n"
        "print('LOCKED', flush=True)\n"
        "time.sleep(600)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "LOCKED"
    return child


def test_second_writer_is_refused_and_a_dead_writers_lock_is_free(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    holder = _hold_lock(out / "local" / "seed0")
    try:
        line = assert_one_line_error(_lm(data_dir, out, "--attention", "local"), capsys)
        assert "another process" in line and str(holder.pid) in line
        with pytest.raises(RunLockedError):  # the library refuses too
            train_toy(out / "local" / "seed0")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The holder died without releasing anything: its lock is gone with it.
    assert run_cli(_lm(data_dir, out, "--attention", "local"), capsys)[0] == 0


def test_full_disk_leaves_the_previous_state_intact(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    out = tmp_path / "out"
    argv = _lm(data_dir, out, "--attention", "sinkhorn")
    assert run_cli(argv, capsys)[0] == 0
    results = (out / "results.json").read_bytes()
    ckpts = sorted(p.name for p in (out / "sinkhorn" / "seed0" / "checkpoints").iterdir())

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "trainer_state.pt")

    with monkeypatch.context() as m:  # the next checkpoint write hits a full disk
        m.setattr(torch, "save", full)
        line = assert_one_line_error([*argv, "--resume", "--steps", "3"], capsys)
    assert "No space left on device" in line and "intact" in line
    assert sorted(p.name for p in (out / "sinkhorn" / "seed0" / "checkpoints").iterdir()) == ckpts
    assert (out / "results.json").read_bytes() == results

    real_write = pathlib.Path.write_text

    def full_results(self, *args, **kwargs):
        if self.name.startswith(".results.json"):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write(self, *args, **kwargs)

    with monkeypatch.context() as m:  # training succeeds, writing results.json does not
        m.setattr(pathlib.Path, "write_text", full_results)
        assert_one_line_error([*argv, "--resume", "--steps", "3"], capsys, "No space left")
    assert (out / "results.json").read_bytes() == results
    assert not list(out.glob(".results.json*"))
    assert run_cli([*argv, "--resume", "--steps", "3"], capsys)[0] == 0  # and it continues


def test_out_that_is_a_file_or_unwritable_is_one_line(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_one_line_error(_lm(data_dir, afile, "--attention", "dense"), capsys, "not a directory")
    assert_one_line_error(
        _lm(data_dir, afile / "sub", "--attention", "dense"), capsys, "not a directory"
    )
