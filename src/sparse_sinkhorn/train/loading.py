"""Finding, verifying and loading checkpoints written by `sparse_sinkhorn.train.checkpoint`.

Every path argument accepts a checkpoint directory (``.../checkpoints/step_0000010``), a run
directory (the ``out_dir`` of [`train`][sparse_sinkhorn.train.train]) or its ``checkpoints``
folder. A run directory resolves to the checkpoint named by ``latest.json``; when that one is
corrupt, the newest valid older one is used with a logged warning.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    LATEST_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    STATE_FILE,
    CheckpointError,
    ConfigMismatchError,
    list_checkpoints,
    sha256_file,
    unwrap_model,
)

logger = logging.getLogger(__name__)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise CheckpointError(f"{path.parent}: missing {what} {path.name}") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable {what} ({err})") from err


def verify_checkpoint(path: str | Path) -> Path:
    """Check every file against ``manifest.json`` (size, sha256) and parse the safetensors header.

    Returns the path; raises [`CheckpointError`][sparse_sinkhorn.train.CheckpointError] naming the
    first problem found.
    """
    ckpt = Path(path)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt} is not a checkpoint directory")
    manifest = _read_json(ckpt / MANIFEST_FILE, "manifest")
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise CheckpointError(f"{ckpt / MANIFEST_FILE}: no 'files' table; the file is damaged")
    for name in (MODEL_FILE, CONFIG_FILE, STATE_FILE):
        if name not in files:
            raise CheckpointError(f"{ckpt / MANIFEST_FILE} does not list {name}")
    for name, info in files.items():
        _verify_file(ckpt / name, info)
    _check_safetensors_header(ckpt / MODEL_FILE)
    return ckpt


def _verify_file(file: Path, info: Mapping[str, Any]) -> None:
    if not file.is_file():
        raise CheckpointError(f"{file} is missing (listed in the manifest)")
    size = file.stat().st_size
    if size != info.get("size"):
        raise CheckpointError(
            f"{file} is {size} bytes but the manifest says {info.get('size')}: "
            "the checkpoint is truncated or was altered"
        )
    if sha256_file(file) != info.get("sha256"):
        raise CheckpointError(
            f"{file}: sha256 does not match the manifest: the checkpoint is corrupt"
        )


def _check_safetensors_header(file: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            handle.keys()
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{file}: unreadable safetensors file ({err})") from err


def _checkpoints_root(path: Path) -> Path:
    if (path / CHECKPOINTS_DIR).is_dir():
        return path / CHECKPOINTS_DIR
    return path


def _candidates(root: Path) -> list[Path]:
    """Checkpoints of ``root`` in the order to try: ``latest.json``'s first, then newest first."""
    ordered = [path for _, path in reversed(list_checkpoints(root))]
    latest_file = root / LATEST_FILE
    if latest_file.is_file():
        try:
            name = json.loads(latest_file.read_text(encoding="utf-8"))["checkpoint"]
            # The pointer names a step_* directory of this run; never a path that leaves it.
            if not isinstance(name, str) or not _STEP_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a step_* checkpoint name")
            latest = root / name
            ordered = [latest] + [p for p in ordered if p != latest]
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.warning("ignoring unreadable %s (%s); scanning step_* dirs", latest_file, err)
    return [p for p in ordered if _inside(p, root)]


_STEP_NAME = re.compile(r"step_\d+")


def _inside(path: Path, root: Path) -> bool:
    """``path`` (after resolving links) lies in ``root``: a link cannot lead a run elsewhere."""
    try:
        return path.resolve().parent == root.resolve()
    except OSError:
        return False


def stored_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of the weights in a checkpoint's safetensors file (header only)."""
    from safetensors import safe_open

    file = Path(path) / MODEL_FILE
    try:
        with safe_open(str(file), framework="pt") as handle:
            return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{file}: unreadable safetensors file ({err})") from err


def _shape_mismatches(
    stored: dict[str, tuple[int, ...]], model: nn.Module, label: str
) -> list[str]:
    """``"name: <label> X, stored Y"`` for every stored weight ``model`` has in another shape
    (or not at all: ``None``)."""
    expected = {k: tuple(v.shape) for k, v in unwrap_model(model).state_dict().items()}
    return [
        f"{k}: {label} {expected.get(k)}, stored {shape}"
        for k, shape in stored.items()
        if expected.get(k) != shape
    ]


def check_shapes_match(ckpt: Path, factory: Callable[[], nn.Module]) -> None:
    """Build ``factory()`` on the meta device (no memory) and compare its weight shapes with
    the ones stored in ``ckpt``; a config whose sizes disagree is a
    [`CheckpointError`][sparse_sinkhorn.train.CheckpointError]
    before any real allocation (a tampered config cannot ask for terabytes)."""
    try:
        with torch.device("meta"):
            meta = factory()
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{ckpt / CONFIG_FILE}: unusable model config ({err})") from err
    bad = _shape_mismatches(stored_shapes(ckpt), meta, "config gives")
    if bad:
        raise CheckpointError(
            f"{ckpt}: config.json does not match the stored weights ({'; '.join(bad[:3])}"
            f"{'; ...' if len(bad) > 3 else ''}); the run directory was altered"
        )


def is_checkpoint_dir(path: Path) -> bool:
    return (path / MANIFEST_FILE).is_file() or path.name.startswith("step_")


def resolve_checkpoint(path: str | Path) -> Path:
    """The verified checkpoint directory that ``path`` designates (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint path {path} does not exist; pass a run dir (the out_dir of a "
            "training run) or a checkpoint dir, or start a new run without resume"
        )
    if is_checkpoint_dir(path):
        return verify_checkpoint(path)
    candidates = _candidates(_checkpoints_root(path))
    if not candidates:
        raise FileNotFoundError(
            f"no checkpoint found under {path} (expected {CHECKPOINTS_DIR}/step_*); "
            "start a new run without resume or point at another run dir"
        )
    problems = []
    for candidate in candidates:
        try:
            verify_checkpoint(candidate)
        except CheckpointError as err:
            logger.warning("skipping corrupt checkpoint: %s", err)
            problems.append(str(err))
            continue
        if problems:
            logger.warning("falling back to the newest valid checkpoint %s", candidate)
        return candidate
    raise CheckpointError(f"no valid checkpoint under {path}: " + "; ".join(problems))


def read_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint: ``{"model_config", "train_config", "step", ...}``."""
    path = Path(path)
    if path.is_file():
        return dict(_read_json(path, "config"))
    return dict(_read_json(resolve_checkpoint(path) / CONFIG_FILE, "config"))


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable ``key: saved X, current Y`` lines for every differing key."""
    saved_n, current_n = _normalise(dict(saved)), _normalise(dict(current))
    missing = object()
    lines = []
    for key in sorted(set(saved_n) | set(current_n)):
        a, b = saved_n.get(key, missing), current_n.get(key, missing)
        if a != b:
            show_a = "<absent>" if a is missing else repr(a)
            show_b = "<absent>" if b is missing else repr(b)
            lines.append(f"{key}: saved {show_a}, current {show_b}")
    return lines


def check_model_config(ckpt: Path, saved: Any, expected: Mapping[str, Any]) -> None:
    """Raise [`ConfigMismatchError`][sparse_sinkhorn.train.ConfigMismatchError] naming every key
    where ``saved != expected``."""
    diffs = config_differences(saved or {}, expected)
    if diffs:
        raise ConfigMismatchError(
            f"checkpoint {ckpt} was saved with a different model_config ({'; '.join(diffs)}); "
            "build the model from read_config(path)['model_config'] or use a new out_dir"
        )


def _load_into(ckpt: Path, model: nn.Module) -> tuple[list[str], list[str]]:
    """Every stored weight the model has into it: ``(missing, unexpected)`` names."""
    from safetensors.torch import load_model

    target = unwrap_model(model)
    device = next(iter(target.parameters()), torch.empty(0)).device
    try:
        missing, unexpected = load_model(
            target, ckpt / MODEL_FILE, strict=False, device=str(device)
        )
    except Exception as err:  # safetensors / shape errors
        raise CheckpointError(f"{ckpt / MODEL_FILE}: cannot load weights ({err})") from err
    return list(missing), list(unexpected)


def _load_weights(ckpt: Path, model: nn.Module) -> None:
    missing, unexpected = _load_into(ckpt, model)
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt / MODEL_FILE} does not match the model: missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}; build the model from read_config(path)"
        )


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    """``trainer_state.pt`` read with ``weights_only=True`` (never unpickles code)."""
    try:
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{ckpt / STATE_FILE}: unreadable trainer state ({err})") from err
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{ckpt / STATE_FILE}: not a trainer state (no 'step')")
    return state


def load_model_weights(path: str | Path, model: nn.Module) -> Path:
    """Load only the weights into ``model`` (for evaluation/generation); returns the checkpoint."""
    ckpt = resolve_checkpoint(path)
    _load_weights(ckpt, model)
    return ckpt


def warm_start(path: str | Path, model: nn.Module) -> list[str]:
    """Load the weights of the checkpoint at ``path`` into ``model``, which may have more
    (a routed kind started from a dense run: its sort nets); returns the names of the
    model's weights the checkpoint does not hold, left as they were. A stored weight the
    model has no place for, or of another shape, raises
    [`CheckpointError`][sparse_sinkhorn.train.CheckpointError] before any weight is loaded."""
    ckpt = resolve_checkpoint(path)
    bad = _shape_mismatches(stored_shapes(ckpt), model, "model has")
    if bad:
        raise CheckpointError(
            f"{ckpt / MODEL_FILE}: weights of another shape, or that this model has no place "
            f"for (None): {'; '.join(bad)}"
        )
    missing, _ = _load_into(ckpt, model)
    return sorted(missing)


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    expected_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Load weights (and optimizer/scheduler state when given) from a checkpoint or run dir.

    With ``expected_config``, the saved ``model_config`` must equal it (else
    [`ConfigMismatchError`][sparse_sinkhorn.train.ConfigMismatchError]). Returns the trainer state
    dict (``step``, ``extra_state``,
    RNG states, ...) plus ``"path"`` (the checkpoint used) and ``"config"`` (its config.json).
    """
    ckpt = resolve_checkpoint(path)
    config = _read_json(ckpt / CONFIG_FILE, "config")
    if expected_config is not None:
        check_model_config(ckpt, config.get("model_config"), expected_config)
    state = load_trainer_state(ckpt)
    _load_weights(ckpt, model)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    state["path"] = ckpt
    state["config"] = config
    return state
