"""Loading a long-tailed dataset by name (:func:`load_dataset`), and Digits-LT.

Every dataset is split by the rule of utils/data/lt_data.py (CIFAR-10/100, Digits) or by its own
files and rules (utils/data/imagenet_lt.py: ImageNet-LT, mini-ImageNet-LT; utils/data/inat_places.py:
iNaturalist-2018, Places-LT; utils/data/extra_datasets.py:
Helena, MNIST).  Loading is fully deterministic: no random numbers are used anywhere.

Digits: ``sklearn.datasets.load_digits()`` (1,797 images, values 0..16).  For each class, in
file order, the first 120 images form the balanced official training set (1,200 images); all
remaining images (597) are the test set, in file order.  Then ``n_max = 1200/10 - 20 = 100``.
Pixels are stored as ``round(v * 255 / 16)`` in uint8, shape ``N x 1 x 8 x 8``.
"""
from __future__ import annotations

import gzip
import importlib.util
import math
from pathlib import Path

import numpy as np

from utils.data.cifar import load_cifar
from utils.errors import DataError
from utils.data.extra_datasets import load_helena, load_mnist
from utils.data.imagenet_lt import load_imagenet_lt, load_mini_imagenet_lt
from utils.data.inat_places import load_inat2018, load_places_lt
from utils.data.lt_data import VAL_PER_CLASS, LTData, long_tailed_counts, long_tailed_splits, one_line
from utils.names import DATASETS

__all__ = ["DataError", "LTData", "long_tailed_counts", "load_dataset", "VAL_PER_CLASS", "digits_pool_and_test"]

# Digits-LT normalisation.  Computed once from the 1,200-image balanced training pool
# (first 120 images of each class of sklearn's load_digits(), in file order), after
# the uint8 conversion round(v * 255 / 16), in [0,1] units (uint8 / 255): the mean and
# the population standard deviation (torch.std(unbiased=False)) over all 1,200 x 64
# pixels.  tests/test_data.py recomputes them and checks agreement to 4 decimals.
DIGITS_MEAN = (0.3065,)
DIGITS_STD = (0.3754,)
DIGITS_POOL_PER_CLASS = 120

# The datasets split by the rule of utils/data/lt_data.py, and their class counts.
_SPLIT_BY_RULE = {"Cifar10": 10, "Cifar100": 100, "Digits": 10}


def load_dataset(name: str, root: str | Path, imb_type: str, imb_factor: float, n_classes: int,
                 download: bool = True, helena_counts: str = "all") -> LTData:
    """Load a long-tailed dataset.

    ``name`` is one of :data:`utils.names.DATASETS` (case-insensitive); ``root`` is the data
    root holding ``cifar-10-batches-py`` / ``cifar-100-python`` and the files of the other
    datasets (unused for Digits); ``n_classes`` must match the dataset.  ``download``
    only matters for CIFAR, ``helena_counts`` only for Helena.
    """
    canon = {n.lower(): n for n in DATASETS}.get(str(name).lower())
    if canon is None:
        raise DataError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}")
    root = Path(root)
    if canon == "ImageNet":
        return load_imagenet_lt(root, n_classes)
    if canon == "INat2018":
        return load_inat2018(root, n_classes)
    if canon == "PlacesLT":
        return load_places_lt(root, n_classes)
    if canon == "MiniImagenet":
        return load_mini_imagenet_lt(root, imb_factor, n_classes)
    if canon == "Helena":
        if helena_counts not in ("all", "train"):
            raise DataError(f"helena_counts = {helena_counts!r}; use 'all' or 'train'")
        return load_helena(root, n_classes, helena_counts)
    if canon == "MNIST":
        return load_mnist(root, imb_factor, n_classes)
    _check_split_arguments(canon, imb_type, imb_factor, n_classes)
    if canon == "Digits":
        return load_digits_lt(imb_type, imb_factor)
    return load_cifar(canon, root, imb_type, imb_factor, download)


def _check_split_arguments(name: str, imb_type: str, imb_factor: float, n_classes: int) -> None:
    k = _SPLIT_BY_RULE[name]
    if n_classes != k:
        raise DataError(f"data.n_classes = {n_classes} does not match {name} ({k} classes)")
    if imb_type in ("exp", "step"):
        try:
            ok = math.isfinite(float(imb_factor)) and float(imb_factor) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise DataError(f"imb_factor = {imb_factor!r} must be a positive number for imb_type {imb_type!r}")


def digits_pool_and_test() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed Digits split: (pool_images, pool_labels, test_images, test_labels).

    ``pool`` = first 120 images of each class in file order (1,200 images, kept in file
    order), ``test`` = every other image (597), in file order.  Images are uint8
    ``N x 1 x 8 x 8`` with values ``round(v * 255 / 16)``.
    """
    try:
        v, y = _bundled_digits()
    except Exception as e:
        raise DataError(
            f"could not load scikit-learn's bundled digits ({type(e).__name__}: {one_line(e)}); "
            f"install scikit-learn (pip install scikit-learn)"
        ) from None
    # 255*v/16 is a .5 tie only for v = 8 (127.5 -> 128); floor(x + 0.5) rounds half up.
    x = np.floor(v * 255.0 / 16.0 + 0.5).astype(np.uint8).reshape(-1, 1, 8, 8)
    in_pool = np.zeros(len(y), dtype=bool)
    for c in range(10):
        in_pool[np.flatnonzero(y == c)[:DIGITS_POOL_PER_CLASS]] = True
    return x[in_pool], y[in_pool], x[~in_pool], y[~in_pool]


def _bundled_digits() -> tuple[np.ndarray, np.ndarray]:
    """(1797 x 64 float64 pixel values 0..16, int64 labels) of scikit-learn's bundled digits.

    Read from the file ``sklearn.datasets.load_digits`` reads (digits.csv.gz: 64 pixels and
    the label per row), found without importing scikit-learn, whose import loads pandas and
    takes seconds; ``load_digits`` itself where the file is not at that place."""
    spec = importlib.util.find_spec("sklearn")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, mode="rt", encoding="utf-8") as fh:
                table = np.loadtxt(fh, delimiter=",")
            return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.asarray(d.data, dtype=np.float64), np.asarray(d.target, dtype=np.int64)


def load_digits_lt(imb_type: str, imb_factor: float) -> LTData:
    xp, yp, xt, yt = digits_pool_and_test()
    splits = long_tailed_splits(xp, yp, xt, yt, 10, imb_type, imb_factor, "Digits (sklearn load_digits)")
    return LTData(
        name="Digits",
        **splits,
        class_names=[str(c) for c in range(10)],
        mean=DIGITS_MEAN,
        std=DIGITS_STD,
        many_threshold=40,
        few_threshold=10,
        crop_padding=1,
        hflip=False,  # flipping changes digits
    )
