"""Opening the run directory that a plan (utils/run/plan.py) decided on: create it, move a
previous run aside for ``--overwrite`` (and delete it once the new run has started), or
reopen it to resume (the best weights of the checkpoint settled, its best-epoch log back).
The caller holds the directory's lock (utils/run/runlock.py).
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

from utils.run.checkpoint import _marker, _settle_best
from utils.names import BEST_LOG_FILE, BEST_PARAM_FILE, CHECKPOINT_FILE, FINAL_EVENTS_SUFFIX
from utils.run.rundir import RunDir, safe_join
from utils.errors import RunDirError
from utils.run.plan import RunPlan


def open_run(plan: RunPlan, exp_root, cfg) -> RunDir:
    """Create (or reopen, when resuming) the run directory of a plan; the caller holds its lock.

    ``--overwrite`` first moves the previous run aside (``.<seed>.old-<time>`` beside it; one
    rename, so it is never half deleted); the caller deletes that copy once the new run has
    started (:func:`delete_old_copy`)."""
    if plan.action == "overwrite" and plan.path.exists():
        safe_join(Path(exp_root), plan.path)  # never move anything outside exp/
        aside = plan.path.parent / f".{plan.path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        try:
            os.rename(plan.path, aside)
        except OSError as exc:
            raise RunDirError(f"cannot move the previous run {plan.path} aside to replace it: "
                              f"{exc.strerror or exc}; nothing was changed") from None
        plan.old_copy = aside
    if plan.action == "resume":
        rundir = RunDir(plan.path)
        _settle_best(rundir, plan.checkpoint)
        if plan.restore_best:
            rundir.save_torch(BEST_PARAM_FILE, plan.checkpoint["model"])
        best_log = plan.checkpoint.get("best_log", "")
        if best_log:
            rundir.write_text(BEST_LOG_FILE, best_log)
        else:
            rundir.remove(BEST_LOG_FILE)
        remove_final_events(rundir.path)
        return rundir
    plan.created = not plan.path.exists()
    try:
        rundir = RunDir.create(Path(exp_root), cfg.run_subdir())
        rundir.save_torch(CHECKPOINT_FILE, _marker(cfg, None, finished=False))
    except BaseException:
        if plan.created:
            shutil.rmtree(plan.path, ignore_errors=True)
        _put_back(plan)
        raise
    return rundir


def _put_back(plan: RunPlan) -> None:
    """The new run could not start: the previous one returns to its place."""
    if plan.old_copy is None:
        return
    try:
        os.rename(plan.old_copy, plan.path)
        plan.old_copy = None
    except OSError:
        pass  # it stays in plan.old_copy, which the error message names


def delete_old_copy(plan: RunPlan) -> Optional[str]:
    """Delete the previous run that --overwrite moved aside; a problem is returned as a warning
    (the new run is unaffected: the copy is a hidden folder beside it)."""
    if plan.old_copy is None:
        return None
    failures = _rmtree_collecting(plan.old_copy)
    copy, plan.old_copy = plan.old_copy, None
    if not failures:
        return None
    where, exc = failures[0]
    return (f"could not delete the previous run's copy {copy} ({len(failures)} problem(s), first: {where}: "
            f"{getattr(exc, 'strerror', None) or exc}); the new run is not affected; delete it by hand")


def _rmtree_collecting(path: Path) -> list:
    """shutil.rmtree that goes on past a file it cannot delete; returns [(path, exception)]."""
    failures: list = []
    if sys.version_info >= (3, 12):  # onerror is deprecated there
        shutil.rmtree(path, onexc=lambda fn, p, exc: failures.append((p, exc)))
    else:
        shutil.rmtree(path, onerror=lambda fn, p, info: failures.append((p, info[1])))
    return failures


def remove_final_events(run_dir: Path) -> None:
    """TensorBoard: the final evaluation's events have a file of their own
    (events.out.tfevents.*.final), so that a run resumed after a kill during that evaluation
    can drop them and write them once."""
    for old in Path(run_dir).glob(f"events.out.tfevents.*{FINAL_EVENTS_SUFFIX}"):
        old.unlink(missing_ok=True)
