"""Readers (and an IDX writer) for the standard on-disk image formats.

* **IDX** (MNIST, Fashion-MNIST): ``*-ubyte`` or ``*-ubyte.gz``; big-endian header
  ``0x00 0x00 <type code> <ndim>`` followed by ``ndim`` uint32 sizes and the raw data.
* **CIFAR-10 python pickles**, the official files of ``cifar-10-python.tar.gz``:
  ``cifar-10-batches-py/data_batch_1..5`` and ``test_batch``; each a dict with ``b"data"``
  (uint8 array (10000, 3072), channel-planar: 1024 R, then 1024 G, then 1024 B values, each
  plane row-major) and ``b"labels"`` (list of ints). They are read with a restricted unpickler
  that only admits numpy's array-reconstruction globals, so a tampered file cannot run code.

Axis legend: N images, H height, W width, C channels.
"""

from __future__ import annotations

import codecs
import gzip
import io
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np

# IDX type code -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_maybe_gzip(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        return gzip.decompress(raw)
    return raw


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed, detected by magic bytes) into a numpy array.

    Returns native-endian data of the stored type (uint8 for MNIST images and labels), shape
    as stored: images ``(N, H, W)``, labels ``(N,)``.
    """
    path = Path(path)
    data = _read_maybe_gzip(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (magic bytes {data[:4]!r})")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type code {code:#04x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes, ndim={ndim})")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: IDX payload has {len(data) - header} bytes, expected {expected} "
            f"for shape {shape} and dtype {dtype}"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write ``array`` as an IDX file; gzip-compressed (with a fixed mtime) if ``path`` ends in .gz.

    Output is byte-for-byte deterministic for the same array.
    """
    path = Path(path)
    arr = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    native = arr.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(
            f"cannot store dtype {arr.dtype} in IDX; use one of {sorted(map(str, codes))}"
        )
    if arr.ndim > 255:
        raise ValueError(f"IDX supports at most 255 dims, got {arr.ndim}")
    big = np.dtype(_IDX_DTYPES[codes[native]])
    payload = struct.pack(">BBBB", 0, 0, codes[native], arr.ndim)
    payload += struct.pack(f">{arr.ndim}I", *arr.shape)
    payload += np.ascontiguousarray(arr, dtype=big).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:
            gz.write(payload)
        path.write_bytes(buf.getvalue())
    else:
        path.write_bytes(payload)


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem, root / stem.replace("-idx", ".idx")):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"no IDX file {stem}(.gz) in {root}")


def load_idx_split(root: str | os.PathLike[str], split: str) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-layout split: ``(images uint8 (N, H, W), labels uint8 (N,))``.

    ``split`` is ``"train"`` or ``"test"`` (files ``train-*`` / ``t10k-*``).
    """
    prefix = {"train": "train", "test": "t10k", "t10k": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    images = read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte"))
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{root}: {split} has {images.shape[0]} images but {labels.shape[0]} labels"
        )
    return images, labels


def _latin1_encode(obj: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 protocol-2 pickles use it for bytes; latin-1 only."""
    if encoding.replace("-", "").replace("_", "").lower() != "latin1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return codecs.encode(obj, "latin1")


# numpy kinds a data pickle may hold: bool, signed/unsigned int, float, complex. Object
# arrays are refused: their raw bytes would be read as pointers (a forged file segfaults).
_SAFE_KINDS = frozenset("biufc")
_MAX_DIMS = 32


def _text(value: Any, what: str) -> str:
    if isinstance(value, bytes):  # Python 2 pickles read with encoding="bytes"
        value = value.decode("latin1")
    if not isinstance(value, str):
        raise pickle.UnpicklingError(f"refusing {what} {value!r} in a data pickle")
    return value


def _safe_dtype(spec: Any) -> np.dtype:
    """A plain numeric numpy dtype from its pickled name, or UnpicklingError."""
    if isinstance(spec, _DtypeStub):
        return spec.get()
    if isinstance(spec, np.dtype):
        dtype = spec
    else:
        try:
            dtype = np.dtype(_text(spec, "dtype"))
        except TypeError as err:
            raise pickle.UnpicklingError(f"refusing dtype {spec!r} ({err})") from None
    if dtype.kind not in _SAFE_KINDS or dtype.hasobject or dtype.fields or dtype.subdtype:
        raise pickle.UnpicklingError(
            f"refusing dtype {dtype} in a data pickle (only plain numeric arrays are allowed)"
        )
    return dtype


class _DtypeStub:
    """``numpy.dtype(name, align, copy)`` + its ``__setstate__``, checked before numpy sees it."""

    def __init__(self, name: Any, align: Any = False, copy: Any = False) -> None:
        self.dtype = _safe_dtype(name)

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) < 5 or state[0] not in (3, 4):
            raise pickle.UnpicklingError(f"refusing dtype state {state!r}")
        if any(part is not None for part in state[2:5]):  # subarray, names, fields
            raise pickle.UnpicklingError("refusing a structured/sub-array dtype in a data pickle")
        order = _text(state[1], "byte order")
        if order not in ("<", ">", "|", "="):
            raise pickle.UnpicklingError(f"refusing byte order {order!r}")
        if order == "<":
            self.dtype = self.dtype.newbyteorder("<")
        elif order == ">":
            self.dtype = self.dtype.newbyteorder(">")

    def get(self) -> np.dtype:
        return self.dtype


def _shape(value: Any) -> tuple[int, ...]:
    if not isinstance(value, tuple) or len(value) > _MAX_DIMS:
        raise pickle.UnpicklingError(f"refusing array shape {value!r}")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value):
        raise pickle.UnpicklingError(f"refusing array shape {value!r}")
    return value


def _from_bytes(raw: Any, dtype: np.dtype, shape: tuple[int, ...], order: str) -> np.ndarray:
    """A fresh array from raw bytes whose length must match shape x itemsize exactly."""
    if not isinstance(raw, (bytes, bytearray)):
        raise pickle.UnpicklingError(
            f"refusing array data of type {type(raw).__name__} (only raw numeric bytes)"
        )
    count = 1
    for n in shape:
        count *= n
    if len(raw) != count * dtype.itemsize:
        raise pickle.UnpicklingError(
            f"array data is {len(raw)} bytes but shape {shape} of {dtype} needs "
            f"{count * dtype.itemsize}: the file is damaged"
        )
    flat = np.frombuffer(raw, dtype=dtype, count=count)
    return flat.reshape(shape, order="F" if order == "F" else "C").copy()


class _NdarrayName:
    """What the global ``numpy.ndarray`` resolves to: a name that `_ArrayStub` accepts
    as its class argument and nothing can call or instantiate (``numpy.ndarray(shape)``
    would allocate whatever shape the file declares, before any size check)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        raise pickle.UnpicklingError(
            "refusing to call numpy.ndarray from a data pickle (it would allocate the declared "
            f"shape {args[0] if args else ()!r} before reading any data)"
        )


class _ArrayStub:
    """``_reconstruct(ndarray, ...)`` + ``__setstate__``: rebuilt with ``np.frombuffer``."""

    def __init__(self, cls: Any, shape: Any = (0,), tag: Any = b"b") -> None:
        if cls is not _NdarrayName:
            raise pickle.UnpicklingError(f"refusing to reconstruct {cls!r} (only numpy.ndarray)")
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) != 5 or state[0] != 1:
            raise pickle.UnpicklingError("refusing an ndarray state that is not numpy's format 1")
        _, shape, dtype, fortran, raw = state
        order = "F" if fortran is True else "C"
        self.array = _from_bytes(raw, _safe_dtype(dtype), _shape(shape), order)

    def get(self) -> np.ndarray:
        if self.array is None:
            raise pickle.UnpicklingError("an ndarray in the pickle was never given its data")
        return self.array


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """``numpy._core.numeric._frombuffer`` (protocol-5 pickles), checked."""
    return _from_bytes(buf, _safe_dtype(dtype), _shape(shape), "F" if order == "F" else "C")


def _scalar(dtype: Any, data: Any = None) -> Any:
    """``multiarray.scalar(dtype, bytes)`` (numpy scalars), numeric only."""
    return _from_bytes(data, _safe_dtype(dtype), (), "C")[()]


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR pickle needs: ndarray/dtype and the reconstruct helpers.

    None of them is numpy's own: each is a checked stand-in that admits plain numeric arrays
    only and builds them with ``np.frombuffer`` from exactly sized raw bytes.
    """
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): _NdarrayName,  # only as the class argument of _reconstruct
        ("numpy", "dtype"): _DtypeStub,
        ("_codecs", "encode"): _latin1_encode,  # bytes in protocol-2 pickles made by Python 3
    }
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = _ArrayStub
        allowed[(f"{mod}.multiarray", "scalar")] = _scalar
        allowed[(f"{mod}.numeric", "_frombuffer")] = _frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that admits plain numeric numpy arrays, lists, dicts, strings and numbers.

    Plain containers (dict, list, tuple, bytes, str, int, float) need no globals; numpy arrays
    go through checked stand-ins (no object, structured or sub-array dtypes; raw data of the
    exact size). Anything else (``os.system``, ``builtins.eval``, arbitrary classes) raises
    ``pickle.UnpicklingError``.
    """

    _ALLOWED = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name} from a data pickle "
                "(only numpy arrays are allowed)"
            ) from None

    def load(self) -> Any:
        return _finish(super().load(), depth=0)


_PLAIN = (str, bytes, bytearray, int, float, bool, type(None))


def _finish(obj: Any, depth: int) -> Any:
    """Replace the stand-ins by their arrays/dtypes; refuse anything not plain data."""
    if depth > 100:
        raise pickle.UnpicklingError("refusing a data pickle nested more than 100 levels deep")
    if isinstance(obj, (_ArrayStub, _DtypeStub)):
        return obj.get()
    if isinstance(obj, (np.ndarray, np.generic)):
        return obj
    if isinstance(obj, _PLAIN):
        return obj
    if isinstance(obj, dict):
        return {_finish(k, depth + 1): _finish(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_finish(v, depth + 1) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    raise pickle.UnpicklingError(f"refusing a {type(obj).__name__} in a data pickle")


def safe_pickle_load(path: str | os.PathLike[str]) -> Any:
    """Load a pickle of numpy arrays and plain containers with `RestrictedUnpickler`."""
    with Path(path).open("rb") as fh:
        return RestrictedUnpickler(fh, encoding="bytes").load()


def read_cifar_batch(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """One official CIFAR-10 batch file -> ``(images uint8 (N, 32, 32, 3) HWC, labels int64 (N,))``.

    The file stores each image channel-planar (R plane, G plane, B plane); it is returned in
    height-width-channel order so that flattening gives RGBRGB... per pixel, row-major.
    """
    batch = safe_pickle_load(path)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{path}: not a CIFAR-10 batch (need b'data' and b'labels', got {keys})")
    data, labels = batch[b"data"], batch[b"labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        raise ValueError(f"{path}: data must be a uint8 array, got {type(data).__name__}")
    if not isinstance(labels, list) or not all(type(y) is int and 0 <= y < 10 for y in labels):
        raise ValueError(f"{path}: labels must be a list of ints in [0, 10)")
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{path}: expected data (N, 3072) and N labels, got {data.shape} and {labels.shape}"
        )
    # (N, 3072) -> (N, C=3, H=32, W=32) -> (N, H, W, C)
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def load_cifar10(root: str | os.PathLike[str], split: str) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 split from ``root`` (the dir holding ``cifar-10-batches-py`` or that dir itself).

    ``"train"`` concatenates ``data_batch_1..5`` (50,000 images), ``"test"`` is ``test_batch``.
    """
    root = Path(root)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    if split == "train":
        names = [f"data_batch_{i}" for i in range(1, 6)]
    elif split == "test":
        names = ["test_batch"]
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    parts = [read_cifar_batch(root / n) for n in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
