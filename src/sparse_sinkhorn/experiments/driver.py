"""The one way every experiment trains its runs: a grid of (name, seed) runs.

An experiment is a set of *names* (attention kinds, classifier variants, ablation variants),
each trained with every seed. :func:`train_grid` is the only place that

* names a run's directory (:func:`run_name`: ``<out>/<name>/seed<seed>``, whatever the
  number of seeds, so ``--resume`` with another ``--seeds`` finds the same runs),
* checks every run directory before the first run trains (``--resume`` / ``--overwrite``
  rules of :func:`prepare_run_dir`), so a bad flag fails at once rather than an hour in,
* spreads the runs over ``--jobs`` one-thread worker processes (:func:`map_runs`), and
* summarises each name over its seeds (mean ± sample standard deviation).

An experiment supplies, per name, a *runner*: ``runner(seed=..., name=...)`` trains one run
in ``<out>/<name>`` and returns its record (a dict with at least ``"eval"``, a flat
``{metric: value}``, and ``"train_seconds"``). For ``--jobs > 1`` a runner must be picklable:
a :func:`functools.partial` of a module-level function with picklable arguments.
"""

from __future__ import annotations

import argparse
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from ..train import init_distributed
from ..train.checkpoint import list_checkpoints
from ..train.distributed import barrier
from ..train.rundir import allow_overwrite, check_writable, hold_run_lock
from .common import mean_and_std, setup_logging

Runner = Callable[..., dict[str, Any]]
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


def grid_options(args: argparse.Namespace) -> GridOptions:
    """The grid's options from an experiment's flags (``--out``, ``--resume``, ``--overwrite``,
    ``--jobs``). Runs trained in parallel would interleave their progress bars, so this also
    turns progress bars off when ``--jobs > 1``. ``--resume`` needs an existing ``--out``
    (checked here, before an experiment loads its data)."""
    jobs = int(getattr(args, "jobs", 1))
    if not str(args.out).strip():
        raise UsageError(f"--out must name a directory, got {args.out!r}")
    options = GridOptions(
        out=Path(args.out),
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
    """Check one training run's directory before :func:`train` uses it; touch nothing yet.

    * ``--out`` must be a directory this process can write (else a one-line error).
    * The main rank takes the run dir's lock for the rest of the process: a second process
      writing the same run gets a one-line error (a lock left by a dead process is free).
    * ``--overwrite`` only *marks* an existing run for replacement: :func:`train` removes it
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
    replaced by the mean over the seeds, ``eval_std`` beside it, ``train_seconds`` summed, and
    each run's seed, metrics and loss under ``runs``."""
    mean, std = mean_and_std([r["eval"] for r in runs])
    return {
        **runs[0],
        "eval": mean,
        "eval_std": std,
        "train_seconds": sum(r["train_seconds"] for r in runs),
        "runs": [
            {"seed": s, "eval": r["eval"], "train_loss": r.get("train_loss")}
            for s, r in zip(seeds, runs, strict=True)
        ],
    }


def check_runs(
    names: Sequence[str], seeds: Sequence[int], options: GridOptions
) -> dict[tuple[str, int], tuple[Path, bool]]:
    """Check every ``(name, seed)`` run directory (:func:`prepare_run_dir`) before any trains.

    Returns each run's directory and whether it resumes (``--resume`` and the directory exists:
    a run an interrupted grid never started starts fresh). The main rank first takes the lock of
    ``--out`` itself for the rest of the process (one grid per ``--out``; a second command gets
    a one-line error). When the runs will go to worker processes, each worker takes its own
    run's lock; otherwise the main rank takes them all here.
    :func:`train_grid` calls this; an experiment may call it earlier, before it loads its data.
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


def _prepared(
    runner: Runner, run_dir: Path, resume: bool, overwrite: bool, **kwargs: Any
) -> dict[str, Any]:
    """A runner in a worker process, which takes its run directory's lock itself."""
    prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
    return runner(**kwargs)


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
    together). Returns ``summarize(name, its runs, seeds)`` per name, in ``runners`` order.
    """
    if not seeds:
        raise UsageError("no seeds to train")
    parallel = options.in_workers
    dirs = check_runs(list(runners), seeds, options)
    calls: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []
    for (name, seed), (run_dir, resume) in dirs.items():
        kwargs = {"seed": seed, "name": run_name(name, seed)}
        if parallel:
            prepare = (runners[name], run_dir, resume, options.overwrite)
            calls.append((_prepared, prepare, kwargs))
        else:
            calls.append((runners[name], (), kwargs))
    records = map_runs(calls, options.jobs)
    groups: dict[str, list[dict[str, Any]]] = {}
    for (name, _), record in zip(dirs, records, strict=True):
        groups.setdefault(name, []).append(record)
    return [summarize(name, groups[name], seeds) for name in runners]


class WorkerDiedError(ChildProcessError):
    """A ``--jobs`` worker process died in the middle of a run (killed by a signal, or by the
    kernel when memory ran out); the message names the run. An ``OSError``, so the command
    prints it as one line."""


_STARTED: Any = None  # in a worker: where it reports (job index, pid) as each job starts


def _init_worker(threads: int, parent: int, started: Any = None) -> None:
    global _STARTED
    _STARTED = started
    torch.set_num_threads(threads)
    setup_logging()
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A worker whose parent died (killed, even by SIGKILL; perhaps before this worker had
    started) exits within a second instead of finishing its run, or waiting forever for the
    next, as an orphan."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _call(job: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]) -> Any:
    fn, fn_args, fn_kwargs = job
    return fn(*fn_args, **fn_kwargs)


def _call_pickled(index: int, payload: bytes) -> Any:
    if _STARTED is not None:
        _STARTED.put((index, os.getpid()))
    return _call(pickle.loads(payload))


def _job_label(job: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]], i: int) -> str:
    """A job's run for messages: its ``name`` keyword (a grid run's ``<name>/seed<N>``)."""
    name = job[2].get("name")
    return str(name) if name is not None else f"job {i} ({getattr(job[0], '__name__', job[0])})"


def _died(
    jobs: Sequence[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]],
    started: Any,
    processes: dict[int, Any],
    done: set[int],
) -> WorkerDiedError:
    """Which run's worker died, and how, from the workers' start reports and exit codes."""
    running: dict[int, int] = {}  # pid -> the job it started last
    while not started.empty():
        index, pid = started.get()
        running[pid] = index
    for process in processes.values():
        process.join(timeout=5)  # the pool terminates the other workers; let them settle
    codes = {pid: p.exitcode for pid, p in processes.items()}
    dead = [pid for pid, code in codes.items() if code not in (None, 0, -signal.SIGTERM)]
    dead = dead or [pid for pid, code in codes.items() if code not in (None, 0)]
    runs = [running[pid] for pid in dead if pid in running and running[pid] not in done]
    how = []
    for pid in dead:
        code = codes[pid]
        assert code is not None
        how.append(f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}")
    what = ", ".join(_job_label(jobs[i], i) for i in runs) or "a run"
    return WorkerDiedError(
        f"the worker process training {what} died ({'; '.join(how) or 'no exit status'}; "
        "out of memory is a common cause); the other runs were stopped: pass --resume to "
        "continue them"
    )


def map_runs(
    jobs: Sequence[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]], n_procs: int
) -> list[Any]:
    """Run independent training runs ``fn(*args, **kwargs)``, in order, ``n_procs`` at a time.

    ``n_procs > 1`` starts that many worker processes (spawned, one intra-op thread each, so
    small CPU models use one core each instead of contending for all of them); ``fn`` must be a
    module-level function and its arguments picklable. Each job travels as plain pickle bytes
    (tensors copied, not shared through one file descriptor each: a dataset of 20,000 token
    tensors would exhaust the descriptors) and only a few jobs are in flight at a time, so the
    data is not held once per job. The first failing run stops the rest. Under torchrun
    (several ranks) the runs always go one after another in this process: the ranks train each
    run together.
    """
    if n_procs <= 0:
        raise UsageError(f"--jobs must be > 0, got {n_procs}")
    if n_procs == 1 or len(jobs) <= 1 or init_distributed().world_size > 1:
        return [_call(job) for job in jobs]
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("spawn")
    workers = min(n_procs, len(jobs))
    results: list[Any] = [None] * len(jobs)
    finished: set[int] = set()
    queue = iter(enumerate(jobs))
    started = context.SimpleQueue()
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(1, os.getpid(), started)
    ) as pool:
        pending: dict[Future[Any], int] = {}

        def submit_next() -> None:
            for i, job in queue:
                payload = pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
                pending[pool.submit(_call_pickled, i, payload)] = i
                return

        for _ in range(workers + 1):  # one queued behind the running ones
            submit_next()
        processes = dict(getattr(pool, "_processes", None) or {})  # pid -> Process
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    i = pending.pop(future)
                    try:
                        results[i] = future.result()
                    except BrokenProcessPool:
                        raise _died(jobs, started, processes, finished) from None
                    finished.add(i)
                    submit_next()
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    return results


def add_grid_args(parser: argparse.ArgumentParser, *, default_seeds: int | str = 1) -> None:
    """``--seeds`` and ``--jobs``: how many seeds per name, how many runs at once."""
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="train each with this many seeds (--seed, --seed+1, ...) and report "
        f"mean ± std (default: {default_seeds})",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="train this many runs at once in worker processes of one thread each "
        "(one process per CPU core suits the cpu preset; default: 1)",
    )


def seed_list(args: argparse.Namespace, default: int = 1) -> list[int]:
    """``--seed, --seed + 1, ...``: ``--seeds`` of them (``default`` when not given)."""
    n = default if args.seeds is None else args.seeds
    if n <= 0:
        raise UsageError(f"--seeds must be > 0, got {n}")
    return [args.seed + i for i in range(n)]
