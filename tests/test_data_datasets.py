"""Torch datasets and padding collate functions."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from sparse_sinkhorn.data import (
    ImageTokens,
    PairClassification,
    TextClassification,
    TokenWindows,
    collate,
    collate_pairs,
)


def test_token_windows_next_token_targets() -> None:
    ds = TokenWindows(torch.arange(10), seq_len=3)
    assert len(ds) == 3  # windows start at 0, 3, 6; each needs 4 tokens
    x, y = ds[1]
    assert x.tolist() == [3, 4, 5] and y.tolist() == [4, 5, 6]
    assert x.dtype == torch.long
    overlapping = TokenWindows(list(range(10)), seq_len=3, stride=1)
    assert len(overlapping) == 7
    assert overlapping[-1][1].tolist() == [7, 8, 9]
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(ValueError, match="seq_len \\+ 1 = 11"):
        TokenWindows(torch.arange(10), seq_len=10)


def test_image_tokens_grey_and_cifar_order() -> None:
    grey = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3)
    ds = ImageTokens(grey, labels=np.array([4, 5]))
    assert len(ds) == 2 and ds.seq_len == 6
    assert ds[1].tolist() == [6, 7, 8, 9, 10, 11] and ds[1].dtype == torch.long
    assert ds.labels is not None and ds.labels.tolist() == [4, 5]
    rgb = np.zeros((1, 2, 2, 3), dtype=np.uint8)
    rgb[0, 0, 1] = [10, 20, 30]  # pixel (row 0, col 1)
    seq = ImageTokens(rgb)[0]
    assert seq.shape == (12,)
    assert seq[3:6].tolist() == [10, 20, 30]  # channels interleaved per pixel, raster order
    with pytest.raises(ValueError, match="uint8"):
        ImageTokens(np.zeros((1, 2, 2), dtype=np.float32))


def test_collate_pads_and_masks() -> None:
    ds = TextClassification([[5, 6, 7], [8], [9, 10, 11, 12, 13]], [1, 0, 1], max_tokens=4)
    ids, mask, labels = collate([ds[0], ds[1], ds[2]])
    assert ids.shape == mask.shape == (3, 4)
    assert ids.tolist() == [[5, 6, 7, 0], [8, 0, 0, 0], [9, 10, 11, 12]]
    assert mask.dtype == torch.bool
    assert mask.tolist() == [
        [True, True, True, False],
        [True, False, False, False],
        [True, True, True, True],
    ]
    assert labels.tolist() == [1, 0, 1]
    ids, mask, _ = collate([ds[1]], pad_id=3)
    assert ids.tolist() == [[8]] and mask.all()


def test_collate_in_dataloader_custom_pad() -> None:
    ds = TextClassification([[1], [2, 2]], [0, 1])
    loader = DataLoader(ds, batch_size=2, collate_fn=partial(collate, pad_id=99))
    ids, mask, _ = next(iter(loader))
    assert ids.tolist() == [[1, 99], [2, 2]]
    assert (ids != 99).eq(mask).all()


def test_max_len_is_the_former_name_of_max_tokens() -> None:
    """``max_len=`` still truncates as ``max_tokens=`` does, with a DeprecationWarning; an
    unknown keyword is a TypeError."""
    texts, labels = [[5, 6, 7], [8]], [1, 0]
    with pytest.warns(DeprecationWarning, match="max_len= is renamed max_tokens="):
        old = TextClassification(texts, labels, max_len=2)
    assert [t.tolist() for t in old.ids] == [[5, 6], [8]]
    with pytest.warns(DeprecationWarning, match="PairClassification: max_len="):
        pair = PairClassification([[5, 6]], [[8, 9]], [1], cls_id=2, sep_id=3, max_len=4)
    assert pair[0][0].tolist() == [2, 5, 6, 3]
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_length'"):
        TextClassification(texts, labels, max_length=2)


def test_pair_concat_encoding() -> None:
    ds = PairClassification([[5, 6], [7]], [[8], [9, 10, 11]], [2, 0], cls_id=2, sep_id=3)
    ids, seg, label = ds[0]
    assert ids.tolist() == [2, 5, 6, 3, 8]
    assert seg.tolist() == [0, 0, 0, 0, 1]
    assert label == 2
    ids, mask, labels, segments = collate_pairs([ds[0], ds[1]])
    assert ids.tolist() == [[2, 5, 6, 3, 8, 0], [2, 7, 3, 9, 10, 11]]
    assert mask.sum(1).tolist() == [5, 6]
    assert segments.tolist() == [[0, 0, 0, 0, 1, 0], [0, 0, 0, 1, 1, 1]]
    assert labels.tolist() == [2, 0]
    short = PairClassification([[5, 6]], [[8, 9]], [1], cls_id=2, sep_id=3, max_tokens=4)
    assert short[0][0].tolist() == [2, 5, 6, 3]


def test_pair_separate_encoding() -> None:
    ds = PairClassification([[5, 6], [7]], [[8], [9, 10, 11]], [1, 0], encoding="separate")
    p, h, y = ds[1]
    assert p.tolist() == [7] and h.tolist() == [9, 10, 11] and y == 0
    p_ids, p_mask, h_ids, h_mask, labels = collate_pairs([ds[0], ds[1]], encoding="separate")
    assert p_ids.shape == (2, 2) and h_ids.shape == (2, 3)
    assert p_mask.tolist() == [[True, True], [True, False]]
    assert h_mask.tolist() == [[True, False, False], [True, True, True]]
    assert labels.tolist() == [1, 0]


def test_pair_errors_name_values() -> None:
    with pytest.raises(ValueError, match="cls_id and sep_id"):
        PairClassification([[1]], [[2]], [0])
    with pytest.raises(ValueError, match="'stacked'"):
        PairClassification([[1]], [[2]], [0], encoding="stacked")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2 labels"):
        TextClassification([[1]], [0, 1])
