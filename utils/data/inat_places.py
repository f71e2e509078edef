"""The two large long-tailed benchmarks beside ImageNet-LT: iNaturalist-2018 and Places-LT,
from the standard file lists over image folders the user places, decoded per image by the
DataLoader workers (utils/data/batches.py ``FileSplit``) with ImageNet-LT's transforms and
groups (utils/data/imagenet_lt.py: 224-pixel crops; Many n > 100, Few n < 20).

Layout under ``data.root`` (default ``datasets/``)::

    iNaturalist18/iNaturalist18_train.txt   "<path relative to iNaturalist18/> <label>" per line
    iNaturalist18/iNaturalist18_val.txt     (the lists of Kang et al., classifier-balancing)
    iNaturalist18/train_val2018/...         the images, as the iNaturalist 2018 archive unpacks
    Places_LT/Places_LT_train.txt           "<path relative to Places365/> <label>" per line
    Places_LT/Places_LT_val.txt             (the lists of Liu et al., OLTR)
    Places_LT/Places_LT_test.txt
    Places365/...                           the Places365 images the lists name

* iNaturalist-2018: 8,142 classes; 437,513 training and 24,426 validation images.  As in the
  literature the validation list is the TEST set.  The validation split is carved from the
  training list (:func:`carve_validation`): per class, in file order, the class's last image,
  for every class with at least 2 images (every class of the real list: its smallest have 2),
  so each class keeps at least one training image and the split is balanced (one per class,
  8,142 images).  A fixed rule on the file's order: no random numbers, the same on every
  machine.  Training then holds 437,513 - 8,142 = 429,371 images.
* Places-LT: 365 classes; the lists' split (62,500 / 7,300 / 36,500; 4,980 .. 5 per class).

A path in a list is taken relative to its image folder (a leading ``/`` is dropped, as some
copies of the lists have one).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from utils.data.imagenet_lt import (check_images_exist, check_labels, file_dataset, read_list, read_split_lists,
                                    train_class_counts)
from utils.data.lt_data import LTData

__all__ = ["load_inat2018", "load_places_lt", "carve_validation", "INAT_FOLDER", "PLACES_LISTS", "PLACES_IMAGES"]

INAT_FOLDER = "iNaturalist18"
PLACES_LISTS = "Places_LT"
PLACES_IMAGES = "Places365"


def _under(folder: Path, names: list[str]) -> list[str]:
    return [str(folder / n.lstrip("/")) for n in names]  # as read_split_lists


def carve_validation(labels: np.ndarray) -> np.ndarray:
    """A boolean mask over a training list: per class, its last image in file order, for the
    classes with at least 2 images (so every class keeps a training image)."""
    last = {}
    for i, c in enumerate(labels.tolist()):
        last[c] = i
    counts = np.bincount(labels)
    held = np.zeros(len(labels), dtype=bool)
    held[[i for c, i in last.items() if counts[c] >= 2]] = True
    return held


def load_inat2018(root: Path, n_classes: int) -> LTData:
    folder = root / INAT_FOLDER
    what = "the iNaturalist-2018 file lists (iNaturalist18_train.txt, iNaturalist18_val.txt)"
    train_list = folder / "iNaturalist18_train.txt"
    names, labels = read_list(train_list, what)
    held = carve_validation(labels)
    test_names, test_labels = read_list(folder / "iNaturalist18_val.txt", what)
    names = np.asarray(names, dtype=object)
    files = {"train": _under(folder, list(names[~held])), "val": _under(folder, list(names[held])),
             "test": _under(folder, test_names)}
    split_labels = {"train": labels[~held], "val": labels[held], "test": test_labels}
    counts = train_class_counts(split_labels["train"], n_classes, train_list, "iNaturalist-2018")
    check_labels(test_labels, n_classes, folder / "iNaturalist18_val.txt")
    check_images_exist(folder, files["train"], "the images of the iNaturalist 2018 archive (train_val2018/)")
    class_names = _class_folders(files["train"], split_labels["train"], n_classes)
    return file_dataset("INat2018", files, split_labels, class_names, counts, color_jitter=True)


def load_places_lt(root: Path, n_classes: int) -> LTData:
    what = "the Places-LT file lists (Places_LT_train.txt, Places_LT_val.txt, Places_LT_test.txt)"
    files, labels, counts = read_split_lists(root / PLACES_LISTS, "Places_LT", root / PLACES_IMAGES, n_classes,
                                             "Places-LT", what, "the Places365 images the lists name")
    class_names = _class_folders(files["train"], labels["train"], n_classes)
    return file_dataset("PlacesLT", files, labels, class_names, counts, color_jitter=True)


def _class_folders(paths: list[str], labels: np.ndarray, n_classes: int) -> list[str]:
    """Class names: the folder of each class's first training image (iNaturalist's category id,
    Places' scene name), or the label where the lists put every image in one folder."""
    names = [""] * n_classes
    for path, c in zip(paths, labels.tolist()):
        if not names[c]:
            names[c] = Path(path).parent.name
    if len(set(names)) < n_classes:
        return [str(c) for c in range(n_classes)]
    return names
