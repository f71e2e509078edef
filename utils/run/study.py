"""The Optuna study behind ``python -m utils.sweep``: storage, sampler, and handing out trials.

Storage: by default a journal file, ``<exp_root>/sweeps/<study>/journal.log`` (Optuna's
JournalStorage with a file backend: one line per operation, appended under a file lock, so
several processes on one machine or on a shared file system can work on one study); or an
RDB URL (``sqlite:///...``, ``postgresql://...``, ``mysql://...``) for machines that share a
database instead of a file system.  A study remembers the search it was created for (the
config file and the space); re-running the same command continues it, another space under
the same name is refused.

``--trials N`` is the size of the study, whichever worker runs them: a worker takes a new
trial only while fewer than N are finished or running (a trial stopped by Ctrl-C does not
count: it is queued again with its parameters, and continues its runs when it comes back).
Counting and asking happen under a lock file beside the journal, so workers that share the
sweep folder never overshoot N; workers on separate machines with an RDB URL and no shared
folder may, in a rare race, run one trial more.
"""
from __future__ import annotations

import fcntl
import itertools
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from utils.config.search_space import Param, grid_size
from utils.errors import ConfigError

JOURNAL_FILE = "journal.log"
ASK_LOCK = ".ask.lock"
RDB_PREFIXES = ("sqlite:///", "postgresql://", "postgresql+", "mysql://", "mysql+")
SAMPLERS = ("tpe", "random", "grid")
# what a study records of the search it was created for (its user attributes)
IDENTITY_KEYS = ("config", "space", "stage1", "sampler", "seeds")


def _optuna():
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints one line per trial itself
    return optuna


def make_storage(url: str, sweep_dir: Path):
    """The storage named by --storage ('' = the journal file in the sweep folder)."""
    optuna = _optuna()
    if not url:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend, JournalStorage
        return JournalStorage(JournalFileBackend(str(sweep_dir / JOURNAL_FILE)))
    if not url.startswith(RDB_PREFIXES):
        raise ConfigError(f"--storage {url!r} is not an RDB URL; give sqlite:///FILE, postgresql://... or "
                          "mysql://..., or leave it out for the journal file in the sweep folder")
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as exc:  # noqa: BLE001 - a driver that is missing, a server that refuses: one line
        raise ConfigError(f"--storage {url!r} cannot be opened ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:200]})") from None


def make_sampler(name: str, params: list[Param], seed: Optional[int]):
    optuna = _optuna()
    if name == "random" or name == "grid":
        # a grid is the queue of its combinations (enqueue_grid): every trial's values are fixed, and
        # this sampler is never asked.  (Optuna's GridSampler stops the study from inside tell, which
        # only an optimize() loop allows.)
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def open_study(name: str, storage, sampler, identity: dict):
    """Create the study, or load it when it exists and was made for the same search."""
    optuna = _optuna()
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, direction="maximize",
                                load_if_exists=True)
    recorded = {k: study.user_attrs[k] for k in IDENTITY_KEYS if k in study.user_attrs}
    if not recorded:
        for key, value in identity.items():
            study.set_user_attr(key, value)
    elif recorded != {k: identity[k] for k in recorded}:
        differs = next(k for k in recorded if recorded[k] != identity[k])
        raise ConfigError(f"study {name!r} was created with {differs} {recorded[differs]!r}, not "
                          f"{identity[differs]!r}; re-run it with the same command, or give another --study")
    return study


def enqueue_grid(study, params: list[Param], sweep_dir: Path) -> None:
    """A new grid study: every combination queued once, in order (the first key varies slowest)."""
    with _ask_lock(sweep_dir):
        if study.get_trials(deepcopy=False):
            return
        for combination in itertools.product(*(p.values for p in params)):
            study.enqueue_trial(dict(zip((p.key for p in params), combination)), skip_if_exists=True)


def suggest(trial, params: list[Param]) -> dict:
    """The trial's value of every searched key (a queued trial's fixed values come back as queued)."""
    values = {}
    for p in params:
        if p.is_finite:
            values[p.key] = trial.suggest_categorical(p.key, list(p.values))
        elif p.kind == "int":
            values[p.key] = trial.suggest_int(p.key, int(p.low), int(p.high))
        else:
            values[p.key] = trial.suggest_float(p.key, p.low, p.high, log=p.kind == "log")
    return values


def counted(trial) -> bool:
    """Finished, failed or running: a trial that takes one of the study's N places."""
    from optuna.trial import TrialState
    if trial.state == TrialState.FAIL:
        return not trial.user_attrs.get("interrupted", False)
    return trial.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.PRUNED)


@contextmanager
def _ask_lock(sweep_dir: Path):
    sweep_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(sweep_dir / ASK_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def next_trial(study, n_trials: int, sweep_dir: Path):
    """A new (or queued) trial while the study has fewer than ``n_trials`` counted ones; else None."""
    with _ask_lock(sweep_dir):
        if sum(counted(t) for t in study.get_trials(deepcopy=False)) >= n_trials:
            return None
        return study.ask()


def claim(trial, run_name: str) -> None:
    """Name the trial's runs and this worker on the trial, so that a later worker can tell
    whether it is still alive (reclaim_abandoned)."""
    trial.set_user_attr("run_name", run_name)
    trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def reclaim_abandoned(study, sweep_dir: Path) -> list[int]:
    """Trials left running by a worker of this machine that no longer exists (killed with SIGKILL,
    the machine rebooted): recorded as interrupted and queued again, like a Ctrl-C.  Returns their
    numbers.  (A worker on another machine cannot be checked from here; its trial stays running.)"""
    from optuna.trial import TrialState
    host, reclaimed = socket.gethostname(), []
    with _ask_lock(sweep_dir):
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = t.user_attrs.get("worker") or {}
            if worker.get("host") != host or _alive(int(worker.get("pid", 0) or 0)) or not worker.get("pid"):
                continue
            run_name = t.user_attrs.get("run_name", "")
            study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
            study._storage.set_trial_user_attr(t._trial_id, "failure",
                                               f"its worker (pid {worker['pid']}) ended while it ran")
            study.tell(t.number, state=TrialState.FAIL)
            # a trial whose worker ended before it suggested its values keeps the values it was queued with
            params = dict(t.params) or dict(t.system_attrs.get("fixed_params", {}))
            study.enqueue_trial(params, user_attrs={"run_name": run_name} if run_name else None)
            reclaimed.append(t.number)
    return reclaimed


def study_size(sampler_name: str, params: list[Param], trials: Optional[int]) -> int:
    """--trials, checked: a grid has as many trials as combinations (default: all of them)."""
    if sampler_name == "grid":
        size = grid_size(params)
        if trials is not None and trials > size:
            raise ConfigError(f"--trials {trials} but the grid has {size} combinations; give --trials {size} or "
                              "fewer (each combination runs once)")
        return trials if trials is not None else size
    if trials is None:
        raise ConfigError(f"--sampler {sampler_name} needs --trials N (the number of trials of the study)")
    return trials


def finish_trial(study, trial, outcome, run_name: str, params_values: dict) -> None:
    """Record a trial's outcome; an interrupted one is queued again under the same run name."""
    from optuna.trial import TrialState
    trial.set_user_attr("run_name", run_name)
    trial.set_user_attr("seed_scores", {str(k): v for k, v in outcome.seed_scores.items()})
    trial.set_user_attr("seconds", round(outcome.seconds, 1))
    if outcome.failure:
        trial.set_user_attr("failure", outcome.failure[:1000])
        trial.set_user_attr("interrupted", outcome.interrupted)
        study.tell(trial, state=TrialState.FAIL)
        if outcome.interrupted:
            study.enqueue_trial(params_values, user_attrs={"run_name": run_name})
        return
    study.tell(trial, outcome.score)
