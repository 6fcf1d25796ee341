"""The experiments' command-line flags and how they become values (``from . import flags``).

Rule: everything here reads or declares argparse flags and nothing else; a flag's value is
validated where it is read, so a bad flag is a one-line
[`UsageError`][sparse_sinkhorn.errors.UsageError]
before any data is loaded. The list of seeds is computed here only (`seed_list`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import UsageError
from ..nn import ATTENTION_KINDS


def parse_kinds(
    value: str,
    allowed: Sequence[str] = ATTENTION_KINDS,
    all_kinds: Sequence[str] | None = None,
    *,
    what: str = "attention kind",
) -> list[str]:
    """``"all"``, one name, or a comma-separated list -> list of names (validated)."""
    if value == "all":
        return list(all_kinds or allowed)
    kinds = [k.strip() for k in value.split(",") if k.strip()]
    bad = [k for k in kinds if k not in allowed]
    if bad or not kinds:
        raise UsageError(
            f"unknown {what} {', '.join(bad) or value!r}; choose from {', '.join(allowed)} or 'all'"
        )
    return kinds


def seed_arg(text: str) -> int:
    """An argparse ``type``: a seed in ``[0, 2**31)`` (derived seeds must fit every RNG)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value < 2**31:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**31), got {value}")
    return value


def out_dir_arg(text: str) -> str:
    """An argparse ``type``: ``--out`` names a directory (an empty one would write into the
    current directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            f"must name a directory, got {text!r}; pass --out . to write into the current one"
        )
    return text


def add_common_args(parser: argparse.ArgumentParser, *, default_out: str) -> None:
    """Flags every experiment takes."""
    parser.add_argument(
        "--preset",
        default="cpu",
        choices=("cpu", "paper"),
        help="cpu: minutes on a laptop-class CPU (default); paper: the paper's sizes",
    )
    parser.add_argument(
        "--out",
        type=out_dir_arg,
        default=default_out,
        # the text, not %(default)s: an experiment whose directory follows from other flags
        # ("runs/recall-<task>") parses to None and derives it
        help=f"output directory (default: {default_out})",
    )
    parser.add_argument("--steps", type=int, default=None, help="override the preset's steps")
    parser.add_argument("--seed", type=seed_arg, default=0, help="random seed (default: 0)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--resume",
        action="store_true",
        help="continue each run from its latest checkpoint in --out",
    )
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="delete earlier runs of the same attention kinds in --out first",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_attention_arg(
    parser: argparse.ArgumentParser,
    kinds: Sequence[str],
    defaults: Sequence[str] | None = None,
    *,
    help: str | None = None,
) -> None:
    """``--attention``: one of ``kinds``, a comma list, or ``all`` (= ``defaults`` when given,
    else every kind); ``help`` replaces the generated help text."""
    default = f"(= {', '.join(defaults)}; default)" if defaults else "(default)"
    parser.add_argument(
        "--attention",
        default="all",
        help=help or f"one of {', '.join(kinds)}, a comma list, or 'all' {default}",
    )


@dataclass(frozen=True)
class Override:
    """An optional positive-int flag that overrides one preset field. An experiment lists
    its own as ``OVERRIDES = {field: Override(flag, help)}``; `add_override_flags` declares
    them and `positive_overrides` reads them."""

    flag: str  # e.g. "--block-size"
    help: str = ""  # empty for the flags every experiment declares (`DECLARED`)
    former: str | None = None  # the flag's former name, still accepted with a warning

    @property
    def dest(self) -> str:
        """The parsed attribute: ``--block-size`` -> ``block_size``."""
        return self.flag.removeprefix("--").replace("-", "_")


STEPS = Override("--steps")  # declared by add_common_args
SEEDS = Override("--seeds")  # declared by add_grid_args
BLOCK_SIZE = Override("--block-size", "override the block size")
BATCH_SIZE = Override("--batch-size", "override the batch size")
DECLARED = (STEPS.flag, SEEDS.flag)


class _FormerFlag(argparse.Action):
    """A flag's former name: stores into the current flag's ``dest`` and says on stderr that
    the flag is renamed (as argparse says of a deprecated option)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        current = "--" + self.dest.replace("_", "-")
        print(
            f"{parser.prog}: warning: {option_string} is renamed {current}; the former name "
            "will be removed",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def add_override_flags(parser: argparse.ArgumentParser, overrides: Mapping[str, Override]) -> None:
    """Declare the override flags (``None`` when not given) but those in `DECLARED`, and
    the former name of a renamed one (left out of ``--help``)."""
    for override in overrides.values():
        if override.flag not in DECLARED:
            parser.add_argument(override.flag, type=int, default=None, help=override.help)
        if override.former is not None:
            parser.add_argument(
                override.former,
                type=int,
                dest=override.dest,
                default=None,
                help=argparse.SUPPRESS,
                action=_FormerFlag,
            )


def add_grid_args(parser: argparse.ArgumentParser, *, default_seeds: int | str = 1) -> None:
    """``--seeds`` and ``--jobs``: how many seeds per name, how many runs at once."""
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="train each with this many seeds (--seed, --seed+1, ...) and report "
        f"mean ± std (default: {default_seeds})",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="train this many runs at once in worker processes of one thread each "
        "(one process per CPU core suits the cpu preset; default: 1)",
    )


def positive_overrides(
    args: argparse.Namespace, overrides: Mapping[str, Override]
) -> dict[str, int]:
    """The preset fields the user overrode: ``{field: Override}`` -> ``{field: value}``.

    Every override flag is an optional positive int; ``<= 0`` is a one-line error.
    """
    changes: dict[str, int] = {}
    for field, override in overrides.items():
        value = getattr(args, override.dest)
        if value is None:
            continue
        if value <= 0:
            raise UsageError(f"{override.flag} must be > 0, got {value}")
        changes[field] = value
    return changes


def seed_list(args: argparse.Namespace, default: int = 1) -> list[int]:
    """The seeds of every name of a grid: ``--seed, --seed + 1, ...``, ``--seeds`` of them
    (``default`` when not given: 1, or the experiment's preset count)."""
    n = default if args.seeds is None else args.seeds
    if n <= 0:
        raise UsageError(f"--seeds must be > 0, got {n}")
    return [args.seed + i for i in range(n)]
