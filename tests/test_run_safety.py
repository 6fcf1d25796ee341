"""No data loss: --overwrite validates before it replaces, --resume of a finished run rebuilds
its results, results.json merges kinds, one writer per run dir (a dead writer's lock is free),
and a failed write (full disk) leaves the previous state intact with a one-line error."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pathlib
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers_cli import assert_one_line_error, read_only_bind_works, run_cli
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


def test_results_json_records_its_command_commit_and_wall_time(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every results.json says how it was made: the command line as typed, the git commit of
    the source tree (in a checkout whose files are tracked, as in an editable install; else
    none), when it was written and the invocation's wall time."""
    import shlex

    import sparse_sinkhorn.experiments.provenance as provenance

    out = tmp_path / "out"
    argv = _lm(data_dir, out, "--attention", "dense")
    assert run_cli(argv, capsys)[0] == 0
    made = _results(out)["provenance"]
    assert made["command"] == shlex.join(["sparse-sinkhorn", *argv])
    assert 0.0 < made["wall_seconds"] < 600.0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", made["written_at"])
    here = Path(provenance.__file__).parent
    tracked = subprocess.run(
        ["git", "ls-files", "--error-unmatch", "provenance.py"], cwd=here, capture_output=True
    ).returncode == 0  # fmt: skip
    if tracked:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        assert made["git_commit"] == head and isinstance(made["git_dirty"], bool)
    else:
        assert made["git_commit"] is None and made["git_dirty"] is None


def test_merged_results_keep_the_provenance_of_their_earlier_rows(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file that keeps rows of an earlier one says which invocations made them: the
    earlier file's provenance under ``earlier``, oldest first (its own ``earlier`` included)."""
    import shlex

    out = tmp_path / "out"
    argvs = [_lm(data_dir, out, "--attention", kind) for kind in ("sinkhorn", "dense", "local")]
    for argv in argvs:
        assert run_cli(argv, capsys)[0] == 0
    made = _results(out)["provenance"]
    assert made["command"] == shlex.join(["sparse-sinkhorn", *argvs[2]])
    earlier = made["earlier"]
    assert [e["command"] for e in earlier] == [
        shlex.join(["sparse-sinkhorn", *a]) for a in argvs[:2]
    ]
    assert all("earlier" not in e and "git_commit" in e for e in earlier)
    # Re-running every kind keeps nothing earlier: no list.
    both = _lm(data_dir, out, "--attention", "sinkhorn,dense,local", "--overwrite")
    assert run_cli(both, capsys)[0] == 0
    assert "earlier" not in _results(out)["provenance"]


def test_provenance_is_the_tree_the_command_began_with(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commit is noted when the command begins (a commit made while a grid trains is not
    the code it ran); a checkout that moved by the time the file is written says so. git is
    asked about this package's own checkout, whatever GIT_DIR says, and without locks."""
    import sparse_sinkhorn.experiments.provenance as provenance

    states = iter([("a" * 40, False), ("b" * 40, True)])
    monkeypatch.setattr(provenance, "_git_state", lambda: next(states))
    monkeypatch.setattr(provenance, "_INVOCATION", dict(provenance._INVOCATION))
    provenance.begin_invocation(["lm", "--steps", "2"])
    made = provenance.provenance()
    assert made["command"] == "sparse-sinkhorn lm --steps 2"
    assert (made["git_commit"], made["git_dirty"]) == ("a" * 40, False)
    assert made["git_commit_at_write"] == "b" * 40

    calls: list[tuple[list[str], dict[str, str]]] = []

    def fake_run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        calls.append((cmd, kw["env"]))
        return subprocess.CompletedProcess(cmd, 0, stdout="")

    monkeypatch.undo()
    monkeypatch.setenv("GIT_DIR", str(Path("/nonexistent")))
    monkeypatch.setattr(provenance.subprocess, "run", fake_run)
    provenance._git_state()
    assert calls and all(c[:2] == ["git", "--no-optional-locks"] for c, _ in calls)
    assert all("GIT_DIR" not in env for _, env in calls)


def test_a_run_saved_before_a_model_field_existed_resumes(
    data_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A checkpoint whose model_config lacks a field added since with its default
    (LanguageModelConfig.token_conv) is the same model: --resume continues it, and keeps the
    configuration as saved."""
    from sparse_sinkhorn.models import LanguageModelConfig

    def before_token_conv(self: LanguageModelConfig) -> dict[str, Any]:
        data = {"type": type(self).__name__, **dataclasses.asdict(self)}
        del data["token_conv"]
        return data

    out = tmp_path / "out"
    argv = _lm(data_dir, out, "--attention", "dense")
    with monkeypatch.context() as patch:
        patch.setattr(LanguageModelConfig, "to_dict", before_token_conv)
        assert run_cli(argv, capsys)[0] == 0
    code, err = run_cli([*argv, "--resume", "--steps", "3"], capsys)
    assert code == 0, err
    row = _results(out)["results"][0]
    assert "token_conv" not in row["config"]
    step = json.loads((out / "dense" / "seed0" / "checkpoints" / "step_0000003" / "config.json")
                      .read_text())  # fmt: skip
    assert "token_conv" not in step["model_config"]


def test_recall_kinds_run_one_by_one_on_one_out_all_stay_in_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three `recall` commands on one --out, one kind each: the settings saved as JSON (lists)
    equal the new ones (tuples), so every kind's rows end in results.json and nothing is set
    aside."""
    out = tmp_path / "recall"
    argv = ["recall", "--lengths", "64", "--block-size", "16", "--steps", "2", "--batch-size"]
    argv += ["2", "--d-model", "16", "--out", str(out), "--no-progress"]
    for kind in ("dense", "local", "sparse"):
        code, err = run_cli([*argv, "--attention", kind], capsys)
        assert code == 0, err
    assert [r["kind"] for r in _results(out)["results"]] == ["dense", "local", "sparse"]
    assert not list(out.glob("results.previous*"))


def test_a_results_file_set_aside_is_never_overwritten(tmp_path: Path) -> None:
    """Results of incompatible runs written one after another: each earlier file is set aside
    under a name of its own, so every row written stays in some file."""
    from sparse_sinkhorn.experiments.results import write_results

    for steps in (1, 2, 3):
        row = {"kind": f"k{steps}", "eval": {}}
        payload = {"experiment": "x", "settings": {"steps": steps}, "results": [row]}
        write_results(tmp_path, payload, "table")
    files = ["results.json", "results.previous.json", "results.previous-2.json"]
    kinds = [[r["kind"] for r in _results_file(tmp_path / f)["results"]] for f in files]
    assert kinds == [["k3"], ["k1"], ["k2"]]


def test_a_setting_saved_under_its_former_name_is_the_same_setting(tmp_path: Path) -> None:
    """A classify results.json that holds ``max_len`` (the former name of ``max_tokens``)
    merges with a run of the same sizes: its rows are kept, nothing is set aside."""
    from sparse_sinkhorn.experiments.results import write_results

    def payload(kind: str, **settings: int) -> dict:
        return {"experiment": "classify", "settings": settings, "results": [{"kind": kind}]}

    write_results(tmp_path, payload("dense", max_len=64, steps=2), "table")
    write_results(tmp_path, payload("local", max_tokens=64, steps=2), "table")
    assert [r["kind"] for r in _results_file(tmp_path / "results.json")["results"]] == [
        "dense",
        "local",
    ]
    assert not list(tmp_path.glob("results.previous*"))


def test_other_seeds_of_a_kind_never_drop_the_earlier_seeds(tmp_path: Path) -> None:
    """A second grid on one --out with other seeds of a kind replaces its row in results.json;
    the earlier file, with the first seeds' row, is kept whole beside it and the table says so."""
    from sparse_sinkhorn.experiments.results import write_results

    def payload(seeds: list[int]) -> dict:
        row = {"kind": "dense", "length": 64, "runs": [{"seed": s} for s in seeds], "eval": {}}
        other = {"kind": "local", "length": 64, "runs": [{"seed": 0}], "eval": {}}
        rows = [row, other] if seeds == [0] else [row]
        return {"experiment": "x", "settings": {"steps": 1}, "results": rows}

    write_results(tmp_path, payload([0]), "table")
    write_results(tmp_path, payload([1, 2]), "table")
    current = _results_file(tmp_path / "results.json")["results"]
    assert {r["kind"]: [x["seed"] for x in r["runs"]] for r in current} == {
        "dense": [1, 2],
        "local": [0],
    }
    earlier = _results_file(tmp_path / "results.previous.json")["results"]
    assert [x["seed"] for x in earlier[0]["runs"]] == [0]  # seed 0's dense row is kept
    assert "results.previous.json" in (tmp_path / "results.md").read_text()
    write_results(tmp_path, payload([1, 2]), "table")  # the same seeds again: nothing set aside
    assert not (tmp_path / "results.previous-2.json").exists()


def _results_file(path: Path) -> dict:
    return json.loads(path.read_text())


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


def test_deleting_the_lock_file_does_not_free_the_run(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another process holds the run; someone deletes ``.lock``: a second writer (the CLI's
    ``--resume``, the library's ``train``) is still refused and writes nothing."""
    out = tmp_path / "out"
    run_dir = out / "local" / "seed0"
    holder = _hold_lock(run_dir)
    try:
        (run_dir / ".lock").unlink()
        line = assert_one_line_error(
            [*_lm(data_dir, out, "--attention", "local"), "--resume"], capsys
        )
        assert "another process" in line and str(run_dir) in line
        with pytest.raises(RunLockedError):  # the library refuses too
            train_toy(run_dir)
        assert list(run_dir.iterdir()) == []  # nothing written, not even a new .lock
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


@pytest.mark.parametrize(
    ("code", "says"),
    [
        (errno.ENOSPC, "intact"),  # a full disk
        (errno.EROFS, "no permission"),  # the place became read-only
        (errno.EACCES, "no permission"),  # the place lost its write permission
    ],
)
def test_full_disk_leaves_the_previous_state_intact(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch, code, says
) -> None:
    out = tmp_path / "out"
    argv = _lm(data_dir, out, "--attention", "sinkhorn")
    assert run_cli(argv, capsys)[0] == 0
    results = (out / "results.json").read_bytes()
    ckpts = sorted(p.name for p in (out / "sinkhorn" / "seed0" / "checkpoints").iterdir())

    def full(*_args, **_kwargs):  # a failed write() names no file, as the kernel's does not
        raise OSError(code, os.strerror(code))

    with monkeypatch.context() as m:  # the next checkpoint write fails
        m.setattr(torch, "save", full)
        line = assert_one_line_error([*argv, "--resume", "--steps", "3"], capsys)
    named = out / "sinkhorn" / "seed0" / "checkpoints" / "step_0000003" / "trainer_state.pt"
    assert f"{os.strerror(code)}: {named} (" in line and says in line
    if code != errno.ENOSPC:
        return
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


def _cli_process(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("SPARSE_SINKHORN_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "sparse_sinkhorn.cli", *argv],
        capture_output=True, text=True, env=env, timeout=120, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("limit", "victim"), [(1 << 20, "model.safetensors"), (2 << 20, "trainer_state.pt")]
)
def test_a_file_size_limit_is_one_line_naming_the_file(
    data_dir: Path, tmp_path: Path, limit: int, victim: str
) -> None:
    """``ulimit -f``: the checkpoint's weights (1.6 MB) or trainer state (3.2 MB) cannot be
    written. One line naming the file and the cause, exit 2, no partial checkpoint left."""

    def file_size_limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "out"
    done = _cli_process(_lm(data_dir, out, "--attention", "dense"), preexec_fn=file_size_limit)
    lines = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("sparse-sinkhorn: error: File too large: "), lines[0]
    assert lines[0].endswith(f"/dense/seed0/checkpoints/step_0000001/{victim}"), lines[0]
    ckpts = out / "dense" / "seed0" / "checkpoints"
    assert not ckpts.exists() or not list(ckpts.iterdir())  # nothing partial


def test_a_read_only_out_leaves_the_run_intact_and_is_one_line(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--out`` on a really read-only mount (a read-only bind in a private mount namespace:
    permission bits do not stop root): ``--resume`` and ``--overwrite`` are one line each and
    leave every file as it was."""
    out = tmp_path / "out"
    argv = _lm(data_dir, out, "--attention", "dense")
    assert run_cli(argv, capsys)[0] == 0
    if not read_only_bind_works(out):
        pytest.skip("no read-only bind mounts here (unshare -rm not permitted)")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for extra in (["--resume", "--steps", "3"], ["--overwrite"]):
        mount = f'mount --bind {out} {out} && mount -o remount,bind,ro {out} && exec "$@"'
        done = subprocess.run(
            ["unshare", "-rm", "sh", "-c", mount, "sh", sys.executable, "-m",
             "sparse_sinkhorn.cli", *argv, *extra],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        lines = [line for line in done.stderr.splitlines() if "error" in line.lower()]
        assert done.returncode == 2, done.stderr
        assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        assert str(out) in lines[0] and "writable" in lines[0], lines[0]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_second_grid_on_the_same_out_is_refused_before_it_takes_a_run(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A ``--jobs 2`` grid has checked its runs and is starting its workers (which take the
    run locks themselves); a second ``--jobs 2`` command on the same ``--out`` is refused in
    one line and takes none of the first grid's runs, which its workers then take."""
    out = tmp_path / "out"
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from sparse_sinkhorn.experiments.driver import GridOptions, check_runs, "
        "prepare_run_dir\n"
        f"runs = check_runs(['local'], [0, 1], GridOptions(out=Path({str(out)!r}), jobs=2))\n"
        "print('CHECKED', flush=True)\n"
        "sys.stdin.readline()\n"
        "for run_dir, resume in runs.values():  # what its workers do first\n"
        "    prepare_run_dir(run_dir, resume=resume, overwrite=False)\n"
        "print('TOOK', flush=True)\n"
    )
    first = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert first.stdout is not None and first.stdout.readline().strip() == "CHECKED"
        argv = [*_lm(data_dir, out, "--attention", "local"), "--seeds", "2", "--jobs", "2"]
        line = assert_one_line_error(argv, capsys, "another process", str(out))
        assert str(first.pid) in line
        took, _ = first.communicate("go\n", timeout=60)
        assert took.strip() == "TOOK" and first.returncode == 0
    finally:
        first.kill()


@pytest.mark.slow
def test_a_second_jobs_grid_on_the_same_out_is_refused_and_the_first_finishes(
    data_dir: Path, tmp_path: Path
) -> None:
    """Two ``--jobs 2`` commands on one ``--out``, the second started while the first is
    starting its workers: the second is refused in one line, the first trains every run."""
    out = tmp_path / "out"
    argv = [*_lm(data_dir, out, "--attention", "local"), "--seeds", "2", "--jobs", "2"]
    env = {k: v for k, v in os.environ.items() if k != "SPARSE_SINKHORN_DEBUG"}
    first = subprocess.Popen(
        [sys.executable, "-m", "sparse_sinkhorn.cli", *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not any(out.rglob("*")) and time.monotonic() < deadline:
            time.sleep(0.05)  # the first has begun (its --out holds something)
        second = _cli_process(argv)
        _, first_err = first.communicate(timeout=180)
    finally:
        first.kill()
    lines = [line for line in second.stderr.splitlines() if "error" in line.lower()]
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    assert "another process" in lines[0] and str(out) in lines[0], lines[0]
    assert first.returncode == 0, first_err
    results = _results(out)["results"]
    assert [r["kind"] for r in results] == ["local"] and len(results[0]["runs"]) == 2
