"""The feature-table and MNIST datasets of the original (SPEC 4.3): Helena and MNIST, read
from files the user places under the data root (default ``datasets/``)::

    helena.arff                             class column first, then 27 numeric features
    helena_valid_indices.json               {"<label>": [row, ...]} 20 rows per class
    helena_test_indices.json                (the original's fixed validation/test rows)
    mnist-original.mat                      "data" 784 x 70000 uint8, "label" 1 x 70000

* Helena: class labels renumbered by decreasing class size (0 = the largest class, the
  original's ``np.argsort(-counts)``); validation and test rows from the two index
  files, every other row trains; the 27 features standardised with the original's
  fixed per-feature mean/std.  No augmentation.  ``helena_counts="all"`` keeps the
  original's class sizes (over the whole file, i.e. training + 20 validation + 20 test
  rows per class) for the groups, the prior and the class-balanced weights; ``"train"``
  counts the training rows only.
* MNIST (balanced; ``imb_factor`` must be 1 as in the original): scikit-learn's
  ``train_test_split(test_size=10000, random_state=0, stratify=labels)`` twice (test,
  then validation), so 50,000 / 10,000 / 10,000 images; training augmentation
  RandomCrop(28, padding=4) + RandomHorizontalFlip (the original's, flip included);
  mean 0.1301, std 0.3069.  (For a file with N != 70,000 images the held-out sets have
  round(N / 7) images each, so tests can use tiny files.)

Groups (Many n > many, Few n < few): Helena 500 / 200, MNIST 1000 / 200.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from utils.errors import DataError
from utils.data.imagenet_lt import need_file
from utils.data.lt_data import LTData, one_line

__all__ = ["load_helena", "load_mnist", "HELENA_MEAN", "HELENA_STD", "MNIST_MEAN", "MNIST_STD"]

MNIST_MEAN = (0.1301,)
MNIST_STD = (0.3069,)
# The original's fixed standardisation of Helena's 27 features (utils/data_units.py there).
HELENA_MEAN = (
    1.58288167e-01, 5.57037048e-01, 3.99761081e-01, 5.00160372e-01, 5.10247896e-01, 5.29567537e-01,
    3.46977703e-01, 5.36485030e-02, 3.62584491e-01, 1.25675640e+02, 1.19772758e+02, 1.12860018e+02,
    3.66884493e+01, 3.49288424e+01, 3.34216862e+01, -8.20831699e-02, -5.04515470e-02, -3.33100116e-02,
    7.04400200e+01, 1.03401015e+00, 4.69232939e+00, 1.02238266e+01, 3.69231674e+00, 5.61279166e+00,
    -7.95518359e-01, 4.93099725e-01, 4.55378998e-01)
HELENA_STD = (
    1.68466041e-01, 3.54006602e-01, 2.42181709e-01, 2.17568431e-01, 2.61706411e-01, 3.70982956e-01,
    2.23766462e-01, 3.67327475e-02, 1.64758695e-01, 5.33314783e+01, 5.47079150e+01, 6.17488870e+01,
    1.87199115e+01, 1.85985040e+01, 1.89926139e+01, 2.66167363e+00, 2.95894681e+00, 3.23702490e+00,
    1.52503935e+01, 6.27665329e+00, 1.08637107e+01, 5.91986458e+00, 3.69953085e+00, 4.02897586e+00,
    3.10204107e+00, 1.97985517e+00, 1.89782894e+00)
HELENA_FEATURES = 27
MNIST_FILE = "mnist-original.mat"
HELENA_FILE = "helena.arff"
HELENA_VALID_FILE = "helena_valid_indices.json"
HELENA_TEST_FILE = "helena_test_indices.json"
MNIST_HOLDOUT = 10_000  # validation and test images each, of the 70,000


def _read_index_file(path: Path, n_classes: int, n_rows: int) -> dict[int, np.ndarray]:
    need_file(path, "the original's Helena index file")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        out = {int(k): np.asarray(v, dtype=np.int64).reshape(-1) for k, v in raw.items()}
    except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as e:
        raise DataError(f"{path} is not a JSON object of label -> list of row indices "
                        f"({type(e).__name__}: {one_line(e)})") from None
    missing = [c for c in range(n_classes) if c not in out]
    if missing:
        raise DataError(f"{path} has no rows for class {missing[0]}; it must list rows for classes 0..{n_classes - 1}")
    for c, rows in out.items():
        if len(rows) and (rows.min() < 0 or rows.max() >= n_rows):
            raise DataError(f"{path}: class {c} lists row {int(rows.max())}, but {HELENA_FILE} has {n_rows} rows")
    return out


def _read_helena_table(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(class labels as in the file, N x 27 float64 features) of helena.arff."""
    from scipy.io import arff

    try:
        table, meta = arff.loadarff(str(path))
        columns = meta.names()
        old_labels = np.array([int(float(v.decode() if isinstance(v, bytes) else v)) for v in table[columns[0]]],
                              dtype=np.int64)
        features = np.stack([np.asarray(table[c], dtype=np.float64) for c in columns[1:]], axis=1)
    except Exception as e:
        raise DataError(f"{path} is not a readable Helena arff file (class column first, then "
                        f"{HELENA_FEATURES} numeric features): {type(e).__name__}: {one_line(e)}") from None
    if features.shape[1] != HELENA_FEATURES:
        raise DataError(f"{path} has {features.shape[1]} feature columns after the class column, "
                        f"expected {HELENA_FEATURES}")
    return old_labels, features


def _helena_rows(root: Path, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, validation, test) rows: the two index files' rows, and every other row trains,
    per class in row order, classes in label order."""
    n = len(labels)
    valid = _read_index_file(root / HELENA_VALID_FILE, k, n)
    test = _read_index_file(root / HELENA_TEST_FILE, k, n)
    val_rows = np.concatenate([valid[c] for c in range(k)])
    test_rows = np.concatenate([test[c] for c in range(k)])
    if np.intersect1d(val_rows, test_rows).size:
        raise DataError(f"{root / HELENA_VALID_FILE} and {root / HELENA_TEST_FILE} share rows; they must be disjoint")
    held_out = np.zeros(n, dtype=bool)
    held_out[val_rows] = True
    held_out[test_rows] = True
    train_rows = np.concatenate([np.flatnonzero((labels == c) & ~held_out) for c in range(k)])
    return train_rows, val_rows, test_rows


def load_helena(root: Path, n_classes: int, helena_counts: str) -> LTData:
    path = need_file(root / HELENA_FILE, "helena.arff (the Helena dataset of the AutoML benchmark, OpenML 41169)")
    old_labels, features = _read_helena_table(path)
    k = int(old_labels.max()) + 1
    counts_all = np.bincount(old_labels, minlength=k)
    if old_labels.min() < 0 or (counts_all == 0).any():
        raise DataError(f"{path}: class labels must be 0..K-1 with every class present")
    if k != n_classes:
        raise DataError(f"data.n_classes = {n_classes} does not match Helena: {path} has {k} classes")
    # Labels renumbered by decreasing class size, exactly as the original (its default,
    # unstable argsort decides ties, and its index files are keyed by these labels).
    by_size = np.argsort(-counts_all)
    new_of_old = np.empty_like(by_size)
    new_of_old[by_size] = np.arange(k)
    labels = new_of_old[old_labels]
    train_rows, val_rows, test_rows = _helena_rows(root, labels, k)
    # The original's Normalize1d: float32 features, float32 statistics.
    x = (torch.from_numpy(features.astype(np.float32))
         - torch.tensor(HELENA_MEAN, dtype=torch.float32)) / torch.tensor(HELENA_STD, dtype=torch.float32)
    y = torch.from_numpy(labels)
    train_counts = np.bincount(labels[train_rows], minlength=k)
    counts = np.bincount(labels, minlength=k) if helena_counts == "all" else train_counts
    if (train_counts == 0).any():
        raise DataError(f"class {int(np.flatnonzero(train_counts == 0)[0])} of {path} has no training rows left "
                        f"after the validation/test rows")

    def rows(r):
        idx = torch.from_numpy(r)
        return x[idx].contiguous(), y[idx].contiguous()

    train_x, train_y = rows(train_rows)
    val_x, val_y = rows(val_rows)
    test_x, test_y = rows(test_rows)
    return LTData(
        name="Helena",
        train_images=train_x, train_labels=train_y,
        val_images=val_x, val_labels=val_y,
        test_images=test_x, test_labels=test_y,
        class_names=[str(c) for c in range(k)], class_counts=counts.tolist(),
        mean=(0.0,), std=(1.0,),  # already standardised above
        many_threshold=500, few_threshold=200,
        crop_padding=0, hflip=False,
    )


def load_mnist(root: Path, imb_factor: float, n_classes: int) -> LTData:
    import scipy.io
    from sklearn.model_selection import train_test_split

    if float(imb_factor) != 1.0:
        raise DataError(f"data.imb_factor = {imb_factor}: MNIST is balanced (as in the original); set data.imb_factor 1")
    if n_classes != 10:
        raise DataError(f"data.n_classes = {n_classes} does not match MNIST (10 classes)")
    path = need_file(root / MNIST_FILE, "mnist-original.mat (MATLAB file with 'data' 784 x 70000 and 'label' 1 x 70000)")
    try:
        mat = scipy.io.loadmat(str(path))
        data = np.asarray(mat["data"])
        labels_f = np.asarray(mat["label"]).reshape(-1)
    except Exception as e:
        raise DataError(f"{path} is not a readable mnist-original.mat ({type(e).__name__}: {one_line(e)})") from None
    if data.ndim != 2 or data.shape[0] != 784 or data.shape[1] != len(labels_f):
        raise DataError(f"{path}: 'data' has shape {data.shape} and 'label' {len(labels_f)} entries; "
                        f"expected 784 x N and N")
    labels = labels_f.astype(np.int64)
    if labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{path}: labels must be 0..9")
    n = len(labels)
    images = np.ascontiguousarray(data.T.reshape(n, 1, 28, 28), dtype=np.uint8)
    holdout = MNIST_HOLDOUT if n == 70_000 else max(10, round(n / 7))
    # Indices instead of the images: the split depends only on the labels and N.
    try:
        rest, test_idx, rest_y, _ = train_test_split(np.arange(n), labels_f, test_size=holdout, random_state=0,
                                                     stratify=labels_f)
        train_idx, val_idx, _, _ = train_test_split(rest, rest_y, test_size=holdout, random_state=0, stratify=rest_y)
    except ValueError as e:
        raise DataError(f"{path} is too small to split ({one_line(e)})") from None

    def split(idx):
        return torch.from_numpy(images[idx]).contiguous(), torch.from_numpy(labels[idx])

    train_x, train_y = split(train_idx)
    val_x, val_y = split(val_idx)
    test_x, test_y = split(test_idx)
    counts = np.bincount(labels[train_idx], minlength=10)
    return LTData(
        name="MNIST",
        train_images=train_x, train_labels=train_y,
        val_images=val_x, val_labels=val_y,
        test_images=test_x, test_labels=test_y,
        class_names=[str(c) for c in range(10)], class_counts=counts.tolist(),
        mean=MNIST_MEAN, std=MNIST_STD,
        many_threshold=1000, few_threshold=200,
        crop_padding=4, hflip=True,  # the original's RandomCrop(28, padding=4) + RandomHorizontalFlip
    )
