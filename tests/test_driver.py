"""The experiment driver's worker pool: many-tensor jobs travel, results keep their order, the
first failure stops the grid."""

from __future__ import annotations

import resource
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
