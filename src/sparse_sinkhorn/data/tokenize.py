"""Tokenisers built on HF ``tokenizers`` (imported lazily), wrapped in `Tokenizer`.

Every tokenizer made here has the same special tokens with the same ids::

    [PAD] = 0, [UNK] = 1, [CLS] = 2, [SEP] = 3

* `train_bpe`: byte-level BPE; ``decode(encode(s)) == s`` for any string.
* `train_word_level`: words and punctuation runs (``\\w+|[^\\w\\s]+``) seen at least
  ``min_freq`` times; others map to ``[UNK]``. Decoding joins tokens with single spaces, so it
  round-trips text whose tokens are in the vocabulary and separated by single spaces.
* `train_char_level`: every character of the training text; ``decode(encode(s)) == s``
  exactly for text made of those characters (unknown characters encode to ``[UNK]``, which
  decoding drops).

``Tokenizer.save(path)`` writes the standard ``tokenizer.json`` format, readable by
``Tokenizer.load(path)`` and by ``tokenizers.Tokenizer.from_file``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tokenizers

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
PAD, UNK, CLS, SEP = SPECIAL_TOKENS


class Tokenizer:
    """A thin wrapper: ``encode``/``decode``, ``vocab_size``, special ids, ``save``/``load``."""

    def __init__(self, backend: tokenizers.Tokenizer):
        self.backend = backend
        ids = []
        for tok in SPECIAL_TOKENS:
            index = backend.token_to_id(tok)
            if index is None:
                raise ValueError(f"tokenizer lacks the special token {tok}")
            ids.append(int(index))
        self.pad_id, self.unk_id, self.cls_id, self.sep_id = ids  # the special ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return list(self.backend.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts (parallel in the Rust backend)."""
        out = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [list(e.ids) for e in out]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text for ``ids``; special tokens (``[PAD]``, ``[UNK]``, ...) are dropped by default."""
        return str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, index: int) -> str | None:
        return self.backend.id_to_token(index)

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``tokenizer.json`` format (e.g. beside a checkpoint)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        from tokenizers import Tokenizer as Backend

        if not Path(path).is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        return cls(Backend.from_file(str(path)))

    def __repr__(self) -> str:
        model = type(self.backend.model).__name__
        return f"Tokenizer(model={model}, vocab_size={self.vocab_size})"


def _as_list(texts: Iterable[str] | str) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    return list(texts)


def train_bpe(texts: Iterable[str] | str, vocab_size: int, *, min_freq: int = 2) -> Tokenizer:
    """Byte-level BPE with ``vocab_size`` entries (including the 256 bytes and 4 specials)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    floor = 256 + len(SPECIAL_TOKENS)
    if vocab_size < floor:
        raise ValueError(f"byte-level BPE needs vocab_size >= {floor}, got {vocab_size}")
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_freq,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_as_list(texts), trainer)
    return Tokenizer(backend)


def train_word_level(
    texts: Iterable[str] | str,
    *,
    min_freq: int = 1,
    max_vocab: int | None = None,
    lowercase: bool = False,
) -> Tokenizer:
    """Word vocabulary of tokens seen ``>= min_freq`` times (the ``max_vocab`` most frequent)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    if min_freq < 1:
        raise ValueError(f"min_freq must be >= 1, got {min_freq}")
    backend = Backend(models.WordLevel(unk_token=UNK))
    if lowercase:
        backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(
        vocab_size=max_vocab if max_vocab is not None else 1 << 30,
        min_frequency=min_freq,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    backend.train_from_iterator(_as_list(texts), trainer)
    return Tokenizer(backend)


def train_char_level(texts: Iterable[str] | str) -> Tokenizer:
    """One token per character of the training text (plus the specials); exact round-trip."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.WordLevel(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # every char alone
    backend.decoder = decoders.Fuse()  # join without separators
    trainer = trainers.WordLevelTrainer(
        vocab_size=1 << 30,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    backend.train_from_iterator(_as_list(texts), trainer)
    return Tokenizer(backend)
