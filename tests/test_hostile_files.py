"""Crafted and damaged files: data pickles never run code or crash the process, and a
tampered run directory given to ``generate`` is one clear error (exit status 2)."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers_cli import assert_one_line_error, run_cli
from sparse_sinkhorn.data.image_formats import RestrictedUnpickler, read_cifar_batch

WORDS = ["the", "king", "and", "queen", "of", "fair", "verona", "speak", "to", "thee", "my", "lord"]


def _object_dtype_cifar_pickle(path: Path) -> None:
    """A CIFAR batch whose ``data`` array claims dtype object: its raw bytes (0x4141...) would
    be dereferenced as PyObject pointers by numpy, i.e. a segfault or worse."""
    data = np.full((2, 3072), 0x4141414141414141, dtype=np.uint64)
    payload = pickle.dumps({b"data": data, b"labels": [0, 1]}, protocol=2)
    assert payload.count(b"u8") == 1
    path.write_bytes(payload.replace(b"u8", b"O8"))


def test_object_dtype_pickle_is_refused_without_crashing(tmp_path: Path) -> None:
    path = tmp_path / "data_batch_1"
    _object_dtype_cifar_pickle(path)
    code = (
        "import sys, pickle\n"
        "from sparse_sinkhorn.data.image_formats import read_cifar_batch\n"
        "try:\n"
        f"    read_cifar_batch({str(path)!r})\n"
        "except pickle.UnpicklingError as err:\n"
        "    print('REFUSED', err); sys.exit(0)\n"
        "print('LOADED'); sys.exit(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)  # -11 = segfault
    assert "REFUSED" in done.stdout and "object" in done.stdout


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps(np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8")]), protocol=2),  # structured
        pickle.dumps(np.array([1, "x", None], dtype=object), protocol=2),  # object array
        pickle.dumps(np.arange(4, dtype=np.int64), protocol=2).replace(b"K\x04\x85", b"K\x09\x85"),
        pickle.dumps(np.ma.masked_array([1, 2]), protocol=2),  # an ndarray subclass
        pickle.dumps({"a": {1, 2}}, protocol=2),  # a set needs builtins.set
        pickle.dumps(np.zeros(2, dtype=object), protocol=5),
    ],
    ids=["structured", "object", "size-mismatch", "subclass", "set", "object-p5"],
)
def test_unpickler_refuses_everything_but_plain_numeric_data(payload: bytes) -> None:
    with pytest.raises(pickle.UnpicklingError, match=r"refusing|damaged"):
        RestrictedUnpickler(io.BytesIO(payload), encoding="bytes").load()


class _HugeArray:
    """Pickles as a direct ``numpy.ndarray(shape, "u1")`` call declaring 128 TiB: numpy would
    allocate it before reading any data."""

    def __reduce__(self) -> tuple:
        return (np.ndarray, ((2**20, 2**20, 2**7), "u1"))


def test_a_huge_declared_shape_never_reaches_the_allocator(tmp_path: Path) -> None:
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _HugeArray(), b"labels": [0]}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to call numpy\.ndarray"):
        read_cifar_batch(path)
    reduce = pickle.dumps(_HugeArray(), protocol=2)
    at = reduce.rindex(pickle.REDUCE)
    newobj = reduce[:at] + pickle.NEWOBJ + reduce[at + 1 :]  # ndarray.__new__(ndarray, ...)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to call numpy\.ndarray"):
        RestrictedUnpickler(io.BytesIO(newobj), encoding="bytes").load()


@pytest.mark.parametrize("protocol", [2, 5])
def test_unpickler_still_reads_numeric_arrays(protocol: int) -> None:
    obj = {
        b"data": np.arange(12, dtype=">f4").reshape(3, 4),
        b"fortran": np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)),
        b"labels": [1, 2],
        b"name": "batch",
        b"n": np.int64(7),
    }
    back = RestrictedUnpickler(
        io.BytesIO(pickle.dumps(obj, protocol=protocol)), encoding="bytes"
    ).load()
    for key in (b"data", b"fortran"):
        assert back[key].dtype == obj[key].dtype and np.array_equal(back[key], obj[key])
    assert back[b"labels"] == [1, 2] and back[b"name"] == "batch" and back[b"n"] == 7


def test_cifar_reader_refuses_non_numeric_labels(tmp_path: Path) -> None:
    path = tmp_path / "b"
    data = np.zeros((1, 3072), dtype=np.uint8)
    path.write_bytes(pickle.dumps({b"data": data, b"labels": ["x"]}, protocol=2))
    with pytest.raises(ValueError, match="labels"):
        read_cifar_batch(path)


# ----------------------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step char LM run (sinkhorn) on a tiny generated corpus."""
    from sparse_sinkhorn.cli import main

    root = tmp_path_factory.mktemp("lmrun")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 40), ("valid", 6), ("test", 6)):
        d = root / "data" / "shakespeare" / split
        d.mkdir(parents=True)
        lines = [
            " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (6,), generator=g).tolist())
            for _ in range(n)
        ]
        (d / "play.txt").write_text("\n".join(lines) + "\n")
    argv = ["lm", "--level", "char", "--data-dir", str(root / "data"), "--out", str(root / "out")]
    tiny = ["--length", "16", "--block-size", "4", "--batch-size", "4", "--eval-windows", "2"]
    assert main([*argv, "--attention", "sinkhorn", "--steps", "2", *tiny, "--no-progress"]) == 0
    return root / "out" / "sinkhorn" / "seed0"


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _ckpt(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step_*"))[-1]


def _each_ckpt(run: Path, change) -> None:
    """Tamper with every checkpoint (else loading rightly falls back to an intact one)."""
    for ckpt in sorted((run / "checkpoints").glob("step_*")):
        change(ckpt)


def _rewrite_config(run: Path, change) -> None:
    """Edit config.json and re-seal the manifest, as a careful attacker would."""
    _each_ckpt(run, lambda ckpt: _reseal(ckpt, change))


def _reseal(ckpt: Path, change) -> None:
    from sparse_sinkhorn.train.checkpoint import sha256_file

    config = json.loads((ckpt / "config.json").read_text())
    change(config["model_config"])
    (ckpt / "config.json").write_text(json.dumps(config))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    file = ckpt / "config.json"
    manifest["files"]["config.json"] = {"sha256": sha256_file(file), "size": file.stat().st_size}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


TAMPERS = {
    "run.json garbage": lambda r: (r / "run.json").write_bytes(b"\xff{not json"),
    "run.json a list": lambda r: (r / "run.json").write_text("[1, 2]"),
    "run.json image shape": lambda r: (r / "run.json").write_text(
        json.dumps({"task": "image", "image_shape": [10**6, 10**6], "start_id": 0})
    ),
    "tokenizer garbage": lambda r: (r / "tokenizer.json").write_text('{"model": 42}'),
    "tokenizer missing": lambda r: (r / "tokenizer.json").unlink(),
    "config garbage (manifest catches)": lambda r: _each_ckpt(
        r, lambda c: (c / "config.json").write_text("{")
    ),
    "config vocab 10**12": lambda r: _rewrite_config(r, lambda c: c.update(vocab_size=10**12)),
    "config d_model str": lambda r: _rewrite_config(r, lambda c: c.update(d_model="wide")),
    "config n_heads 0": lambda r: _rewrite_config(r, lambda c: c.update(n_heads=0)),
    "config max_len 10**15": lambda r: _rewrite_config(
        r, lambda c: c["attention"].update(max_len=10**15)
    ),
    "config unknown field": lambda r: _rewrite_config(r, lambda c: c.update(evil=1)),
    "config attention garbage": lambda r: _rewrite_config(r, lambda c: c.update(attention=3)),
    "config type": lambda r: _rewrite_config(r, lambda c: c.update(type="os.system")),
    "weights truncated": lambda r: _each_ckpt(
        r, lambda c: (c / "model.safetensors").write_bytes(b"\x00" * 8)
    ),
    "latest.json escapes": lambda r: (
        _each_ckpt(r, shutil.rmtree),
        (r / "checkpoints" / "latest.json").write_text('{"checkpoint": "../../../etc"}'),
    ),
}


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_generate_on_a_tampered_run_dir_is_one_clear_error(
    tamper: str, lm_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(lm_run, tmp_path)
    TAMPERS[tamper](run)
    assert_one_line_error(["generate", "--run", str(run), "--tokens", "3"], capsys, str(run))


def test_generate_untampered_copy_works(
    lm_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(lm_run, tmp_path)
    code, err = run_cli(["generate", "--run", str(run), "--tokens", "3"], capsys)
    assert code == 0, err


def test_checkpoint_pointer_cannot_leave_the_run_dir(lm_run: Path, tmp_path: Path) -> None:
    """latest.json naming a path outside (or a link leading outside) is ignored."""
    from sparse_sinkhorn.train import resolve_checkpoint

    run = _copy(lm_run, tmp_path)
    outside = tmp_path / "elsewhere"
    shutil.copytree(_ckpt(run), outside / "step_0000099")
    (run / "checkpoints" / "latest.json").write_text(
        json.dumps({"checkpoint": "../../elsewhere/step_0000099"})
    )
    assert resolve_checkpoint(run) == _ckpt(run)
    (run / "checkpoints" / "step_0000099").symlink_to(outside / "step_0000099")
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"checkpoint": "step_0000099"}))
    assert resolve_checkpoint(run).resolve().parent == (run / "checkpoints").resolve()
