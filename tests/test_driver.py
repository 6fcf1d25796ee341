"""The experiment driver's worker pool: many-tensor jobs travel, results keep their order, the
first failure stops the grid."""

from __future__ import annotations

import argparse
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from helpers_cli import assert_one_line_error
from sparse_sinkhorn.cli import one_line
from sparse_sinkhorn.errors import UsageError
from sparse_sinkhorn.experiments.driver import GridOptions, grid_options, run_name
from sparse_sinkhorn.experiments.workers import WorkerDiedError, map_runs


def test_jobs_of_many_tensors_travel_to_workers() -> None:
    """A classification dataset is a list of one tensor per example; shared through one file
    descriptor each, 20,000 of them exhausted the descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = min(soft, 1024)
    data = [torch.full((3,), i) for i in range(2 * limit)]  # twice the descriptors allowed
    jobs = [(len, (data,), {}), (sum, ([1, 2, 3],), {}), (len, (data[:7],), {})]
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        assert map_runs(jobs, 2) == [2 * limit, 6, 7]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_failing_run_fails_the_grid() -> None:
    jobs = [(int, ("1",), {}), (int, ("not a number",), {}), (int, ("3",), {})]
    with pytest.raises(ValueError, match="not a number"):
        map_runs(jobs, 2)


def test_options_and_names() -> None:
    with pytest.raises(UsageError, match="--jobs must be > 0"):
        GridOptions(out=Path("x"), jobs=0)
    assert run_name("sinkhorn", 3) == "sinkhorn/seed3"


def _worker_pids(parent: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:  # the parent pid
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_workers_exit_when_the_parent_is_killed() -> None:
    """SIGKILL the process that runs a --jobs grid: its workers (in the middle of a run) exit
    too instead of training on as orphans."""
    code = (
        "import time, sys\n"
        "from sparse_sinkhorn.experiments.workers import map_runs\n"
        "map_runs([(time.sleep, (120,), {})] * 2, 2)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 60
        workers: list[int] = []
        while len(workers) < 3 and time.monotonic() < deadline:  # 2 workers + a resource tracker
            time.sleep(0.2)
            workers = _worker_pids(parent.pid)
        assert len(workers) >= 2, workers
        time.sleep(1.0)  # the workers are now inside their run (sleeping)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        alive = workers
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = [p for p in workers if Path(f"/proc/{p}").exists() and not _zombie(p)]
        assert not alive, f"workers still running after their parent was killed: {alive}"
    finally:
        parent.kill()
        for pid in _worker_pids(parent.pid):
            os.kill(pid, signal.SIGKILL)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _sleeping_run(seconds: float, pid_dir: str, *, seed: int, name: str) -> dict:
    """A run that says which worker trains it, then takes ``seconds``."""
    Path(pid_dir, name.replace("/", "_")).write_text(str(os.getpid()))
    time.sleep(seconds)
    return {"seed": seed}


def _index(i: int) -> int:
    return i


def test_a_grid_of_thousands_of_runs_finishes() -> None:
    """Each worker reports every run it starts on a pipe; 4,000 reports (about 100 KiB, more
    than a pipe holds) must not block the workers: the parent reads them as runs finish."""
    n = 4000
    out: list[list[int]] = []
    thread = threading.Thread(
        target=lambda: out.append(map_runs([(_index, (i,), {}) for i in range(n)], 2)), daemon=True
    )
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "map_runs hung"
    assert out == [list(range(n))]


def test_a_killed_worker_is_one_line_naming_its_run(tmp_path: Path) -> None:
    """SIGKILL the worker in the middle of one run of a --jobs 2 grid: the parent raises one
    error (an OSError: the command's one-line exit) naming that run and the signal, not
    ``BrokenProcessPool``'s traceback."""
    jobs = [
        (_sleeping_run, (60, str(tmp_path)), {"seed": 0, "name": "sinkhorn/seed0"}),
        (_sleeping_run, (60, str(tmp_path)), {"seed": 1, "name": "sinkhorn/seed1"}),
        (_sleeping_run, (0, str(tmp_path)), {"seed": 0, "name": "dense/seed0"}),
    ]
    marker = tmp_path / "sinkhorn_seed1"

    def kill_when_started() -> None:
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        os.kill(int(marker.read_text()), signal.SIGKILL)

    killer = threading.Thread(target=kill_when_started, daemon=True)
    killer.start()
    start = time.monotonic()
    with pytest.raises(WorkerDiedError) as err:
        map_runs(jobs, 2)
    killer.join()
    assert time.monotonic() - start < 50  # the other run was stopped, not waited for
    message = one_line(err.value)
    assert isinstance(err.value, OSError)  # printed by the command as one line, exit 2
    assert "sinkhorn/seed1" in message and "SIGKILL" in message, message
    assert "sinkhorn/seed0" not in message and "\n" not in str(err.value)


def _grid_process(out: Path) -> subprocess.Popen[str]:
    """A ``sort --jobs 2`` grid of two long runs in a session of its own (a terminal's
    process group), started once both workers train."""
    argv = ["sort", "--attention", "dense", "--length", "8", "--block-size", "4", "--n-eval"]
    argv += ["4", "--seeds", "2", "--jobs", "2", "--steps", "100000", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "SPARSE_SINKHORN_DEBUG"}
    child = subprocess.Popen(
        [sys.executable, "-m", "sparse_sinkhorn.cli", *argv, "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    metrics = [out / "dense" / f"seed{seed}" / "metrics.jsonl" for seed in (0, 1)]
    deadline = time.monotonic() + 120
    while not all(m.exists() for m in metrics) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(m.exists() for m in metrics), "the workers did not start training"
    return child


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize(
    ("how", "code", "line"),
    [
        ("ctrl-c", 130, "sparse-sinkhorn: interrupted; pass --resume"),
        ("sigterm", 143, "sparse-sinkhorn: terminated; pass --resume"),
    ],
)
def test_ctrl_c_or_sigterm_on_a_jobs_grid_is_one_line(
    tmp_path: Path, how: str, code: int, line: str
) -> None:
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) or SIGTERM to the
    command of a ``--jobs 2`` grid: the workers stop, the command says so in one line, no
    ``KeyboardInterrupt`` traceback, no "leaked semaphore" warning, and ``--resume`` continues
    from the checkpoints."""
    child = _grid_process(tmp_path / "out")
    workers = [p for p in _worker_pids(child.pid) if p != child.pid]
    try:
        if how == "ctrl-c":
            os.killpg(child.pid, signal.SIGINT)
        else:
            child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == code, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "leaked semaphore" not in err, err
    assert err.strip().splitlines()[-1].startswith(line), err
    time.sleep(1.0)
    alive = [p for p in workers if Path(f"/proc/{p}").exists() and not _zombie(p)]
    assert not alive, f"workers still running: {alive}"


@pytest.mark.parametrize("command", ["sort", "ablate", "lm", "image", "classify", "nli"])
def test_an_empty_out_is_refused(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """``--out ''`` would write results, run directories and plots into the current one."""
    monkeypatch.chdir(tmp_path)
    assert_one_line_error([command, "--out", "", "--steps", "1"], capsys, "--out", "''")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UsageError, match="--out must name a directory"):
        grid_options(
            argparse.Namespace(out="", resume=False, overwrite=False, no_progress=True, seed=0)
        )


@pytest.mark.parametrize(
    ("schedule", "steps", "warmup", "expected"),
    [
        ("sort", 20, 100, 19),  # warm-up ends before the last step
        ("sort", 1300, 100, 100),
        ("lm", 300, 30, 30),  # at most a tenth of the run, at least one step
        ("image", 5, 15, 1),
        ("recall", 2000, 50, 50),
        ("classify", 50, 50, 25),  # at most half the run
        ("classify", 1, 50, 0),
    ],
)
def test_one_warmup_rule_keeps_each_experiments_clamp(
    schedule: str, steps: int, warmup: int, expected: int
) -> None:
    from sparse_sinkhorn.experiments.presets import SCHEDULES
    from sparse_sinkhorn.experiments.run_setup import train_config

    preset = argparse.Namespace(steps=steps, batch_size=4, lr=1e-3, warmup_steps=warmup)
    config = train_config(preset, SCHEDULES[schedule], seed=3, progress=False)
    assert config.warmup_steps == expected and config.seed == 3 and config.steps == steps


def test_log_lines_name_their_run_and_the_grid_reports_progress(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    from sparse_sinkhorn.experiments.progress import GridProgress, RunFormatter, naming

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "step %d/%d", (5, 10), None)
    formatter = RunFormatter("%(message)s")
    with naming("sinkhorn/seed2"):
        assert formatter.format(record) == "[sinkhorn/seed2] step 5/10"
    assert formatter.format(record) == "step 5/10"
    progress = GridProgress(4)
    with caplog.at_level(logging.INFO):
        progress.finished("dense/seed0")
    assert "grid: 1/4 runs done (dense/seed0 finished)" in caplog.text
    assert "elapsed, ETA" in caplog.text
