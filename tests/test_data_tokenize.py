"""Tokenisers: round trips, special ids, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparse_sinkhorn.data import Tokenizer, train_bpe, train_char_level, train_word_level

TEXT = (
    "To be, or not to be: that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "\tThe slings and arrows of outrageous fortune,  ünïcode ✓ 🙂\r\n"
)


def test_char_level_exact_round_trip(tmp_path: Path) -> None:
    tok = train_char_level(TEXT)
    ids = tok.encode(TEXT)
    assert len(ids) == len(TEXT)
    assert tok.decode(ids) == TEXT
    assert tok.vocab_size == len(set(TEXT)) + 4
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id) == (0, 1, 2, 3)
    assert tok.encode("Z") == [tok.unk_id]  # unseen character
    tok.save(tmp_path / "tok" / "tokenizer.json")
    again = Tokenizer.load(tmp_path / "tok" / "tokenizer.json")
    assert again.encode(TEXT) == ids and again.decode(ids) == TEXT


def test_bpe_round_trip(tmp_path: Path) -> None:
    corpus = [TEXT] * 20
    tok = train_bpe(corpus, vocab_size=300)
    assert tok.vocab_size <= 300 and tok.pad_id == 0
    ids = tok.encode(TEXT)
    assert len(ids) < len(TEXT.encode())  # merges were learned
    assert tok.decode(ids) == TEXT
    unseen = "Zebras quizzically vex 42 jumping koalas"
    assert tok.decode(tok.encode(unseen)) == unseen  # byte-level: no unknowns
    tok.save(tmp_path / "bpe.json")
    assert Tokenizer.load(tmp_path / "bpe.json").encode(TEXT) == ids
    with pytest.raises(ValueError, match="vocab_size >= 260"):
        train_bpe(corpus, vocab_size=100)


def test_word_level_vocab_and_unk(tmp_path: Path) -> None:
    texts = ["the cat sat on the mat .", "the dog sat ."]
    tok = train_word_level(texts, min_freq=2)
    known = "the sat ."
    assert tok.decode(tok.encode(known)) == known
    ids = tok.encode("the cat sat")
    assert ids[1] == tok.unk_id  # "cat" seen once < min_freq
    assert tok.vocab_size == 4 + 3  # specials + the, sat, .
    tok.save(tmp_path / "w.json")
    assert Tokenizer.load(tmp_path / "w.json").encode(known) == tok.encode(known)
    full = train_word_level(texts)
    sentence = "the dog sat on the mat ."
    assert full.decode(full.encode(sentence)) == sentence
    assert train_word_level(["The the"], lowercase=True).vocab_size == 5
    with pytest.raises(ValueError, match="min_freq must be >= 1, got 0"):
        train_word_level(texts, min_freq=0)


def test_batch_encode_and_missing_file(tmp_path: Path) -> None:
    tok = train_char_level("abc")
    assert tok.encode_batch(["ab", "c"]) == [tok.encode("ab"), tok.encode("c")]
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        Tokenizer.load(tmp_path / "nope.json")
