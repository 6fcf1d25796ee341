"""Known datasets and where they live on disk.

The data directory is, in order of precedence: an explicit ``data_dir`` argument (the CLI's
``--data-dir``), the ``SPARSE_SINKHORN_DATA`` environment variable, or
``~/.cache/sparse-sinkhorn/data``. Each dataset occupies ``<data_dir>/<name>/`` and, once fetched,
carries a ``manifest.json`` describing its source, files (bytes + sha256) and example counts.

Layout (what ``sparse-sinkhorn data fetch NAME`` writes)::

    shakespeare/{train,valid,test}/<play>.txt    plain text, one file per play (split by play)
    fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
    mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
    cifar10/cifar-10-batches-py/{data_batch_1..5,test_batch}   (official python pickles)
    imdb/{train,test}.jsonl                      {"text": str, "label": 0|1}
    mr/{train,test}.jsonl                        {"text": str, "label": 0|1}
    snli/snli_1.0_{train,test}.jsonl             SNLI jsonl (sentence1/2, gold_label)
    mnli/multinli_1.0_{train,dev_matched,dev_mismatched}.jsonl
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SparseSinkhornError

ENV_VAR = "SPARSE_SINKHORN_DATA"
DEFAULT_DATA_DIR = Path("~/.cache/sparse-sinkhorn/data")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of one dataset (no I/O)."""

    name: str  # directory name under the data dir and the CLI name
    description: str  # one line for ``data list``
    files: tuple[str, ...]  # paths (relative to the dataset dir) whose presence means "present"
    fetchable_here: bool  # False: only the canonical URL can provide it (no registry copy)
    put_hint: str = ""  # where to place the standard files by hand when fetch cannot

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"dataset name must be a plain directory name, got {self.name!r}")
        if not self.files:
            raise ValueError(f"dataset {self.name!r} must list at least one expected file")


def _idx_files() -> tuple[str, ...]:
    return tuple(
        f"{split}-{kind}-ubyte.gz"
        for split in ("train", "t10k")
        for kind in ("images-idx3", "labels-idx1")
    )


CIFAR10_BATCHES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
MNLI_FILES = tuple(f"multinli_1.0_{s}.jsonl" for s in ("train", "dev_matched", "dev_mismatched"))

DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "shakespeare",
            "Shakespeare, 38 plays as plain text, split by play (char/word LM)",
            ("train", "valid", "test"),
            fetchable_here=True,
        ),
        DatasetInfo(
            "fashion-mnist",
            "Fashion-MNIST 28x28 grey images, 60k train + 10k test (IDX)",
            _idx_files(),
            fetchable_here=True,
        ),
        DatasetInfo(
            "mnist",
            "MNIST digits (IDX); full 60k+10k from the canonical mirror, else a 5k subset",
            _idx_files(),
            fetchable_here=True,
        ),
        DatasetInfo(
            "cifar10",
            "CIFAR-10 32x32 colour images, python pickles",
            tuple(f"cifar-10-batches-py/{b}" for b in CIFAR10_BATCHES),
            fetchable_here=False,
            put_hint="extract cifar-10-python.tar.gz so that {dir}/cifar-10-batches-py/"
            "data_batch_1..5 and test_batch exist",
        ),
        DatasetInfo(
            "imdb",
            "IMDb movie reviews, binary sentiment (jsonl)",
            ("train.jsonl", "test.jsonl"),
            fetchable_here=True,
        ),
        DatasetInfo(
            "mr",
            "Rotten Tomatoes sentence polarity (MR), binary sentiment (jsonl)",
            ("train.jsonl", "test.jsonl"),
            fetchable_here=True,
        ),
        DatasetInfo(
            "snli",
            "SNLI 1.0 natural language inference (jsonl)",
            ("snli_1.0_train.jsonl", "snli_1.0_test.jsonl"),
            fetchable_here=True,
        ),
        DatasetInfo(
            "mnli",
            "MultiNLI 1.0 natural language inference (jsonl)",
            MNLI_FILES[:2],
            fetchable_here=False,
            put_hint="extract multinli_1.0.zip so that {dir}/multinli_1.0_train.jsonl, "
            "multinli_1.0_dev_matched.jsonl and multinli_1.0_dev_mismatched.jsonl exist",
        ),
    )
}


class DatasetNotFoundError(SparseSinkhornError, FileNotFoundError):
    """A dataset is missing from the data directory; the message names the fetch command."""


def get_info(name: str) -> DatasetInfo:
    """The `DatasetInfo` for ``name``; ``ValueError`` listing known names otherwise."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(
            f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}"
        ) from None


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data directory: ``data_dir`` > ``$SPARSE_SINKHORN_DATA`` > ``~/.cache/...``."""
    if data_dir is not None:
        root = Path(data_dir).expanduser()
    else:
        env = os.environ.get(ENV_VAR)
        root = Path(env).expanduser() if env else DEFAULT_DATA_DIR.expanduser()
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(
            errno.ENOTDIR, f"the data directory {root} is a file, not a directory", str(root)
        )
    return root


def is_present(name: str, data_dir: str | os.PathLike[str] | None = None) -> bool:
    """True when every expected file of ``name`` exists under the data directory."""
    info = get_info(name)
    root = resolve_data_dir(data_dir) / name
    return all((root / f).exists() for f in info.files)


def dataset_dir(name: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """``<data_dir>/<name>``, raising `DatasetNotFoundError` if it is not there."""
    info = get_info(name)
    base = resolve_data_dir(data_dir)
    root = base / name
    if not is_present(name, base):
        missing = [f for f in info.files if not (root / f).exists()]
        msg = (
            f"dataset {name!r} not found in {base} (missing under {root}: "
            f"{', '.join(missing)}); run: sparse-sinkhorn data fetch {name}"
        )
        if data_dir is not None:
            msg += f" --data-dir {base}"
        if info.put_hint:
            msg += f" (or {info.put_hint.format(dir=root)})"
        raise DatasetNotFoundError(msg)
    return root


def read_manifest(root: Path) -> dict[str, Any] | None:
    """The parsed ``manifest.json`` in a dataset directory, or None when absent."""
    path = root / MANIFEST
    if not path.is_file():
        return None
    with path.open(encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


def dir_size(root: Path) -> int:
    """Total bytes of regular files below ``root`` (0 when it does not exist)."""
    if not root.exists():
        return 0
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
