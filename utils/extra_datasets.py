"""The other datasets of the original (SPEC 4.3): ImageNet-LT, mini-ImageNet-LT,
Helena and MNIST, read from files the user places under the data root.

Layout under ``data.root`` (default ``datasets/``)::

    CLS-LOC/train/<wnid>/<file>.JPEG        ImageNet (ILSVRC-2012 CLS-LOC) training images
    CLS-LOC/val/<wnid>/<file>.JPEG          ImageNet validation images (ImageNet-LT's test set)
    ImageNet_LT/ImageNet_LT_train.txt       "<path relative to CLS-LOC> <label>" per line
    ImageNet_LT/ImageNet_LT_val.txt         (the standard lists of Liu et al., OLTR)
    ImageNet_LT/ImageNet_LT_test.txt
    mini_imagenet/<imb>_train.txt           "<file name> <label>" per line; the image is
    mini_imagenet/<imb>_val.txt             CLS-LOC/train/<wnid>/<file name>, wnid = the
    mini_imagenet/<imb>_test.txt            file name up to the first "_"; <imb> = data.imb_factor
    mini_imagenet/all_classes.txt           the 100 wnids (to generate the split files)
    helena.arff                             class column first, then 27 numeric features
    helena_valid_indices.json               {"<label>": [row, ...]} 20 rows per class
    helena_test_indices.json                (the original's fixed validation/test rows)
    mnist-original.mat                      "data" 784 x 70000 uint8, "label" 1 x 70000

What each loader reproduces from the published implementation:

* ImageNet-LT: the split is the lists' (train 115,846 / val 20,000 / test 50,000 images,
  1,000 classes, 1,280 .. 5 per class).  Training transform RandomResizedCrop(224),
  RandomHorizontalFlip, ColorJitter(0.4, 0.4, 0.4, 0); otherwise Resize(256),
  CenterCrop(224); ImageNet mean/std.  ``imb_type``/``imb_factor`` are not used.
* mini-ImageNet-LT: the split files of the original (TailCalibX's generator), chosen by
  ``imb_factor``; when they are absent and ``mini_imagenet/all_classes.txt`` is there,
  they are generated once, reproducibly (:func:`make_mini_imagenet_splits`).  The
  same transforms as ImageNet-LT without colour jitter.
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

Groups (Many n > many, Few n < few): ImageNet-LT and mini-ImageNet-LT 100 / 20,
Helena 500 / 200, MNIST 1000 / 200.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from utils.data import LTData, _one_line
from utils.errors import DataError

__all__ = ["load_extra_dataset", "IMAGENET_MEAN", "IMAGENET_STD", "HELENA_MEAN", "HELENA_STD",
           "MNIST_MEAN", "MNIST_STD", "imagenet_transforms"]

IMAGE_SIZE = 224  # the side of the crops the image-file datasets' transforms produce
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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

IMAGENET_FOLDER = "CLS-LOC"
IMAGENET_LT_FOLDER = "ImageNet_LT"
MINI_IMAGENET_FOLDER = "mini_imagenet"
MNIST_FILE = "mnist-original.mat"
HELENA_FILE = "helena.arff"
HELENA_VALID_FILE = "helena_valid_indices.json"
HELENA_TEST_FILE = "helena_test_indices.json"
MNIST_HOLDOUT = 10_000  # validation and test images each, of the 70,000


def _need_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path} is missing; put {what} there (see datasets/README.md)")
    return path


# ----------------------------------------------------------------------------------
# Image-file datasets: ImageNet-LT and mini-ImageNet-LT
# ----------------------------------------------------------------------------------


def imagenet_transforms(color_jitter: bool):
    """(train, eval) transforms of the original, ending in uint8 C x H x W tensors.

    Normalisation ((x / 255 - mean) / std, what ToTensor + Normalize compute) is done on
    the training device, so workers ship uint8 (4x fewer bytes than float32).
    """
    from torchvision import transforms as T

    train = [T.RandomResizedCrop(IMAGE_SIZE), T.RandomHorizontalFlip()]
    if color_jitter:
        train.append(T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0))
    train.append(T.PILToTensor())
    evaluation = [T.Resize(256), T.CenterCrop(IMAGE_SIZE), T.PILToTensor()]
    return T.Compose(train), T.Compose(evaluation)


def _read_list(path: Path, what: str) -> tuple[list[str], np.ndarray]:
    """Lines "<name> <label>" (extra columns ignored, blank lines skipped)."""
    _need_file(path, what)
    names, labels = [], []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            parts = line.split()
            if not parts:
                continue
            try:
                if len(parts) < 2:
                    raise ValueError
                label = int(parts[-1])
                if label < 0:
                    raise ValueError
            except ValueError:
                raise DataError(f"{path}, line {lineno}: expected '<image path> <label>' with a label >= 0, "
                                f"got {line.strip()!r}") from None
            names.append(parts[0])
            labels.append(label)
    if not names:
        raise DataError(f"{path} lists no images; put {what} there")
    return names, np.asarray(labels, dtype=np.int64)


def _class_counts(train_labels: np.ndarray, n_classes: int, source: Path, name: str) -> list[int]:
    k = int(train_labels.max()) + 1
    if k != n_classes:
        raise DataError(f"data.n_classes = {n_classes} does not match {name}: {source} has labels "
                        f"0..{k - 1} ({k} classes)")
    counts = np.bincount(train_labels, minlength=k)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise DataError(f"{source} has no training image of class {int(empty[0])}; every class of {name} "
                        f"needs at least one")
    return counts.tolist()


def _check_labels(labels: np.ndarray, n_classes: int, source: Path) -> None:
    if labels.max() >= n_classes:
        raise DataError(f"{source} has label {int(labels.max())}, but the training list has only "
                        f"{n_classes} classes (0..{n_classes - 1})")


def _check_images_exist(folder: Path, paths: list[str], what: str) -> None:
    if not folder.is_dir():
        raise DataError(f"image folder {folder} not found; put {what} there (see datasets/README.md)")
    first = Path(paths[0])
    if not first.is_file():
        raise DataError(f"image {first} (the first one listed) not found; put {what} under {folder}")


def _file_dataset(name: str, files: dict, labels: dict, class_names: list[str], counts: list[int],
                  color_jitter: bool) -> LTData:
    train_tf, eval_tf = imagenet_transforms(color_jitter)
    as_tensor = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64)) for k, v in labels.items()}
    return LTData(
        name=name,
        train_images=None, train_labels=as_tensor["train"],
        val_images=None, val_labels=as_tensor["val"],
        test_images=None, test_labels=as_tensor["test"],
        class_names=class_names, class_counts=counts,
        mean=IMAGENET_MEAN, std=IMAGENET_STD,
        many_threshold=100, few_threshold=20,
        crop_padding=0, hflip=False,  # the transforms above do the augmentation
        train_files=files["train"], val_files=files["val"], test_files=files["test"],
        train_transform=train_tf, eval_transform=eval_tf, image_size=(IMAGE_SIZE, IMAGE_SIZE),
    )


def _load_imagenet_lt(root: Path, n_classes: int) -> LTData:
    lists = root / IMAGENET_LT_FOLDER
    images = root / IMAGENET_FOLDER
    what = "the ImageNet-LT file lists (ImageNet_LT_train.txt, ImageNet_LT_val.txt, ImageNet_LT_test.txt)"
    files, labels = {}, {}
    for split in ("train", "val", "test"):
        path = lists / f"ImageNet_LT_{split}.txt"
        names, y = _read_list(path, what)
        files[split] = [str(images / n) for n in names]
        labels[split] = y
    counts = _class_counts(labels["train"], n_classes, lists / "ImageNet_LT_train.txt", "ImageNet-LT")
    for split in ("val", "test"):
        _check_labels(labels[split], n_classes, lists / f"ImageNet_LT_{split}.txt")
    _check_images_exist(images, files["train"], "the ImageNet (ILSVRC-2012 CLS-LOC) train/ and val/ folders")
    names = _wnid_names(files["train"], labels["train"], n_classes)
    return _file_dataset("ImageNet", files, labels, names, counts, color_jitter=True)


def _wnid_names(paths: list[str], labels, n_classes: int) -> list[str]:
    """Class names: the synset folder (wnid) of each class's first training image."""
    names = [""] * n_classes
    for path, c in zip(paths, labels):
        if not names[c]:
            names[c] = Path(path).parent.name
    return names


MINI_TRAIN, MINI_VAL, MINI_TEST = 500, 100, 100  # images per class drawn for each split


def mini_imagenet_counts(n_classes: int, imb_factor: float) -> list[int]:
    """The original's (TailCalibX's) profile: int(500 * imb_factor ** (c / (K - 1))), truncated."""
    if n_classes == 1:
        return [MINI_TRAIN]
    return [int(MINI_TRAIN * imb_factor ** (c / (n_classes - 1.0))) for c in range(n_classes)]


def make_mini_imagenet_splits(root: Path, imb_factor: float, seed: int = 0) -> list[Path]:
    """Write ``<imb>_{train,val,test}.txt`` and ``<imb>_num_list.json`` from ``all_classes.txt``.

    The classes are the wnids of ``mini_imagenet/all_classes.txt``, labelled in sorted
    order (as the original's ``np.unique``).  For each class, its images in
    ``CLS-LOC/train/<wnid>/`` (sorted by name) are shuffled with numpy's
    ``default_rng(seed)``; the first 500 are the training pool, the next 100 validation,
    the next 100 test (disjoint; the original drew them without a seed and could overlap
    for its "unequal" classes).  Class c keeps the first
    ``int(500 * imb_factor ** (c / (K - 1)))`` images of its pool.
    """
    folder = root / MINI_IMAGENET_FOLDER
    class_file = _need_file(folder / "all_classes.txt", "the mini-ImageNet class list (one wnid per line)")
    wnids = sorted({line.strip() for line in class_file.read_text(encoding="utf-8").splitlines() if line.strip()})
    if not wnids:
        raise DataError(f"{class_file} lists no classes")
    train_dir = root / IMAGENET_FOLDER / "train"
    rng = np.random.default_rng(seed)
    counts = mini_imagenet_counts(len(wnids), float(imb_factor))
    need = MINI_TRAIN + MINI_VAL + MINI_TEST
    rows: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for label, wnid in enumerate(wnids):
        class_dir = train_dir / wnid
        names = sorted(p.name for p in class_dir.iterdir() if p.is_file()) if class_dir.is_dir() else []
        if len(names) < need:
            raise DataError(f"{class_dir} has {len(names)} images; mini-ImageNet-LT needs {need} per class "
                            f"(ImageNet's training images of the classes in {class_file})")
        order = [names[i] for i in rng.permutation(len(names))[:need]]
        rows["train"] += [f"{n} {label}" for n in order[:counts[label]]]
        rows["val"] += [f"{n} {label}" for n in order[MINI_TRAIN:MINI_TRAIN + MINI_VAL]]
        rows["test"] += [f"{n} {label}" for n in order[MINI_TRAIN + MINI_VAL:need]]
    tag = f"{float(imb_factor)}"
    written = []
    for split, lines in rows.items():
        path = folder / f"{tag}_{split}.txt"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        written.append(path)
    (folder / f"{tag}_num_list.json").write_text(json.dumps(counts), encoding="utf-8")
    return written


def _load_mini_imagenet_lt(root: Path, imb_factor: float, n_classes: int) -> LTData:
    folder = root / MINI_IMAGENET_FOLDER
    train_dir = root / IMAGENET_FOLDER / "train"
    tag = f"{float(imb_factor)}"
    if not (folder / f"{tag}_train.txt").is_file() and (folder / "all_classes.txt").is_file():
        written = make_mini_imagenet_splits(root, imb_factor)
        print(f"mini-ImageNet-LT: wrote the split files {', '.join(p.name for p in written)} in {folder} "
              f"(from all_classes.txt, seed 0)", flush=True)
    what = (f"the mini-ImageNet-LT split files for data.imb_factor = {tag} ({tag}_train.txt, {tag}_val.txt, "
            f"{tag}_test.txt)")
    files, labels = {}, {}
    for split in ("train", "val", "test"):
        path = folder / f"{tag}_{split}.txt"
        if split == "val" and not path.is_file() and (folder / f"{tag}_valid.txt").is_file():
            path = folder / f"{tag}_valid.txt"  # the name the original's reader looked for
        names, y = _read_list(path, what)
        files[split] = [str(train_dir / n.split("_")[0] / n) for n in names]
        labels[split] = y
    counts = _class_counts(labels["train"], n_classes, folder / f"{tag}_train.txt", "mini-ImageNet-LT")
    for split in ("val", "test"):
        _check_labels(labels[split], n_classes, folder / f"{tag}_{split}.txt")
    _check_images_exist(train_dir, files["train"], "the ImageNet (ILSVRC-2012 CLS-LOC) train/ folder")
    names = _wnid_names(files["train"], labels["train"], n_classes)
    return _file_dataset("MiniImagenet", files, labels, names, counts, color_jitter=False)


# ----------------------------------------------------------------------------------
# Helena (tabular)
# ----------------------------------------------------------------------------------


def _read_index_file(path: Path, n_classes: int, n_rows: int) -> dict[int, np.ndarray]:
    _need_file(path, "the original's Helena index file")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        out = {int(k): np.asarray(v, dtype=np.int64).reshape(-1) for k, v in raw.items()}
    except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as e:
        raise DataError(f"{path} is not a JSON object of label -> list of row indices "
                        f"({type(e).__name__}: {_one_line(e)})") from None
    missing = [c for c in range(n_classes) if c not in out]
    if missing:
        raise DataError(f"{path} has no rows for class {missing[0]}; it must list rows for classes 0..{n_classes - 1}")
    for c, rows in out.items():
        if len(rows) and (rows.min() < 0 or rows.max() >= n_rows):
            raise DataError(f"{path}: class {c} lists row {int(rows.max())}, but {HELENA_FILE} has {n_rows} rows")
    return out


def _load_helena(root: Path, n_classes: int, helena_counts: str) -> LTData:
    from scipy.io import arff

    path = _need_file(root / HELENA_FILE, "helena.arff (the Helena dataset of the AutoML benchmark, OpenML 41169)")
    try:
        table, meta = arff.loadarff(str(path))
        columns = meta.names()
        old_labels = np.array([int(float(v.decode() if isinstance(v, bytes) else v)) for v in table[columns[0]]],
                              dtype=np.int64)
        features = np.stack([np.asarray(table[c], dtype=np.float64) for c in columns[1:]], axis=1)
    except Exception as e:
        raise DataError(f"{path} is not a readable Helena arff file (class column first, then "
                        f"{HELENA_FEATURES} numeric features): {type(e).__name__}: {_one_line(e)}") from None
    if features.shape[1] != HELENA_FEATURES:
        raise DataError(f"{path} has {features.shape[1]} feature columns after the class column, "
                        f"expected {HELENA_FEATURES}")
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
    # Every row not held out trains, per class in row order, classes in label order.
    train_rows = np.concatenate([np.flatnonzero((labels == c) & ~held_out) for c in range(k)])

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


# ----------------------------------------------------------------------------------
# MNIST
# ----------------------------------------------------------------------------------


def _load_mnist(root: Path, imb_factor: float, n_classes: int) -> LTData:
    import scipy.io
    from sklearn.model_selection import train_test_split

    if float(imb_factor) != 1.0:
        raise DataError(f"data.imb_factor = {imb_factor}: MNIST is balanced (as in the original); set data.imb_factor 1")
    if n_classes != 10:
        raise DataError(f"data.n_classes = {n_classes} does not match MNIST (10 classes)")
    path = _need_file(root / MNIST_FILE, "mnist-original.mat (MATLAB file with 'data' 784 x 70000 and 'label' 1 x 70000)")
    try:
        mat = scipy.io.loadmat(str(path))
        data = np.asarray(mat["data"])
        labels_f = np.asarray(mat["label"]).reshape(-1)
    except Exception as e:
        raise DataError(f"{path} is not a readable mnist-original.mat ({type(e).__name__}: {_one_line(e)})") from None
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
        raise DataError(f"{path} is too small to split ({_one_line(e)})") from None

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


def load_extra_dataset(name: str, root: Path, imb_type: str, imb_factor: float, n_classes: int,
                       helena_counts: str = "all") -> LTData:
    if name == "ImageNet":
        return _load_imagenet_lt(root, n_classes)
    if name == "MiniImagenet":
        return _load_mini_imagenet_lt(root, imb_factor, n_classes)
    if name == "Helena":
        if helena_counts not in ("all", "train"):
            raise DataError(f"helena_counts = {helena_counts!r}; use 'all' or 'train'")
        return _load_helena(root, n_classes, helena_counts)
    if name == "MNIST":
        return _load_mnist(root, imb_factor, n_classes)
    raise DataError(f"unknown dataset {name!r}")  # pragma: no cover - load_dataset checks names
