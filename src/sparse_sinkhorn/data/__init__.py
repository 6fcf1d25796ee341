"""Datasets: standard-format readers, torch datasets, tokenisers and the fetch step.

Nothing here imports ``tokenizers`` at import time (see `tokenize`). The synthetic
sorting data lives in `sorting`. Datasets are read from the data directory
(``--data-dir`` > ``$SPARSE_SINKHORN_DATA`` > ``~/.cache/sparse-sinkhorn/data``), filled by
``sparse-sinkhorn data fetch NAME``.
"""

from __future__ import annotations

from .datasets import (
    ImageTokens,
    PairClassification,
    TextClassification,
    TokenWindows,
    collate,
    collate_pairs,
    pad_sequences,
)
from .image_formats import (
    RestrictedUnpickler,
    load_cifar10,
    load_idx_split,
    read_cifar_batch,
    read_idx,
    safe_pickle_load,
    write_idx,
)
from .load import load_images, load_nli, load_shakespeare, load_text_classification
from .registry import (
    DATASETS,
    DatasetInfo,
    DatasetNotFoundError,
    dataset_dir,
    is_present,
    resolve_data_dir,
)
from .text_formats import (
    NLI_LABELS,
    LabeledPairs,
    LabeledTexts,
    iter_lines,
    load_aclimdb,
    load_jsonl_classification,
    load_nli_jsonl,
    load_sst,
    parse_sst_tree,
    read_lines,
    read_text,
)
from .tokenize import Tokenizer, train_bpe, train_char_level, train_word_level

__all__ = [
    "DATASETS",
    "NLI_LABELS",
    "DatasetInfo",
    "DatasetNotFoundError",
    "ImageTokens",
    "LabeledPairs",
    "LabeledTexts",
    "PairClassification",
    "RestrictedUnpickler",
    "TextClassification",
    "TokenWindows",
    "Tokenizer",
    "collate",
    "collate_pairs",
    "dataset_dir",
    "is_present",
    "iter_lines",
    "load_aclimdb",
    "load_cifar10",
    "load_idx_split",
    "load_images",
    "load_jsonl_classification",
    "load_nli",
    "load_nli_jsonl",
    "load_shakespeare",
    "load_sst",
    "load_text_classification",
    "pad_sequences",
    "parse_sst_tree",
    "read_cifar_batch",
    "read_idx",
    "read_lines",
    "read_text",
    "resolve_data_dir",
    "safe_pickle_load",
    "train_bpe",
    "train_char_level",
    "train_word_level",
    "write_idx",
]
