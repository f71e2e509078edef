"""The three kinds of split the training loop and the evaluation passes read.

* :class:`SplitTensors`, the fast path: uint8 images and labels on the training device,
  augmented in batches by :class:`~utils.data.augment.BatchAugment` (the loop slices them).

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
  device).  The order is :func:`batch_slices` of the shuffle generator, as
  on the fast path (a trailing batch of one sample is dropped);
* ``eval_batches(batch_size)``: the split in order, without augmentation;
* ``subset(start, stop)``: rows start..stop-1 (a rank's evaluation shard under torchrun).

Under torchrun ``epoch_batches`` yields this rank's part of each global batch as ``x``
(:func:`utils.distributed.my_bounds`) and the whole global batch's ``y`` and ``idx``.

``train_one_epoch`` (utils/engine/train.py) and the evaluation passes (utils/engine/evaluation.py) take
their batches from any split through ``train_batches`` / ``eval_batches``, so every kind of
data goes through the same training step and the same records.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from utils import distributed
from utils.data.augment import BatchAugment, normalize
from utils.errors import DataError

__all__ = ["SplitTensors", "FeatureSplit", "FileSplit", "ImageFiles", "make_splits", "batch_slices",
           "n_batches_of"]

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class SplitTensors:
    """The fast path: uint8 images and labels resident on the training device."""
    images: torch.Tensor  # uint8 N x C x H x W on the device
    labels: torch.Tensor  # int64 N on the device

    def __len__(self) -> int:
        return self.labels.shape[0]

    def subset(self, start: int, stop: int) -> "SplitTensors":
        """Rows start..stop-1 (views, no copy): a rank's shard for evaluation."""
        return SplitTensors(self.images[start:stop], self.labels[start:stop])


def batch_slices(n: int, batch_size: int, generator: torch.Generator,
                 device: Optional[torch.device] = None) -> list[torch.Tensor]:
    """A fresh permutation cut into batches; a trailing batch of one sample
    is dropped for the epoch (BatchNorm cannot train on a single sample).

    The permutation is drawn on the CPU generator (the same order on every
    device) and copied to ``device`` once per epoch, not once per step.
    """
    order = torch.randperm(n, generator=generator)
    if device is not None:
        order = order.to(device, non_blocking=True)  # pageable source: staged at once (see params_to)
    batches = list(torch.split(order, batch_size))
    if len(batches) > 1 and batches[-1].numel() == 1:
        batches.pop()
    return batches


def n_batches_of(n: int, batch_size: int) -> int:
    """How many batches :func:`batch_slices` gives for ``n`` samples."""
    full, rest = divmod(n, batch_size)
    count = full + (1 if rest else 0)
    if count > 1 and rest == 1:
        count -= 1  # the trailing single sample is dropped
    return count


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
            lo, hi = distributed.my_bounds(idx.shape[0])
            yield self.features[idx[lo:hi]], self.labels[idx], idx

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        device = self.labels.device
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            yield (self.features[start:stop], self.labels[start:stop],
                   torch.arange(start, stop, device=device))


# Batches each worker decodes ahead: a worker that meets a slow file (a network filesystem)
# does not starve the device for that many batches (torch's default is 2).  Host memory:
# prefetch x workers x batch x 150 KB of uint8 at 224 x 224.
PREFETCH_BATCHES_PER_WORKER = 4


class ImageFiles(Dataset):
    """``(uint8 C x H x W image, index)`` for each listed file, decoded with PIL and transformed.

    An item is an index, or ``(index, seed)``: the random transforms then draw from
    torch's RNG seeded with ``seed`` (torchvision's transforms draw from torch's RNG
    only), so an image's augmentation depends on its seed alone, not on which worker
    decodes it, how many there are, or what that worker decoded before."""

    def __init__(self, paths: Sequence[str], transform: Callable):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        image = self._decode(index)
        if seed is None:
            return self.transform(image), index
        with torch.random.fork_rng(devices=[]):  # the process's own RNG state is left as it was
            torch.manual_seed(seed)
            return self.transform(image), index

    def _decode(self, index: int):
        from PIL import Image

        path = self.paths[index]
        try:
            with open(path, "rb") as fh:
                return Image.open(fh).convert("RGB")
        except OSError as e:
            raise DataError(f"cannot read image {path} ({type(e).__name__}: {e})") from None


class _Batches:
    """The batch sampler of a DataLoader that lives for the whole run: the batches of
    the next pass, set before each ``iter(loader)`` (which takes them at that moment)."""

    def __init__(self, batches: Optional[list] = None):
        self.batches = batches or []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _persistent_loader(files: ImageFiles, batches: _Batches, num_workers: int, pin_memory: bool) -> DataLoader:
    """A DataLoader whose workers start once and serve every later pass."""
    workers = ({"persistent_workers": True, "prefetch_factor": PREFETCH_BATCHES_PER_WORKER}
               if num_workers > 0 else {})
    # the generator only gives the workers' base seed (the images bring their own seeds);
    # without it the loader would draw from the process's global RNG
    return DataLoader(files, batch_sampler=batches, num_workers=num_workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(0), **workers)


class FileSplit:
    """Image files decoded per image by DataLoader workers; normalised on the device.

    The training loader and each evaluation loader are built once, on first use, with
    persistent workers: a new epoch sets the batches and reuses the processes.  Training
    images are decoded with ``transform`` (random), evaluation passes with
    ``eval_transform`` (default: ``transform``)."""

    def __init__(self, paths: Sequence[str], labels: torch.Tensor, transform: Callable,
                 mean: Sequence[float], std: Sequence[float], device: torch.device, num_workers: int,
                 eval_transform: Optional[Callable] = None):
        if len(paths) != labels.shape[0]:
            raise ValueError(f"{len(paths)} files but {labels.shape[0]} labels")
        self.files = ImageFiles(paths, transform)
        self.eval_files = ImageFiles(paths, eval_transform if eval_transform is not None else transform)
        self.labels = labels.to(device)
        self.device = torch.device(device)
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device).reshape(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device).reshape(1, -1, 1, 1)
        self.num_workers = int(num_workers)
        self._train_batches = _Batches()
        self._train_loader: Optional[DataLoader] = None
        self._eval_loaders: dict[int, DataLoader] = {}  # by batch size
        self._subsets: dict[tuple[int, int], FileSplit] = {}

    def __len__(self) -> int:
        return self.labels.shape[0]

    def subset(self, start: int, stop: int) -> "FileSplit":
        """Rows start..stop-1; the same object (and loaders) for the same rows (a rank's shard
        is asked for at every evaluation)."""
        if (start, stop) not in self._subsets:
            self._subsets[(start, stop)] = FileSplit(
                self.files.paths[start:stop], self.labels[start:stop], self.files.transform, self.mean.flatten(),
                self.std.flatten(), self.device, self.num_workers, eval_transform=self.eval_files.transform)
        return self._subsets[(start, stop)]

    def _decoded(self, decoded) -> Iterator[Batch]:
        for images, idx in decoded:
            idx = idx.to(self.device, non_blocking=True)
            x = normalize(images.to(self.device, non_blocking=True), self.mean, self.std)
            yield x, self.labels[idx], idx

    def epoch_batches(self, batch_size: int, shuffle_generator: torch.Generator) -> Iterator[Batch]:
        """One epoch; under torchrun the DataLoader of each rank decodes only its part of
        every global batch (DistributedSampler's sharding, with the permutation of the
        shared shuffle generator standing for ``set_epoch``).

        After the permutation, the shuffle generator draws one seed per position of the
        epoch, the same on every rank, for the random transforms of the image there:
        the images of an epoch depend on the generator's state alone (resume restores
        it), not on the number of workers or of processes."""
        global_batches = batch_slices(len(self), batch_size, shuffle_generator)
        seeds = torch.randint(0, 2 ** 62, (len(self),), generator=shuffle_generator)
        local, start = [], 0  # this rank's (index, seed) part of each batch (one process: the whole batch)
        for b in global_batches:
            lo, hi = distributed.my_bounds(b.shape[0])
            local.append(list(zip(b[lo:hi].tolist(), seeds[start + lo:start + hi].tolist())))
            start += b.shape[0]
        # the last, small batch may leave a rank without images (fewer than the processes)
        self._train_batches.batches = [part for part in local if part]
        if self._train_loader is None:
            self._train_loader = _persistent_loader(self.files, self._train_batches, self.num_workers,
                                                    self.device.type == "cuda")
        return self._sharded(iter(self._train_loader), global_batches, local)

    def _sharded(self, decoded_parts, global_batches: list[torch.Tensor], local: list[list]) -> Iterator[Batch]:
        """(this rank's decoded part, the global batch's labels and indices) per batch."""
        decoded = self._decoded(decoded_parts)
        x = None
        for idx, part in zip(global_batches, local):
            x = next(decoded)[0] if part else x.new_zeros((0,) + tuple(x.shape[1:]))
            idx = idx.to(self.device, non_blocking=True)
            yield x, self.labels[idx], idx

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        """The split in order, decoded with the evaluation transform."""
        loader = self._eval_loaders.get(batch_size)
        if loader is None:
            n = len(self)
            batches = _Batches([list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)])
            loader = self._eval_loaders[batch_size] = _persistent_loader(self.eval_files, batches, self.num_workers,
                                                                         self.device.type == "cuda")
        return self._decoded(iter(loader))


def make_splits(data, device: torch.device, num_workers: int = 0):
    """(train, val, test, augment) for an :class:`~utils.data.lt_data.LTData` on ``device``.

    uint8 images in memory give the fast path's ``SplitTensors`` + ``BatchAugment``;
    feature tables give :class:`FeatureSplit`; image files give :class:`FileSplit`
    (whose random transforms run in the workers; ``augment`` is then unused; the training
    split's evaluation passes, FDR and final features, decode with the evaluation transform).
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
                      num_workers, eval_transform=data.eval_transform),
            FileSplit(data.val_files, data.val_labels, data.eval_transform, data.mean, data.std, device, num_workers),
            FileSplit(data.test_files, data.test_labels, data.eval_transform, data.mean, data.std, device,
                      num_workers),
            augment)

