"""Training runs side by side: ``--jobs`` one-thread worker processes (`map_runs`).

Rule: this module knows nothing of experiments; it runs independent jobs ``fn(*args,
**kwargs)`` in order, several at a time, tells the caller as each one finishes, and turns a
worker that died into one error that names its run.
"""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import SparseSinkhornError, UsageError
from ..train import init_distributed
from .progress import setup_logging

Job = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class WorkerDiedError(SparseSinkhornError, ChildProcessError):
    """A ``--jobs`` worker process died in the middle of a run (killed by a signal, or by the
    kernel when memory ran out); the message names the run. A library error (and an
    ``OSError``, as before), so the command prints it as one line."""


_STARTED: Any = None  # in a worker: where it reports (job index, pid) as each job starts


def _init_worker(threads: int, parent: int, started: Any = None) -> None:
    global _STARTED
    _STARTED = started
    # Ctrl-C reaches the whole process group: the parent alone handles it and stops the
    # workers (each would otherwise print its own KeyboardInterrupt traceback)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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


def _call(job: Job) -> Any:
    fn, fn_args, fn_kwargs = job
    return fn(*fn_args, **fn_kwargs)


def _ignore(index: int) -> None:
    """The default ``on_done`` of `map_runs`."""


def _call_and_report(job: Job, index: int, report: Callable[[int], None]) -> Any:
    result = _call(job)
    report(index)
    return result


def _call_pickled(index: int, payload: bytes) -> Any:
    if _STARTED is not None:
        _STARTED.put((index, os.getpid()))
    return _call(pickle.loads(payload))


def _job_label(job: Job, i: int) -> str:
    """A job's run for messages: the ``label`` of its ``run`` keyword (a grid run's
    ``<name>/seed<N>``), or its ``name`` keyword."""
    label = getattr(job[2].get("run"), "label", None) or job[2].get("name")
    return str(label) if label is not None else f"job {i} ({getattr(job[0], '__name__', job[0])})"


def _drain(started: Any, running: dict[int, int]) -> None:
    """Read the workers' start reports into ``running`` (pid -> the job it started last). The
    parent reads them as runs finish, so the reports' pipe never fills (a worker blocked on a
    full pipe would stop the grid without a word)."""
    while not started.empty():
        index, pid = started.get()
        running[pid] = index


def _died(
    jobs: Sequence[Job],
    started: Any,
    running: dict[int, int],
    processes: dict[int, Any],
    done: set[int],
) -> WorkerDiedError:
    """Which run's worker died, and how, from the workers' start reports and exit codes."""
    _drain(started, running)
    for process in processes.values():
        process.join(timeout=5)  # the pool terminates the other workers; let them settle
    # The pool's own thread reaps the workers too: a worker it reaped between our wait and
    # its recording the status reads as running (None) for an instant, so read until settled.
    deadline = time.monotonic() + 5
    while any(p.exitcode is None for p in processes.values()) and time.monotonic() < deadline:
        time.sleep(0.01)
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


def _stop(processes: dict[int, Any]) -> None:
    """Terminate the workers still running and wait for them, so the pool shuts down at once
    and its queues and semaphores are released (a run stopped mid-way keeps its latest
    checkpoint: ``--resume`` continues it)."""
    for process in processes.values():
        if process.is_alive():
            process.terminate()
    for process in processes.values():
        process.join(timeout=10)


def map_runs(
    jobs: Sequence[Job], n_procs: int, on_done: Callable[[int], None] | None = None
) -> list[Any]:
    """Run independent training runs ``fn(*args, **kwargs)``, in order, ``n_procs`` at a time.

    ``n_procs > 1`` starts that many worker processes (spawned, one intra-op thread each, so
    small CPU models use one core each instead of contending for all of them); ``fn`` must be a
    module-level function and its arguments picklable. Each job travels as plain pickle bytes
    (tensors copied, not shared through one file descriptor each: a dataset of 20,000 token
    tensors would exhaust the descriptors) and only a few jobs are in flight at a time, so the
    data is not held once per job. The first failing run stops the rest. Under torchrun
    (several ranks) the runs always go one after another in this process: the ranks train each
    run together. ``on_done(i)`` is called in this process as job ``i`` finishes.
    """
    if n_procs <= 0:
        raise UsageError(f"--jobs must be > 0, got {n_procs}")
    report = on_done or _ignore
    if n_procs == 1 or len(jobs) <= 1 or init_distributed().world_size > 1:
        return [_call_and_report(job, i, report) for i, job in enumerate(jobs)]
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
        running: dict[int, int] = {}  # pid -> the job it started last
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                _drain(started, running)
                for future in done:
                    i = pending.pop(future)
                    try:
                        results[i] = future.result()
                    except BrokenProcessPool:
                        raise _died(jobs, started, running, processes, finished) from None
                    finished.add(i)
                    report(i)
                    submit_next()
        except BaseException:
            for future in pending:
                future.cancel()
            _stop(processes)  # Ctrl-C, SIGTERM, a failed run: the running runs stop now
            raise
    return results
