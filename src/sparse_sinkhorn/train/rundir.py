"""Run directories: one writer at a time, checks before anything is touched, and replacing a
run only once the new one is about to start.

* `run_lock` / `hold_run_lock`: an exclusive ``fcntl.flock`` on the directory
  itself (``<dir>/.lock`` holds the owner's pid, for messages; deleting it frees nothing).
  The kernel drops the lock when its process dies (even by SIGKILL), so a lock left by a dead
  process is never mistaken for a live writer; a second live writer gets `RunLockedError`.
  Locks are re-entrant within one process (the experiment that checks a run dir and the
  [`train`][sparse_sinkhorn.train.train] call that writes it share one lock).
* `check_writable`: ``--out`` is a directory (or can become one) this process may write.
* `allow_overwrite`: mark a run dir whose previous run may be replaced; ``train()``
  removes the old checkpoints only when the new run actually starts (after its data, model
  and config were built), so a run that fails before that leaves the old one intact.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import SparseSinkhornError

LOCK_FILE = ".lock"

# path -> (fd, depth); the fd keeps the flock for as long as it is open.
_HELD: dict[Path, list[int]] = {}
_OVERWRITE: set[Path] = set()


class RunLockedError(SparseSinkhornError, RuntimeError):
    """Another live process is writing the same run directory."""


def _key(path: Path) -> Path:
    return Path(os.path.abspath(path))


def check_writable(path: str | Path, what: str = "--out") -> Path:
    """``path`` is a directory, or can be created as one, that this process may write in.

    Raises ``NotADirectoryError`` / ``PermissionError`` naming ``what`` (a one-line CLI error).
    Nothing is created.
    """
    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise NotADirectoryError(
            errno.ENOTDIR, f"{what} {path}: {probe} is a file, not a directory", str(probe)
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"{what} {path}: {probe} is not writable", str(probe))
    return path


def _acquire(directory: Path) -> None:
    import fcntl

    key = _key(directory)
    if key in _HELD:
        _HELD[key][1] += 1
        return
    directory.mkdir(parents=True, exist_ok=True)
    # The lock is on the directory itself: deleting or replacing ``.lock`` cannot free it
    # (a lock on the file alone would let a second writer lock a fresh file of that name).
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise
        except OSError:  # no flock on directories here (NFS): lock the file, as a fallback
            os.close(dir_fd)
            dir_fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(dir_fd)
        try:
            owner = (directory / LOCK_FILE).read_text("ascii", "replace").strip() or "?"
        except OSError:
            owner = "?"
        raise RunLockedError(
            f"{directory} is being written by another process (pid {owner}); wait for it to "
            "finish or choose another --out"
        ) from None
    except BaseException:
        os.close(dir_fd)
        raise
    try:  # the owner's pid, for the message above; its presence marks a run that began
        fd = os.open(directory / LOCK_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)
    except BaseException:
        os.close(dir_fd)  # drops the flock
        raise
    _HELD[key] = [dir_fd, 1]


def _release(directory: Path) -> None:
    key = _key(directory)
    entry = _HELD.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        del _HELD[key]
        os.close(entry[0])  # drops the flock


@contextmanager
def run_lock(directory: str | Path) -> Iterator[None]:
    """Hold the exclusive lock of ``directory`` (created if needed) for the ``with`` block."""
    path = Path(directory)
    _acquire(path)
    try:
        yield
    finally:
        _release(path)


def hold_run_lock(directory: str | Path) -> None:
    """Take the lock of ``directory`` for the rest of this process (released at exit)."""
    _acquire(Path(directory))


def allow_overwrite(directory: str | Path) -> None:
    """Let the next fresh ``train()`` into ``directory`` replace the run already there."""
    _OVERWRITE.add(_key(Path(directory)))


def take_overwrite(directory: str | Path) -> bool:
    """Whether ``directory`` was marked by `allow_overwrite` (the mark is consumed)."""
    key = _key(Path(directory))
    if key in _OVERWRITE:
        _OVERWRITE.discard(key)
        return True
    return False
