"""Batch sources for data that is not a uint8 image tensor in memory.

The training loop's fast path (utils/train.py) works on :class:`~utils.train.SplitTensors`:
uint8 images on the device, augmented in batches by :class:`~utils.augment.BatchAugment`.
Two kinds of data do not fit it:

* :class:`FeatureSplit`: a float feature table in memory (Helena), already standardised,
  never augmented; batches are sliced on the device.
* :class:`FileSplit`: image files too large for memory (ImageNet-LT, mini-ImageNet-LT),
  decoded per image by a torch DataLoader with workers running the dataset's PIL
  transforms (which yield uint8); the batch is normalised on the device.

Both offer the same small interface, the "batch split":

* ``len(split)`` and ``split.labels`` (int64, on the device, in dataset order);
* ``epoch_batches(batch_size, shuffle_generator)``: one training epoch,
  ``(x, y, idx)`` with ``x`` float and normalised, ``idx`` the dataset indices (on the
  device).  The order is :func:`utils.train.batch_slices` of the shuffle generator, as
  on the fast path (a trailing batch of one sample is dropped);
* ``eval_batches(batch_size)``: the split in order, without augmentation.

``train_one_epoch`` and ``evaluate`` in utils/train.py hand any split that is not a
``SplitTensors`` to :func:`train_one_epoch_batches` / :func:`evaluate_batches` here,
which compute the same records from these batches.
"""
from __future__ import annotations

import math
import sys
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from utils.augment import BatchAugment, normalize
from utils.errors import DataError
from utils.metrics import class_averaged_accuracy, confusion_counts
from utils.train import EvalResult, SplitTensors, TrainState, batch_slices

__all__ = ["FeatureSplit", "FileSplit", "ImageFiles", "make_splits", "train_one_epoch_batches",
           "evaluate_batches"]

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class FeatureSplit:
    """A float feature table on the device (N x F, already standardised); no augmentation."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        if features.dim() != 2 or not features.is_floating_point():
            raise ValueError(f"expected a float N x F feature table, got {features.dtype} {tuple(features.shape)}")
        self.features = features
        self.labels = labels

    def __len__(self) -> int:
        return self.labels.shape[0]

    def epoch_batches(self, batch_size: int, shuffle_generator: torch.Generator) -> Iterator[Batch]:
        for idx in batch_slices(len(self), batch_size, shuffle_generator):
            idx = idx.to(self.labels.device, non_blocking=True)
            yield self.features[idx], self.labels[idx], idx

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        device = self.labels.device
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            yield (self.features[start:stop], self.labels[start:stop],
                   torch.arange(start, stop, device=device))


class ImageFiles(Dataset):
    """``(uint8 C x H x W image, index)`` for each listed file, decoded with PIL and transformed."""

    def __init__(self, paths: Sequence[str], transform: Callable):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from PIL import Image

        path = self.paths[index]
        try:
            with open(path, "rb") as fh:
                image = Image.open(fh).convert("RGB")
        except OSError as e:
            raise DataError(f"cannot read image {path} ({type(e).__name__}: {e})") from None
        return self.transform(image), index


class FileSplit:
    """Image files decoded per image by DataLoader workers; normalised on the device."""

    def __init__(self, paths: Sequence[str], labels: torch.Tensor, transform: Callable,
                 mean: Sequence[float], std: Sequence[float], device: torch.device, num_workers: int):
        if len(paths) != labels.shape[0]:
            raise ValueError(f"{len(paths)} files but {labels.shape[0]} labels")
        self.files = ImageFiles(paths, transform)
        self.labels = labels.to(device)
        self.device = torch.device(device)
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device).reshape(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device).reshape(1, -1, 1, 1)
        self.num_workers = int(num_workers)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def _loader(self, batches: list[list[int]], seed: int) -> DataLoader:
        return DataLoader(self.files, batch_sampler=batches, num_workers=self.num_workers,
                          pin_memory=self.device.type == "cuda",
                          # seeds the workers' torch/random RNGs (the random transforms)
                          generator=torch.Generator().manual_seed(seed))

    def _batches(self, loader: DataLoader) -> Iterator[Batch]:
        for images, idx in loader:
            idx = idx.to(self.device, non_blocking=True)
            x = normalize(images.to(self.device, non_blocking=True), self.mean, self.std)
            yield x, self.labels[idx], idx

    def epoch_batches(self, batch_size: int, shuffle_generator: torch.Generator) -> Iterator[Batch]:
        batches = [b.tolist() for b in batch_slices(len(self), batch_size, shuffle_generator)]
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=shuffle_generator))
        if self.num_workers == 0:
            torch.manual_seed(seed)  # the transforms then draw from the main process's RNG
        return self._batches(self._loader(batches, seed))

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        n = len(self)
        batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
        return self._batches(self._loader(batches, 0))


def make_splits(data, device: torch.device, num_workers: int = 0):
    """(train, val, test, augment) for an :class:`~utils.data.LTData` on ``device``.

    uint8 images in memory give the fast path's ``SplitTensors`` + ``BatchAugment``;
    feature tables give :class:`FeatureSplit`; image files give :class:`FileSplit`
    (whose random transforms run in the workers; ``augment`` is then unused).
    """
    augment = BatchAugment(data.mean, data.std, data.crop_padding, data.hflip, device)
    kind = data.kind
    if kind == "images":
        return (SplitTensors(data.train_images.to(device), data.train_labels.to(device)),
                SplitTensors(data.val_images.to(device), data.val_labels.to(device)),
                SplitTensors(data.test_images.to(device), data.test_labels.to(device)),
                augment)
    if kind == "features":
        return (FeatureSplit(data.train_images.to(device), data.train_labels.to(device)),
                FeatureSplit(data.val_images.to(device), data.val_labels.to(device)),
                FeatureSplit(data.test_images.to(device), data.test_labels.to(device)),
                augment)
    return (FileSplit(data.train_files, data.train_labels, data.train_transform, data.mean, data.std, device,
                      num_workers),
            FileSplit(data.val_files, data.val_labels, data.eval_transform, data.mean, data.std, device, num_workers),
            FileSplit(data.test_files, data.test_labels, data.eval_transform, data.mean, data.std, device,
                      num_workers),
            augment)


def train_one_epoch_batches(model: nn.Module, split, state: TrainState, epoch: int, total_epochs: int,
                            show_progress: bool = True) -> dict:
    """utils.train.train_one_epoch for a batch split: the same step and the same record.

    ``state.augment`` / ``state.augment_generator`` are not used (the split augments).
    """
    state.set_train_mode(model)
    device = split.labels.device
    n = len(split)
    n_batches = n_batches_of(n, state.batch_size)
    term_sums: dict[str, torch.Tensor] = {}
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct_mask = torch.zeros(n, dtype=torch.bool, device=device)
    sample_loss = torch.full((n,), float("nan"), device=device)  # per-image CE, for per-class loss plots
    counts = torch.zeros(state.n_classes, state.n_classes, dtype=torch.long, device=device)
    seen = 0
    bar = _progress(show_progress, n_batches, f"epoch {epoch}/{total_epochs}")
    for step, (x, y, idx) in enumerate(split.epoch_batches(state.batch_size, state.shuffle_generator), start=1):
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
            if step % state.progress_every == 0 or step == n_batches:
                bar.set_postfix(loss=f"{float(loss_sum) / seen:.4f}",
                                acc=f"{float(counts.diagonal().sum()) / seen:.3f}")
    if bar is not None:
        bar.close()
    if seen == 0:
        raise DataError("the training split yielded no batch")
    record = {"train_loss": float(loss_sum) / seen}
    for name, value in term_sums.items():
        record[f"train_{name}"] = float(value) / seen
    record["train_acc"] = float(counts.diagonal().sum()) / seen
    record["train_acc_cls"] = class_averaged_accuracy(counts.cpu())
    if not math.isfinite(record["train_loss"]):
        raise FloatingPointError(f"training loss became {record['train_loss']} in epoch {epoch}")
    return {"record": record, "correct": correct_mask.cpu(), "sample_loss": sample_loss.cpu()}


def n_batches_of(n: int, batch_size: int) -> int:
    """How many batches :func:`utils.train.batch_slices` gives for ``n`` samples."""
    full, rest = divmod(n, batch_size)
    count = full + (1 if rest else 0)
    if count > 1 and rest == 1:
        count -= 1  # the trailing single sample is dropped
    return count


def _progress(show: bool, total: int, desc: str):
    if not show:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, desc=desc, leave=False, disable=None, file=sys.stderr, dynamic_ncols=True)


@torch.inference_mode()
def evaluate_batches(model: nn.Module, split, n_classes: int, batch_size: int,
                     want_features: bool = False) -> EvalResult:
    """utils.train.evaluate for a batch split: eval mode, no augmentation, dataset order."""
    was_training = model.training
    model.eval()
    preds, feats = [], []
    for x, _, _ in split.eval_batches(batch_size):
        h = model.features(x)
        preds.append(model.classify(h).argmax(dim=1))
        if want_features:
            feats.append(h.float())
    model.train(was_training)
    pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=split.labels.device)
    counts = confusion_counts(pred, split.labels, n_classes).cpu()
    features: Optional[torch.Tensor] = torch.cat(feats).cpu() if want_features else None
    return EvalResult(counts=counts, preds=pred.cpu(), features=features)
