"""``recall --init-from KIND_DIR``: each run starts from the final weights of the same seed's
run of another kind (``KIND_DIR/seed<s>``, a kind directory ``<out>/<task>-<length>/<kind>``
of an earlier grid) on the same task, length and model; the weights the kind adds (its sort
nets) start fresh.

Rule: every check of the source happens here, before any run trains (`check_sources`); a
run records what it started from in its directory (`INIT_FILE`), so that ``--resume``
continues only runs that started the same way (`check_started_as`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import UsageError
from ..train import CheckpointError, read_config, warm_start
from ..train.checkpoint import CHECKPOINTS_DIR, list_checkpoints
from ..train.loading import config_differences
from .driver import run_name
from .presets import RecallPreset

INIT_FILE = "init_from.txt"  # in a run directory: the KIND_DIR it started from (absent: none)
# the attention fields that fix the model's task and length beside its sizes
_SAME_ATTENTION = ("block_size", "max_len")


def the_length(preset: RecallPreset) -> int:
    """The one length a grid started from other runs trains."""
    if len(preset.lengths) != 1:
        raise UsageError("--init-from starts one length's runs: pass one --lengths")
    return preset.lengths[0]


def _comparable(config: Mapping[str, Any]) -> dict[str, Any]:
    """A model configuration without its attention kind's own fields."""
    attention = config.get("attention") or {}
    return {
        **{k: v for k, v in config.items() if k != "attention"},
        **{f"attention.{k}": attention.get(k) for k in _SAME_ATTENTION},
    }


def check_sources(
    kind_dir: str,
    grid: str,
    wanted: Mapping[str, Mapping[str, Any]],
    seeds: Sequence[int],
    writes: Sequence[Path],
) -> None:
    """``UsageError`` unless ``kind_dir`` is a kind directory of a ``grid`` (``<task>-<length>``)
    run that this grid does not write (``writes``: its kind directories), with a finished run
    for every seed of the model of each kind in ``wanted`` (kind -> model configuration) but
    for its attention kind."""
    source = Path(kind_dir)
    if source.resolve() in {w.resolve() for w in writes}:
        raise UsageError(f"--init-from {kind_dir}: this grid writes that directory")
    if source.parent.name != grid:
        raise UsageError(
            f"--init-from {kind_dir}: not a kind directory of a {grid} grid (<out>/{grid}/<kind>)"
        )
    for seed in seeds:
        run_dir = source / f"seed{seed}"
        if not run_dir.is_dir():
            raise UsageError(f"--init-from: no run for seed {seed} ({run_dir} is missing)")
        try:
            saved = read_config(run_dir)
        except (CheckpointError, FileNotFoundError) as err:
            raise UsageError(f"--init-from: no weights for seed {seed} ({err})") from None
        steps = (saved.get("train_config") or {}).get("steps")
        if saved.get("step") != steps:
            raise UsageError(
                f"--init-from: {run_dir} has not finished (step {saved.get('step')} of {steps})"
            )
        for kind, config in wanted.items():
            diffs = config_differences(
                _comparable(saved.get("model_config") or {}), _comparable(config)
            )
            if diffs:
                raise UsageError(
                    f"--init-from {run_dir}: another model than {kind}'s ({'; '.join(diffs)})"
                )


def start_from(model: nn.Module, run_dir: Path) -> None:
    """``model`` with the final weights of the run in ``run_dir`` (checked by
    `check_sources`); only sort-net weights may be missing from it."""
    fresh = [n for n in warm_start(run_dir, model) if ".sort_net." not in f".{n}"]
    if fresh:
        raise UsageError(f"--init-from {run_dir}: holds no {', '.join(fresh)}")


def _started(run_dir: Path) -> str | None:
    path = run_dir / INIT_FILE
    return path.read_text(encoding="utf-8") if path.is_file() else None


def _how(init_from: str | None) -> str:
    return "from scratch" if init_from is None else f"from {init_from}"


def check_started_as(
    out: Path, names: Sequence[str], seeds: Sequence[int], init_from: str | None
) -> None:
    """``UsageError`` when ``--resume`` would continue a run (one with a checkpoint) that
    started otherwise than ``init_from`` says."""
    for name in names:
        for seed in seeds:
            run_dir = out / run_name(name, seed)
            if not list_checkpoints(run_dir / CHECKPOINTS_DIR):
                continue  # it starts afresh
            started = _started(run_dir)
            if started != init_from:
                raise UsageError(
                    f"--resume: {run_dir} started {_how(started)}, this command starts "
                    f"{_how(init_from)}; pass the same --init-from, or --overwrite"
                )


def mark_start(run_dir: Path, init_from: str | None, resume: bool) -> None:
    """Record in ``run_dir`` what a run that starts now starts from (a resumed run with a
    checkpoint keeps its record)."""
    if resume and list_checkpoints(run_dir / CHECKPOINTS_DIR):
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / INIT_FILE
    if init_from is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(init_from, encoding="utf-8")
