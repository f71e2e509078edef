"""Tests for utils/data/datasets.py: long-tailed splits of CIFAR-10/100 (fake pickles written to tmp) and Digits."""

from __future__ import annotations

import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from utils.data.datasets import (
    DIGITS_MEAN,
    DIGITS_STD,
    DataError,
    LTData,
    digits_pool_and_test,
    load_dataset,
    long_tailed_counts,
)

# ----------------------------------------------------------------------------------
# fake CIFAR writers (official python-pickle layout)
# ----------------------------------------------------------------------------------


def _fake_images(labels: np.ndarray) -> np.ndarray:
    """N x 3072 uint8 zeros, with markers: pixel 0 = class, pixels 1,2 = index within
    the class in file order (low byte, high byte), pixel 1024 (channel 1, (0,0)) = 7."""
    x = np.zeros((len(labels), 3072), dtype=np.uint8)
    x[:, 0] = labels
    for c in np.unique(labels):
        pos = np.flatnonzero(labels == c)
        k = np.arange(len(pos))
        x[pos, 1] = k % 256
        x[pos, 2] = k // 256
    x[:, 1024] = 7
    return x


def _shuffled_labels(n_classes: int, per_class: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(n_classes), per_class))


def _dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=5)  # fastest to write; the loader reads any protocol


def write_cifar100(root: Path, train_per_class: int = 500, test_per_class: int = 100) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    y = _shuffled_labels(100, train_per_class, 0)
    _dump(folder / "train", {b"data": _fake_images(y), b"fine_labels": y.tolist()})
    yt = _shuffled_labels(100, test_per_class, 1)
    _dump(folder / "test", {b"data": _fake_images(yt), b"fine_labels": yt.tolist()})
    _dump(folder / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)]})
    return folder


def write_cifar10(root: Path, train_per_class: int = 5000, test_per_class: int = 100) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    y = _shuffled_labels(10, train_per_class, 2)
    x = _fake_images(y)
    for i, (xb, yb) in enumerate(zip(np.array_split(x, 5), np.array_split(y, 5)), start=1):
        _dump(folder / f"data_batch_{i}", {b"data": xb, b"labels": yb.tolist()})
    yt = _shuffled_labels(10, test_per_class, 3)
    _dump(folder / "test_batch", {b"data": _fake_images(yt), b"labels": yt.tolist()})
    _dump(folder / "batches.meta", {b"label_names": [f"n{i}".encode() for i in range(10)]})
    return folder


@pytest.fixture(scope="module")
def cifar100_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("c100")
    write_cifar100(root)
    return root


@pytest.fixture(scope="module")
def cifar10_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("c10")
    write_cifar10(root)
    return root


@pytest.fixture(scope="module")
def cifar100_lt(cifar100_root) -> LTData:
    return load_dataset("Cifar100", cifar100_root, "exp", 0.01, 100, download=False)


@pytest.fixture(scope="module")
def cifar10_lt(cifar10_root) -> LTData:
    return load_dataset("Cifar10", cifar10_root, "exp", 0.01, 10, download=False)


def _index_in_class(images: torch.Tensor) -> torch.Tensor:
    flat = images.reshape(len(images), -1).long()
    return flat[:, 1] + 256 * flat[:, 2]


def _check_file_order(d: LTData, V: int = 20) -> None:
    tr_idx, va_idx = _index_in_class(d.train_images), _index_in_class(d.val_images)
    # pixel 0 encodes the class the image came from
    assert torch.equal(d.train_images[:, 0, 0, 0].long(), d.train_labels)
    assert torch.equal(d.val_images[:, 0, 0, 0].long(), d.val_labels)
    start = 0
    for c, n in enumerate(d.class_counts):
        # training: class order, and the first n_c images of class c in file order
        assert torch.all(d.train_labels[start : start + n] == c)
        assert torch.equal(tr_idx[start : start + n], torch.arange(n))
        # validation: the next V images of class c
        assert torch.all(d.val_labels[c * V : (c + 1) * V] == c)
        assert torch.equal(va_idx[c * V : (c + 1) * V], torch.arange(n, n + V))
        start += n
    assert start == len(d.train_labels)


def _check_tensors(d: LTData, shape: tuple[int, int, int]) -> None:
    for x, y in ((d.train_images, d.train_labels), (d.val_images, d.val_labels), (d.test_images, d.test_labels)):
        assert x.dtype == torch.uint8 and x.is_contiguous() and tuple(x.shape[1:]) == shape
        assert y.dtype == torch.int64 and y.shape == (len(x),)


# ----------------------------------------------------------------------------------
# long_tailed_counts
# ----------------------------------------------------------------------------------


def test_counts_reproduce_published_totals():
    c100 = long_tailed_counts(480, 100, "exp", 0.01)
    assert sum(c100) == 10457 and c100[0] == 480 and c100[-1] == 5 and len(c100) == 100
    c10 = long_tailed_counts(4980, 10, "exp", 0.01)
    assert sum(c10) == 12360 and c10[0] == 4980 and c10[-1] == 50
    assert all(a >= b for a, b in zip(c100, c100[1:]))


def test_counts_step_and_balanced():
    assert long_tailed_counts(480, 100, "step", 0.01) == [480] * 50 + [5] * 50
    assert long_tailed_counts(4980, 10, "step", 0.1) == [4980] * 5 + [498] * 5
    assert long_tailed_counts(100, 5, "step", 0.1) == [100] * 2 + [10] * 3  # K // 2 head classes
    assert long_tailed_counts(480, 100, "none", 0.01) == [480] * 100
    assert long_tailed_counts(99.6, 3, "balanced", 0.5) == [100] * 3
    assert long_tailed_counts(480, 1, "exp", 0.01) == [480]


# ----------------------------------------------------------------------------------
# CIFAR
# ----------------------------------------------------------------------------------


def test_cifar100_lt_sizes_and_groups(cifar100_lt):
    d = cifar100_lt
    assert d.name == "Cifar100" and d.n_classes == 100
    assert len(d.train_labels) == 10457 and sum(d.class_counts) == 10457
    assert len(d.val_labels) == 2000 and len(d.test_labels) == 10000
    assert d.class_counts[0] == 480 and d.class_counts[-1] == 5
    assert d.class_counts == long_tailed_counts(480, 100, "exp", 0.01)
    assert torch.equal(torch.bincount(d.train_labels, minlength=100), torch.tensor(d.class_counts))
    assert d.group_sizes() == {"Many": 34, "Medium": 35, "Few": 31}
    g = d.groups()
    assert g[0] == "Many" and g[-1] == "Few" and len(g) == 100
    assert d.summary_lines() == [
        "#examples in train-set: 10457",
        "#examples in valid-set: 2000",
        "#examples in test-set: 10000",
        "#classes: Many 34 / Medium 35 / Few 31 (Many: n > 100, Few: n < 20)",
    ]
    assert (d.many_threshold, d.few_threshold, d.crop_padding, d.hflip) == (100, 20, 4, True)
    assert d.mean == (0.4914, 0.4822, 0.4465) and d.std == (0.2023, 0.1994, 0.2010)
    assert d.class_names[:2] == ["c0", "c1"] and len(d.class_names) == 100
    _check_tensors(d, (3, 32, 32))


def test_cifar100_file_order_and_layout(cifar100_lt):
    d = cifar100_lt
    _check_file_order(d)
    # row-major CHW: byte 1024 is channel 1, pixel (0, 0)
    assert torch.all(d.train_images[:, 1, 0, 0] == 7) and torch.all(d.test_images[:, 1, 0, 0] == 7)
    # test set = the whole official test set in file order
    assert torch.equal(d.test_labels, torch.from_numpy(_shuffled_labels(100, 100, 1)))


def test_cifar10_lt(cifar10_lt):
    d = cifar10_lt
    assert d.name == "Cifar10" and d.n_classes == 10
    assert len(d.train_labels) == 12360 and d.class_counts[0] == 4980 and d.class_counts[-1] == 50
    assert len(d.val_labels) == 200 and len(d.test_labels) == 1000
    assert d.std == (0.2470, 0.2435, 0.2616) and d.mean == (0.4914, 0.4822, 0.4465)
    assert (d.many_threshold, d.few_threshold, d.crop_padding, d.hflip) == (1000, 200, 4, True)
    assert d.class_names == [f"n{i}" for i in range(10)]
    assert sum(d.group_sizes().values()) == 10
    # file order is across the 5 batch files, in batch order
    _check_file_order(d)
    _check_tensors(d, (3, 32, 32))
    assert torch.equal(d.test_labels, torch.from_numpy(_shuffled_labels(10, 100, 3)))


def test_cifar10_step_and_balanced(tmp_path):
    write_cifar10(tmp_path, train_per_class=120, test_per_class=1)  # n_max = 100
    d = load_dataset("Cifar10", tmp_path, "step", 0.1, 10, download=False)
    assert d.class_counts == [100] * 5 + [10] * 5 and len(d.train_labels) == 550
    _check_file_order(d)
    d = load_dataset("Cifar10", tmp_path, "none", 0.01, 10, download=False)
    assert d.class_counts == [100] * 10 and len(d.train_labels) == 1000 and len(d.val_labels) == 200
    _check_file_order(d)


def test_n_classes_mismatch(cifar10_root):
    with pytest.raises(DataError, match=r"data\.n_classes = 7 does not match Cifar10 \(10 classes\)"):
        load_dataset("Cifar10", cifar10_root, "exp", 0.01, 7, download=False)
    with pytest.raises(DataError, match="Cifar100"):
        load_dataset("Cifar100", cifar10_root, "exp", 0.01, 10, download=False)
    with pytest.raises(DataError, match="Digits"):
        load_dataset("Digits", cifar10_root, "exp", 0.01, 100)


def test_unknown_name(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("SVHN", tmp_path, "exp", 0.01, 10)
    msg = str(e.value)
    assert "SVHN" in msg and "Cifar10" in msg and "Cifar100" in msg and "Digits" in msg and "MNIST" in msg


def test_missing_folder_no_download(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("Cifar100", tmp_path, "exp", 0.01, 100, download=False)
    msg = str(e.value)
    assert str(tmp_path / "cifar-100-python") in msg and "cifar-100-python.tar.gz" in msg
    assert "\n" not in msg


def _fake_torchvision(monkeypatch, **classes):
    """Stand-in torchvision (importing the real one costs ~1.5 s and must not touch the network)."""
    tv = types.ModuleType("torchvision")
    tvd = types.ModuleType("torchvision.datasets")
    for k, v in classes.items():
        setattr(tvd, k, v)
    tv.datasets = tvd
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", tvd)


def test_download_failure_is_data_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("network unreachable")

    _fake_torchvision(monkeypatch, CIFAR10=offline, CIFAR100=offline)
    with pytest.raises(DataError) as e:
        load_dataset("Cifar10", tmp_path, "exp", 0.01, 10, download=True)
    msg = str(e.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg and "could not be downloaded" in msg
    assert "network unreachable" in msg and "cifar-10-python.tar.gz" in msg and "\n" not in msg
    with pytest.raises(DataError, match="cifar-100-python"):
        load_dataset("Cifar100", tmp_path, "exp", 0.01, 100, download=True)


def test_download_is_called_when_missing(tmp_path, monkeypatch):
    """download=True calls torchvision's downloader (train and test) and then reads the pickles."""
    calls = []

    def fake_download(root, train, download):
        calls.append((root, train, download))
        if not (Path(root) / "cifar-10-batches-py").exists():
            write_cifar10(Path(root), train_per_class=40, test_per_class=3)

    _fake_torchvision(monkeypatch, CIFAR10=fake_download)
    d = load_dataset("Cifar10", tmp_path / "new", "none", 1.0, 10, download=True)
    assert calls == [(str(tmp_path / "new"), True, True), (str(tmp_path / "new"), False, True)]
    assert d.class_counts == [20] * 10 and len(d.test_labels) == 30


def test_truncated_pickle(tmp_path):
    folder = write_cifar10(tmp_path, train_per_class=40, test_per_class=3)
    d = load_dataset("Cifar10", tmp_path, "none", 1.0, 10, download=False)  # intact: loads
    assert d.class_counts == [20] * 10
    bad = folder / "data_batch_3"
    raw = bad.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError) as e:
        load_dataset("Cifar10", tmp_path, "none", 1.0, 10, download=True)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


def test_missing_file_in_folder(tmp_path):
    folder = write_cifar100(tmp_path, train_per_class=30, test_per_class=1)
    (folder / "test").unlink()
    with pytest.raises(DataError) as e:
        load_dataset("Cifar100", tmp_path, "none", 1.0, 100, download=False)
    assert str(folder / "test") in str(e.value)


def test_too_few_images_per_class(tmp_path):
    write_cifar10(tmp_path, train_per_class=40, test_per_class=1)
    # n_max = 20; imb_factor 0.01 leaves a class with round(0.2) = 0 training images
    with pytest.raises(DataError, match="imb_factor"):
        load_dataset("Cifar10", tmp_path, "exp", 0.01, 10, download=False)
    # imb_factor > 1 asks for more images than a class has
    with pytest.raises(DataError, match="class 1 .* 40 training images"):
        load_dataset("Cifar10", tmp_path, "exp", 2.0, 10, download=False)


def test_cifar_deterministic(tmp_path):
    write_cifar10(tmp_path, train_per_class=60, test_per_class=2)
    a = load_dataset("Cifar10", tmp_path, "exp", 0.5, 10, download=False)
    b = load_dataset("Cifar10", tmp_path, "exp", 0.5, 10, download=False)
    for k in ("train_images", "train_labels", "val_images", "val_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(a, k), getattr(b, k))
    _check_file_order(a)


# ----------------------------------------------------------------------------------
# Digits
# ----------------------------------------------------------------------------------


def test_digits_pool_and_test_split():
    from sklearn.datasets import load_digits

    raw = load_digits()
    xp, yp, xt, yt = digits_pool_and_test()
    assert xp.shape == (1200, 1, 8, 8) and xt.shape == (597, 1, 8, 8)
    assert xp.dtype == np.uint8 and xt.dtype == np.uint8
    assert np.bincount(yp).tolist() == [120] * 10
    # pool = first 120 of each class in file order, test = the rest in file order
    pool_rows = np.concatenate([np.flatnonzero(raw.target == c)[:120] for c in range(10)])
    in_pool = np.zeros(1797, dtype=bool)
    in_pool[pool_rows] = True
    expect = np.round(raw.data * 255 / 16).astype(np.uint8).reshape(-1, 1, 8, 8)
    assert np.array_equal(xp, expect[in_pool]) and np.array_equal(yp, raw.target[in_pool])
    assert np.array_equal(xt, expect[~in_pool]) and np.array_equal(yt, raw.target[~in_pool])
    assert xp.max() == 255 and xp.min() == 0


def test_digits_mean_std_constants():
    xp, _, _, _ = digits_pool_and_test()
    t = torch.from_numpy(xp).double() / 255
    assert round(t.mean().item(), 4) == DIGITS_MEAN[0]
    assert round(t.std(unbiased=False).item(), 4) == DIGITS_STD[0]


@pytest.mark.parametrize(
    "imb_factor, counts, groups",
    [
        (0.01, [100, 60, 36, 22, 13, 8, 5, 3, 2, 1], {"Many": 2, "Medium": 3, "Few": 5}),
        (0.02, [100, 65, 42, 27, 18, 11, 7, 5, 3, 2], {"Many": 3, "Medium": 3, "Few": 4}),
        (0.05, [100, 72, 51, 37, 26, 19, 14, 10, 7, 5], {"Many": 3, "Medium": 5, "Few": 2}),
    ],
)
def test_digits_lt(imb_factor, counts, groups):
    d = load_dataset("Digits", "unused", "exp", imb_factor, 10)
    assert d.name == "Digits" and d.n_classes == 10 and d.class_names == [str(i) for i in range(10)]
    assert d.class_counts == counts == long_tailed_counts(100, 10, "exp", imb_factor)
    assert len(d.train_labels) == sum(counts) and len(d.val_labels) == 200 and len(d.test_labels) == 597
    assert d.group_sizes() == groups
    assert (d.many_threshold, d.few_threshold, d.crop_padding, d.hflip) == (40, 10, 1, False)
    assert d.mean == DIGITS_MEAN and d.std == DIGITS_STD
    _check_tensors(d, (1, 8, 8))
    # train of class c = first n_c pool images of class c, validation = next 20
    xp, yp, _, _ = digits_pool_and_test()
    start = 0
    for c, n in enumerate(counts):
        pc = torch.from_numpy(xp[yp == c])
        assert torch.equal(d.train_images[start : start + n], pc[:n])
        assert torch.all(d.train_labels[start : start + n] == c)
        assert torch.equal(d.val_images[20 * c : 20 * c + 20], pc[n : n + 20])
        start += n
