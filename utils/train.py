"""The training loop and evaluation passes, shared by both stages.

The loop returns plain per-epoch records; writers (CSV, TensorBoard, logs)
consume them.  Data lives on the training device as uint8 tensors; batches
are sliced from a per-epoch permutation and augmented on the device.  Loss
and accuracy are accumulated on the device and read once per epoch (plus
every ``progress_every`` steps for the progress bar).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from utils.augment import BatchAugment
from utils.metrics import class_averaged_accuracy, confusion_counts

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


@dataclass
class SplitTensors:
    images: torch.Tensor  # uint8 N x C x H x W on the device
    labels: torch.Tensor  # int64 N on the device


@dataclass
class EvalResult:
    counts: torch.Tensor                      # K x K confusion counts (cpu)
    preds: torch.Tensor                       # N (cpu)
    features: Optional[torch.Tensor] = None   # N x D float32 (cpu), when asked

    @property
    def class_avg_acc(self) -> float:
        return class_averaged_accuracy(self.counts)


@torch.inference_mode()
def evaluate(model: nn.Module, split: SplitTensors, augment: BatchAugment, n_classes: int,
             batch_size: int, want_features: bool = False) -> EvalResult:
    """One pass in eval mode (BN running statistics, no augmentation)."""
    if not isinstance(split, SplitTensors):  # feature tables, image files: utils/batches.py
        from utils.batches import evaluate_batches
        return evaluate_batches(model, split, n_classes, batch_size, want_features)
    was_training = model.training
    model.eval()
    preds, feats = [], []
    for start in range(0, split.images.shape[0], batch_size):
        x = augment.eval(split.images[start:start + batch_size])
        h = model.features(x)
        logits = model.classify(h)
        preds.append(logits.argmax(dim=1))
        if want_features:
            feats.append(h.float())
    model.train(was_training)
    pred = torch.cat(preds)
    counts = confusion_counts(pred, split.labels, n_classes).cpu()
    features = torch.cat(feats).cpu() if want_features else None
    return EvalResult(counts=counts, preds=pred.cpu(), features=features)


@dataclass
class TrainState:
    """What one training epoch needs besides the model."""
    optimizer: torch.optim.Optimizer
    objective: Callable  # (logits, labels, features) -> dict of named loss terms
    augment: BatchAugment
    batch_size: int
    n_classes: int
    shuffle_generator: torch.Generator
    augment_generator: Optional[torch.Generator]
    after_step: Optional[Callable[[], None]] = None   # e.g. MaxNorm per step
    set_train_mode: Callable[[nn.Module], None] = field(default=lambda m: m.train())
    progress_every: int = 20


def batch_slices(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A fresh permutation cut into batches; a trailing batch of one sample
    is dropped for the epoch (BatchNorm cannot train on a single sample)."""
    order = torch.randperm(n, generator=generator)
    batches = list(torch.split(order, batch_size))
    if len(batches) > 1 and batches[-1].numel() == 1:
        batches.pop()
    return batches


def train_one_epoch(model: nn.Module, split: SplitTensors, state: TrainState, epoch: int,
                    total_epochs: int, show_progress: bool = True) -> dict:
    if not isinstance(split, SplitTensors):  # feature tables, image files: utils/batches.py
        from utils.batches import train_one_epoch_batches
        return train_one_epoch_batches(model, split, state, epoch, total_epochs, show_progress)
    state.set_train_mode(model)
    device = split.images.device
    n = split.images.shape[0]
    batches = batch_slices(n, state.batch_size, state.shuffle_generator)
    term_sums: dict[str, torch.Tensor] = {}
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct_mask = torch.zeros(n, dtype=torch.bool, device=device)
    sample_loss = torch.full((n,), float("nan"), device=device)  # per-image CE, for per-class loss plots
    counts = torch.zeros(state.n_classes, state.n_classes, dtype=torch.long, device=device)
    seen = 0
    bar = None
    if show_progress and tqdm is not None:
        bar = tqdm(total=len(batches), desc=f"epoch {epoch}/{total_epochs}", leave=False,
                   disable=None, file=sys.stderr, dynamic_ncols=True)
    for step, idx in enumerate(batches, start=1):
        idx = idx.to(device, non_blocking=True)
        x = state.augment(split.images[idx], state.augment_generator)
        y = split.labels[idx]
        h = model.features(x)
        logits = model.classify(h)
        terms = state.objective(logits, y, h)
        loss = sum(terms.values())
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        if state.after_step is not None:
            state.after_step()
        with torch.no_grad():
            bs = y.shape[0]
            seen += bs
            loss_sum += loss.detach().double() * bs
            for name, value in terms.items():
                term_sums[name] = term_sums.get(name, 0) + value.detach().double() * bs
            pred = logits.detach().argmax(dim=1)
            correct_mask[idx] = pred == y
            sample_loss[idx] = F.cross_entropy(logits.detach().float(), y, reduction="none")
            counts += confusion_counts(pred, y, state.n_classes)
        if bar is not None and not bar.disable:
            bar.update(1)
            if step % state.progress_every == 0 or step == len(batches):  # the only host syncs
                bar.set_postfix(loss=f"{float(loss_sum) / seen:.4f}",
                                acc=f"{float(counts.diagonal().sum()) / seen:.3f}")
    if bar is not None:
        bar.close()
    record = {"train_loss": float(loss_sum) / seen}
    for name, value in term_sums.items():
        record[f"train_{name}"] = float(value) / seen
    record["train_acc"] = float(counts.diagonal().sum()) / seen
    record["train_acc_cls"] = class_averaged_accuracy(counts.cpu())
    if not math.isfinite(record["train_loss"]):
        raise FloatingPointError(f"training loss became {record['train_loss']} in epoch {epoch}")
    return {"record": record, "correct": correct_mask.cpu(), "sample_loss": sample_loss.cpu()}
