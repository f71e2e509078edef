"""The shape every dataset loader fills: :class:`LTData`, and the long-tailed split rule.

Split rules (identical for every dataset)
-----------------------------------------
Start from a balanced "official training set" with ``K`` classes and a separate
official test set.  Let ``V = 20`` validation images per class and

    n_max = (number of official training images) / K - V

The long-tailed training size of class ``c`` (``c = 0..K-1`` in label order) is
``n_c = long_tailed_counts(n_max, K, imb_type, imb_factor)[c]``.  Within each class,
taking the images in file order (no shuffling), the first ``n_c`` images are the
training images and the next ``V`` images are the validation images; the rest of the
official training set is unused.  The training (and validation) tensors are the
per-class selections concatenated in class order (class 0's images, then class 1's,
...).  The test set is the whole official test set, in file order.

Every user-facing problem (missing or corrupt files, bad arguments) raises
:class:`~utils.errors.DataError` with a one-line message naming the file/folder and what to do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from utils.errors import DataError
from utils.names import GROUPS

#: validation images per class
VAL_PER_CLASS = 20


def one_line(x: object) -> str:
    return " ".join(str(x).split())


def class_groups(class_counts: Sequence[int], many_threshold: int, few_threshold: int) -> list[str]:
    """Per class: "Many" (n_c > many_threshold), "Few" (n_c < few_threshold) or "Medium"."""
    return ["Many" if n > many_threshold else "Few" if n < few_threshold else "Medium" for n in class_counts]


@dataclass
class LTData:
    """One long-tailed dataset.  Three kinds of storage:

    * images in memory: ``*_images`` uint8 N x C x H x W (CIFAR, Digits, MNIST);
    * features in memory: ``*_images`` float32 N x F, already standardised (Helena);
    * image files (ImageNet-LT, mini-ImageNet-LT): ``*_images`` are None, ``*_files``
      list the paths, decoded per image by ``train_transform`` / ``eval_transform``
      (PIL image -> uint8 C x H x W tensor; normalisation by ``mean``/``std`` happens
      on the training device).  Labels are always int64 tensors.
    """
    name: str
    train_images: Optional[torch.Tensor]  # uint8, N x C x H x W, contiguous
    train_labels: torch.Tensor  # int64, N
    val_images: Optional[torch.Tensor]
    val_labels: torch.Tensor
    test_images: Optional[torch.Tensor]
    test_labels: torch.Tensor
    class_names: list[str]
    class_counts: list[int]  # n_c = training images of class c
    mean: tuple[float, ...]  # per channel, [0,1] pixel units
    std: tuple[float, ...]
    many_threshold: int  # Many: n_c > many_threshold
    few_threshold: int  # Few: n_c < few_threshold; Medium otherwise
    crop_padding: int  # training augmentation: zero pad + random crop
    hflip: bool  # training augmentation: horizontal flip with p = 1/2
    train_files: Optional[list[str]] = None  # image-file datasets only
    val_files: Optional[list[str]] = None
    test_files: Optional[list[str]] = None
    train_transform: Optional[Callable] = None  # PIL image -> uint8 C x H x W tensor
    eval_transform: Optional[Callable] = None
    image_size: Optional[tuple[int, int]] = None  # image-file datasets: (H, W) their transforms produce

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def kind(self) -> str:
        """"files" (decoded per image), "features" (float table) or "images" (uint8 in memory)."""
        if self.train_images is None:
            return "files"
        return "images" if self.train_images.dtype == torch.uint8 else "features"

    @property
    def in_channels(self) -> int:
        """Image channels; for a feature table, the number of features."""
        return 3 if self.train_images is None else int(self.train_images.shape[1])

    @property
    def input_size(self) -> Optional[tuple[int, int]]:
        """(H, W) of the images the network sees; None for a feature table."""
        if self.kind == "images":
            return (int(self.train_images.shape[2]), int(self.train_images.shape[3]))
        return self.image_size if self.kind == "files" else None

    def groups(self) -> list[str]:
        """Per class: "Many" (n_c > many_threshold), "Few" (n_c < few_threshold) or "Medium"."""
        return class_groups(self.class_counts, self.many_threshold, self.few_threshold)

    def group_sizes(self) -> dict[str, int]:
        g = self.groups()
        return {k: g.count(k) for k in GROUPS}

    def summary_lines(self) -> list[str]:
        s = self.group_sizes()
        return [
            f"#examples in train-set: {len(self.train_labels)}",
            f"#examples in valid-set: {len(self.val_labels)}",
            f"#examples in test-set: {len(self.test_labels)}",
            f"#classes: Many {s['Many']} / Medium {s['Medium']} / Few {s['Few']} "
            f"(Many: n > {self.many_threshold}, Few: n < {self.few_threshold})",
        ]


def long_tailed_counts(n_max: float, n_classes: int, imb_type: str, imb_factor: float) -> list[int]:
    """Training images per class.

    * ``"exp"``:  ``n_c = round(n_max * imb_factor ** (c / (K-1)))``
    * ``"step"``: first ``K // 2`` classes ``round(n_max)``, the rest ``round(n_max * imb_factor)``
    * ``"none"``: ``round(n_max)`` for every class (balanced).  The original took any other text
      to mean balanced; the config (utils/config/__init__.py) accepts exactly these three names.

    Rounding is Python's ``round()`` (round to nearest).  Truncation with ``int()``
    (as in some published code) does NOT reproduce the published sizes: with
    ``n_max = 480, K = 100, imb_factor = 0.01`` it gives 10,410 images and a tail of 4,
    whereas rounding gives the published 10,457 and tail 5; for CIFAR-10
    (``n_max = 4980``) truncation gives 12,355 / tail 49, rounding 12,360 / tail 50.
    (``floor(x + 0.5)`` gives the same totals; the two only differ on exact .5 ties.)
    """
    K = int(n_classes)
    if K < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    if imb_type == "exp":
        if K == 1:
            return [int(round(n_max))]
        return [int(round(n_max * imb_factor ** (c / (K - 1)))) for c in range(K)]
    if imb_type == "step":
        head = K // 2
        return [int(round(n_max))] * head + [int(round(n_max * imb_factor))] * (K - head)
    return [int(round(n_max))] * K


def split_long_tailed(
    labels: np.ndarray, n_classes: int, imb_type: str, imb_factor: float, source: str
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Indices (into the official training set) of the train and validation images."""
    K = n_classes
    n_max = len(labels) / K - VAL_PER_CLASS
    counts = long_tailed_counts(n_max, K, imb_type, imb_factor)
    if min(counts) < 1:
        raise DataError(
            f"imb_type={imb_type!r}, imb_factor={imb_factor} leaves a class of {source} with "
            f"{min(counts)} training images; use a larger imb_factor"
        )
    train_idx, val_idx = [], []
    for c in range(K):
        idx = np.flatnonzero(labels == c)  # file order
        need = counts[c] + VAL_PER_CLASS
        if len(idx) < need:
            raise DataError(
                f"class {c} of {source} has {len(idx)} training images but {counts[c]} training + "
                f"{VAL_PER_CLASS} validation are needed (imb_type={imb_type!r}, imb_factor={imb_factor}); "
                f"check the files or use imb_factor <= 1"
            )
        train_idx.append(idx[: counts[c]])
        val_idx.append(idx[counts[c] : need])
    return np.concatenate(train_idx), np.concatenate(val_idx), counts


def to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)).contiguous()
    y = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    return x, y


def long_tailed_splits(pool_images: np.ndarray, pool_labels: np.ndarray, test_images: np.ndarray,
                       test_labels: np.ndarray, n_classes: int, imb_type: str, imb_factor: float,
                       source: str) -> dict:
    """The train, validation and test tensors and the class counts of an in-memory dataset whose
    official training set is the pool of :func:`split_long_tailed`: LTData's fields for them."""
    tr, va, counts = split_long_tailed(pool_labels, n_classes, imb_type, imb_factor, source)
    out = {"class_counts": counts}
    out["train_images"], out["train_labels"] = to_tensors(pool_images[tr], pool_labels[tr])
    out["val_images"], out["val_labels"] = to_tensors(pool_images[va], pool_labels[va])
    out["test_images"], out["test_labels"] = to_tensors(test_images, test_labels)
    return out
