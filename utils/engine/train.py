"""One training epoch and its step, shared by both stages.

An epoch returns a plain record; writers (CSV, TensorBoard, logs) consume it.
Data lives on the training device as uint8 tensors; batches are sliced from a
per-epoch permutation and augmented on the device, with crop and flip
parameters drawn on a CPU generator.  Loss and accuracy are
accumulated on the device and read once per epoch (plus every
``progress_every`` steps when a progress bar is shown): no training step
waits for the device (tests/test_host_syncs.py checks it).  Forward passes
run under a :class:`FastPath` (autocast dtype, memory layout, optional
compiled forward).
"""
from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import torch
from torch import nn
import torch.nn.functional as F

from utils import distributed
from utils.engine.accel import CUDAGRAPH_MODES, FastPath
from utils.data.augment import BatchAugment, params_to
from utils.data.batches import SplitTensors, batch_slices, n_batches_of
from utils.errors import DataError
from utils.engine.metrics import class_averaged_accuracy

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is a dependency
    tqdm = None


def cosine_lr(base_lr: float, epoch: int, total_epochs: int) -> float:
    """Learning rate used during 1-based ``epoch``.

    The original steps CosineAnnealingLR(T_max=total, eta_min=0) once at the
    *start* of every training epoch, so epoch 1 already runs at the step-1
    rate and the last epoch at 0.
    """
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * epoch / total_epochs))


def _augmented_batches(split: SplitTensors, batches: list[torch.Tensor], state: "TrainState"):
    """(this rank's augmented images, labels, indices) of each global batch.

    The augmentation parameters are drawn on the CPU generator for the whole global batch
    and each rank copies and applies its slice: under torchrun the ranks' crops and flips
    differ and together equal those of one process (which draws the same numbers in the
    same order)."""
    device = split.labels.device
    for idx in batches:
        lo, hi = distributed.my_bounds(idx.shape[0])
        packed = state.augment.draw_params(idx.shape[0], state.augment_generator)
        dy, dx, flip = params_to(packed[:, lo:hi], device)
        x = state.augment.apply(split.images[idx[lo:hi]], dy, dx, flip, validate=False)
        yield x, split.labels[idx], idx


def train_batches(split, state: "TrainState", max_steps: Optional[int] = None):
    """(number of batches, iterator of (x, y, dataset indices)) for one training epoch.

    In-memory images are sliced from a fresh permutation and augmented on the
    device; the other splits (feature tables, image files: utils/data/batches.py)
    produce their batches themselves from the same shuffle generator.  Under
    torchrun, ``x`` holds this rank's part of the global batch while ``y`` and the
    indices are the whole global batch's (every rank knows the permutation).
    """
    if isinstance(split, SplitTensors):
        batches = batch_slices(len(split), state.batch_size, state.shuffle_generator, split.labels.device)
        batches = batches[:max_steps] if max_steps is not None else batches
        return len(batches), _augmented_batches(split, batches, state)
    n = n_batches_of(len(split), state.batch_size)
    if max_steps is not None:
        n = min(n, max_steps)
    return n, itertools.islice(split.epoch_batches(state.batch_size, state.shuffle_generator), n)


@dataclass
class TrainState:
    """What one training epoch needs besides the model."""
    optimizer: torch.optim.Optimizer
    objective: Callable  # (logits, labels, features) -> dict of named loss terms
    augment: BatchAugment
    batch_size: int
    n_classes: int
    shuffle_generator: torch.Generator            # CPU: the epoch's permutation
    augment_generator: Optional[torch.Generator]  # CPU: crop offsets and flips (None: the global RNG)
    after_step: Optional[Callable[[], None]] = None   # e.g. MaxNorm per step
    set_train_mode: Callable[[nn.Module], None] = field(default=lambda m: m.train())
    progress_every: int = 20
    fast: FastPath = field(default_factory=FastPath)
    forward: Optional[Callable] = None  # (features, logits) = forward(x): the DDP module under torchrun
    project_every_epoch: Optional[Callable[[], None]] = None  # MaxNorm once per epoch (fit calls it)
    # checks every step's loss (and gradients) and applies or skips the optimizer step (utils/engine/guard.py)
    guard: Optional["StepGuard"] = None


class StepGuard(Protocol):
    """What :func:`train_step` asks of a guard (utils/engine/guard.py ``NonFiniteGuard``)."""

    def check_terms(self, terms: dict) -> dict:
        """The step's loss terms, checked (and zeroed where the step will be skipped)."""

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()``, or not, as the check decided."""


def accumulate_confusion(counts: torch.Tensor, preds: torch.Tensor, labels: torch.Tensor) -> None:
    """counts[label, pred] += 1 in place, on the device.

    Unlike ``torch.bincount`` (which on CUDA reads the maximum back to size its
    output), a scatter-add into a preallocated K x K tensor never waits for the device.
    """
    k = counts.shape[0]
    flat = labels.long() * k + preds.long()
    counts.view(-1).scatter_add_(0, flat, torch.ones_like(flat))


def train_step(model: nn.Module, state: TrainState, x: torch.Tensor, y: torch.Tensor):
    """One optimisation step on a batch: (loss, named terms, logits), nothing read back."""
    fast = state.fast
    with fast.autocast():
        if state.forward is not None:
            if fast.compile_mode in CUDAGRAPH_MODES and fast.device_type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # as FastPath.forward: CUDA graphs reuse outputs
            h, logits = state.forward(fast.layout(x))
            # the loss of the global batch, from every rank's outputs (utils/distributed.py)
            h = distributed.gather_rows_autograd(h, y.shape[0])
            logits = distributed.gather_rows_autograd(logits, y.shape[0])
        else:
            h, logits = fast.forward(model, x)
        terms = state.objective(logits, y, h)
        if state.guard is not None:
            terms = state.guard.check_terms(terms)
        loss = sum(terms.values())
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if state.guard is not None:
        state.guard.step(state.optimizer)
    else:
        state.optimizer.step()
    if state.after_step is not None:
        state.after_step()
    return loss, terms, logits


class EpochTotals:
    """What one training epoch accumulates, kept on the device and read once at its end."""

    def __init__(self, n_images: int, n_batches: int, n_classes: int, device: torch.device):
        self.term_sums: dict[str, torch.Tensor] = {}
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.correct = torch.zeros(n_images, dtype=torch.bool, device=device)
        self.sample_loss = torch.full((n_images,), float("nan"), device=device)  # per-image CE, for per-class plots
        self.counts = torch.zeros(n_classes, n_classes, dtype=torch.long, device=device)
        self.step_loss = torch.full((n_batches,), float("nan"), device=device)  # the loss of every step
        self.images = 0  # trained images (the global batches), known on the host

    @torch.no_grad()
    def add(self, step: int, loss: torch.Tensor, terms: dict, logits: torch.Tensor, y: torch.Tensor,
            idx: torch.Tensor) -> None:
        bs = y.shape[0]
        self.images += bs
        self.loss_sum += loss.detach().double() * bs
        self.step_loss[step - 1] = loss.detach()
        for name, value in terms.items():
            self.term_sums[name] = self.term_sums.get(name, 0) + value.detach().double() * bs
        pred = logits.detach().argmax(dim=1)
        self.correct[idx] = pred == y
        self.sample_loss[idx] = F.cross_entropy(logits.detach().float(), y, reduction="none")
        accumulate_confusion(self.counts, pred, y)

    def progress(self) -> dict:
        """The running loss and accuracy for a progress bar (a host read)."""
        return {"loss": f"{float(self.loss_sum) / self.images:.4f}",
                "acc": f"{float(self.counts.diagonal().sum()) / self.images:.3f}"}

    def result(self, epoch: int) -> dict:
        """The epoch's record and per-image arrays (the epoch's host reads)."""
        seen = self.images
        if seen == 0:
            raise DataError("the training split yielded no batch")
        record = {"train_loss": float(self.loss_sum) / seen}
        for name, value in self.term_sums.items():
            record[f"train_{name}"] = float(value) / seen
        record["train_acc"] = float(self.counts.diagonal().sum()) / seen
        record["train_acc_cls"] = class_averaged_accuracy(self.counts.cpu())
        if not math.isfinite(record["train_loss"]):
            raise FloatingPointError(f"training loss became {record['train_loss']} in epoch {epoch}")
        return {"record": record, "correct": self.correct.cpu(), "sample_loss": self.sample_loss.cpu(),
                "step_loss": self.step_loss.cpu(), "images": seen}


def train_one_epoch(model: nn.Module, split, state: TrainState, epoch: int,
                    total_epochs: int, show_progress: bool = True, max_steps: Optional[int] = None) -> dict:
    """One pass over the shuffled training set (``max_steps``: stop early; for benchmarks;
    ``show_progress``: a progress bar on stderr, which the caller gives to one process).

    Returns ``record`` (the epoch's metrics.csv values), the per-image ``correct`` and
    ``sample_loss``, ``step_loss`` and ``images``, the number of images trained (global
    batches under torchrun)."""
    state.set_train_mode(model)
    n_batches, batches = train_batches(split, state, max_steps)
    totals = EpochTotals(len(split), n_batches, state.n_classes, split.labels.device)
    bar = None
    if show_progress and tqdm is not None:
        bar = tqdm(total=n_batches, desc=f"epoch {epoch}/{total_epochs}", leave=False,
                   disable=None, file=sys.stderr, dynamic_ncols=True)
    for step, (x, y, idx) in enumerate(batches, start=1):
        loss, terms, logits = train_step(model, state, x, y)
        totals.add(step, loss, terms, logits, y, idx)
        if bar is not None and not bar.disable:
            bar.update(1)
            if step % state.progress_every == 0 or step == n_batches:  # the only host syncs
                bar.set_postfix(**totals.progress())
    if bar is not None:
        bar.close()
    return totals.result(epoch)
