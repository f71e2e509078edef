"""What a run does with its directory (:func:`plan_run`), decided before anything is written:

- absent or empty: a new run;
- holds a run and neither ``--resume`` nor ``--overwrite`` was given: refused, untouched;
- ``--overwrite``: the directory is moved aside (``.<seed>.old-<time>-<pid>``), the run starts
  afresh, and the old copy is deleted once it has started (after every input check has
  passed, so a typo never costs a finished run, and never half deleted);
- ``--resume`` (or the config key ``load_checkpoint: true``): an unfinished run continues
  from the last completed epoch of ``checkpoint.ckpt``; a finished run of the same config is
  left as it is (of another config: refused, naming the keys); a directory without a usable
  checkpoint starts afresh.

Finished means the ``finished`` mark of ``checkpoint.ckpt``, written last (``run_state``):
``acc.json`` alone does not make a run finished.  The caller of ``plan_run``/``open_run``
holds the directory's lock (utils/run/runlock.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from utils.run.checkpoint import check_generator_states, pending_best, read_checkpoint
from utils.data.cifar import CIFAR_FOLDERS
from utils.config.rules import recorded_form
from utils.config.schema import Config, DataConfig
from utils.errors import CheckpointError, DataError, RunDirError, Stage1Error
from utils.names import ACC_FILE, ARGS_FILE, BEST_PARAM_FILE, CHECKPOINT_FILE
from utils.run.rundir import safe_join
from utils.run.runlock import live_owner, lock_refusal

# Keys a resumed run may change: they do not change what the run computes.
RESUME_FREE_KEYS = frozenset({"load_checkpoint", "save_checkpoint", "checkpoint_every", "checkpoint_every_s",
                              "description", "device",
                              "deterministic", "optim.nonfinite",
                              # how it runs, not what it computes (a resume may move to another machine)
                              "precision", "memory_format", "compile", "num_threads", "optim.sgd_impl",
                              "data.eval_batch_size", "data.num_workers"})

# Files whose presence marks a directory as holding a run (of this project or the original).
_RUN_MARKERS = (CHECKPOINT_FILE, ARGS_FILE, BEST_PARAM_FILE, ACC_FILE)



# ---------------------------------------------------------------------------
# Finished or not
# ---------------------------------------------------------------------------

@dataclass
class RunState:
    """What a run directory holds, as far as finishing goes.  ``finished`` comes from the marker
    in checkpoint.ckpt, which a run writes last; acc.json alone proves nothing (a run killed in its
    final evaluation has one).  A run of the published implementation (no checkpoint.ckpt, but
    acc.json and best.paramOnly) counts as finished."""
    finished: bool
    epoch: Optional[int] = None        # last completed epoch in the checkpoint
    total_epochs: Optional[int] = None
    best_epoch: Optional[int] = None
    config: Optional[dict] = None
    why: str = ""                      # for messages: what the directory holds

    def describe_unfinished(self) -> str:
        if self.epoch is None:
            return self.why or "no checkpoint"
        return f"last completed epoch {self.epoch} of {self.total_epochs}"


def run_state(path: Path) -> RunState:
    ckpt_file = Path(path) / CHECKPOINT_FILE
    if ckpt_file.is_file():
        try:
            ckpt = read_checkpoint(ckpt_file, mmap=True)
        except CheckpointError:
            return RunState(False, why="its checkpoint.ckpt is unreadable")
        return RunState(bool(ckpt.get("finished")), epoch=int(ckpt.get("epoch", 0)),
                        total_epochs=ckpt.get("total_epochs"),
                        best_epoch=int(ckpt["best_epoch"]) if "best_epoch" in ckpt else None,
                        config=ckpt.get("config"), why=CHECKPOINT_FILE)
    if (Path(path) / ACC_FILE).is_file() and (Path(path) / BEST_PARAM_FILE).is_file():
        return RunState(True, why="a run of the published implementation (acc.json, best.paramOnly)")
    return RunState(False, why="no checkpoint.ckpt and no acc.json")


# ---------------------------------------------------------------------------
# What to do with the run directory
# ---------------------------------------------------------------------------

@dataclass
class RunPlan:
    path: Path                    # the run directory (absolute)
    action: str                   # "new" | "overwrite" | "resume" | "done"
    checkpoint: Optional[dict] = None   # the loaded checkpoint when resuming
    note: str = ""                # what the run says about it
    old_copy: Optional[Path] = None     # --overwrite: the previous run, moved aside until the new one started
    restore_best: bool = False    # resuming: best.paramOnly is lost but is the checkpoint's own model
    created: bool = False         # open_run made the directory (a failure before its first epoch removes it)

    @property
    def first_epoch(self) -> int:
        return int(self.checkpoint["epoch"]) + 1 if self.checkpoint is not None else 1


def _has_run(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in _RUN_MARKERS)


def _check_writable(path: Path, exp_root: Path) -> None:
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RunDirError(f"cannot write the run directory {path}: {existing} is a file, not a folder "
                          f"(check --exp_root {str(exp_root)!r})")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"cannot write the run directory {path}: no write permission in {existing}")


def run_directory(cfg, exp_root) -> Path:
    """The run directory of a config (absolute, checked to stay inside exp_root and be writable)."""
    exp_root = Path(exp_root)
    try:
        path = safe_join(exp_root, cfg.run_subdir())
        _check_writable(path, exp_root)
    except OSError as exc:  # a path longer than the file system allows, a folder it cannot read
        raise RunDirError(f"cannot use the run directory {exp_root / cfg.run_subdir()}: {exc.strerror or exc} "
                          f"(check --exp_root)") from None
    return path


def _check_separate_from_stage1(cfg, stage: str, path: Path) -> None:
    if stage != "second" or not cfg.model.is_pretrained or not cfg.model.pretrained_path:
        return
    stage1 = (Path(cfg.model.pretrained_path) / str(cfg.seeds)).resolve()
    if stage1 == path or stage1 in path.parents or path in stage1.parents:
        raise Stage1Error(f"the stage-2 run directory {path} overlaps the stage-1 run {stage1}; stage 2 never "
                          "writes into a stage-1 run: change exp_name or model.pretrained_path")


def check_data_root(d: DataConfig) -> None:
    """data.root must be a folder; a dataset folder inside it must not lead outside it."""
    root = Path(d.root)
    if root.exists() and not root.is_dir():
        raise DataError(f"data.root = {d.root!r} is a file, not a folder; give the folder that holds the datasets")
    folder = CIFAR_FOLDERS.get(d.name)
    if folder is not None and (root / folder).exists():
        safe_join(root, Path(folder), "dataset folder", DataError)


def plan_run(cfg, stage: str, exp_root, resume: bool, overwrite: bool, check_only: bool = False,
             locked: bool = False) -> RunPlan:
    """Decide, before anything is written, what this run does with its directory.

    ``check_only``: memory-map the checkpoint instead of reading it (a pre-check
    of every seed before any work; the weights are not used).  ``locked``: this process
    holds the directory's lock (utils/run/runlock.py); otherwise a live owner refuses the plan.
    """
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other; give one")
    exp_root = Path(exp_root)
    path = run_directory(cfg, exp_root)
    check_data_root(cfg.data)
    _check_separate_from_stage1(cfg, stage, path)
    if not locked:
        owner = live_owner(path)
        if owner is not None:
            raise lock_refusal(path, owner)
    if not _has_run(path):
        note = f"nothing to resume in {path}; starting from epoch 1" if resume else ""
        return RunPlan(path, "new", note=note)
    if overwrite:
        return RunPlan(path, "overwrite", note=f"--overwrite: the previous run in {path} was replaced")
    ckpt_file = path / CHECKPOINT_FILE
    if not resume:
        state = run_state(path)
        if state.finished:
            raise RunDirError(_finished_message(path))
        where = state.describe_unfinished() if ckpt_file.is_file() else "no completed epoch"
        raise RunDirError(f"run directory {path} holds an unfinished run ({where}) and was left untouched; "
                          "add --resume to continue it or --overwrite to start it again")
    if not ckpt_file.is_file():
        if run_state(path).finished:
            return RunPlan(path, "done", note=f"run directory {path} holds a finished run; nothing to do "
                                              "(--overwrite runs it again)")
        return RunPlan(path, "overwrite", note=f"no checkpoint in {path}; starting again from epoch 1")
    ckpt = read_checkpoint(ckpt_file, mmap=check_only)
    diffs = config_differences(ckpt["config"], cfg.to_dict()) if ckpt.get("stage") == stage else []
    if ckpt.get("finished"):
        if diffs:
            raise RunDirError(f"run directory {path} holds a finished run of another config ({'; '.join(diffs)}); "
                              "it was left untouched: --overwrite runs it again with this config")
        return RunPlan(path, "done", note=f"run directory {path} holds a finished run; nothing to do "
                                          "(--overwrite runs it again)")
    if ckpt.get("stage") != stage:
        raise CheckpointError(f"{ckpt_file} belongs to a {ckpt.get('stage')} run, not {stage}; use --overwrite")
    if diffs:
        raise CheckpointError(f"cannot resume {ckpt_file}: {diffs[0]}; resume with the run's own config "
                              f"({path / ARGS_FILE}) or use --overwrite to start again")
    if "model" not in ckpt:
        return RunPlan(path, "overwrite", note=f"{path} stopped before its first epoch ended; starting again "
                                                "from epoch 1")
    check_generator_states(ckpt["rng"], ckpt_file)
    restore_best = _check_best_weights(path, ckpt)
    return RunPlan(path, "resume", checkpoint=ckpt, restore_best=restore_best,
                   note=f"resuming {path} after epoch {ckpt['epoch']} of {ckpt['total_epochs']} "
                        f"(best epoch {ckpt['best_epoch']})")


def _check_best_weights(path: Path, ckpt: dict) -> bool:
    """A resumed run needs the best weights of its checkpoint: best.paramOnly, or the pending file of
    its best epoch.  When both are gone and the best epoch is the checkpoint's own, its model is them
    (returns True: restore it); otherwise nothing can bring them back."""
    best = int(ckpt["best_epoch"])
    if (path / BEST_PARAM_FILE).is_file() or (path / pending_best(best)).is_file():
        return False
    if best == int(ckpt["epoch"]):
        return True
    raise CheckpointError(f"cannot resume {path}: {BEST_PARAM_FILE} (the weights of best epoch {best}) is missing and "
                          f"the checkpoint holds those of epoch {ckpt['epoch']}; restore the file, or use --overwrite "
                          "to start again")


def _finished_message(path: Path) -> str:
    return (f"run directory {path} already holds a finished run and was left untouched; add --overwrite to "
            "run it again from scratch (--resume only continues unfinished runs)")


# ---------------------------------------------------------------------------
# The config of a checkpoint against this run's
# ---------------------------------------------------------------------------

def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _comparable(config: dict) -> dict:
    """A config flattened, as two runs compare it: the form args.json records (an evaluation-only
    run's unread optim keys at their defaults), and without the configured tau when a tau sweep
    replaces it (args.json records the tau the sweep chose)."""
    flat = _flatten(recorded_form(config))
    if flat.get("model.logit_adjustment_tau_sweep"):
        flat.pop("model.logit_adjustment_tau", None)
    return flat


def config_differences(saved: dict, current: dict) -> list[str]:
    """Every key (other than RESUME_FREE_KEYS) whose value differs, each as a phrase."""
    a, b = _comparable(saved), _comparable(current)
    defaults = _flatten(Config().to_dict())
    out = []
    for key in sorted(set(a) | set(b)):
        if key in RESUME_FREE_KEYS:
            continue
        if key not in b or (key not in a and b[key] == defaults.get(key)):
            continue  # a key this code no longer has, or one added since the checkpoint, at its default
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key} = {a.get(key, '<absent>')!r} in the checkpoint but {b.get(key, '<absent>')!r} now")
    return out

