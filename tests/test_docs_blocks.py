"""Code blocks of Markdown files, and checks that the shell commands they show exist.

Shared by ``tests/test_readme.py`` and ``tests/test_docs.py``. A shell line is checked by what it
starts with: ``make T`` (T is a target of the Makefile), ``sparse-sinkhorn SUB --flag ...`` (SUB's
``--help`` lists every flag), ``python -m MODULE`` (the module exists), ``python FILE`` (the file
exists), ``pip install '.[extra]'`` (the extras exist in pyproject.toml). A line that starts with
anything else must be in ``OTHER_COMMANDS``, so a new kind of command gets a check of its own.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "sparse_sinkhorn.cli"]

# Commands checked only for being one of these (set-up and tools outside the project).
OTHER_COMMANDS = ("python3 -m venv", "git ", "cd ", "mkdocs ", "ruff ", "mypy", "pytest")


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the opening fence

    @property
    def id(self) -> str:
        return f"{self.lang}@{self.line}"


def blocks(path: Path, langs: tuple[str, ...]) -> list[Block]:
    """The fenced code blocks of ``path`` whose language is one of ``langs``."""
    out, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if m:
            start, body = i, []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            if m.group(1) in langs:
                out.append(Block(m.group(1), "\n".join(body) + "\n", start + 1))
        i += 1
    return out


def shell_commands(code: str) -> list[str]:
    """One command per line: comments dropped, ``a && b`` / ``a; b`` split, ``.venv/bin/`` and
    ``VAR=value`` prefixes removed."""
    out = []
    for raw in code.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        for part in re.split(r"&&|;", line):
            part = part.strip()
            part = re.sub(r"^(\w+=\S+\s+)+", "", part)
            part = re.sub(r"^(\.venv/bin/|\$\(VENV\)/bin/)", "", part)
            if part:
                out.append(part)
    return out


@functools.cache
def make_targets() -> frozenset[str]:
    text = (ROOT / "Makefile").read_text()
    return frozenset(re.findall(r"^([A-Za-z][\w-]*):", text, flags=re.M))


@functools.cache
def extras() -> frozenset[str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return frozenset(meta["project"]["optional-dependencies"])


@functools.cache
def cli_help(*words: str) -> str:
    proc = subprocess.run(
        [*CLI, *words, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, f"sparse-sinkhorn {' '.join(words)} --help: {proc.stderr}"
    return proc.stdout


def check_cli(args: list[str]) -> None:
    """``args`` after ``sparse-sinkhorn``: the subcommand exists and takes every flag shown."""
    assert args, "sparse-sinkhorn without a subcommand"
    words = [args[0]]
    if args[0] == "data":
        assert len(args) > 1 and args[1] in ("list", "fetch"), args
        words.append(args[1])
    assert f"\n    {args[0]}" in cli_help(), f"no subcommand {args[0]!r}"
    text = cli_help(*words)
    for flag in (a.split("=", 1)[0] for a in args if a.startswith("--")):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), (
            f"sparse-sinkhorn {' '.join(words)} has no flag {flag}"
        )


def check_command(cmd: str) -> None:
    """One shell command shown in the docs exists (see the module docstring)."""
    args = shlex.split(cmd)
    head = args[0]
    if head == "make":
        targets = [a for a in args[1:] if "=" not in a and not a.startswith("-")]
        assert targets, cmd
        for t in targets:
            assert t in make_targets(), f"no make target {t!r}: {cmd}"
    elif head == "sparse-sinkhorn":
        check_cli(args[1:])
    elif head == "torchrun":
        i = args.index("-m")
        assert args[i + 1] == "sparse_sinkhorn.cli", cmd
        check_cli(args[i + 2 :])
    elif head in ("python", "python3"):
        if args[1] == "-m":
            if args[2] in ("venv", "build", "pytest"):
                return
            assert importlib.util.find_spec(args[2]) is not None, f"no module {args[2]}: {cmd}"
        else:
            assert (ROOT / args[1]).is_file(), f"no file {args[1]}: {cmd}"
    elif head == "pip" or head.endswith("/pip"):
        assert args[1] == "install", cmd
        for a in args[2:]:
            m = re.fullmatch(r"(?:-e\s*)?\.\[([\w,-]+)\]", a)
            if m:
                for extra in m.group(1).split(","):
                    assert extra in extras(), f"no extra {extra!r}: {cmd}"
    else:
        assert cmd.startswith(OTHER_COMMANDS), f"unchecked kind of command: {cmd}"
