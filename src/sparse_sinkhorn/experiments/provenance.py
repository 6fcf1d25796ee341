"""Where a result file came from: the command line, the source tree's git commit, when it was
written and how long the invocation took (`provenance`, recorded in every ``results.json``).
Light on purpose (no torch): the CLI notes its arguments here before any subcommand runs."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The command line, start and source tree of this invocation, as `begin_invocation` noted
# them (the CLI does; otherwise this process's arguments, from this module's import, and the
# tree as `provenance` finds it).
_INVOCATION: dict[str, Any] = {"argv": None, "started": time.monotonic(), "git": None}

# Variables that point git at another repository than the one holding this package's files.
_GIT_LOCATION = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_COMMON_DIR")


def begin_invocation(argv: Sequence[str], program: Sequence[str] = ("sparse-sinkhorn",)) -> None:
    """Note the arguments of ``program`` (the CLI; a script: ``("python", path)``), the start
    time and the source tree's git state (the code this invocation imported: a commit made
    while a long grid trains is not it)."""
    _INVOCATION.update(argv=[*program, *argv], started=time.monotonic(), git=None)
    _INVOCATION["git"] = _git_state()


def _git(*args: str) -> str:
    """``git args`` in this package's source folder: its output (raises when that fails).
    Takes no optional lock (a concurrent ``git commit`` is not disturbed)."""
    here = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if k not in _GIT_LOCATION}
    done = subprocess.run(
        ["git", "--no-optional-locks", *args],
        cwd=here,
        env=env,
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return done.stdout


def _git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout tracking this package's files; (None, None) when they
    are not tracked (a wheel, even inside another repository), git is missing or fails."""
    try:
        _git("ls-files", "--error-unmatch", Path(__file__).name)  # this file, not a venv's
        commit = _git("rev-parse", "HEAD").strip()
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, dirty


def provenance() -> dict[str, Any]:
    """How a result was made: the command line, the source tree's git commit (``None``
    unless this package's own files are tracked in a git checkout, as in an editable install;
    ``git_dirty`` when tracked files differed from that commit) when the invocation began,
    and ``git_commit_at_write`` when the checkout had moved to another commit by the time
    the file was written; the time it was written (UTC) and this invocation's wall time in
    seconds (a resumed or merged grid counts only the invocation that wrote the file)."""
    started = _INVOCATION["git"]
    commit, dirty = started if started is not None else _git_state()
    argv = _INVOCATION["argv"] or [Path(sys.argv[0]).name, *sys.argv[1:]]
    record: dict[str, Any] = {
        "command": shlex.join(argv),
        "git_commit": commit,
        "git_dirty": dirty,
    }
    if started is not None and commit is not None:
        now, _ = _git_state()
        if now is not None and now != commit:
            record["git_commit_at_write"] = now
    record["written_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record["wall_seconds"] = round(time.monotonic() - _INVOCATION["started"], 1)
    return record
