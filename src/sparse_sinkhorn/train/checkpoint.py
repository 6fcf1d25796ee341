"""Checkpoints: safetensors weights + JSON config + weights-only trainer state, written atomically.

Layout of a run directory::

    out_dir/checkpoints/latest.json          {"checkpoint": "step_0000010", "step": 10}
    out_dir/checkpoints/step_0000010/
        model.safetensors                    weights (shared/tied tensors stored once)
        config.json                          {"model_config": ..., "train_config": ..., "step": ...}
        trainer_state.pt                     optimizer, scheduler, step, data position, RNG states
        manifest.json                        sha256 and size of each file above

A checkpoint is written into a temporary directory beside its final name, fsync'ed, renamed with
``os.replace`` and only then published through ``latest.json`` (also replaced atomically), so a
crash at any point leaves either the old or the new checkpoint, never a half-written one that
``latest.json`` points to. ``trainer_state.pt`` is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SparseSinkhornError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "trainer_state.pt"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest.json"
CHECKPOINTS_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(SparseSinkhornError, RuntimeError):
    """A checkpoint is missing files, truncated, altered or unreadable."""


class ConfigMismatchError(SparseSinkhornError, ValueError):
    """A checkpoint was saved with a different ``model_config`` than the current one."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``torch.compile`` wrappers."""
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


# ----------------------------------------------------------------------------- writing


_OS_ERROR_CODE = re.compile(r"os error (\d+)")


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a failed write of ``path`` into an ``OSError`` that names it and its cause.

    Python's own write errors carry no file name, safetensors reports ``(os error 28)`` inside
    its own exception type; either becomes ``OSError(errno, strerror, path)`` (a full disk is
    ``ENOSPC``, a file-size limit ``EFBIG``, a read-only place ``EROFS``/``EACCES``), which the
    command prints as one line.
    """
    try:
        yield
    except Exception as err:
        code = _os_error_code(err)
        if code is None or (isinstance(err, OSError) and err.filename is not None):
            raise
        raise OSError(code, os.strerror(code), str(path)) from err


def _os_error_code(err: BaseException) -> int | None:
    """The errno behind ``err``: its own, one in its message (``os error 28``), or that of the
    OSError it was raised while handling (torch's writer fails again while closing)."""
    seen: BaseException | None = err
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, OSError) and seen.errno is not None:
            return int(seen.errno)
        match = _OS_ERROR_CODE.search(str(seen))
        if match is not None:
            return int(match.group(1))
        seen = seen.__cause__ or seen.__context__
    return None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with writing(path), open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _write_json(path: Path, data: Any) -> None:
    with writing(path), open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def _atomic_write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    _write_json(tmp, data)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _replace_dir(src: Path, dst: Path) -> None:
    """Move directory ``src`` to ``dst``, replacing an existing ``dst``."""
    trash = None
    if dst.exists():
        trash = dst.with_name(f".trash_{dst.name}_{uuid.uuid4().hex}")
        os.replace(dst, trash)
    os.replace(src, dst)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _write_files(tmp: Path, model: nn.Module, config: dict[str, Any], state: Any) -> None:
    from safetensors.torch import save_model

    with writing(tmp / MODEL_FILE):
        save_model(unwrap_model(model), str(tmp / MODEL_FILE), metadata={"format": "pt"})
    _write_json(tmp / CONFIG_FILE, config)
    # Through a Python file object, so a failed write is an OSError (not torch's RuntimeError).
    with writing(tmp / STATE_FILE), open(tmp / STATE_FILE, "wb") as handle:
        torch.save(state, handle)
    files = {}
    for name in (MODEL_FILE, CONFIG_FILE, STATE_FILE):
        _fsync_file(tmp / name)
        files[name] = {"sha256": sha256_file(tmp / name), "size": (tmp / name).stat().st_size}
    _write_json(tmp / MANIFEST_FILE, {"format_version": FORMAT_VERSION, "files": files})
    _fsync_dir(tmp)


def save_checkpoint(
    checkpoints_dir: str | Path,
    step: int,
    model: nn.Module,
    *,
    config: dict[str, Any],
    trainer_state: dict[str, Any],
    keep: int | None = None,
) -> Path:
    """Write ``checkpoints_dir/step_XXXXXXX`` atomically, point ``latest.json`` at it, prune.

    ``config`` becomes ``config.json``; ``trainer_state`` (tensors and plain data only) becomes
    ``trainer_state.pt``. With ``keep``, older checkpoints beyond the newest ``keep`` are removed
    once the new one is in place. Call on one rank only.
    """
    root = Path(checkpoints_dir)
    with writing(root):
        root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    with writing(root):
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp_{final.name}_", dir=root))
    try:
        _write_files(tmp, model, config, trainer_state)
        _replace_dir(tmp, final)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        name = Path(str(err.filename or ""))
        if err.errno is None or name.parent != tmp:
            raise
        # the file the checkpoint would have held, not the temporary folder (now removed)
        raise OSError(err.errno, err.strerror, str(final / name.name)) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    _atomic_write_json(root / LATEST_FILE, {"checkpoint": final.name, "step": step})
    if keep is not None:
        prune_checkpoints(root, keep=keep, newest=final)
    return final


def list_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step_*`` directory, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for child in checkpoints_dir.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def prune_checkpoints(checkpoints_dir: Path, *, keep: int, newest: Path) -> None:
    """Keep ``newest`` and the ``keep - 1`` newest checkpoints older than it; delete the rest.

    Checkpoints with a larger step than ``newest`` (left by a run that was resumed from an
    earlier step) are left alone; the resumed run overwrites them when it gets there. Stale
    temporary directories from interrupted writes are removed too.
    """
    newest_step = int(newest.name.split("_")[1])
    older = [path for step, path in list_checkpoints(checkpoints_dir) if step < newest_step]
    for path in older[: max(0, len(older) - (keep - 1))]:
        logger.debug("pruning old checkpoint %s", path)
        shutil.rmtree(path, ignore_errors=True)
    for child in checkpoints_dir.iterdir():
        if child.is_dir() and child.name.startswith((".tmp_", ".trash_")):
            shutil.rmtree(child, ignore_errors=True)
