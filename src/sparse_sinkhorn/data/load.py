"""Load a fetched dataset by name from the data directory.

Every function raises `DatasetNotFoundError` (a
``FileNotFoundError``) naming ``sparse-sinkhorn data fetch NAME`` when the dataset is missing.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .image_formats import load_cifar10, load_idx_split
from .registry import dataset_dir
from .text_formats import (
    LabeledPairs,
    LabeledTexts,
    load_jsonl_classification,
    load_nli_jsonl,
    read_text,
)

PathLike = str | os.PathLike[str]

IMAGE_DATASETS = ("mnist", "fashion-mnist", "cifar10")
TEXT_CLASSIFICATION_DATASETS = ("imdb", "mr")
NLI_SPLITS: dict[str, tuple[str, ...]] = {
    "snli": ("train", "dev", "test"),
    "mnli": ("train", "dev_matched", "dev_mismatched"),
}


def _check_split(name: str, split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise ValueError(f"{name}: split must be one of {allowed}, got {split!r}")


def load_shakespeare(split: str = "train", data_dir: PathLike | None = None) -> str:
    """The plays of one split (``train``/``valid``/``test``) as one string, plays in name order."""
    _check_split("shakespeare", split, ("train", "valid", "test"))
    return read_text(dataset_dir("shakespeare", data_dir) / split, sep="\n")


def load_images(
    name: str, split: str = "train", data_dir: PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8, labels)`` for mnist / fashion-mnist ``(N, 28, 28)`` or cifar10
    ``(N, 32, 32, 3)`` (height, width, RGB); ``split`` is ``train`` or ``test``."""
    _check_split(name, split, ("train", "test"))
    if name not in IMAGE_DATASETS:
        raise ValueError(f"not an image dataset: {name!r}; choose from {IMAGE_DATASETS}")
    root = dataset_dir(name, data_dir)
    if name == "cifar10":
        return load_cifar10(root, split)
    return load_idx_split(root, split)


def load_text_classification(
    name: str,
    split: str = "train",
    data_dir: PathLike | None = None,
    *,
    strip_html: bool = True,
) -> LabeledTexts:
    """IMDb or MR texts with binary labels (0 negative, 1 positive).

    ``strip_html`` replaces the ``<br />`` tags of IMDb reviews with spaces.
    """
    if name not in TEXT_CLASSIFICATION_DATASETS:
        raise ValueError(
            f"not a text classification dataset: {name!r}; choose from "
            f"{TEXT_CLASSIFICATION_DATASETS}"
        )
    _check_split(name, split, ("train", "test"))
    data = load_jsonl_classification(dataset_dir(name, data_dir) / f"{split}.jsonl")
    if not strip_html:
        return data
    texts = [t.replace("<br />", " ").replace("<br/>", " ") for t in data.texts]
    return LabeledTexts(texts, data.labels)


def nli_path(name: str, split: str, data_dir: PathLike | None = None) -> Path:
    """Where the jsonl file of an SNLI/MNLI split lives (it may be missing)."""
    if name not in NLI_SPLITS:
        raise ValueError(f"not an NLI dataset: {name!r}; choose from {tuple(NLI_SPLITS)}")
    _check_split(name, split, NLI_SPLITS[name])
    prefix = "snli_1.0" if name == "snli" else "multinli_1.0"
    return dataset_dir(name, data_dir) / f"{prefix}_{split}.jsonl"


def load_nli(name: str, split: str = "train", data_dir: PathLike | None = None) -> LabeledPairs:
    """SNLI (``train``/``dev``/``test``) or MNLI (``train``/``dev_matched``/``dev_mismatched``)
    pairs, labels entailment/neutral/contradiction = 0/1/2, ``"-"`` rows dropped."""
    path = nli_path(name, split, data_dir)
    if not path.is_file():
        raise FileNotFoundError(
            f"{name} split {split!r} is not in {path.parent} (the registry copy of SNLI has only "
            "train and test); fetch the full dataset where its canonical URL is reachable"
        )
    return load_nli_jsonl(path)
