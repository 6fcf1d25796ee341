"""Run the console script in-process and read its exit status and stderr."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from sparse_sinkhorn.cli import main


def run_cli(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``(exit status, stderr)`` of ``sparse-sinkhorn *argv`` (``SystemExit`` included)."""
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else 1
    return code, capsys.readouterr().err


def assert_one_line_error(argv: Sequence[str], capsys: pytest.CaptureFixture[str], *match: str):
    """Exit status 2, exactly one stderr line ``sparse-sinkhorn...: error: ...`` (no usage
    block, no traceback, no log lines), and every ``match`` in it."""
    code, err = run_cli(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (argv, code, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("sparse-sinkhorn") and ": error: " in lines[0], err
    for text in match:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def read_only_bind_works(directory: Path) -> bool:
    """Whether this machine lets a user namespace bind-mount ``directory`` read-only (root
    ignores file modes, so a read-only mount is the honest way to refuse writes)."""
    try:
        done = subprocess.run(
            ["unshare", "-rm", "sh", "-c", f"mount --bind {directory} {directory} && "
             f"mount -o remount,bind,ro {directory} && ! touch {directory}/probe"],
            capture_output=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def run_figures(runs: list[dict]) -> list[dict]:
    """A results file's per-run records without what differs between two identical runs:
    the paths of their figures (they name the output directory) and their peak memory (a
    measurement of the process, like time)."""
    return [
        {k: v for k, v in run.items() if not k.endswith("_png") and k != "peak_mem_mb"}
        for run in runs
    ]
