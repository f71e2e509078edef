"""Runs that survive: resuming, refusing to clobber, stopping cleanly, reproducibility.

What a run does with its directory (``plan_run``), decided before anything is written:

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
holds the directory's lock (utils/runlock.py).

``checkpoint.ckpt`` is written atomically at the start of a run (a small marker), after
completed epochs as :class:`CheckpointSchedule` decides (``checkpoint_every``: every epoch
on the CPU; on a GPU often enough that saving costs < 5 % of the time), always after the
last epoch and on Ctrl-C (model, optimizer, schedule, epoch, best metric and epoch, the
per-epoch records, every RNG state including each CUDA device's and the training
generators, which are CPU generators, the config) and at the end (``finished``; kept in
full with ``save_checkpoint: true``, otherwise shrunk to the small marker to spare the
disk).  It is read back with ``weights_only=True`` only.

The best weights follow a small commit protocol so that ``best.paramOnly`` always belongs
to the last checkpoint, whenever the process is killed: an improving epoch writes
``.best.epochN.pending``; the epoch's checkpoint is written; then the pending file is
renamed to ``best.paramOnly``.  On resume, a pending file of the checkpoint's epoch is
promoted and any other is discarded.
"""
from __future__ import annotations

import os
import pickle
import random
import shlex
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from utils import distributed as ddp
from utils.errors import CheckpointError, DataError, RunDirError, RunInterrupted, Stage1Error, TrainingDiverged
from utils.config import Config, recorded_form
from utils.rundir import (ACC_FILE, ARGS_FILE, BEST_LOG_FILE, BEST_PARAM_FILE, CHECKPOINT_FILE, RunDir,
                          load_state_dict, safe_join)
from utils.runlock import live_owner

FORMAT = "wb-longtail-checkpoint"
VERSION = 1
PENDING_PREFIX = ".best.epoch"
PENDING_SUFFIX = ".pending"

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
# Reproducibility
# ---------------------------------------------------------------------------

def apply_determinism(enabled: bool) -> None:
    """``deterministic: true``: deterministic algorithms everywhere (CPU and CUDA).

    Seeds are applied in every case (``seed_everything`` and the training
    generators); this switch also removes the run-to-run variation of
    non-deterministic kernels (cuDNN algorithm choice, atomics in CUDA
    reductions).  cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` set before its first
    use, which is why this runs before the model reaches the device.

    It is also the one place that sets cuDNN's autotuner, for runs and the
    benchmark alike: ``cudnn.benchmark = not enabled`` (timing the candidate
    convolution algorithms at each new input shape picks the fastest, but which
    one wins may differ from run to run).
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = not enabled
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # numpy's state holds an ndarray, which weights_only loading refuses: store a tensor.
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved.  Each CUDA device's state is restored only where
    the same number of devices exists (nothing in training draws from it: the shuffling and
    augmentation generators are CPU generators, so a run resumes exactly on another device)."""
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def check_generator_states(rng: dict, where) -> None:
    """Refuse, in one line, CPU generator states that this version cannot restore.

    The global CPU state and the training generators must be CPU generator states (5056
    bytes in torch 2.x; a CUDA generator's is a 16-byte Philox seed and offset)."""
    size = torch.Generator().get_state().numel()
    states = {"torch": rng.get("torch"), **rng.get("generators", {})}
    for name, state in states.items():
        if isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.numel() == size:
            continue
        got = f"{state.numel()} bytes" if isinstance(state, torch.Tensor) else type(state).__name__
        raise CheckpointError(f"{where} cannot be resumed here: its {name} generator state ({got}) is not a CPU "
                              f"generator's ({size} bytes), e.g. from a version that augmented with a CUDA "
                              "generator; use --overwrite to start the run again")


def relay_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every optimizer state tensor shaped like its parameter the parameter's memory layout.

    ``load_state_dict`` keeps the strides the buffers were saved with; fused and
    multi-tensor kernels need a parameter, its gradient and its momentum (or Adam
    moments) laid out alike, and a run may resume with another ``memory_format``."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                    state[key] = torch.empty_like(param).copy_(value)


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------------------
# Reading checkpoint files
# ---------------------------------------------------------------------------

def read_checkpoint(path: Path, mmap: bool = False) -> dict:
    """checkpoint.ckpt, loaded weights-only; any problem is a one-line CheckpointError."""
    hint = "use --overwrite to start the run again"
    try:
        obj = load_state_dict(path, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path} was refused: {exc}; {hint} (or restore the file you trust)") from None
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{path} is unreadable or truncated ({exc}); {hint}") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this project; {hint}")
    if obj.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {obj.get('version')!r}, this code reads {VERSION}; {hint}")
    required = _MARKER_KEYS if "model" not in obj else {**_MARKER_KEYS, **_STATE_KEYS}
    for key, types in required.items():
        if not isinstance(obj.get(key), types) or (types is int and isinstance(obj.get(key), bool)):
            raise CheckpointError(f"{path} is damaged: its {key!r} is {'missing' if key not in obj else 'of the wrong type'}; "
                                  f"{hint}")
    return obj


# What every checkpoint holds (the start and finish markers too), and what a full one adds.
_MARKER_KEYS = {"stage": str, "finished": bool, "epoch": int, "total_epochs": int, "config": dict}
_STATE_KEYS = {"model": dict, "optimizer": dict, "best_epoch": int, "best_acc": (int, float), "records": list,
               "track": dict, "rng": dict}


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


def config_difference(saved: dict, current: dict) -> Optional[str]:
    """The first key (other than RESUME_FREE_KEYS) whose value differs, as a phrase."""
    diffs = config_differences(saved, current)
    return diffs[0] if diffs else None


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
                        config=ckpt.get("config"), why="checkpoint.ckpt")
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


# The dataset folders the loaders read under data.root (SPEC 4.1).
_DATA_FOLDERS = {"Cifar10": "cifar-10-batches-py", "Cifar100": "cifar-100-python"}


def check_data_root(cfg) -> None:
    """data.root must be a folder; a dataset folder inside it must not lead outside it."""
    root = Path(cfg.data.root)
    if root.exists() and not root.is_dir():
        raise DataError(f"data.root = {cfg.data.root!r} is a file, not a folder; give the folder that holds the datasets")
    folder = _DATA_FOLDERS.get(cfg.data.name)
    if folder is not None and (root / folder).exists():
        safe_join(root, Path(folder), "dataset folder", DataError)


def plan_run(cfg, stage: str, exp_root, resume: bool, overwrite: bool, check_only: bool = False,
             locked: bool = False) -> RunPlan:
    """Decide, before anything is written, what this run does with its directory.

    ``check_only``: memory-map the checkpoint instead of reading it (a pre-check
    of every seed before any work; the weights are not used).  ``locked``: this process
    holds the directory's lock (utils/runlock.py); otherwise a live owner refuses the plan.
    """
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other; give one")
    exp_root = Path(exp_root)
    path = run_directory(cfg, exp_root)
    check_data_root(cfg)
    _check_separate_from_stage1(cfg, stage, path)
    if not locked:
        owner = live_owner(path)
        if owner is not None:
            raise _lock_refusal(path, owner)
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
    if (path / BEST_PARAM_FILE).is_file() or (path / f"{PENDING_PREFIX}{best}{PENDING_SUFFIX}").is_file():
        return False
    if best == int(ckpt["epoch"]):
        return True
    raise CheckpointError(f"cannot resume {path}: {BEST_PARAM_FILE} (the weights of best epoch {best}) is missing and "
                          f"the checkpoint holds those of epoch {ckpt['epoch']}; restore the file, or use --overwrite "
                          "to start again")


def _lock_refusal(path: Path, owner) -> RunDirError:
    from utils.runlock import _refusal, lock_path
    return _refusal(path, lock_path(path), owner)


def _finished_message(path: Path) -> str:
    return (f"run directory {path} already holds a finished run and was left untouched; add --overwrite to "
            "run it again from scratch (--resume only continues unfinished runs)")


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
        elif rundir.file(BEST_LOG_FILE).exists():
            rundir.file(BEST_LOG_FILE).unlink()
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


# TensorBoard: the events of the final evaluation go to their own file (events.out.tfevents.*.final),
# so that a run resumed after a kill during that evaluation can drop them and write them once.
FINAL_EVENTS_SUFFIX = ".final"


def remove_final_events(run_dir: Path) -> None:
    for old in Path(run_dir).glob(f"events.out.tfevents.*{FINAL_EVENTS_SUFFIX}"):
        old.unlink(missing_ok=True)


def _settle_best(rundir: RunDir, ckpt: dict) -> None:
    """Promote the pending best weights of the checkpoint's best epoch; drop any other.

    A pending file of the checkpoint's best epoch was written before that checkpoint (a
    later attempt only writes epochs after the checkpoint it resumed from).
    """
    for pending in rundir.path.glob(f"{PENDING_PREFIX}*{PENDING_SUFFIX}"):
        epoch_text = pending.name[len(PENDING_PREFIX):-len(PENDING_SUFFIX)]
        if epoch_text == str(ckpt["best_epoch"]):
            os.replace(pending, rundir.file(BEST_PARAM_FILE))
        else:
            pending.unlink()


def _marker(cfg, stage: Optional[str], finished: bool, **extra) -> dict:
    return {"format": FORMAT, "version": VERSION, "stage": stage or cfg.project_name, "finished": finished,
            "epoch": 0, "total_epochs": cfg.optim.total_epoch_num, "config": cfg.to_dict(), **extra}


def resume_command(stage: str, argv) -> str:
    args = [a for a in argv if a not in ("--resume", "--overwrite")]
    c = ddp.context()
    if c.enabled:  # the same launch again (multi-node: also --nnodes and the rendezvous of the first launch)
        nodes = c.world_size // max(c.local_world_size, 1)
        launcher = ["torchrun"] + ([f"--nnodes={nodes}"] if nodes > 1 else []) + [f"--nproc_per_node={c.local_world_size}"]
        return shlex.join([*launcher, f"{stage}.py", *args, "--resume"])
    return shlex.join(["python", f"{stage}.py", *args, "--resume"])


# ---------------------------------------------------------------------------
# When to save
# ---------------------------------------------------------------------------

# checkpoint_every = 0 on a GPU: wait at least this many times the last save's duration,
# so that saving takes at most 1/21 < 5 % of the time.
AUTO_SAVE_RATIO = 20


class CheckpointSchedule:
    """Whether a completed epoch writes checkpoint.ckpt (``fit`` also saves after the last
    epoch and on Ctrl-C, whatever this says).

    ``every_epochs`` N >= 1: every N epochs.  0 (auto): every epoch on the CPU, where an
    epoch takes far longer than a save; on other devices once the time since the last save
    has reached AUTO_SAVE_RATIO times that save's duration (the first epoch saves, which
    measures it: a ResNet34 checkpoint is ~171 MB, more than an H200 epoch takes to train).
    ``every_seconds`` > 0: also once that many seconds have passed since the last save.
    """

    def __init__(self, every_epochs: int, every_seconds: float, device_type: str,
                 clock: Callable[[], float] = time.monotonic):
        self.every_epochs, self.every_seconds, self.device_type = every_epochs, every_seconds, device_type
        self.clock = clock
        self.last_save_end = clock()          # the start of training counts as a save
        self.last_save_seconds: Optional[float] = None

    def due(self, epoch: int) -> bool:
        since = self.clock() - self.last_save_end
        if self.every_seconds > 0 and since >= self.every_seconds:
            return True
        if self.every_epochs >= 1:
            return epoch % self.every_epochs == 0
        if self.device_type == "cpu" or self.last_save_seconds is None:
            return True
        return since >= AUTO_SAVE_RATIO * self.last_save_seconds

    def saved(self, started: float) -> None:
        """A save that began at ``started`` (this schedule's clock) has just ended."""
        now = self.clock()
        self.last_save_seconds, self.last_save_end = now - started, now


def _on_any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag True on every rank when it is True on one, in a single all-reduce."""
    if not ddp.context().enabled:
        return flags
    t = ddp.all_reduce_sum(torch.tensor([int(f) for f in flags], device=device))
    return [bool(v) for v in (t > 0).tolist()]


# ---------------------------------------------------------------------------
# The checkpoint of a running fit
# ---------------------------------------------------------------------------

class RunCheckpoint:
    """Saves and restores the state of ``fit`` at epoch boundaries.

    ``fit`` calls: ``bind`` (once the optimizer and generators exist),
    ``restore`` (returns the first epoch to train and the best so far),
    ``save_best`` (instead of writing best.paramOnly directly) and ``save``
    (end of every epoch; it writes when the schedule says so).  ``run`` calls
    ``finish`` and ``close``.
    """

    def __init__(self, rundir: RunDir, cfg, stage: str, plan: Optional[RunPlan] = None, log=None):
        self.rundir, self.cfg, self.stage, self.log = rundir, cfg, stage, log
        self.loaded = plan.checkpoint if plan is not None else None
        self.model = self.optimizer = None
        self.generators: dict[str, torch.Generator] = {}
        self.pending_epoch: Optional[int] = None
        self.saved_epoch, self.best_epoch = 0, 0
        self.guard: Optional[NonFiniteGuard] = None
        self.stopper: Optional[GracefulStop] = None
        self.device = torch.device("cpu")
        self.schedule = CheckpointSchedule(cfg.checkpoint_every, cfg.checkpoint_every_s, "cpu")

    @property
    def resuming(self) -> bool:
        return self.loaded is not None

    def bind(self, model, optimizer, generators: dict, train_state=None, device=None) -> None:
        self.model, self.optimizer, self.generators = model, optimizer, generators
        self.device = device or torch.device("cpu")
        self.schedule = CheckpointSchedule(self.cfg.checkpoint_every, self.cfg.checkpoint_every_s, self.device.type)
        if train_state is not None:
            self.guard = NonFiniteGuard(self.cfg.optim.nonfinite, self.device, self)
            self.guard.attach(train_state)
        self.stopper = GracefulStop()
        self.stopper.install()

    def restore(self, records: list, track: dict, best_acc: float, best_epoch: int):
        """(first epoch, best_acc, best_epoch); fills records and track in place when resuming."""
        if self.loaded is None:
            self._epoch_started(1)
            return 1, best_acc, best_epoch
        c = self.loaded
        saved_track = dict(c["track"])
        if "step_loss" in track and "step_loss" not in saved_track:  # checkpoints from before the per-step losses
            saved_track["step_loss"] = [torch.empty(0) for _ in saved_track.get("acc_val", [])]
        c["track"] = saved_track
        if set(c["track"]) != set(track):
            raise CheckpointError(f"{self.rundir.file(CHECKPOINT_FILE)} was written by another version of this "
                                  f"code (records {sorted(c['track'])}, expected {sorted(track)}); use --overwrite")
        file = self.rundir.file(CHECKPOINT_FILE)
        self.model.load_state_dict(c["model"])
        try:
            self.optimizer.load_state_dict(c["optimizer"])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{file} holds optimizer state that does not fit this optimizer ({exc}), "
                                  "written by another version of this code; use --overwrite") from None
        relay_optimizer_state(self.optimizer)
        check_generator_states(c["rng"], file)
        set_rng_state(c["rng"])
        for name, gen in self.generators.items():
            gen.set_state(c["rng"]["generators"][name])
        records[:] = list(c["records"])
        for key in track:
            track[key][:] = list(c["track"][key])
        self.saved_epoch, self.best_epoch = int(c["epoch"]), int(c["best_epoch"])
        self.loaded = None  # free the memory: the model now holds the weights
        self._epoch_started(self.saved_epoch + 1)
        if self.saved_epoch >= self.cfg.optim.total_epoch_num:
            self.close()  # only the final evaluation is left
        return self.saved_epoch + 1, float(c["best_acc"]), self.best_epoch

    def save_best(self, model, epoch: int) -> None:
        self.rundir.save_torch(f"{PENDING_PREFIX}{epoch}{PENDING_SUFFIX}", model.state_dict())
        if self.rundir.writes and self.pending_epoch is not None and self.pending_epoch != epoch:
            self.rundir.file(f"{PENDING_PREFIX}{self.pending_epoch}{PENDING_SUFFIX}").unlink(missing_ok=True)
        self.pending_epoch = epoch

    def save(self, epoch: int, best_acc: float, best_epoch: int, records: list, track: dict) -> None:
        """The checkpoint of a completed epoch, when :class:`CheckpointSchedule` says so, after
        the last epoch and on Ctrl-C; then commits its best weights; then honours Ctrl-C.

        Under torchrun only rank 0 writes and decides when; one all-reduce gives every rank
        its decision and any rank's Ctrl-C, so all stop after the same epoch, and none goes
        on before the checkpoint is written."""
        total = self.cfg.optim.total_epoch_num
        if self.guard is not None:
            skipped = self.guard.end_epoch()
            if skipped and self.log is not None:
                self.log.info(f"epoch {epoch}: skipped {skipped} steps with a non-finite loss or gradient "
                              "(optim.nonfinite = skip)")
        requested = self.stopper is not None and self.stopper.requested
        stop, due = _on_any_rank([requested, self.rundir.writes and self.schedule.due(epoch)], self.device)
        if not (due or stop or epoch >= total):
            self._epoch_started(epoch + 1)
            return
        started = self.schedule.clock()
        best_log = self.rundir.file(BEST_LOG_FILE)
        state = _marker(
            self.cfg, self.stage, finished=False,
            epoch=epoch, model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
            scheduler={"name": "cosine", "base_lr": self.cfg.optim.base_lr, "last_epoch": epoch,
                       "total_epochs": self.cfg.optim.total_epoch_num},
            best_acc=float(best_acc), best_epoch=int(best_epoch), records=list(records),
            track={k: list(v) for k, v in track.items()},
            rng={**rng_state(), "generators": {n: g.get_state() for n, g in self.generators.items()}},
            best_log=best_log.read_text(encoding="utf-8") if best_log.exists() else "",
            skipped_steps=self.guard.skipped_total if self.guard is not None else 0,
            versions={"torch": str(torch.__version__), "python": sys.version.split()[0]},
        )
        self.rundir.save_torch(CHECKPOINT_FILE, state)
        if self.pending_epoch is not None:
            if self.rundir.writes:
                os.replace(self.rundir.file(f"{PENDING_PREFIX}{self.pending_epoch}{PENDING_SUFFIX}"),
                           self.rundir.file(BEST_PARAM_FILE))
            self.pending_epoch = None
        self.schedule.saved(started)
        ddp.barrier()
        self.saved_epoch, self.best_epoch = epoch, int(best_epoch)
        if stop:
            self.close()
            raise RunInterrupted(f"stopped after epoch {epoch} of {total}; checkpoint saved in "
                                 f"{self.rundir.file(CHECKPOINT_FILE)}", self.rundir.path)
        if epoch >= total:
            self.close()  # from here on, Ctrl-C stops at once; --resume redoes the final evaluation
        self._epoch_started(epoch + 1)

    def _epoch_started(self, epoch: int) -> None:
        if self.guard is not None:
            self.guard.start_epoch(epoch)

    def finish(self) -> None:
        """Mark the run finished: full checkpoint kept with save_checkpoint, else a small marker."""
        path = self.rundir.file(CHECKPOINT_FILE)
        if not self.rundir.writes:
            return
        if self.cfg.save_checkpoint and path.is_file():
            state = read_checkpoint(path)
            if "model" in state:
                state["finished"] = True
                self.rundir.save_torch(CHECKPOINT_FILE, state)
                return
        self.rundir.save_torch(CHECKPOINT_FILE, _marker(self.cfg, self.stage, finished=True,
                                                        epoch=self.cfg.optim.total_epoch_num))

    def diverged(self, exc: BaseException) -> str:
        """The message for a FloatingPointError raised by the training loop itself."""
        step = self.guard.first_bad_step() if self.guard is not None else None
        epoch = self.guard.epoch if self.guard is not None else self.saved_epoch + 1
        return self._diverged_text(str(exc).split(" in epoch")[0].replace("training loss became ", ""), epoch, step)

    def _diverged_text(self, value: str, epoch: int, step: Optional[int]) -> str:
        where = f"epoch {epoch}, step {step}" if step else f"epoch {epoch}"
        kept = (f"the checkpoint of epoch {self.saved_epoch} and the best weights (epoch {self.best_epoch}) are "
                f"kept in {self.rundir.path}") if self.saved_epoch else f"the initial weights are kept in {self.rundir.path}"
        return (f"training loss became {value} at {where}; the run stopped and {kept}. Lower optim.base_lr, "
                "or set optim.nonfinite to skip to skip such steps, then rerun with --resume")

    def close(self) -> None:
        """Restore the signal handlers.  Called from ``run``'s ``finally``: a FloatingPointError
        raised by the training loop on its way out gets the epoch and step (``exc.diverged``)."""
        if self.stopper is not None:
            self.stopper.uninstall()
        exc = sys.exc_info()[1]
        if isinstance(exc, FloatingPointError) and not hasattr(exc, "diverged"):
            exc.diverged = self.diverged(exc)


# ---------------------------------------------------------------------------
# Non-finite losses
# ---------------------------------------------------------------------------

class NonFiniteGuard:
    """Watches every training step's loss without editing the training loop.

    It wraps the objective (called once per step) and the optimizer of a
    ``TrainState``.  ``stop``: the first non-finite loss raises TrainingDiverged
    with its epoch and step, before the optimizer applies it; on CUDA the flag
    stays on the device and is read every ``sync_every`` steps (and at the end
    of the epoch), so the check costs no host synchronisation per step.
    ``skip``: a step whose loss or gradients are not finite is not applied (its
    loss counts as 0 in the epoch's mean).  The check is computed on the device;
    a fused optimizer (fused SGD, the CUDA default) receives it as its
    ``found_inf`` attribute, the flag torch.amp's GradScaler uses (1 = do not
    apply this step), and skipped steps are counted on the device and read once
    per epoch, so no step waits; other optimizers read the flag every step.
    """

    def __init__(self, mode: str, device: torch.device, owner: RunCheckpoint):
        self.mode, self.owner = mode, owner
        self.sync_every = 1 if device.type == "cpu" else 25
        self.epoch, self.step = 1, 0
        self.skipped_epoch = self.skipped_total = 0
        self._bad_step: Optional[torch.Tensor] = None
        self._step_t: Optional[torch.Tensor] = None
        self._last_ok: Optional[torch.Tensor] = None
        self._params: list = []
        self._skipped_on_device: Optional[torch.Tensor] = None
        self._buffers_ready = False

    def attach(self, state) -> None:
        self._params = [p for g in state.optimizer.param_groups for p in g["params"]]
        state.objective = _GuardedObjective(state.objective, self)
        state.optimizer = _GuardedOptimizer(state.optimizer, self)

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.step, self.skipped_epoch, self._bad_step, self._step_t = epoch, 0, 0, None, None
        self._skipped_on_device = None

    def end_epoch(self) -> int:
        """The number of steps this epoch skipped (one host read, at the end of the epoch)."""
        if self._skipped_on_device is not None:
            self.skipped_epoch += int(self._skipped_on_device)
            self._skipped_on_device = None
        self.skipped_total += self.skipped_epoch
        return self.skipped_epoch

    def first_bad_step(self) -> Optional[int]:
        return int(self._bad_step) if self._bad_step is not None and int(self._bad_step) > 0 else None

    def check_terms(self, terms: dict) -> dict:
        self.step += 1
        loss = sum(terms.values())
        ok = torch.isfinite(loss) if isinstance(loss, torch.Tensor) else torch.tensor(bool(np.isfinite(loss)))
        if self.mode == "skip":
            self._last_ok = ok
            return {k: torch.where(ok, v, torch.zeros_like(v)) for k, v in terms.items()}
        if self.sync_every == 1:
            if not bool(ok):
                raise TrainingDiverged(self.owner._diverged_text(str(float(loss.detach())), self.epoch, self.step))
            return terms
        if self._bad_step is None:  # device counters: no host-to-device copy, no sync per step
            self._bad_step = torch.zeros((), dtype=torch.long, device=ok.device)
            self._step_t = torch.zeros((), dtype=torch.long, device=ok.device)
        self._step_t += 1
        self._bad_step = torch.where((self._bad_step == 0) & ~ok, self._step_t, self._bad_step)
        if self.step % self.sync_every == 0 and int(self._bad_step) > 0:
            raise TrainingDiverged(self.owner._diverged_text("nan or inf", self.epoch, int(self._bad_step)))
        return terms

    def bad_step(self) -> Optional[torch.Tensor]:
        """A 0-d bool on the device: the loss or a gradient is not finite (None: nothing to check).

        One norm per gradient in multi-tensor kernels (``torch._foreach_norm``, in every
        supported torch; ``torch.nn.utils.get_total_norm`` needs 2.6); NaN and inf propagate
        through the sums, and a gradient whose norm overflows float32 counts as non-finite."""
        bad = None if self._last_ok is None else ~self._last_ok
        grads = [p.grad for p in self._params if p.grad is not None]
        if grads:
            grads_bad = ~torch.stack(torch._foreach_norm(grads)).isfinite().all()
            bad = grads_bad if bad is None else bad | grads_bad
        return bad

    def optimizer_step(self, optimizer, *args, **kwargs):
        if self.mode != "skip":
            return optimizer.step(*args, **kwargs)
        bad = self.bad_step()
        if bad is None:
            return optimizer.step(*args, **kwargs)
        if all(group.get("fused") for group in optimizer.param_groups):
            self._prepare_fused(optimizer)
            optimizer.found_inf = bad.float()
            self._skipped_on_device = bad.long() if self._skipped_on_device is None else self._skipped_on_device + bad
            return optimizer.step(*args, **kwargs)
        if bool(bad):  # a host read per step: only fused optimizers take the flag on the device
            self.skipped_epoch += 1
            return None
        return optimizer.step(*args, **kwargs)

    def _prepare_fused(self, optimizer) -> None:
        """Zero momentum buffers before the first fused SGD step.

        Fused SGD allocates them with ``torch.empty_like`` on its first step and, when
        ``found_inf`` skips that step, leaves them uninitialised for the next.  A zero
        buffer gives the identical first update (buf = 0.9 * 0 + grad, dampening 0)."""
        if self._buffers_ready:
            return
        self._buffers_ready = True
        if not isinstance(optimizer, torch.optim.SGD):
            return  # fused Adam/AdamW initialise their moments with zeros themselves
        for group in optimizer.param_groups:
            if group["momentum"] == 0:
                continue
            for param in group["params"]:
                state = optimizer.state[param]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(param)


class _GuardedObjective:
    def __init__(self, inner: Callable, guard: NonFiniteGuard):
        self._inner, self._guard = inner, guard

    def __call__(self, *args, **kwargs):
        return self._guard.check_terms(self._inner(*args, **kwargs))

    def __getattr__(self, name):  # set_epoch() and whatever else the objective offers
        return getattr(self._inner, name)


class _GuardedOptimizer:
    def __init__(self, inner, guard: NonFiniteGuard):
        self._inner, self._guard = inner, guard

    def step(self, *args, **kwargs):
        return self._guard.optimizer_step(self._inner, *args, **kwargs)

    def __getattr__(self, name):  # zero_grad, param_groups, state_dict...
        return getattr(self._inner, name)


# ---------------------------------------------------------------------------
# Ctrl-C and SIGTERM
# ---------------------------------------------------------------------------

class GracefulStop:
    """First Ctrl-C (or SIGTERM, as clusters send before killing a job): finish the
    current epoch, write its checkpoint, stop.  A second one stops at once (the
    checkpoint of the last completed epoch stays)."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None)

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            self.uninstall()
            raise KeyboardInterrupt
        self.requested = True
        if ddp.context().is_main:  # under torchrun every process gets the signal; one says so
            print("\ninterrupt: finishing this epoch and saving its checkpoint (press Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)

