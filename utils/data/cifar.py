"""CIFAR-10/100-LT from the official python pickles under ``data.root``
(``cifar-10-batches-py``, ``cifar-100-python``), downloaded by torchvision when absent.

5,000 / 500 training images per class, so ``n_max`` = 4,980 / 480 (utils/data/lt_data.py):
CIFAR-100 at ``imb_factor=0.01`` gives 10,457 training, 2,000 validation and 10,000 test
images; CIFAR-10 at 0.01 gives 12,360 training images.  The pickles are read with a
restricted unpickler: numpy arrays and plain containers only, never code.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from utils.errors import DataError
from utils.data.lt_data import LTData, long_tailed_splits, one_line

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_STD = (0.2023, 0.1994, 0.2010)

# What the CIFAR python pickles need (official files and ones written by recent numpy):
# numpy arrays, their dtypes, and bytes as Python 3 pickles them.  Nothing that runs code.
DATASET_PICKLE_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
})


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in DATASET_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a dataset file never needs (it could run "
                                     "code); refused without loading it")


def restricted_pickle_load(fh, encoding: str = "ASCII") -> Any:
    """pickle.load for data files: only numpy arrays and plain containers, never code."""
    return _RestrictedUnpickler(fh, encoding=encoding).load()


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


# The dataset folders under data.root (the run checks that they do not lead outside it).
CIFAR_FOLDERS = {name: spec["folder"] for name, spec in _CIFAR.items()}


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
            f"{path} is corrupt or truncated ({type(e).__name__}: {one_line(e)}); replace it with the "
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
            f"({type(e).__name__}: {one_line(e)}). {fill}"
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


def load_cifar(name: str, root: Path, imb_type: str, imb_factor: float, download: bool) -> LTData:
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

    shape = (-1, 3, 32, 32)
    splits = long_tailed_splits(x_train.reshape(shape), y_train, x_test.reshape(shape), y_test, K,
                                imb_type, imb_factor, f"{name} ({folder})")
    return LTData(
        name=name,
        **splits,
        class_names=class_names,
        mean=CIFAR_MEAN,
        std=spec["std"],
        many_threshold=spec["many"],
        few_threshold=spec["few"],
        crop_padding=4,
        hflip=True,
    )
