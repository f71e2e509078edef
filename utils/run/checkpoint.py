"""The checkpoint of a run: its format, the random states, and :class:`RunCheckpoint`, which
saves and restores the training loop's state at epoch boundaries.

``checkpoint.ckpt`` is written atomically at the start of a run (a small marker, utils/run/open_dir.py),
after completed epochs as :class:`CheckpointSchedule` decides (``checkpoint_every``: by default
often enough that saving costs < 5 % of the time), always after the
last epoch and on Ctrl-C (model, optimizer, schedule, the loop's state: epoch, best metric and
epoch, per-epoch records, skipped steps; every RNG state including each CUDA device's and the
training generators, which are CPU generators; the config) and at the end (``finished``; kept
in full with ``save_checkpoint: true``, otherwise shrunk to the small marker to spare the
disk).  It is read back with ``weights_only=True`` only.  Finished means that mark: a run
killed during its final evaluation has acc.json already.

The best weights follow a small commit protocol so that ``best.paramOnly`` always belongs
to the last checkpoint, whenever the process is killed: an improving epoch keeps a copy of
its weights in memory; when a checkpoint is due they are written to ``.best.epochN.pending``,
the checkpoint is written, then the pending file is renamed to ``best.paramOnly``.  On
resume, a pending file of the checkpoint's best epoch is promoted and any other is discarded
(:func:`_settle_best`).
"""
from __future__ import annotations

import pickle
import random
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from utils import distributed

from utils.run import runlog
from utils.errors import CheckpointError, RunInterrupted
from utils.names import BEST_LOG_FILE, BEST_PARAM_FILE, CHECKPOINT_FILE
from utils.run.rundir import RunDir, load_state_dict

FORMAT = "wb-longtail-checkpoint"
VERSION = 1
PENDING_PREFIX = ".best.epoch"
PENDING_SUFFIX = ".pending"


def pending_best(epoch: int) -> str:
    """The file an improving epoch's weights wait in until its checkpoint is written."""
    return f"{PENDING_PREFIX}{epoch}{PENDING_SUFFIX}"


# ---------------------------------------------------------------------------
# Reading and writing the file
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


def _marker(cfg, stage: Optional[str], finished: bool, **extra) -> dict:
    """The keys every checkpoint holds; ``extra`` adds (or overrides) the rest."""
    return {"format": FORMAT, "version": VERSION, "stage": stage or cfg.project_name, "finished": finished,
            "epoch": 0, "total_epochs": cfg.optim.total_epoch_num, "config": cfg.to_dict(), **extra}


def _settle_best(rundir: RunDir, ckpt: dict) -> None:
    """Promote the pending best weights of the checkpoint's best epoch; drop any other.

    A pending file of the checkpoint's best epoch was written before that checkpoint (a
    later attempt only writes epochs after the checkpoint it resumed from).
    """
    for pending in rundir.path.glob(f"{PENDING_PREFIX}*{PENDING_SUFFIX}"):
        epoch_text = pending.name[len(PENDING_PREFIX):-len(PENDING_SUFFIX)]
        if epoch_text == str(ckpt["best_epoch"]):
            rundir.replace(pending.name, BEST_PARAM_FILE)
        else:
            rundir.remove(pending.name)


# ---------------------------------------------------------------------------
# Random states
# ---------------------------------------------------------------------------

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
# When to save
# ---------------------------------------------------------------------------

# checkpoint_every = 0: wait at least this many times the last save's duration, so that
# saving takes at most 1/21 < 5 % of the time.  Not only a GPU's concern: a ResNet18 Digits-LT
# epoch takes ~0.8 s on 2 CPU cores and its 90 MB checkpoint ~0.26 s to write and fsync.
AUTO_SAVE_RATIO = 20


class CheckpointSchedule:
    """Whether a completed epoch writes checkpoint.ckpt (``fit`` also saves after the last
    epoch and on Ctrl-C, whatever this says).

    ``every_epochs`` N >= 1: every N epochs.  0 (auto): once the time since the last save
    has reached AUTO_SAVE_RATIO times that save's duration (the first epoch saves, which
    measures it: a ResNet34 checkpoint is ~171 MB, more than an H200 epoch takes to train).
    ``every_seconds`` > 0: also once that many seconds have passed since the last save.
    """

    def __init__(self, every_epochs: int, every_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.every_epochs, self.every_seconds = every_epochs, every_seconds
        self.clock = clock
        self.last_save_end = clock()          # the start of training counts as a save
        self.last_save_seconds: Optional[float] = None

    def due(self, epoch: int) -> bool:
        since = self.clock() - self.last_save_end
        if self.every_seconds > 0 and since >= self.every_seconds:
            return True
        if self.every_epochs >= 1:
            return epoch % self.every_epochs == 0
        if self.last_save_seconds is None:
            return True
        return since >= AUTO_SAVE_RATIO * self.last_save_seconds

    def saved(self, started: float) -> None:
        """A save that began at ``started`` (this schedule's clock) has just ended."""
        now = self.clock()
        self.last_save_seconds, self.last_save_end = now - started, now


def _on_any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag True on every rank when it is True on one, in a single all-reduce."""
    if not distributed.context().enabled:
        return flags
    t = distributed.all_reduce_sum(torch.tensor([int(f) for f in flags], device=device))
    return [bool(v) for v in (t > 0).tolist()]


# ---------------------------------------------------------------------------
# The checkpoint of a running fit
# ---------------------------------------------------------------------------

def _detached_copy(state: dict) -> OrderedDict:
    """A state dict's tensors copied, with its ``_metadata`` (module versions, which
    load_state_dict reads): the file written later is the one the live weights would give."""
    copy = OrderedDict((k, v.detach().clone()) for k, v in state.items())
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        copy._metadata = metadata
    return copy


class RunCheckpoint:
    """Saves and restores the state of the training loop at epoch boundaries.

    ``fit`` (utils/run/fit.py) calls: ``bind`` (once the optimizer and generators exist),
    ``restore`` (resuming: fills the loop's state, the model, the optimizer and every
    random state from the checkpoint), ``save_best`` (instead of writing best.paramOnly
    directly) and ``save`` (end of every epoch; it writes when the schedule says so).
    The loop's state is any object with ``state_dict()`` / ``load_state_dict()`` whose
    keys are the checkpoint's (``epoch``, ``best_acc``, ``best_epoch``, ``records``,
    ``track``, ``skipped_steps``).  ``run`` calls ``finish``.
    """

    def __init__(self, rundir: RunDir, cfg, stage: str, loaded: Optional[dict] = None):
        self.rundir, self.cfg, self.stage = rundir, cfg, stage
        self.loaded = loaded  # the checkpoint a resumed run continues from
        self.model = self.optimizer = None
        self.generators: dict[str, torch.Generator] = {}
        self.pending_epoch: Optional[int] = None   # the improving epoch whose weights wait for a checkpoint
        self.best_weights: Optional[dict] = None   # its weights (rank 0)
        self.saved_epoch, self.best_epoch = 0, 0  # of the last checkpoint written (or resumed from)
        self.device = torch.device("cpu")
        self.schedule = CheckpointSchedule(cfg.checkpoint_every, cfg.checkpoint_every_s)

    @property
    def resuming(self) -> bool:
        return self.loaded is not None

    @property
    def file(self) -> Path:
        return self.rundir.file(CHECKPOINT_FILE)

    def bind(self, model, optimizer, generators: dict, device: Optional[torch.device] = None) -> None:
        self.model, self.optimizer, self.generators = model, optimizer, generators
        self.device = device or torch.device("cpu")
        self.schedule = CheckpointSchedule(self.cfg.checkpoint_every, self.cfg.checkpoint_every_s)

    def restore(self, loop) -> None:
        """The loop's state, the model, the optimizer and every random state, from the checkpoint."""
        c = self.loaded
        try:
            loop.load_state_dict(c)
        except ValueError as exc:
            raise CheckpointError(f"{self.file} was written by another version of this code ({exc}); "
                                  "use --overwrite") from None
        self.model.load_state_dict(c["model"])
        try:
            self.optimizer.load_state_dict(c["optimizer"])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{self.file} holds optimizer state that does not fit this optimizer ({exc}), "
                                  "written by another version of this code; use --overwrite") from None
        relay_optimizer_state(self.optimizer)
        check_generator_states(c["rng"], self.file)
        set_rng_state(c["rng"])
        for name, gen in self.generators.items():
            gen.set_state(c["rng"]["generators"][name])
        self.saved_epoch, self.best_epoch = int(c["epoch"]), int(c["best_epoch"])
        self.loaded = None  # free the memory: the model now holds the weights

    def save_best(self, model, epoch: int) -> None:
        """Keep the improving epoch's weights until the next checkpoint writes them: between
        checkpoints only the last improvement counts, so earlier ones need not touch the disk."""
        if runlog.speaks():
            self.best_weights = _detached_copy(model.state_dict())
        self.pending_epoch = epoch

    def save(self, loop, stop_requested: bool = False) -> None:
        """The checkpoint of the epoch the loop has just completed, when :class:`CheckpointSchedule`
        says so, after the last epoch and on Ctrl-C (``stop_requested``); then commits its best
        weights; then honours Ctrl-C (RunInterrupted).

        Under torchrun only rank 0 writes and decides when (its clock, its save times); one
        all-reduce gives every rank its decision and any rank's Ctrl-C, so all stop after the
        same epoch, and none goes on before the checkpoint is written."""
        epoch, total = loop.epoch, self.cfg.optim.total_epoch_num
        stop, due = _on_any_rank([stop_requested, runlog.speaks() and self.schedule.due(epoch)], self.device)
        if not (due or stop or epoch >= total):
            return
        started = self.schedule.clock()
        if self.pending_epoch is not None and self.best_weights is not None:
            self.rundir.save_torch(pending_best(self.pending_epoch), self.best_weights)
            self.best_weights = None
        self.rundir.save_torch(CHECKPOINT_FILE, self._state(loop))
        if self.pending_epoch is not None:
            self.rundir.replace(pending_best(self.pending_epoch), BEST_PARAM_FILE)
            self.pending_epoch = None
        self.schedule.saved(started)
        distributed.barrier()
        self.saved_epoch, self.best_epoch = epoch, int(loop.best_epoch)
        if stop:
            raise RunInterrupted(f"stopped after epoch {epoch} of {total}; checkpoint saved in {self.file}",
                                 self.rundir.path)

    def _state(self, loop) -> dict:
        o = self.cfg.optim
        best_log = self.rundir.file(BEST_LOG_FILE)
        return _marker(
            self.cfg, self.stage, finished=False, **loop.state_dict(),
            model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
            scheduler={"name": "cosine", "base_lr": o.base_lr, "last_epoch": loop.epoch,
                       "total_epochs": o.total_epoch_num},
            rng={**rng_state(), "generators": {n: g.get_state() for n, g in self.generators.items()}},
            best_log=best_log.read_text(encoding="utf-8") if best_log.exists() else "",
            versions={"torch": str(torch.__version__), "python": sys.version.split()[0]},
        )

    def finish(self) -> None:
        """Mark the run finished: full checkpoint kept with save_checkpoint, else a small marker."""
        if not runlog.speaks():
            return
        if self.cfg.save_checkpoint and self.file.is_file():
            state = read_checkpoint(self.file)
            if "model" in state:
                state["finished"] = True
                self.rundir.save_torch(CHECKPOINT_FILE, state)
                return
        self.rundir.save_torch(CHECKPOINT_FILE, _marker(self.cfg, self.stage, finished=True,
                                                        epoch=self.cfg.optim.total_epoch_num))

    def diverged_message(self, value: str, epoch: int, step: Optional[int]) -> str:
        """What a run whose training loss became ``value`` says: where, and what was kept."""
        where = f"epoch {epoch}, step {step}" if step else f"epoch {epoch}"
        kept = (f"the checkpoint of epoch {self.saved_epoch} and the best weights (epoch {self.best_epoch}) are "
                f"kept in {self.rundir.path}") if self.saved_epoch else f"the initial weights are kept in {self.rundir.path}"
        return (f"training loss became {value} at {where}; the run stopped and {kept}. Lower optim.base_lr, "
                "or set optim.nonfinite to skip to skip such steps, then rerun with --resume")
