"""What each process of a run says and writes: the one place that decides it.

Under torchrun every process runs the same code.  Rank 0 alone (the only process without
torchrun) prints, logs to train.log, writes the run's files, holds the run directory's lock
and draws the figures: :func:`speaks` is that decision, and everything else asks it.  The
other ranks get a logger that drops their records (:class:`RankFilter`) and a
``FollowerRunDir`` whose writers do nothing; a refusal found by rank 0 reaches every rank
(:func:`on_speaking_rank`); a final message that may be a rank's own is printed by that rank,
with its number (:func:`report`).

The run's log is the stdlib logger ``wb.run``: run code logs to :data:`log`, and
:func:`logging_to` sends its records to the terminal and to the run's train.log for the
length of a run.  Importing this module loads no torch (the command line reports a bad
flag through it at once).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Callable, Iterator, Optional, TypeVar

from utils.errors import RunDirError, UserError
from utils.names import TRAIN_LOG_FILE

__all__ = ["log", "rank", "speaks", "say", "report", "on_speaking_rank", "logging_to", "RankFilter"]

T = TypeVar("T")

log = logging.getLogger("wb.run")
log.setLevel(logging.INFO)
log.propagate = False  # the run's lines go to its own handlers, not to whatever the root logger prints


def rank() -> int:
    """This process's rank: torchrun's RANK (the rank its process group gets), 0 without torchrun."""
    text = os.environ.get("RANK", "0").strip()
    return int(text) if text.isdigit() else 0


def speaks() -> bool:
    """Whether this process prints and writes the run's files: rank 0 only."""
    return rank() == 0


class RankFilter(logging.Filter):
    """Keeps the records of the speaking process only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return speaks()


log.addFilter(RankFilter())


def _print(message: str, stream) -> None:
    try:
        print(message, file=stream, flush=True)
    except (BrokenPipeError, ValueError):  # a closed terminal or pipe (| head): train.log still gets it
        pass


def say(message: str, stream=None) -> None:
    """Print a line on the speaking process (outside a run's log: stdout unless told)."""
    if speaks():
        _print(message, stream if stream is not None else sys.stdout)


def report(message: str, same_on_every_rank: bool = True) -> None:
    """A command line's final message, on stderr: once, by rank 0; a message that may be a
    rank's own (not a config error, which every rank shares) also by that rank, numbered."""
    if speaks():
        _print(message, sys.stderr)
    elif not same_on_every_rank:
        _print(f"[rank {rank()}] {message}", sys.stderr)


def on_speaking_rank(action: Callable[[], T], what: str) -> Optional[T]:
    """``action()`` on rank 0 alone (None elsewhere); a refusal there is raised on every rank,
    so that no rank waits for one that has already left."""
    from utils import distributed  # loaded by a run, not by the command line's first checks

    failure, result = None, None
    if speaks():
        try:
            result = action()
        except UserError as exc:
            failure = exc
    if distributed.any_rank(failure is not None):
        raise failure if failure is not None else RunDirError(f"rank 0 could not {what}; see its error")
    return result


class _Terminal(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        _print(record.getMessage(), sys.stdout)


class _TrainLog(logging.Handler):
    """Appends each line to the run's train.log; a failed write stops the run (RunDirError)."""

    def __init__(self, rundir):
        super().__init__()
        self.rundir = rundir

    def emit(self, record: logging.LogRecord) -> None:
        self.rundir.append_line(TRAIN_LOG_FILE, record.getMessage())


@contextlib.contextmanager
def logging_to(rundir) -> Iterator[logging.Logger]:
    """For the length of a run: :data:`log`'s lines to the terminal and to ``rundir``'s train.log."""
    handlers = [_Terminal(), _TrainLog(rundir)]
    for handler in handlers:
        log.addHandler(handler)
    try:
        yield log
    finally:
        for handler in handlers:
            log.removeHandler(handler)
