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
* ``eval_batches(batch_size)``: the split in order, without augmentation;
* ``subset(start, stop)``: rows start..stop-1 (a rank's evaluation shard under torchrun).

Under torchrun ``epoch_batches`` yields this rank's part of each global batch as ``x``
(:func:`utils.distributed.my_bounds`) and the whole global batch's ``y`` and ``idx``.

``train_one_epoch``, ``evaluate`` (utils/train.py) and the final evaluation take
their batches from any split through ``utils.train.train_batches`` / ``eval_batches``,
so every kind of data goes through the same training step and the same records.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from utils import distributed as ddp
from utils.augment import BatchAugment, normalize
from utils.errors import DataError
from utils.train import SplitTensors, batch_slices

__all__ = ["FeatureSplit", "FileSplit", "ImageFiles", "make_splits", "n_batches_of"]

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

    def subset(self, start: int, stop: int) -> "FeatureSplit":
        return FeatureSplit(self.features[start:stop], self.labels[start:stop])

    def epoch_batches(self, batch_size: int, shuffle_generator: torch.Generator) -> Iterator[Batch]:
        for idx in batch_slices(len(self), batch_size, shuffle_generator):
            idx = idx.to(self.labels.device, non_blocking=True)
            lo, hi = ddp.my_bounds(idx.shape[0])
            yield self.features[idx[lo:hi]], self.labels[idx], idx

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

    def subset(self, start: int, stop: int) -> "FileSplit":
        part = FileSplit.__new__(FileSplit)
        part.files = ImageFiles(self.files.paths[start:stop], self.files.transform)
        part.labels, part.device = self.labels[start:stop], self.device
        part.mean, part.std, part.num_workers = self.mean, self.std, self.num_workers
        return part

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
        """One epoch; under torchrun the DataLoader of each rank decodes only its part of
        every global batch (DistributedSampler's sharding, with the permutation of the
        shared shuffle generator standing for ``set_epoch``)."""
        global_batches = batch_slices(len(self), batch_size, shuffle_generator)
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=shuffle_generator))
        seed += ddp.context().rank  # each rank's random transforms differ
        if self.num_workers == 0:
            torch.manual_seed(seed)  # the transforms then draw from the main process's RNG
        local = []  # this rank's part of each batch (one process: the whole batch)
        for b in global_batches:
            lo, hi = ddp.my_bounds(b.shape[0])
            local.append(b[lo:hi].tolist())
        # the last, small batch may leave a rank without images (fewer than the processes)
        return self._sharded(self._loader([part for part in local if part], seed), global_batches, local)

    def _sharded(self, loader: DataLoader, global_batches: list[torch.Tensor],
                 local: list[list[int]]) -> Iterator[Batch]:
        """(this rank's decoded part, the global batch's labels and indices) per batch."""
        decoded = self._batches(loader)
        x = None
        for idx, part in zip(global_batches, local):
            x = next(decoded)[0] if part else x.new_zeros((0,) + tuple(x.shape[1:]))
            idx = idx.to(self.device, non_blocking=True)
            yield x, self.labels[idx], idx

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


def n_batches_of(n: int, batch_size: int) -> int:
    """How many batches :func:`utils.train.batch_slices` gives for ``n`` samples."""
    full, rest = divmod(n, batch_size)
    count = full + (1 if rest else 0)
    if count > 1 and rest == 1:
        count -= 1  # the trailing single sample is dropped
    return count
