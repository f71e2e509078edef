"""iNaturalist-2018 and Places-LT from tiny generated lists and JPEGs in their real layouts."""
import json
from pathlib import Path

import numpy as np
import pytest

from tests.test_datasets_extra import _acc, _config, _jpeg, in_tmp  # noqa: F401 (a fixture)
from utils.cli import main
from utils.data.datasets import load_dataset
from utils.data.inat_places import carve_validation
from utils.errors import DataError

TINY_NET = {"name": "BNMLP", "mlp_hlayer_n": 1, "mlp_features_d": 8}


def _make_inat(root: Path, train_counts=(4, 3, 2), test_per_class=2):
    """iNaturalist18/iNaturalist18_{train,val}.txt over iNaturalist18/train_val2018/<kingdom>/<id>/*.jpg."""
    folder = root / "iNaturalist18"
    rows = {"train": [], "val": []}
    for c, n in enumerate(train_counts):
        for i in range(n + test_per_class):
            rel = f"train_val2018/Plantae/{100 + c}/img{i}.jpg"
            _jpeg(folder / rel, (80 * c, 40 * i % 256, 120), size=(40 + 3 * i, 30))
            rows["train" if i < n else "val"].append(f"{rel} {c}")
    for split, lines in rows.items():
        (folder / f"iNaturalist18_{split}.txt").write_text("\n".join(lines) + "\n")
    return rows


def _make_places(root: Path, counts=(5, 3, 1), held=2):
    """Places_LT/Places_LT_{train,val,test}.txt over Places365/data_256/<letter>/<scene>/*.jpg (leading '/')."""
    scenes = ("abbey", "airfield", "bakery")
    rows = {"train": [], "val": [], "test": []}
    for c, scene in enumerate(scenes):
        for split, n in (("train", counts[c]), ("val", held), ("test", held)):
            for i in range(n):
                rel = f"/data_256/{scene[0]}/{scene}/{split}{i:08d}.jpg"
                _jpeg(root / "Places365" / rel.lstrip("/"), (90 * c, 20 * i, 200), size=(36, 44))
                rows[split].append(f"{rel} {c}")
    (root / "Places_LT").mkdir(parents=True, exist_ok=True)
    for split, lines in rows.items():
        (root / "Places_LT" / f"Places_LT_{split}.txt").write_text("\n".join(lines) + "\n")
    return rows


def test_validation_carved_from_the_training_list_keeps_a_training_image_per_class():
    # file order, classes interleaved: the last image of each class with >= 2 images is held out
    labels = np.array([0, 1, 0, 2, 1, 0, 3, 3])
    assert carve_validation(labels).tolist() == [False, False, False, False, True, True, False, True]
    # class 2 has a single image: it stays in training


def test_inat2018_split_counts_groups_and_paths(tmp_path):
    _make_inat(tmp_path)
    data = load_dataset("INat2018", tmp_path, "exp", 0.01, 3)
    assert data.class_counts == [3, 2, 1]  # 4, 3, 2 listed, the last of each class held out
    assert data.val_labels.tolist() == [0, 1, 2]
    assert data.val_files[0] == str(tmp_path / "iNaturalist18/train_val2018/Plantae/100/img3.jpg")
    assert data.test_labels.tolist() == [0, 0, 1, 1, 2, 2]  # iNaturalist18_val.txt is the test set
    assert data.test_files[0] == str(tmp_path / "iNaturalist18/train_val2018/Plantae/100/img4.jpg")
    assert data.class_names == ["100", "101", "102"]
    assert (data.many_threshold, data.few_threshold) == (100, 20)
    assert data.image_size == (224, 224)


def test_places_lt_split_and_leading_slash(tmp_path):
    _make_places(tmp_path)
    data = load_dataset("PlacesLT", tmp_path, "exp", 0.01, 3)
    assert data.class_counts == [5, 3, 1]
    assert len(data.val_files) == len(data.test_files) == 6
    assert data.train_files[0] == str(tmp_path / "Places365/data_256/a/abbey/train00000000.jpg")
    assert data.class_names == ["abbey", "airfield", "bakery"]


@pytest.mark.parametrize("name, make, missing", [
    ("INat2018", _make_inat, "iNaturalist18/iNaturalist18_val.txt"),
    ("PlacesLT", _make_places, "Places_LT/Places_LT_test.txt"),
])
def test_a_missing_list_is_refused_by_name(in_tmp, write_json, capsys, name, make, missing):
    root = in_tmp / "data"
    make(root)
    (root / missing).unlink()
    assert main("first", ["--json_path", write_json("c.json", _config(name, root, 3, TINY_NET))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert f"{root / missing} is missing" in err
    assert not (in_tmp / "exp").exists()  # nothing written


def test_missing_images_name_the_folder(tmp_path):
    import shutil
    _make_places(tmp_path)
    shutil.rmtree(tmp_path / "Places365")
    with pytest.raises(DataError, match=r"image folder .*Places365 not found; put the Places365 images"):
        load_dataset("PlacesLT", tmp_path, "exp", 0.01, 3)


@pytest.mark.parametrize("name, make", [("INat2018", _make_inat), ("PlacesLT", _make_places)])
def test_one_epoch_end_to_end(in_tmp, write_json, name, make):
    root = in_tmp / "data"
    make(root)
    cfg = _config(name, root, 3, TINY_NET, num_workers=1)
    assert main("first", ["--json_path", write_json("c.json", cfg), "--no_figures"]) == 0
    run = in_tmp / f"exp/{name}/BNMLP/first/t/0"
    _acc(run)
    top = json.loads((run / "topk.json").read_text())
    assert top["top5"]["All"] == 1.0  # 3 classes: the label is always among the top 5
    assert set(json.loads((run / "calibration.json").read_text())) >= {"ECE", "NLL", "Brier", "bins"}
