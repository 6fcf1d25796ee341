"""Plain-text corpora for language modelling, with their held-out splits.

`load_corpus` reads LM1B's layout, a directory with train/valid/test entries, or any
text file or directory of shards (split by lines in order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError


@dataclass(frozen=True)
class Corpus:
    name: str
    train: str
    valid: str
    test: str
    split: str  # how the held-out text was chosen (documented in results.json)


def _read_files(files: Sequence[Path], max_chars: int | None) -> str:
    parts: list[str] = []
    size = 0
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if max_chars is not None and size >= max_chars:
            break
    out = "\n".join(parts)
    return out if max_chars is None else out[:max_chars]


def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.name != "manifest.json"
    )
    if not files:
        raise UsageError(f"--corpus {path}: no text files in this directory")
    return files


def _named_split(root: Path, name: str) -> Path | None:
    for candidate in (root / name, root / f"{name}.txt"):
        if candidate.exists():
            return candidate
    return None


def load_corpus(path: str | Path, max_chars: int | None = None) -> Corpus:
    """A plain-text corpus and its held-out splits. Recognised layouts, in order:

    1. LM1B (``1-billion-word-language-modeling-benchmark-r13output``): training text from
       ``training-monolingual.tokenized.shuffled/``; test = held-out shard
       ``news.en.heldout-00000-of-00050`` (the usual test set), valid = shard ``00001``.
    2. A directory with ``train``, ``valid`` (or ``validation``) and ``test`` entries, each a
       file (``train.txt`` also works) or a directory of shards.
    3. Anything else (one file or a directory of shards): its lines in order, the first 90%
       for training, the next 5% valid, the last 5% test.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise UsageError(
            f"--corpus {root} does not exist; pass a plain-text file or a directory "
            "of text shards (e.g. LM1B's 1-billion-word-language-modeling-benchmark-r13output)"
        )
    lm1b = next(iter(sorted(root.rglob("training-monolingual.tokenized.shuffled"))), None)
    if lm1b is not None:
        held = lm1b.parent / "heldout-monolingual.tokenized.shuffled"
        test_f = held / "news.en.heldout-00000-of-00050"
        valid_f = held / "news.en.heldout-00001-of-00050"
        if not (test_f.is_file() and valid_f.is_file()):
            raise UsageError(f"LM1B held-out shards 00000/00001 not found in {held}")
        return Corpus(
            "lm1b",
            _read_files(_text_files(lm1b), max_chars),
            _read_files([valid_f], None),
            _read_files([test_f], None),
            "LM1B: valid = heldout-00001, test = heldout-00000",
        )
    if root.is_dir():
        parts = {n: _named_split(root, n) for n in ("train", "valid", "validation", "test")}
        valid = parts["valid"] or parts["validation"]
        if parts["train"] and valid and parts["test"]:
            return Corpus(
                root.name,
                _read_files(_text_files(parts["train"]), max_chars),
                _read_files(_text_files(valid), None),
                _read_files(_text_files(parts["test"]), None),
                "the corpus's own train/valid/test",
            )
    lines = _read_files(_text_files(root), None).splitlines(keepends=True)
    if len(lines) < 20:
        raise UsageError(
            f"--corpus {root} has {len(lines)} lines; need at least 20 to split "
            "90/5/5 into train/valid/test (or give train/valid/test files)"
        )
    a, b = len(lines) * 90 // 100, len(lines) * 95 // 100
    train_text = "".join(lines[:a])
    return Corpus(
        root.name,
        train_text if max_chars is None else train_text[:max_chars],
        "".join(lines[a:b]),
        "".join(lines[b:]),
        "lines in order: first 90% train, next 5% valid, last 5% test",
    )
