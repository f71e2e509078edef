"""The image-file datasets of the original (SPEC 4.3): ImageNet-LT and mini-ImageNet-LT,
read from files the user places under the data root and decoded per image by DataLoader
workers (utils/data/batches.py ``FileSplit``).

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

* ImageNet-LT: the split is the lists' (train 115,846 / val 20,000 / test 50,000 images,
  1,000 classes, 1,280 .. 5 per class).  Training transform RandomResizedCrop(224),
  RandomHorizontalFlip, ColorJitter(0.4, 0.4, 0.4, 0); otherwise Resize(256),
  CenterCrop(224); ImageNet mean/std.  ``imb_type``/``imb_factor`` are not used.
* mini-ImageNet-LT: the split files of the original (TailCalibX's generator), chosen by
  ``imb_factor``; when they are absent and ``mini_imagenet/all_classes.txt`` is there,
  they are generated once, reproducibly (:func:`make_mini_imagenet_splits`).  The
  same transforms as ImageNet-LT without colour jitter.

Groups (Many n > many, Few n < few): 100 / 20 for both.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from utils.errors import DataError
from utils.data.lt_data import LTData

__all__ = ["load_imagenet_lt", "load_mini_imagenet_lt", "make_mini_imagenet_splits", "mini_imagenet_counts",
           "imagenet_transforms", "IMAGENET_MEAN", "IMAGENET_STD", "need_file",
           # the readers iNaturalist-2018 and Places-LT share (utils/data/inat_places.py)
           "read_list", "read_split_lists", "train_class_counts", "check_labels", "check_images_exist",
           "file_dataset"]

IMAGE_SIZE = 224  # the side of the crops the image-file datasets' transforms produce
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_FOLDER = "CLS-LOC"
IMAGENET_LT_FOLDER = "ImageNet_LT"
MINI_IMAGENET_FOLDER = "mini_imagenet"


def need_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path} is missing; put {what} there (see datasets/README.md)")
    return path


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


def read_list(path: Path, what: str) -> tuple[list[str], np.ndarray]:
    """Lines "<name> <label>" (extra columns ignored, blank lines skipped)."""
    need_file(path, what)
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


def train_class_counts(train_labels: np.ndarray, n_classes: int, source: Path, name: str) -> list[int]:
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


def check_labels(labels: np.ndarray, n_classes: int, source: Path) -> None:
    if labels.max() >= n_classes:
        raise DataError(f"{source} has label {int(labels.max())}, but the training list has only "
                        f"{n_classes} classes (0..{n_classes - 1})")


def check_images_exist(folder: Path, paths: list[str], what: str) -> None:
    if not folder.is_dir():
        raise DataError(f"image folder {folder} not found; put {what} there (see datasets/README.md)")
    first = Path(paths[0])
    if not first.is_file():
        raise DataError(f"image {first} (the first one listed) not found; put {what} under {folder}")


def file_dataset(name: str, files: dict, labels: dict, class_names: list[str], counts: list[int],
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


def read_split_lists(lists: Path, stem: str, images: Path, n_classes: int, name: str, what: str,
                     images_what: str) -> tuple[dict, dict, list[int]]:
    """({split: image paths}, {split: labels}, training class counts) of the three lists
    ``<lists>/<stem>_{train,val,test}.txt``, each path taken under ``images`` (a leading "/"
    dropped, as some copies of the lists have one)."""
    files, labels = {}, {}
    for split in ("train", "val", "test"):
        names, y = read_list(lists / f"{stem}_{split}.txt", what)
        files[split] = [str(images / n.lstrip("/")) for n in names]
        labels[split] = y
    counts = train_class_counts(labels["train"], n_classes, lists / f"{stem}_train.txt", name)
    for split in ("val", "test"):
        check_labels(labels[split], n_classes, lists / f"{stem}_{split}.txt")
    check_images_exist(images, files["train"], images_what)
    return files, labels, counts


def load_imagenet_lt(root: Path, n_classes: int) -> LTData:
    what = "the ImageNet-LT file lists (ImageNet_LT_train.txt, ImageNet_LT_val.txt, ImageNet_LT_test.txt)"
    files, labels, counts = read_split_lists(root / IMAGENET_LT_FOLDER, "ImageNet_LT", root / IMAGENET_FOLDER,
                                             n_classes, "ImageNet-LT", what,
                                             "the ImageNet (ILSVRC-2012 CLS-LOC) train/ and val/ folders")
    names = _wnid_names(files["train"], labels["train"], n_classes)
    return file_dataset("ImageNet", files, labels, names, counts, color_jitter=True)


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
    class_file = need_file(folder / "all_classes.txt", "the mini-ImageNet class list (one wnid per line)")
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


def load_mini_imagenet_lt(root: Path, imb_factor: float, n_classes: int) -> LTData:
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
        names, y = read_list(path, what)
        files[split] = [str(train_dir / n.split("_")[0] / n) for n in names]
        labels[split] = y
    counts = train_class_counts(labels["train"], n_classes, folder / f"{tag}_train.txt", "mini-ImageNet-LT")
    for split in ("val", "test"):
        check_labels(labels[split], n_classes, folder / f"{tag}_{split}.txt")
    check_images_exist(train_dir, files["train"], "the ImageNet (ILSVRC-2012 CLS-LOC) train/ folder")
    names = _wnid_names(files["train"], labels["train"], n_classes)
    return file_dataset("MiniImagenet", files, labels, names, counts, color_jitter=False)
