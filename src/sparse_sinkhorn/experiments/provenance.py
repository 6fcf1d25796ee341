"""Where a result file came from: the command line, the source tree's git commit, when it was
written and how long the invocation took (`provenance`, recorded in every ``results.json``).
Light on purpose (no torch): the CLI notes its arguments here before any subcommand runs."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The command line and start of this invocation, as `begin_invocation` noted them (the CLI
# does; otherwise this process's arguments, from this module's import).
_INVOCATION: dict[str, Any] = {"argv": None, "started": time.monotonic()}


def begin_invocation(argv: Sequence[str]) -> None:
    """Note the ``sparse-sinkhorn`` arguments and the start time that `provenance` records."""
    _INVOCATION.update(argv=["sparse-sinkhorn", *argv], started=time.monotonic())


def _git(*args: str) -> str:
    """``git args`` in this package's source folder: its output (raises when that fails)."""
    here = Path(__file__).resolve().parent
    done = subprocess.run(
        ["git", *args], cwd=here, capture_output=True, text=True, timeout=10, check=True
    )
    return done.stdout


def provenance() -> dict[str, Any]:
    """How a result was made: the command line, the source tree's git commit (``None``
    unless this package's own files are tracked in a git checkout, as in an editable install;
    ``git_dirty`` when tracked files differ from that commit), the time it was written (UTC)
    and this invocation's wall time in seconds (a resumed or merged grid counts only the
    invocation that wrote the file)."""
    commit, dirty = None, None
    try:
        _git("ls-files", "--error-unmatch", Path(__file__).name)  # this file, not a venv's
        commit = _git("rev-parse", "HEAD").strip()
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError):
        pass
    argv = _INVOCATION["argv"] or [Path(sys.argv[0]).name, *sys.argv[1:]]
    return {
        "command": shlex.join(argv),
        "git_commit": commit,
        "git_dirty": dirty,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_seconds": round(time.monotonic() - _INVOCATION["started"], 1),
    }
