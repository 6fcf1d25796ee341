"""Standard-format readers on tiny generated files (no network, no real datasets)."""

from __future__ import annotations

import gzip
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from sparse_sinkhorn.data import (
    RestrictedUnpickler,
    load_aclimdb,
    load_cifar10,
    load_idx_split,
    load_jsonl_classification,
    load_nli_jsonl,
    load_sst,
    parse_sst_tree,
    read_cifar_batch,
    read_idx,
    read_lines,
    read_text,
    safe_pickle_load,
    write_idx,
)

# --------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path: Path, suffix: str, dtype: type) -> None:
    arr: np.ndarray = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4)
    if dtype == np.uint8:
        arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / f"x-idx3-ubyte{suffix}"
    write_idx(path, arr)
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, arr)


def test_idx_header_is_mnist_layout(tmp_path: Path) -> None:
    write_idx(tmp_path / "l-idx1-ubyte", np.array([7, 2, 1], dtype=np.uint8))
    raw = (tmp_path / "l-idx1-ubyte").read_bytes()
    assert raw == b"\x00\x00\x08\x01" + b"\x00\x00\x00\x03" + bytes([7, 2, 1])


def test_idx_gz_is_deterministic_and_real_gzip(tmp_path: Path) -> None:
    arr = np.ones((3, 2, 2), dtype=np.uint8)
    write_idx(tmp_path / "a.gz", arr)
    write_idx(tmp_path / "b.gz", arr)
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()
    assert gzip.decompress((tmp_path / "a.gz").read_bytes())[:4] == b"\x00\x00\x08\x03"


def test_idx_rejects_bad_files(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"PK\x03\x04junk")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02")
    with pytest.raises(ValueError, match="expected 5"):
        read_idx(tmp_path / "short")


@pytest.mark.parametrize("gz", [True, False])
def test_load_idx_split(tmp_path: Path, gz: bool) -> None:
    ext = ".gz" if gz else ""
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 4], dtype=np.uint8)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{ext}", images)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{ext}", labels)
    x, y = load_idx_split(tmp_path, "test")
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)
    with pytest.raises(ValueError, match="'valid'"):
        load_idx_split(tmp_path, "valid")


# --------------------------------------------------------------------------------- CIFAR


def _fake_cifar_batch(path: Path, n: int, seed: int, protocol: int = 2) -> np.ndarray:
    data = np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)
    batch = {
        b"batch_label": b"training batch 1 of 5",
        b"labels": [i % 10 for i in range(n)],
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        pickle.dump(batch, fh, protocol=protocol)
    return data


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_batch_layout(tmp_path: Path, protocol: int) -> None:
    data = _fake_cifar_batch(tmp_path / "data_batch_1", 4, 0, protocol)
    images, labels = read_cifar_batch(tmp_path / "data_batch_1")
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 1, 2, 3]
    # pixel (row 1, col 2) of image 3: planes R, G, B at offset 1*32 + 2
    off = 1 * 32 + 2
    assert images[3, 1, 2].tolist() == [data[3, off], data[3, 1024 + off], data[3, 2048 + off]]


def test_load_cifar10_splits(tmp_path: Path) -> None:
    root = tmp_path / "cifar-10-batches-py"
    for i in range(1, 6):
        _fake_cifar_batch(root / f"data_batch_{i}", 3, i)
    _fake_cifar_batch(root / "test_batch", 2, 9)
    x, y = load_cifar10(tmp_path, "train")
    assert x.shape == (15, 32, 32, 3) and y.shape == (15,)
    x, y = load_cifar10(root, "test")
    assert x.shape == (2, 32, 32, 3)


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned > should_not_exist",))


def test_restricted_unpickler_rejects_code(tmp_path: Path) -> None:
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Evil(), b"labels": [0]}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        safe_pickle_load(path)
    with pytest.raises(pickle.UnpicklingError):
        read_cifar_batch(path)
    assert not (tmp_path / "should_not_exist").exists()
    assert not Path("should_not_exist").exists()


def test_restricted_unpickler_rejects_other_codecs() -> None:
    import io

    payload = pickle.dumps(b"abc", protocol=2).replace(b"latin1", b"rot_13")
    with pytest.raises(pickle.UnpicklingError, match="rot_13"):
        RestrictedUnpickler(io.BytesIO(payload)).load()


def test_restricted_unpickler_rejects_builtins() -> None:
    import io

    payload = pickle.dumps(eval, protocol=2)  # a global reference to builtins.eval
    with pytest.raises(pickle.UnpicklingError, match=r"refusing.*eval"):
        RestrictedUnpickler(io.BytesIO(payload)).load()


def test_cifar_batch_wrong_keys(tmp_path: Path) -> None:
    path = tmp_path / "b"
    path.write_bytes(pickle.dumps({b"pixels": [1]}))
    with pytest.raises(ValueError, match="not a CIFAR-10 batch"):
        read_cifar_batch(path)


# --------------------------------------------------------------------------------- text


def test_plain_text_file_and_dir(tmp_path: Path) -> None:
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "b.txt").write_text("second shard\n\nlast line\n", encoding="utf-8")
    (tmp_path / "corpus" / "a.txt").write_text("first line\nzweite Zeile ü\n", encoding="utf-8")
    assert read_text(tmp_path / "corpus" / "a.txt") == "first line\nzweite Zeile ü\n"
    joined = read_text(tmp_path / "corpus")
    assert joined.startswith("first line") and joined.endswith("last line\n")
    assert read_lines(tmp_path / "corpus") == [
        "first line",
        "zweite Zeile ü",
        "second shard",
        "last line",
    ]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_text(tmp_path / "nope")


def test_aclimdb_folder(tmp_path: Path) -> None:
    for split in ("train", "test"):
        for pol, n in (("pos", 2), ("neg", 3)):
            folder = tmp_path / "aclImdb" / split / pol
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / f"{i}_{7 if pol == 'pos' else 2}.txt").write_text(f"{pol} review {i}")
    data = load_aclimdb(tmp_path, "train")
    assert len(data) == 5
    assert data.labels == [0, 0, 0, 1, 1]
    assert data.texts[0] == "neg review 0" and data.texts[-1] == "pos review 1"
    assert len(load_aclimdb(tmp_path / "aclImdb", "test")) == 5


SST_LINES = [
    "(3 (2 It) (4 (4 (2 's) (4 (3 (2 a) (4 (3 lovely) (2 film))) (3 (2 with) (4 (3 (3 lovely)"
    " (2 performances)) (2 (2 by) (2 (2 (2 Buy) (2 and)) (2 Accorsi))))))) (2 .)))",
    "(2 (2 Neutral) (2 line))",
    "(0 (1 Awful) (1 (1 bad) (2 film)))",
    "(1 (2 Not) (1 good))",
]


def test_sst_tree_parsing(tmp_path: Path) -> None:
    text, label = parse_sst_tree(SST_LINES[0])
    assert label == 3
    assert text == "It 's a lovely film with lovely performances by Buy and Accorsi ."
    path = tmp_path / "train.txt"
    path.write_text("\n".join(SST_LINES) + "\n")
    binary = load_sst(path)
    assert binary.labels == [1, 0, 0]  # neutral dropped
    assert binary.texts[1] == "Awful bad film"
    assert load_sst(path, binary=False).labels == [3, 2, 0, 1]
    with pytest.raises(ValueError, match="not an SST tree"):
        parse_sst_tree("(3 (2 unbalanced)")


def _write_jsonl(path: Path, rows: list[dict[str, str]] | list[dict[str, object]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_nli_jsonl_drops_dash(tmp_path: Path) -> None:
    rows = [
        {"gold_label": "neutral", "sentence1": "A man.", "sentence2": "A tall man."},
        {"gold_label": "-", "sentence1": "No majority.", "sentence2": "Dropped."},
        {"gold_label": "entailment", "sentence1": "A dog runs.", "sentence2": "An animal moves."},
        {"gold_label": "contradiction", "sentence1": "It rains.", "sentence2": "It is dry."},
    ]
    _write_jsonl(tmp_path / "snli_1.0_test.jsonl", rows)
    pairs = load_nli_jsonl(tmp_path / "snli_1.0_test.jsonl")
    assert len(pairs) == 3
    assert pairs.labels == [1, 0, 2]
    assert pairs.premises[1] == "A dog runs." and pairs.hypotheses[2] == "It is dry."
    _write_jsonl(
        tmp_path / "bad.jsonl", [{"gold_label": "maybe", "sentence1": "a", "sentence2": "b"}]
    )
    with pytest.raises(ValueError, match="'maybe'"):
        load_nli_jsonl(tmp_path / "bad.jsonl")


def test_jsonl_classification(tmp_path: Path) -> None:
    _write_jsonl(
        tmp_path / "train.jsonl", [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]
    )
    data = load_jsonl_classification(tmp_path / "train.jsonl")
    assert data.texts == ["good", "bad"] and data.labels == [1, 0]
    _write_jsonl(tmp_path / "bad.jsonl", [{"text": "x", "label": "pos"}])
    with pytest.raises(ValueError, match="'pos'"):
        load_jsonl_classification(tmp_path / "bad.jsonl")
