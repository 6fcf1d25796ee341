"""The one way every experiment trains its runs: a grid of (name, seed) runs.

An experiment is a set of *names* (attention kinds, classifier variants, ablation variants),
each trained with every seed. This module is the only place that

* names a run's directory (`run_name`: ``<out>/<name>/seed<seed>``, whatever the
  number of seeds, so ``--resume`` with another ``--seeds`` finds the same runs),
* checks every run directory before the first run trains (``--resume`` / ``--overwrite``
  rules of `prepare_run_dir`) and decides whether each run resumes, so a bad flag fails
  at once rather than an hour in,
* seeds a run (`seed_run`, before its runner builds anything),
* builds a run's [`TrainConfig`][sparse_sinkhorn.train.TrainConfig] from its preset and its
  experiment's `Schedule` (through `run_setup.train_config`, the one warm-up rule),
* trains, times and records a run (`fit`: ``train``, ``loss.png``, the common record),
* spreads the runs over ``--jobs`` one-thread worker processes (`map_runs`),
  naming each run in its log lines and logging the grid's progress, and
* summarises each name over its seeds (mean ± sample standard deviation).

An experiment supplies, per name, a *runner*: ``runner(run)`` gets the `Run` the
driver prepared, builds that run's data and model, trains them with `fit` and returns
its record (a dict with at least ``"eval"``, a flat ``{metric: value}``, and
``"train_seconds"`` for `summarize_seeds`). For ``--jobs > 1`` a runner must be
picklable: a `functools.partial` of a module-level function with picklable arguments.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from ..errors import UsageError
from ..train import TrainResult, init_distributed, memory, plot_metrics, train
from ..train.checkpoint import list_checkpoints
from ..train.distributed import barrier
from ..train.rng import seed_everything
from ..train.rundir import allow_overwrite, check_writable, hold_run_lock
from .presets import Preset, Schedule
from .progress import GridProgress, naming, setup_logging
from .run_setup import resumed_model_config, train_config
from .stats import mean_and_std
from .workers import Job, map_runs

Runner = Callable[["Run"], dict[str, Any]]
# summarize(name, its runs in seed order, the seeds) -> the name's record in the results.
Summary = Callable[[str, Sequence[dict[str, Any]], Sequence[int]], dict[str, Any]]


@dataclass(frozen=True)
class GridOptions:
    """Where and how a grid of runs trains (the experiments' shared flags)."""

    out: Path
    resume: bool = False
    overwrite: bool = False
    jobs: int = 1
    progress: bool = True  # progress bars (off when runs go in parallel: they would interleave)
    first_seed: int = 0  # --seed: the run whose plots an experiment keeps

    def __post_init__(self) -> None:
        if self.jobs <= 0:
            raise UsageError(f"--jobs must be > 0, got {self.jobs}")

    @property
    def in_workers(self) -> bool:
        """Whether the runs go to worker processes (``--jobs > 1``, not under torchrun)."""
        return self.jobs > 1 and init_distributed().world_size == 1


def grid_options(args: argparse.Namespace, out: str | None = None) -> GridOptions:
    """The grid's options from an experiment's flags (``--out``, ``--resume``, ``--overwrite``,
    ``--jobs``); ``out`` replaces ``--out`` where an experiment derives its directory from it.

    Runs trained in parallel would interleave their progress bars, so this also turns progress
    bars off when ``--jobs > 1``. ``--resume`` needs an existing ``--out`` (checked here,
    before an experiment loads its data). Sets up the log lines
    (`setup_logging`): an experiment calls this before it logs.
    """
    setup_logging()  # the experiment's log lines from here on
    jobs = int(getattr(args, "jobs", 1))
    out = args.out if out is None else out
    if not str(out).strip():
        raise UsageError(f"--out must name a directory, got {out!r}")
    options = GridOptions(
        out=Path(out),
        resume=bool(args.resume),
        overwrite=bool(args.overwrite),
        jobs=jobs,
        progress=not args.no_progress and jobs == 1,
        first_seed=int(args.seed),
    )
    if options.resume and not options.out.is_dir():
        raise UsageError(
            f"--resume: no run directory {str(options.out)!r}; "
            "start without --resume or pass the --out of an earlier run"
        )
    return options


def run_name(name: str, seed: int) -> str:
    """A run's directory under ``--out``: ``<name>/seed<seed>``."""
    return f"{name}/seed{seed}"


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool, is_main: bool = True) -> None:
    """Check one training run's directory before [`train`][sparse_sinkhorn.train.train] uses it;
    touch nothing yet.

    * ``--out`` must be a directory this process can write (else a one-line error).
    * The main rank takes the run dir's lock for the rest of the process: a second process
      writing the same run gets a one-line error (a lock left by a dead process is free).
    * ``--overwrite`` only *marks* an existing run for replacement:
      [`train`][sparse_sinkhorn.train.train] removes it
      when the new run starts, after its data, tokenizer and model were built, so a command
      that fails before that (missing data, a bad flag) leaves the earlier run intact.
    * ``--resume`` of a run dir that exists but holds no complete checkpoint (killed before or
      during its first checkpoint write) starts that run from step 0.

    Every rank checks (so all raise the same error).
    """
    check_writable(run_dir)
    has_run = bool(list_checkpoints(run_dir / "checkpoints"))
    if resume and not has_run and not run_dir.is_dir():
        raise UsageError(
            f"--resume: no checkpoints in {run_dir}; start without --resume, or pass "
            "the --out of an earlier run"
        )
    if has_run and not resume and not overwrite:
        raise UsageError(
            f"{run_dir} already holds a run; pass --resume to continue it, "
            "--overwrite to start over, or another --out"
        )
    if is_main:
        hold_run_lock(run_dir)
        if has_run and not resume:
            allow_overwrite(run_dir)


def summarize_seeds(
    name: str, runs: Sequence[dict[str, Any]], seeds: Sequence[int]
) -> dict[str, Any]:
    """``name``'s runs over ``seeds`` as one record: the first run's record with ``eval``
    replaced by the mean over the seeds, ``eval_std`` beside it, ``train_seconds`` summed,
    ``peak_mem_mb`` the smallest (every seed trains the same shapes; the first run in a
    process also counts the process's one-time allocations, about 0.1 GiB on CPU), and each
    run's seed, metrics, loss and peak memory under ``runs``."""
    mean, std = mean_and_std([r["eval"] for r in runs])
    peaks: list[float | None] = [r.get("peak_mem_mb") for r in runs]
    known = [p for p in peaks if p is not None]
    return {
        **runs[0],
        "eval": mean,
        "eval_std": std,
        "train_seconds": sum(r["train_seconds"] for r in runs),
        "peak_mem_mb": min(known) if len(known) == len(peaks) else None,
        "runs": [
            {"seed": s, "eval": r["eval"], "train_loss": r.get("train_loss"), "peak_mem_mb": p}
            for s, r, p in zip(seeds, runs, peaks, strict=True)
        ],
    }


def check_runs(
    names: Sequence[str], seeds: Sequence[int], options: GridOptions
) -> dict[tuple[str, int], tuple[Path, bool]]:
    """Check every ``(name, seed)`` run directory (`prepare_run_dir`) before any trains.

    Returns each run's directory and whether it resumes (``--resume`` and the directory exists:
    a run an interrupted grid never started starts fresh). The main rank first takes the lock of
    ``--out`` itself for the rest of the process (one grid per ``--out``; a second command gets
    a one-line error). When the runs will go to worker processes, each worker takes its own
    run's lock; otherwise the main rank takes them all here.
    `train_grid` calls this; an experiment may call it earlier, before it loads its data.
    """
    dist = init_distributed()
    parallel = options.in_workers
    if dist.rank == 0:
        # One grid per --out at a time: a second command on this --out is refused here, before
        # it touches a run (its workers would otherwise take runs this grid has not reached).
        check_writable(options.out)
        hold_run_lock(options.out)
    runs: dict[tuple[str, int], tuple[Path, bool]] = {}
    for name in names:
        for seed in seeds:
            run_dir = options.out / run_name(name, seed)
            resume = options.resume and run_dir.is_dir()
            prepare_run_dir(
                run_dir,
                resume=resume,
                overwrite=options.overwrite,
                is_main=dist.rank == 0 and not parallel,
            )
            runs[(name, seed)] = (run_dir, resume)
    barrier()
    return runs


@dataclass(frozen=True)
class Run:
    """One ``(name, seed)`` run of a grid, as the driver prepared it for its runner."""

    name: str  # the grid's name: an attention kind or a variant
    seed: int
    out: Path  # the grid's --out
    resume: bool  # continue from the checkpoint in ``dir`` (decided by `check_runs`)
    progress: bool  # show a progress bar
    keeps_plots: bool  # the --seed run: the one whose figures an experiment keeps

    @property
    def dir(self) -> Path:
        """The run's directory, ``<out>/<name>/seed<seed>``."""
        return self.out / run_name(self.name, self.seed)

    @property
    def label(self) -> str:
        """``<name>/seed<seed>``: how messages name the run."""
        return run_name(self.name, self.seed)


def seed_run(seed: int) -> None:
    """Seed torch, ``random`` and numpy for a run: the one place runs are seeded (model
    initialisation draws from these; [`train`][sparse_sinkhorn.train.train] reseeds for the
    data)."""
    seed_everything(seed)


def _start_run(runner: Runner, *, run: Run, take_lock: bool, overwrite: bool) -> dict[str, Any]:
    """One run, in this process or a worker (which takes the run directory's lock itself):
    seeded, and every log line it prints names it."""
    with naming(run.label):
        if take_lock:
            prepare_run_dir(run.dir, resume=run.resume, overwrite=overwrite)
        seed_run(run.seed)
        return runner(run)


def train_grid(
    runners: Mapping[str, Runner],
    seeds: Sequence[int],
    options: GridOptions,
    *,
    summarize: Summary = summarize_seeds,
) -> list[dict[str, Any]]:
    """Train every ``(name, seed)`` run and summarise each name over its seeds, in order.

    Every run directory is checked first (a run left unstarted by an interrupted ``--resume``
    grid starts fresh); then the runs train, ``jobs`` at a time in one-thread worker processes,
    or one after another in this process (always so under torchrun: the ranks train each run
    together), and rank 0 logs runs done / total, elapsed time and ETA as each finishes.
    Returns ``summarize(name, its runs, seeds)`` per name, in ``runners`` order.
    """
    if not seeds:
        raise UsageError("no seeds to train")
    parallel = options.in_workers
    dirs = check_runs(list(runners), seeds, options)
    calls: list[Job] = []
    for (name, seed), (_, resume) in dirs.items():
        run = Run(name, seed, options.out, resume, options.progress, seed == options.first_seed)
        how = {"run": run, "take_lock": parallel, "overwrite": options.overwrite}
        calls.append((_start_run, (runners[name],), how))
    progress = GridProgress(len(calls), enabled=init_distributed().is_main)
    labels = [run_name(name, seed) for name, seed in dirs]
    records = map_runs(calls, options.jobs, lambda i: progress.finished(labels[i]))
    groups: dict[str, list[dict[str, Any]]] = {}
    for (name, _), record in zip(dirs, records, strict=True):
        groups.setdefault(name, []).append(record)
    return [summarize(name, groups[name], seeds) for name in runners]


def model_sizes(preset: Preset) -> dict[str, Any]:
    """The model sizes a preset fixes: width, heads, layers, feed-forward width, dropout."""
    fields = ("d_model", "n_heads", "n_layers", "d_ff", "dropout")
    return {field: getattr(preset, field) for field in fields}


@dataclass
class Plan:
    """What a runner hands `fit`: a model built after `seed_run`, and its data."""

    model: nn.Module
    model_config: dict[str, Any]  # saved with every checkpoint and in the run's record
    data: Dataset[Any]
    loss_fn: Callable[..., Any]
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None
    collate_fn: Callable[[list[Any]], Any] | None = None


@dataclass
class Fitted:
    """A trained run: the model, what [`train`][sparse_sinkhorn.train.train] returned, and how long
    training took."""

    run: Run
    plan: Plan
    result: TrainResult
    seconds: float
    loss_png: str | None
    peak_mem_mb: float  # training's peak memory above the process's before it (train.memory)

    @property
    def eval(self) -> dict[str, float]:
        """The final evaluation, ``{metric: value}`` (without the ``eval/`` prefix)."""
        return {k.removeprefix("eval/"): v for k, v in self.result.eval_metrics.items()}

    @property
    def train_loss(self) -> float | None:
        """The last logged training loss."""
        return self.result.metrics.get("loss")

    @property
    def params(self) -> int:
        """The model's parameter count."""
        return sum(p.numel() for p in self.plan.model.parameters())

    def record(self, **first: Any) -> dict[str, Any]:
        """The run's record: ``first``, then parameters, loss, evaluation, training seconds,
        the loss plot (when the schedule draws one), the run directory and the model config."""
        plot = {"loss_png": self.loss_png} if self.loss_png is not None else {}
        return {
            **first,
            "params": self.params,
            "train_loss": self.train_loss,
            "eval": self.eval,
            "train_seconds": self.seconds,
            "peak_mem_mb": self.peak_mem_mb,
            **plot,
            "run_dir": str(self.run.dir),
            "config": self.plan.model_config,
        }


def fit(run: Run, plan: Plan, preset: Preset, schedule: Schedule) -> Fitted:
    """Train ``plan`` as ``run`` (resumed when the driver said so) with `train_config`,
    timing it and measuring its peak memory (`memory`, on the
    device it trains on; evaluations included); draw ``loss.png`` in the run directory when
    the schedule asks for it."""
    config = train_config(preset, schedule, seed=run.seed, progress=run.progress)
    if run.resume:
        plan = replace(plan, model_config=resumed_model_config(run.dir, plan.model_config))
    device = init_distributed().device.type  # where train() puts the model
    base = memory.reset_peak(device)
    t0 = time.perf_counter()
    result = train(
        plan.model,
        plan.data,
        plan.loss_fn,
        config,
        out_dir=run.dir,
        collate_fn=plan.collate_fn,
        eval_fn=plan.eval_fn,
        resume=run.resume,
        model_config=plan.model_config,
    )
    seconds = time.perf_counter() - t0
    peak_mem_mb = max(memory.peak(device) - base, 0.0)
    loss_png = None
    if schedule.loss_plot:
        path = plot_metrics(run.dir / "metrics.jsonl", run.dir / "loss.png", keys=("loss",))
        loss_png = str(path)
    return Fitted(run, plan, result, seconds, loss_png, peak_mem_mb)
