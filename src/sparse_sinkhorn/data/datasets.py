"""Map-style, deterministic torch datasets and the padding collate functions.

Axis legend: N examples (or tokens), L sequence length, B batch, H height, W width, C channels.

* `TokenWindows`: LM windows ``(inputs, targets)`` cut from one token stream.
* `ImageTokens`: images as sequences of 256-level pixel tokens.
* `TextClassification`: variable-length ``(ids, label)``; batch with `collate`.
* `PairClassification`: NLI pairs, encoded as ``[CLS] premise [SEP] hypothesis`` with
  segment ids (``encoding="concat"``) or as two separate sequences (``encoding="separate"``);
  batch with `collate_pairs`.

Padding masks follow the library convention: bool, ``True`` = real token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..renamed import renamed_keywords


class TokenWindows(Dataset[tuple[Tensor, Tensor]]):
    """Fixed windows of ``seq_len + 1`` tokens from a 1-D stream, for next-token prediction.

    Window ``i`` covers ``tokens[i*stride : i*stride + seq_len + 1]`` and is returned as
    ``(inputs, targets) = (window[:-1], window[1:])``, both LongTensor ``(seq_len,)``. The default
    ``stride = seq_len`` tiles the stream without overlap; a trailing partial window is dropped.
    """

    def __init__(self, tokens: Tensor | Sequence[int], seq_len: int, stride: int | None = None):
        stream = torch.as_tensor(tokens, dtype=torch.long)
        if stream.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(stream.shape)}")
        stride = seq_len if stride is None else stride
        if seq_len < 1 or stride < 1:
            raise ValueError(f"seq_len and stride must be >= 1, got {seq_len} and {stride}")
        if stream.numel() < seq_len + 1:
            raise ValueError(
                f"need at least seq_len + 1 = {seq_len + 1} tokens, got {stream.numel()}"
            )
        self.tokens = stream
        self.seq_len = seq_len
        self.stride = stride

    def __len__(self) -> int:
        return (self.tokens.numel() - (self.seq_len + 1)) // self.stride + 1

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        start = (index % len(self)) * self.stride
        window = self.tokens[start : start + self.seq_len + 1]  # (L + 1,)
        return window[:-1], window[1:]


class ImageTokens(Dataset[Tensor]):
    """uint8 images as pixel-token sequences (values 0..255 are the token ids).

    ``images`` is ``(N, H, W)`` (grey) or ``(N, H, W, C)`` (channels last, e.g. the CIFAR loader's
    output). Item ``i`` is a LongTensor ``(H*W*C,)`` in raster order, row by row, left to right,
    with the channels of each pixel interleaved: ``R G B R G B ...``. A 32x32 CIFAR image thus
    gives 3072 sub-pixel tokens; ``labels`` (if given) are kept in ``self.labels``.
    """

    def __init__(self, images: np.ndarray | Tensor, labels: np.ndarray | Tensor | None = None):
        arr = torch.as_tensor(np.asarray(images))
        if arr.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (256 levels), got {arr.dtype}")
        if arr.ndim not in (3, 4):
            raise ValueError(f"images must be (N, H, W) or (N, H, W, C), got {tuple(arr.shape)}")
        self.image_shape = tuple(arr.shape[1:])
        self.pixels = arr.reshape(arr.shape[0], -1).contiguous()  # (N, H*W*C), C fastest
        self.labels = None if labels is None else torch.as_tensor(np.asarray(labels)).long()
        if self.labels is not None and self.labels.shape[0] != self.pixels.shape[0]:
            raise ValueError(f"{self.pixels.shape[0]} images but {self.labels.shape[0]} labels")

    @property
    def seq_len(self) -> int:
        return int(self.pixels.shape[1])

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    def __getitem__(self, index: int) -> Tensor:
        return self.pixels[index].long()  # (H*W*C,)


def _truncate(ids: Sequence[int], max_tokens: int | None) -> list[int]:
    return list(ids) if max_tokens is None else list(ids)[:max_tokens]


def _max_tokens(max_tokens: int | None, former: dict[str, Any], where: str) -> int | None:
    """``max_tokens``, or the value passed under its former name ``max_len`` (warned)."""
    return renamed_keywords(
        former, {"max_len": "max_tokens"}, where, strict=True, stacklevel=4
    ).get("max_tokens", max_tokens)


class TextClassification(Dataset[tuple[Tensor, int]]):
    """Token-id sequences with integer labels; item ``i`` is ``(ids LongTensor (L_i,), label)``.

    Sequences longer than ``max_tokens`` are truncated (keeping the start); ``max_len=`` is
    its former name, still accepted with a ``DeprecationWarning``.
    """

    def __init__(
        self,
        ids: Sequence[Sequence[int]],
        labels: Sequence[int],
        max_tokens: int | None = None,
        **former: Any,
    ):
        max_tokens = _max_tokens(max_tokens, former, "TextClassification")
        if len(ids) != len(labels):
            raise ValueError(f"{len(ids)} sequences but {len(labels)} labels")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
        self.ids = [torch.tensor(_truncate(s, max_tokens), dtype=torch.long) for s in ids]
        self.labels = [int(y) for y in labels]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.ids[index], self.labels[index]


PairEncoding = Literal["concat", "separate"]


class PairClassification(Dataset[tuple[Tensor, Tensor, int]]):
    """Sentence pairs (NLI) with labels; the model picks the encoding.

    * ``encoding="concat"``: item is ``(ids, segment_ids, label)`` with
      ``ids = [CLS] premise [SEP] hypothesis`` and ``segment_ids`` 0 for ``[CLS]``, the premise
      and its ``[SEP]``, 1 for the hypothesis. Needs ``cls_id`` and ``sep_id``. ``max_tokens``
      truncates the joined sequence.
    * ``encoding="separate"``: item is ``(premise_ids, hypothesis_ids, label)``, each truncated to
      ``max_tokens`` (for siamese encoders).

    ``max_len=`` is the former name of ``max_tokens``, still accepted with a
    ``DeprecationWarning``.
    """

    def __init__(
        self,
        premises: Sequence[Sequence[int]],
        hypotheses: Sequence[Sequence[int]],
        labels: Sequence[int],
        *,
        encoding: PairEncoding = "concat",
        cls_id: int | None = None,
        sep_id: int | None = None,
        max_tokens: int | None = None,
        **former: Any,
    ):
        max_tokens = _max_tokens(max_tokens, former, "PairClassification")
        if not len(premises) == len(hypotheses) == len(labels):
            raise ValueError(
                f"lengths differ: {len(premises)} premises, {len(hypotheses)} hypotheses, "
                f"{len(labels)} labels"
            )
        if encoding not in ("concat", "separate"):
            raise ValueError(f"encoding must be 'concat' or 'separate', got {encoding!r}")
        if encoding == "concat" and (cls_id is None or sep_id is None):
            raise ValueError(f"encoding='concat' needs cls_id and sep_id, got {cls_id}, {sep_id}")
        self.encoding = encoding
        self.labels = [int(y) for y in labels]
        self.items: list[tuple[Tensor, Tensor]] = []
        for p, h in zip(premises, hypotheses, strict=True):
            if encoding == "concat":
                assert cls_id is not None and sep_id is not None  # validated above
                ids = [cls_id, *p, sep_id, *h]
                seg = [0] * (len(p) + 2) + [1] * len(h)
                first, second = _truncate(ids, max_tokens), _truncate(seg, max_tokens)
            else:
                first, second = _truncate(p, max_tokens), _truncate(h, max_tokens)
            self.items.append(
                (torch.tensor(first, dtype=torch.long), torch.tensor(second, dtype=torch.long))
            )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        first, second = self.items[index]
        return first, second, self.labels[index]


def pad_sequences(seqs: Sequence[Tensor], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Right-pad 1-D LongTensors to the batch maximum: ``(ids (B, L), mask (B, L) True=real)``."""
    if not seqs:
        raise ValueError("cannot pad an empty batch")
    length = max(max(int(s.numel()) for s in seqs), 1)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)  # (B, L)
    mask = torch.zeros((len(seqs), length), dtype=torch.bool)  # (B, L)
    for i, s in enumerate(seqs):
        ids[i, : s.numel()] = s
        mask[i, : s.numel()] = True
    return ids, mask


def collate(batch: Sequence[tuple[Tensor, int]], pad_id: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Batch `TextClassification` items.

    Returns ``(ids (B, L), key_padding_mask (B, L), labels (B,))``.

    Pads to the longest sequence in the batch; ``key_padding_mask`` is True on real tokens. For a
    ``pad_id`` other than 0 use ``functools.partial(collate, pad_id=...)``.
    """
    ids, mask = pad_sequences([item[0] for item in batch], pad_id)
    labels = torch.tensor([int(item[1]) for item in batch], dtype=torch.long)  # (B,)
    return ids, mask, labels


def collate_pairs(
    batch: Sequence[tuple[Tensor, Tensor, int]],
    pad_id: int = 0,
    encoding: PairEncoding = "concat",
) -> tuple[Tensor, ...]:
    """Batch `PairClassification` items; ``encoding`` must match the dataset's.

    * ``"concat"`` -> ``(ids, key_padding_mask, labels, segment_ids)``: ids, mask and segment ids
      ``(B, L)``, labels ``(B,)``; padded positions have segment id 0 and mask False.
    * ``"separate"`` -> ``(premise_ids, premise_mask, hypothesis_ids, hypothesis_mask, labels)``,
      each side padded to its own batch maximum.

    As a ``collate_fn``: ``functools.partial(collate_pairs, encoding="separate")``.
    """
    if encoding not in ("concat", "separate"):
        raise ValueError(f"encoding must be 'concat' or 'separate', got {encoding!r}")
    labels = torch.tensor([int(item[2]) for item in batch], dtype=torch.long)  # (B,)
    if encoding == "concat":
        ids, mask = pad_sequences([item[0] for item in batch], pad_id)
        segments, _ = pad_sequences([item[1] for item in batch], 0)
        return ids, mask, labels, segments
    p_ids, p_mask = pad_sequences([item[0] for item in batch], pad_id)
    h_ids, h_mask = pad_sequences([item[1] for item in batch], pad_id)
    return p_ids, p_mask, h_ids, h_mask, labels
