"""Readers for the standard on-disk text formats.

* plain-text corpora: one file, or a directory of files (read in sorted path order); LM1B-style
  shards are one sentence a line (`read_lines`).
* IMDb as distributed (Maas et al.): ``aclImdb/{train,test}/{pos,neg}/*.txt``.
* SST in the PTB tree format, one tree a line: ``(3 (2 It) (4 (2 's) (3 good)))``.
* classification jsonl: one ``{"text": str, "label": int}`` object a line (IMDb/MR here).
* SNLI/MNLI jsonl: ``sentence1``, ``sentence2``, ``gold_label``; pairs whose gold label is
  ``"-"`` (no annotator majority) are dropped.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

NLI_LABELS: dict[str, int] = {"entailment": 0, "neutral": 1, "contradiction": 2}


@dataclass(frozen=True)
class LabeledTexts:
    """Parallel lists of texts and integer labels."""

    texts: list[str]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class LabeledPairs:
    """Parallel lists of premises, hypotheses and labels (NLI: 0/1/2 = ent./neutral/contr.)."""

    premises: list[str]
    hypotheses: list[str]
    labels: list[int]

    def __post_init__(self) -> None:
        n = {len(self.premises), len(self.hypotheses), len(self.labels)}
        if len(n) != 1:
            raise ValueError(
                f"lengths differ: {len(self.premises)} premises, {len(self.hypotheses)} "
                f"hypotheses, {len(self.labels)} labels"
            )

    def __len__(self) -> int:
        return len(self.labels)


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise FileNotFoundError(f"no files in text corpus directory {path}")
        return files
    raise FileNotFoundError(f"text corpus {path} does not exist")


def read_text(path: str | os.PathLike[str], *, encoding: str = "utf-8", sep: str = "\n") -> str:
    """A plain-text corpus as one string: a file, or a directory's files joined with ``sep``."""
    return sep.join(p.read_text(encoding=encoding) for p in _files(Path(path)))


def iter_lines(path: str | os.PathLike[str], *, encoding: str = "utf-8") -> Iterator[str]:
    """Non-empty lines (trailing newline stripped) of a file or of a directory of shards."""
    for p in _files(Path(path)):
        with p.open(encoding=encoding) as fh:
            for line in fh:
                line = line.rstrip("\r\n")
                if line.strip():
                    yield line


def read_lines(path: str | os.PathLike[str], *, encoding: str = "utf-8") -> list[str]:
    """All non-empty lines of a one-sentence-a-line corpus (LM1B-style shards)."""
    return list(iter_lines(path, encoding=encoding))


def load_aclimdb(root: str | os.PathLike[str], split: str) -> LabeledTexts:
    """IMDb reviews from ``aclImdb/<split>/{neg,pos}/*.txt``; labels neg=0, pos=1.

    ``root`` is the ``aclImdb`` directory or its parent. Files are read in sorted order
    (all negatives, then all positives): shuffle in the DataLoader.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    base = Path(root)
    if (base / "aclImdb").is_dir():
        base = base / "aclImdb"
    texts: list[str] = []
    labels: list[int] = []
    for label, polarity in enumerate(("neg", "pos")):
        folder = base / split / polarity
        if not folder.is_dir():
            raise FileNotFoundError(f"IMDb folder {folder} does not exist")
        for f in sorted(folder.glob("*.txt")):
            texts.append(f.read_text(encoding="utf-8"))
            labels.append(label)
    return LabeledTexts(texts, labels)


_SST_LEAF = re.compile(r"\(\d+ ([^()\s]+)\)")
_SST_ROOT = re.compile(r"^\s*\((\d)\s")


def parse_sst_tree(line: str) -> tuple[str, int]:
    """One PTB-format SST tree -> ``(sentence, root label 0..4)``; leaves joined by spaces."""
    m = _SST_ROOT.match(line)
    if m is None or line.count("(") != line.count(")"):
        raise ValueError(f"not an SST tree line: {line[:80]!r}")
    words = _SST_LEAF.findall(line)
    if not words:
        raise ValueError(f"SST tree has no leaves: {line[:80]!r}")
    return " ".join(words), int(m.group(1))


def load_sst(path: str | os.PathLike[str], *, binary: bool = True) -> LabeledTexts:
    """SST trees file (``train.txt``/``dev.txt``/``test.txt``) -> sentences and root labels.

    ``binary=True`` (SST-2 convention) maps labels 0,1 -> 0 and 3,4 -> 1 and drops neutral (2);
    ``binary=False`` keeps the 5 fine-grained labels.
    """
    texts: list[str] = []
    labels: list[int] = []
    for line in iter_lines(path):
        text, label = parse_sst_tree(line)
        if binary:
            if label == 2:
                continue
            label = int(label > 2)
        texts.append(text)
        labels.append(label)
    return LabeledTexts(texts, labels)


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, object]]]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None


def load_jsonl_classification(
    path: str | os.PathLike[str], *, text_key: str = "text", label_key: str = "label"
) -> LabeledTexts:
    """A jsonl file of ``{"text": ..., "label": int}`` rows (the IMDb/MR files fetch writes)."""
    path = Path(path)
    texts: list[str] = []
    labels: list[int] = []
    for lineno, row in _iter_jsonl(path):
        text, label = row.get(text_key), row.get(label_key)
        if not isinstance(text, str) or isinstance(label, bool) or not isinstance(label, int):
            raise ValueError(
                f"{path}:{lineno}: need string {text_key!r} and int {label_key!r}, "
                f"got {type(text).__name__} and {label!r}"
            )
        texts.append(text)
        labels.append(label)
    return LabeledTexts(texts, labels)


def load_nli_jsonl(path: str | os.PathLike[str]) -> LabeledPairs:
    """SNLI/MNLI jsonl -> pairs with labels entailment/neutral/contradiction = 0/1/2.

    Rows whose ``gold_label`` is ``"-"`` (no majority among annotators) are dropped, as is
    standard; any other unknown label is an error.
    """
    path = Path(path)
    premises: list[str] = []
    hypotheses: list[str] = []
    labels: list[int] = []
    for lineno, row in _iter_jsonl(path):
        gold = row.get("gold_label")
        if gold == "-":
            continue
        if not isinstance(gold, str) or gold not in NLI_LABELS:
            raise ValueError(
                f"{path}:{lineno}: gold_label {gold!r} is not one of {sorted(NLI_LABELS)} or '-'"
            )
        s1, s2 = row.get("sentence1"), row.get("sentence2")
        if not isinstance(s1, str) or not isinstance(s2, str):
            raise ValueError(f"{path}:{lineno}: sentence1/sentence2 missing or not strings")
        premises.append(s1)
        hypotheses.append(s2)
        labels.append(NLI_LABELS[gold])
    return LabeledPairs(premises, hypotheses, labels)
