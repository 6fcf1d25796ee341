"""What a grid says while it trains: log lines that name their run, and the grid's progress.

Rule: while a run trains (in this process or in a ``--jobs`` worker), every log line the
experiments' handler prints starts with the run's ``[<name>/seed<N>]`` (`naming`), so the
lines of runs trained in parallel can be told apart; `GridProgress` logs runs done /
total, the elapsed time and an estimate of the time left each time a run finishes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

_RUN: list[str] = []  # the run this process trains now (innermost last)


class RunFormatter(logging.Formatter):
    """``%(message)s``, after ``[<run>] `` while a run trains."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"[{_RUN[-1]}] {text}" if _RUN else text


def setup_logging() -> None:
    """INFO lines on stderr that name their run (`RunFormatter`); does nothing when the
    root logger already has a handler (an application's, or pytest's)."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(RunFormatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


@contextmanager
def naming(run: str) -> Iterator[None]:
    """Log lines within this block name ``run`` (a run's ``<name>/seed<N>``)."""
    _RUN.append(run)
    try:
        yield
    finally:
        _RUN.pop()


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class GridProgress:
    """Counts a grid's finished runs and logs ``runs done / total``, elapsed time and ETA."""

    def __init__(self, total: int, *, enabled: bool = True) -> None:
        self.total = total
        self.done = 0
        self.enabled = enabled
        self.start = time.monotonic()

    def finished(self, run: str) -> None:
        """Count ``run`` as finished and log the progress line."""
        self.done += 1
        elapsed = time.monotonic() - self.start
        left = self.total - self.done
        eta = elapsed / self.done * left
        line = (
            f"grid: {self.done}/{self.total} runs done ({run} finished), "
            f"{_duration(elapsed)} elapsed, ETA {_duration(eta)}"
        )
        if self.enabled:
            logger.info("%s", line)
