"""Long-tailed datasets held in memory as uint8 tensors.

Three datasets are built here: ``"Cifar10"``, ``"Cifar100"`` (CIFAR-10/100-LT) and
``"Digits"`` (Digits-LT, built from scikit-learn's bundled 8x8 digits).  Loading is
fully deterministic: no random numbers are used anywhere.  The other datasets of the
original (``"ImageNet"``, ``"MiniImagenet"``, ``"Helena"``, ``"MNIST"``) are read by
utils/extra_datasets.py with their own split rules; :func:`load_dataset` serves all.

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

* CIFAR-10/100: official python pickles (``cifar-10-batches-py``,
  ``cifar-100-python``) under ``root``; 5,000 / 500 training images per class, so
  ``n_max`` = 4,980 / 480.  CIFAR-100 at ``imb_factor=0.01`` gives 10,457 training,
  2,000 validation and 10,000 test images; CIFAR-10 at 0.01 gives 12,360 training
  images.
* Digits: ``sklearn.datasets.load_digits()`` (1,797 images, values 0..16).  For each
  class, in file order, the first 120 images form the balanced official training set
  (1,200 images); all remaining images (597) are the test set, in file order.  Then
  ``n_max = 1200/10 - 20 = 100``.  Pixels are stored as ``round(v * 255 / 16)`` in
  uint8, shape ``N x 1 x 8 x 8``.

Every user-facing problem (missing or corrupt files, bad arguments) raises
:class:`DataError` with a one-line message naming the file/folder and what to do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from utils.errors import DataError
from utils.rundir import restricted_pickle_load

__all__ = [
    "DataError",
    "LTData",
    "long_tailed_counts",
    "load_dataset",
    "DATASET_NAMES",
    "VAL_PER_CLASS",
]

#: canonical dataset names accepted by :func:`load_dataset`
DATASET_NAMES = ("Cifar10", "Cifar100", "Digits", "ImageNet", "MiniImagenet", "Helena", "MNIST")
#: the datasets read by utils/extra_datasets.py (SPEC 4.3)
EXTRA_DATASETS = ("ImageNet", "MiniImagenet", "Helena", "MNIST")
#: validation images per class
VAL_PER_CLASS = 20

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_STD = (0.2023, 0.1994, 0.2010)

# Digits-LT normalisation.  Computed once from the 1,200-image balanced training pool
# (first 120 images of each class of sklearn's load_digits(), in file order), after
# the uint8 conversion round(v * 255 / 16), in [0,1] units (uint8 / 255): the mean and
# the population standard deviation (torch.std(unbiased=False)) over all 1,200 x 64
# pixels.  tests/test_data.py recomputes them and checks agreement to 4 decimals.
DIGITS_MEAN = (0.3065,)
DIGITS_STD = (0.3754,)
DIGITS_POOL_PER_CLASS = 120


def _one_line(x: object) -> str:
    return " ".join(str(x).split())


# ----------------------------------------------------------------------------------
# Dataset container
# ----------------------------------------------------------------------------------


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
        out = []
        for n in self.class_counts:
            if n > self.many_threshold:
                out.append("Many")
            elif n < self.few_threshold:
                out.append("Few")
            else:
                out.append("Medium")
        return out

    def group_sizes(self) -> dict[str, int]:
        g = self.groups()
        return {k: g.count(k) for k in ("Many", "Medium", "Few")}

    def summary_lines(self) -> list[str]:
        s = self.group_sizes()
        return [
            f"#examples in train-set: {len(self.train_labels)}",
            f"#examples in valid-set: {len(self.val_labels)}",
            f"#examples in test-set: {len(self.test_labels)}",
            f"#classes: Many {s['Many']} / Medium {s['Medium']} / Few {s['Few']} "
            f"(Many: n > {self.many_threshold}, Few: n < {self.few_threshold})",
        ]


# ----------------------------------------------------------------------------------
# Long-tailed class counts
# ----------------------------------------------------------------------------------


def long_tailed_counts(n_max: float, n_classes: int, imb_type: str, imb_factor: float) -> list[int]:
    """Training images per class.

    * ``"exp"``:  ``n_c = round(n_max * imb_factor ** (c / (K-1)))``
    * ``"step"``: first ``K // 2`` classes ``round(n_max)``, the rest ``round(n_max * imb_factor)``
    * ``"none"``: ``round(n_max)`` for every class (balanced).  The original took any other text
      to mean balanced; the config (utils/config.py) accepts exactly these three names.

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


def _split_long_tailed(
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


def _to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)).contiguous()
    y = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    return x, y


# ----------------------------------------------------------------------------------
# CIFAR
# ----------------------------------------------------------------------------------

_CIFAR = {
    "Cifar10": dict(
        pretty="CIFAR-10",
        folder="cifar-10-batches-py",
        tarball="cifar-10-python.tar.gz",
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test=["test_batch"],
        meta="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
        K=10,
        std=CIFAR10_STD,
        many=1000,
        few=200,
    ),
    "Cifar100": dict(
        pretty="CIFAR-100",
        folder="cifar-100-python",
        tarball="cifar-100-python.tar.gz",
        train=["train"],
        test=["test"],
        meta="meta",
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
        K=100,
        std=CIFAR100_STD,
        many=100,
        few=20,
    ),
}


def _load_pickle(path: Path, spec: dict) -> dict:
    if not path.is_file():
        raise DataError(
            f"{path} is missing; put the complete official python version of {spec['pretty']} "
            f"({spec['tarball']}, extracted) in {path.parent}"
        )
    try:
        with open(path, "rb") as f:
            obj = restricted_pickle_load(f, encoding="bytes")  # never runs code from the file
    except Exception as e:  # truncated / corrupt / not a pickle
        raise DataError(
            f"{path} is corrupt or truncated ({type(e).__name__}: {_one_line(e)}); replace it with the "
            f"file from the official {spec['tarball']}"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} does not hold a CIFAR dict; replace it with the file from {spec['tarball']}")
    return obj


def _load_cifar_batches(paths: list[Path], spec: dict) -> tuple[np.ndarray, np.ndarray]:
    datas, labels = [], []
    for p in paths:
        d = _load_pickle(p, spec)
        if b"data" not in d or spec["label_key"] not in d:
            raise DataError(
                f"{p} lacks the keys b'data' / {spec['label_key']!r}; replace it with the file from "
                f"the official {spec['tarball']}"
            )
        x = np.asarray(d[b"data"])
        y = np.asarray(d[spec["label_key"]], dtype=np.int64).reshape(-1)
        if x.ndim != 2 or x.shape[1] != 3072 or x.shape[0] != len(y) or x.dtype != np.uint8:
            raise DataError(
                f"{p} has data of shape {x.shape} / dtype {x.dtype} with {len(y)} labels, expected "
                f"uint8 N x 3072; replace it with the file from the official {spec['tarball']}"
            )
        if len(y) and (y.min() < 0 or y.max() >= spec["K"]):
            raise DataError(
                f"{p} has labels outside 0..{spec['K'] - 1}; replace it with the file from the official "
                f"{spec['tarball']}"
            )
        datas.append(x)
        labels.append(y)
    if len(datas) == 1:
        return datas[0], labels[0]
    return np.concatenate(datas), np.concatenate(labels)


def _ensure_cifar(name: str, spec: dict, root: Path, download: bool) -> Path:
    folder = root / spec["folder"]
    if folder.is_dir():
        return folder
    fill = f"Put the official python version ({spec['tarball']}, extracted) there."
    if not download:
        raise DataError(f"{spec['pretty']} not found under {folder} (download=False). {fill}")
    created = [p for p in [root, *root.parents] if not p.exists()]
    before = set(root.iterdir()) if root.is_dir() else set()
    try:
        import torchvision.datasets as tvd

        cls = tvd.CIFAR10 if name == "Cifar10" else tvd.CIFAR100
        root.mkdir(parents=True, exist_ok=True)
        cls(str(root), train=True, download=True)
        cls(str(root), train=False, download=True)
    except Exception as e:
        _remove_partial_download(root, before, created)
        raise DataError(
            f"{spec['pretty']} not found under {folder} and could not be downloaded "
            f"({type(e).__name__}: {_one_line(e)}). {fill}"
        ) from None
    if not folder.is_dir():
        raise DataError(f"{spec['pretty']} not found under {folder} after downloading. {fill}")
    return folder


def _remove_partial_download(root: Path, before: set, created: list) -> None:
    """A failed download (offline) leaves what it found: its partial files and the folders it
    made go (an empty ``datasets/`` would look like a data root someone had prepared)."""
    import shutil

    if root.is_dir():
        for entry in set(root.iterdir()) - before:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    for folder in created:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            break


def _load_cifar(name: str, root: Path, imb_type: str, imb_factor: float, download: bool) -> LTData:
    spec = _CIFAR[name]
    K = spec["K"]
    folder = _ensure_cifar(name, spec, root, download)

    meta_path = folder / spec["meta"]
    meta = _load_pickle(meta_path, spec)
    try:
        class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[spec["names_key"]]]
    except Exception:
        raise DataError(
            f"{meta_path} lacks {spec['names_key']!r}; replace it with the file from the official {spec['tarball']}"
        ) from None
    if len(class_names) != K:
        raise DataError(
            f"{meta_path} lists {len(class_names)} class names, expected {K}; replace it with the file "
            f"from the official {spec['tarball']}"
        )

    x_train, y_train = _load_cifar_batches([folder / f for f in spec["train"]], spec)
    x_test, y_test = _load_cifar_batches([folder / f for f in spec["test"]], spec)

    tr, va, counts = _split_long_tailed(y_train, K, imb_type, imb_factor, f"{name} ({folder})")
    shape = (-1, 3, 32, 32)
    train_images, train_labels = _to_tensors(x_train[tr].reshape(shape), y_train[tr])
    val_images, val_labels = _to_tensors(x_train[va].reshape(shape), y_train[va])
    test_images, test_labels = _to_tensors(x_test.reshape(shape), y_test)
    return LTData(
        name=name,
        train_images=train_images,
        train_labels=train_labels,
        val_images=val_images,
        val_labels=val_labels,
        test_images=test_images,
        test_labels=test_labels,
        class_names=class_names,
        class_counts=counts,
        mean=CIFAR_MEAN,
        std=spec["std"],
        many_threshold=spec["many"],
        few_threshold=spec["few"],
        crop_padding=4,
        hflip=True,
    )


# ----------------------------------------------------------------------------------
# Digits
# ----------------------------------------------------------------------------------


def digits_pool_and_test() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed Digits split: (pool_images, pool_labels, test_images, test_labels).

    ``pool`` = first 120 images of each class in file order (1,200 images, kept in file
    order), ``test`` = every other image (597), in file order.  Images are uint8
    ``N x 1 x 8 x 8`` with values ``round(v * 255 / 16)``.
    """
    try:
        from sklearn.datasets import load_digits

        d = load_digits()
    except Exception as e:
        raise DataError(
            f"could not load scikit-learn's bundled digits ({type(e).__name__}: {_one_line(e)}); "
            f"install scikit-learn (pip install scikit-learn)"
        ) from None
    v = np.asarray(d.data, dtype=np.float64)
    y = np.asarray(d.target, dtype=np.int64)
    # 255*v/16 is a .5 tie only for v = 8 (127.5 -> 128); floor(x + 0.5) rounds half up.
    x = np.floor(v * 255.0 / 16.0 + 0.5).astype(np.uint8).reshape(-1, 1, 8, 8)
    in_pool = np.zeros(len(y), dtype=bool)
    for c in range(10):
        in_pool[np.flatnonzero(y == c)[:DIGITS_POOL_PER_CLASS]] = True
    return x[in_pool], y[in_pool], x[~in_pool], y[~in_pool]


def _load_digits(imb_type: str, imb_factor: float) -> LTData:
    xp, yp, xt, yt = digits_pool_and_test()
    tr, va, counts = _split_long_tailed(yp, 10, imb_type, imb_factor, "Digits (sklearn load_digits)")
    train_images, train_labels = _to_tensors(xp[tr], yp[tr])
    val_images, val_labels = _to_tensors(xp[va], yp[va])
    test_images, test_labels = _to_tensors(xt, yt)
    return LTData(
        name="Digits",
        train_images=train_images,
        train_labels=train_labels,
        val_images=val_images,
        val_labels=val_labels,
        test_images=test_images,
        test_labels=test_labels,
        class_names=[str(c) for c in range(10)],
        class_counts=counts,
        mean=DIGITS_MEAN,
        std=DIGITS_STD,
        many_threshold=40,
        few_threshold=10,
        crop_padding=1,
        hflip=False,  # flipping changes digits
    )


# ----------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------

_N_CLASSES = {"Cifar10": 10, "Cifar100": 100, "Digits": 10}


def load_dataset(
    name: str,
    root: str | Path,
    imb_type: str,
    imb_factor: float,
    n_classes: int,
    download: bool = True,
    helena_counts: str = "all",
) -> LTData:
    """Load a long-tailed dataset (see the module docstring for the split rules).

    ``name`` is one of :data:`DATASET_NAMES` (case-insensitive); ``root`` is the data
    root holding ``cifar-10-batches-py`` / ``cifar-100-python`` and the files of the
    other datasets (see utils/extra_datasets.py; unused for Digits); ``n_classes`` must
    match the dataset.  ``helena_counts`` only matters for Helena.
    """
    canon = {n.lower(): n for n in DATASET_NAMES}.get(str(name).lower())
    if canon is None:
        raise DataError(f"unknown dataset {name!r}; use one of {', '.join(DATASET_NAMES)}")
    if canon in EXTRA_DATASETS:
        from utils.extra_datasets import load_extra_dataset

        return load_extra_dataset(canon, Path(root), imb_type, imb_factor, n_classes, helena_counts)
    K = _N_CLASSES[canon]
    if n_classes != K:
        raise DataError(f"data.n_classes = {n_classes} does not match {canon} ({K} classes)")
    if imb_type in ("exp", "step"):
        try:
            ok = math.isfinite(float(imb_factor)) and float(imb_factor) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise DataError(f"imb_factor = {imb_factor!r} must be a positive number for imb_type {imb_type!r}")
    if canon == "Digits":
        return _load_digits(imb_type, imb_factor)
    return _load_cifar(canon, Path(root), imb_type, imb_factor, download)
