"""The ``sparse-sinkhorn`` console script.

Each subcommand lives in its own module and registers itself through a function
``add_subparser(subparsers) -> None`` that sets ``func`` (a callable taking the parsed
``argparse.Namespace`` and returning an exit code) as a default on its parser.
Errors about the user's input, files or data (a corrupt checkpoint, a checkpoint from
another config, a dataset not fetched yet) are printed as one line and exit with status 2;
set ``SPARSE_SINKHORN_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# Every module that adds subcommands; each defines ``add_subparser``.
_COMMANDS: tuple[str, ...] = (
    "sparse_sinkhorn.experiments.sorting",
    "sparse_sinkhorn.experiments.lm",
    "sparse_sinkhorn.experiments.image",
    "sparse_sinkhorn.experiments.classify",
    "sparse_sinkhorn.experiments.generate",
    "sparse_sinkhorn.data.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    from .data.fetch import FetchError
    from .data.registry import DatasetNotFoundError
    from .train.checkpoint import CheckpointError, ConfigMismatchError

    return (CheckpointError, ConfigMismatchError, DatasetNotFoundError, FetchError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except _user_errors() as err:
        if os.environ.get("SPARSE_SINKHORN_DEBUG"):
            raise
        print(f"sparse-sinkhorn: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
