"""The ``sparse-sinkhorn`` console script.

Each subcommand lives in its own module and registers itself through a function
``add_subparser(subparsers) -> None`` that sets ``func`` (a callable taking the parsed
``argparse.Namespace`` and returning an exit code) as a default on its parser.
Errors about the user's input, files or data (a corrupt checkpoint, a checkpoint from
another config, a dataset not fetched yet), bad values (``ValueError``/``TypeError`` from the
library's checks), file-system failures (missing, unreadable or unwritable paths, a full disk:
``OSError``) and a subcommand's [`UsageError`][sparse_sinkhorn.errors.UsageError] are printed as one
line on stderr and exit with status 2; Ctrl-C (status 130) and SIGTERM (143) are one line too.
Set ``SPARSE_SINKHORN_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any, NoReturn

from .errors import SparseSinkhornError, UsageError

# Every module that adds subcommands; each defines ``add_subparser``.
_COMMANDS: tuple[str, ...] = (
    "sparse_sinkhorn.experiments.commands",
    "sparse_sinkhorn.generate",
    "sparse_sinkhorn.data.cli",
)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): ``prog: error: msg (see prog --help)``.

    Sub-parsers are built from the parent's class, so every subcommand gets it too.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sparse-sinkhorn",
        description="Sparse Sinkhorn Attention: the paper's experiments and tools.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is not None and name.startswith(err.name):
                continue  # that subcommand is not part of this build
            raise
        module.add_subparser(subparsers)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that describe a problem with the user's input, files or data: shown as one line."""
    import pickle

    return (
        SparseSinkhornError,  # every error type the library defines
        pickle.UnpicklingError,
        OSError,  # missing/unreadable/unwritable paths, a full disk, a read-only file system
        ValueError,  # the library's argument and file-content checks
        TypeError,
        MemoryError,
    )


def _missing_extra(err: ModuleNotFoundError) -> str | None:
    """The one-line message for a third-party package this install lacks (None: not that)."""
    name = (err.name or "").split(".")[0]
    if not name or name == "sparse_sinkhorn":
        return None
    return (
        f"the command needs the {name!r} package, which is not installed; install the "
        "extras it comes with: pip install 'sparse-sinkhorn[train,data]'"
    )


class ExitWithError(SystemExit):
    """A subcommand's [`UsageError`][sparse_sinkhorn.errors.UsageError] (or ``SystemExit("error:
    ...")``) after `main` printed it: exit status 2.

    ``str()`` is still the message (for callers and tests that match it).
    """

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def one_line(err: BaseException | str) -> str:
    """The message of an error as one line (an ``OSError`` as ``what: path``)."""
    if isinstance(err, OSError) and err.strerror:
        paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
        text = f"{err.strerror}: {' -> '.join(paths)}" if paths else err.strerror
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            text += " (the disk is full; files written before this one are intact)"
        elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            text += " (no permission to use this path; choose another --out or --data-dir)"
    elif isinstance(err, MemoryError):
        text = "out of memory" + (f" ({err})" if str(err) else "")
    else:
        text = str(err) or type(err).__name__
    text = " ".join(text.split())
    return text.removeprefix("error: ")


class Terminated(KeyboardInterrupt):
    """SIGTERM while a command runs: unwinds like Ctrl-C (workers stopped, locks released)."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated


def _interrupted(err: KeyboardInterrupt, args: argparse.Namespace) -> int:
    """The one line for Ctrl-C (exit status 130) or SIGTERM (143); an experiment's says how to
    continue."""
    what, code = ("terminated", 143) if isinstance(err, Terminated) else ("interrupted", 130)
    hint = "; pass --resume to continue from the latest checkpoints" if "resume" in args else ""
    print(f"sparse-sinkhorn: {what}{hint}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        return _main(argv)
    except ModuleNotFoundError as err:
        message = _missing_extra(err)
        if message is None or os.environ.get("SPARSE_SINKHORN_DEBUG"):
            raise
        print(f"sparse-sinkhorn: error: {message}", file=sys.stderr)
        return 2
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    from .experiments.provenance import begin_invocation

    begin_invocation(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as err:
        if os.environ.get("SPARSE_SINKHORN_DEBUG"):
            raise
        return _interrupted(err, args)
    except ExitWithError:
        raise
    except (UsageError, SystemExit) as err:
        message = str(err) if isinstance(err, UsageError) else err.code
        if not isinstance(message, str):
            raise
        if os.environ.get("SPARSE_SINKHORN_DEBUG"):
            raise
        print(f"sparse-sinkhorn: error: {one_line(message)}", file=sys.stderr)
        raise ExitWithError(message) from None
    except _user_errors() as err:
        if os.environ.get("SPARSE_SINKHORN_DEBUG"):
            raise
        print(f"sparse-sinkhorn: error: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
