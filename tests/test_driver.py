"""The experiment driver's worker pool: many-tensor jobs travel, results keep their order, the
first failure stops the grid."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sparse_sinkhorn.errors import UsageError
from sparse_sinkhorn.experiments.driver import GridOptions, map_runs, run_name


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
        "from sparse_sinkhorn.experiments.driver import map_runs\n"
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
