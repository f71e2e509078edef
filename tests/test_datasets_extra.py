"""ImageNet-LT, mini-ImageNet-LT, Helena and MNIST from tiny files in their real layouts,
the batch sources that feed them to the training loop, and the small networks."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from utils.cli import main
from utils.data.datasets import load_dataset
from utils.errors import DataError

HELENA_OLD_SIZES = {0: 60, 1: 503, 2: 250}  # old label -> rows; renumbered by size: 1 -> 0, 2 -> 1, 0 -> 2
HELD = 3  # validation and test rows per class in the tiny index files


# ---------------------------------------------------------------------------
# Tiny files in the layouts of the real datasets
# ---------------------------------------------------------------------------

def _jpeg(path: Path, colour, size=(40, 30)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="JPEG")


def _make_imagenet(root: Path, train_counts=(5, 3, 2), val_per_class=1, test_per_class=2):
    """CLS-LOC/{train,val}/<wnid>/*.JPEG and ImageNet_LT/ImageNet_LT_{train,val,test}.txt."""
    lines = {"train": [], "val": [], "test": []}
    for c, n in enumerate(train_counts):
        wnid = f"n0000000{c}"
        colour = (80 * c, 255 - 80 * c, 40)
        for i in range(n + val_per_class):
            rel = f"train/{wnid}/{wnid}_{i}.JPEG"
            _jpeg(root / "CLS-LOC" / rel, colour, size=(40 + 7 * i, 30 + 5 * c))
            lines["train" if i < n else "val"].append(f"{rel} {c}")
        for i in range(test_per_class):
            rel = f"val/{wnid}/ILSVRC2012_val_{c}{i:04d}.JPEG"
            _jpeg(root / "CLS-LOC" / rel, colour, size=(33, 41))
            lines["test"].append(f"{rel} {c}")
    (root / "ImageNet_LT").mkdir(parents=True, exist_ok=True)
    for split, rows in lines.items():
        (root / "ImageNet_LT" / f"ImageNet_LT_{split}.txt").write_text("\n".join(rows) + "\n")
    return lines


def _make_mini_imagenet(root: Path, tag="0.1", val_name="val"):
    counts = {"train": (4, 2), val_name: (1, 1), "test": (2, 1)}
    folder = root / "mini_imagenet"
    folder.mkdir(parents=True, exist_ok=True)
    for split, per_class in counts.items():
        rows = []
        for c, n in enumerate(per_class):
            wnid = f"n0123456{c}"
            for i in range(n):
                name = f"{wnid}_{split}{i}.JPEG"
                _jpeg(root / "CLS-LOC" / "train" / wnid / name, (200 * c, 30, 90), size=(36, 50))
                rows.append(f"{name} {c}")
        (folder / f"{tag}_{split}.txt").write_text("\n".join(rows) + "\n")


def _helena_rows():
    """(old labels, features): classes interleaved in row order; feature 0 = the row number."""
    rng = np.random.default_rng(0)
    labels = np.concatenate([np.full(n, c) for c, n in HELENA_OLD_SIZES.items()])
    labels = labels[rng.permutation(len(labels))]
    feats = rng.normal(size=(len(labels), 27)) * 3 + 1
    feats[:, 0] = np.arange(len(labels))
    return labels, feats


def _make_helena(root: Path):
    labels, feats = _helena_rows()
    root.mkdir(parents=True, exist_ok=True)
    head = ["@relation helena", "@attribute class {0,1,2}"]
    head += [f"@attribute V{i} numeric" for i in range(1, 28)]
    body = [f"{c}," + ",".join(f"{v:.6f}" for v in row) for c, row in zip(labels, feats)]
    (root / "helena.arff").write_text("\n".join(head + ["@data"] + body) + "\n")
    new_of_old = {1: 0, 2: 1, 0: 2}
    valid, test = {}, {}
    for old, new in new_of_old.items():
        rows = np.flatnonzero(labels == old)
        valid[str(new)] = rows[-2 * HELD:-HELD].tolist()[::-1]  # any order: kept as listed
        test[str(new)] = rows[-HELD:].tolist()
    (root / "helena_valid_indices.json").write_text(json.dumps(valid))
    (root / "helena_test_indices.json").write_text(json.dumps(test))
    return labels, feats, valid, test


def _make_mnist(root: Path, per_class=14):
    import scipy.io

    n = 10 * per_class
    labels = np.tile(np.arange(10), per_class).astype(np.float64)  # interleaved classes
    data = np.zeros((784, n), dtype=np.uint8)
    data[0] = np.arange(n) % 256  # pixel (0, 0) and (0, 1) encode the column index
    data[1] = np.arange(n) // 256
    data[100:300] = (labels * 25).astype(np.uint8)[None, :]  # a learnable class signal
    root.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(root / "mnist-original.mat", {"data": data, "label": labels[None, :]})
    return data, labels


def _config(name, root, n_classes, model, epochs=1, imb_factor=0.01, exp_name="t", **data):
    return {
        "exp_name": exp_name, "project_name": "first", "seeds": 0,
        "data": {"name": name, "imb_type": "exp", "imb_factor": imb_factor, "n_classes": n_classes,
                 "batch_size": 4, "root": str(root), "num_workers": 0, **data},
        "model": model,
        "optim": {"total_epoch_num": epochs, "base_lr": 0.01, "fdr_every": 1},
    }


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _acc(run: Path) -> dict:
    acc = json.loads((run / "acc.json").read_text())
    assert set(acc) == {"All", "Many", "Medium", "Few"} and all(0 <= v <= 1 for v in acc.values())
    return acc


# ---------------------------------------------------------------------------
# ImageNet-LT
# ---------------------------------------------------------------------------

def test_imagenet_lt_lists_counts_groups_and_paths(tmp_path):
    lines = _make_imagenet(tmp_path)
    data = load_dataset("ImageNet", tmp_path, "exp", 0.01, 3)
    assert data.kind == "files" and data.in_channels == 3
    assert data.input_size == (224, 224)  # what the transforms produce (the automatic evaluation batch's input)
    assert data.class_counts == [5, 3, 2]
    assert data.groups() == ["Few", "Few", "Few"]  # Many n > 100, Few n < 20
    assert (data.many_threshold, data.few_threshold) == (100, 20)
    assert len(data.train_files) == 10 and len(data.val_files) == 3 and len(data.test_files) == 6
    assert data.train_files[0] == str(tmp_path / "CLS-LOC" / lines["train"][0].split()[0])
    assert data.test_files[-1] == str(tmp_path / "CLS-LOC" / "val/n00000002/ILSVRC2012_val_20001.JPEG")
    assert data.train_labels.tolist() == [0] * 5 + [1] * 3 + [2] * 2
    assert data.class_names == ["n00000000", "n00000001", "n00000002"]
    assert data.mean == (0.485, 0.456, 0.406) and data.std == (0.229, 0.224, 0.225)
    names = [type(t).__name__ for t in data.train_transform.transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter", "PILToTensor"]
    jitter = data.train_transform.transforms[2]
    assert jitter.brightness == (0.6, 1.4) and jitter.contrast == (0.6, 1.4) and jitter.saturation == (0.6, 1.4)
    assert jitter.hue is None
    resize, crop, _ = data.eval_transform.transforms
    assert resize.size == 256 and tuple(crop.size) == (224, 224)


def test_imagenet_lt_missing_and_bad_files(tmp_path):
    with pytest.raises(DataError, match=r"ImageNet_LT/ImageNet_LT_train\.txt is missing"):
        load_dataset("ImageNet", tmp_path, "exp", 0.01, 3)
    _make_imagenet(tmp_path)
    with pytest.raises(DataError, match="data.n_classes = 1000 does not match ImageNet-LT.*labels 0..2"):
        load_dataset("ImageNet", tmp_path, "exp", 0.01, 1000)
    (tmp_path / "ImageNet_LT" / "ImageNet_LT_val.txt").write_text("train/x.JPEG 0\nbroken-line\n")
    with pytest.raises(DataError, match=r"ImageNet_LT_val\.txt, line 2: expected '<image path> <label>'"):
        load_dataset("ImageNet", tmp_path, "exp", 0.01, 3)


def test_imagenet_lt_missing_image_folder_names_it(tmp_path):
    _make_imagenet(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "CLS-LOC")
    with pytest.raises(DataError, match=r"image folder .*CLS-LOC not found"):
        load_dataset("ImageNet", tmp_path, "exp", 0.01, 3)


def test_file_split_batches_are_224_normalised_and_ordered(tmp_path):
    from utils.data.batches import make_splits
    from utils.engine.train import batch_slices

    _make_imagenet(tmp_path)
    data = load_dataset("ImageNet", tmp_path, "exp", 0.01, 3)
    train, val, test, _ = make_splits(data, torch.device("cpu"), num_workers=1)
    assert len(train) == 10 and len(test) == 6
    # evaluation: dataset order, resize 256 + centre crop 224 of a one-colour image
    x, y, idx = next(iter(test.eval_batches(4)))
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32
    assert idx.tolist() == [0, 1, 2, 3] and y.tolist() == [0, 0, 1, 1]
    from PIL import Image
    with Image.open(data.test_files[0]) as im:
        pixel = np.asarray(im.convert("RGB"))[15, 15].astype(np.float32)
    expected = (pixel / 255 - np.array(data.mean)) / np.array(data.std)
    assert torch.allclose(x[0, :, 112, 112], torch.tensor(expected, dtype=torch.float32), atol=2e-2)
    # training: the shuffle of batch_slices, labels that follow the indices
    gen, ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    batches = list(train.epoch_batches(4, gen))
    order = torch.cat([b for b in batch_slices(10, 4, ref)])
    assert torch.equal(torch.cat([b[2] for b in batches]), order)
    for xb, yb, ib in batches:
        assert xb.shape[1:] == (3, 224, 224)
        assert torch.equal(yb, data.train_labels[ib])
    # the same seed gives the same random crops (each image seeded from the shuffle generator)
    again = list(train.epoch_batches(4, torch.Generator().manual_seed(3)))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))


def test_unreadable_image_is_a_data_error_naming_it(tmp_path):
    from utils.data.batches import make_splits

    _make_imagenet(tmp_path)
    data = load_dataset("ImageNet", tmp_path, "exp", 0.01, 3)
    Path(data.test_files[3]).write_bytes(b"not a jpeg")
    _, _, test, _ = make_splits(data, torch.device("cpu"), num_workers=0)
    with pytest.raises(DataError, match=r"cannot read image .*ILSVRC2012_val_10001\.JPEG"):
        list(test.eval_batches(2))


def test_imagenet_lt_one_epoch_end_to_end(in_tmp, write_json):
    root = in_tmp / "data"
    _make_imagenet(root)
    cfg = _config("ImageNet", root, 3, {"name": "BNMLP", "mlp_hlayer_n": 1, "mlp_features_d": 8},
                  num_workers=1)
    assert main("first", ["--json_path", write_json("c.json", cfg)]) == 0
    run = in_tmp / "exp/ImageNet/BNMLP/first/t/0"
    _acc(run)
    track = torch.load(run / "trackRecords.ckpt", weights_only=True)
    assert track["correct"].shape == (1, 10)
    state = torch.load(run / "best.paramOnly", weights_only=True)
    assert state["linearList.0.weight"].shape == (8, 3 * 224 * 224)  # the 224 transforms fed the model


# ---------------------------------------------------------------------------
# mini-ImageNet-LT
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("val_name", ["val", "valid"])
def test_mini_imagenet_split_files(tmp_path, val_name):
    _make_mini_imagenet(tmp_path, "0.1", val_name)
    data = load_dataset("MiniImagenet", tmp_path, "exp", 0.1, 2)
    assert data.class_counts == [4, 2] and len(data.val_files) == 2 and len(data.test_files) == 3
    assert data.train_files[0] == str(tmp_path / "CLS-LOC/train/n01234560/n01234560_train0.JPEG")
    assert (data.many_threshold, data.few_threshold) == (100, 20)
    names = [type(t).__name__ for t in data.train_transform.transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "PILToTensor"]  # no colour jitter
    with pytest.raises(DataError, match=r"0\.01_train\.txt is missing.*data.imb_factor = 0.01"):
        load_dataset("MiniImagenet", tmp_path, "exp", 0.01, 2)


def test_mini_imagenet_split_files_generated_from_the_class_list(tmp_path, capsys):
    from utils.data.imagenet_lt import make_mini_imagenet_splits, mini_imagenet_counts

    folder = tmp_path / "mini_imagenet"
    folder.mkdir()
    (folder / "all_classes.txt").write_text("n02000000\nn01000000\n")  # labelled in sorted order
    for wnid, n in (("n01000000", 700), ("n02000000", 703)):
        (tmp_path / "CLS-LOC/train" / wnid).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "CLS-LOC/train" / wnid / f"{wnid}_{i}.JPEG").touch()
    data = load_dataset("MiniImagenet", tmp_path, "exp", 0.1, 2)
    assert "wrote the split files 0.1_train.txt, 0.1_val.txt, 0.1_test.txt" in capsys.readouterr().out
    assert data.class_counts == [500, 50] == mini_imagenet_counts(2, 0.1)
    assert json.loads((folder / "0.1_num_list.json").read_text()) == [500, 50]
    assert data.val_labels.tolist() == [0] * 100 + [1] * 100 and len(data.test_labels) == 200
    assert data.train_files[0].startswith(str(tmp_path / "CLS-LOC/train/n01000000/n01000000_"))
    for c in range(2):
        parts = [{f for f, y in zip(files, labels.tolist()) if y == c}
                 for files, labels in ((data.train_files, data.train_labels), (data.val_files, data.val_labels),
                                       (data.test_files, data.test_labels))]
        assert len(parts[0] | parts[1] | parts[2]) == sum(map(len, parts))  # disjoint
    text = (folder / "0.1_train.txt").read_text()
    make_mini_imagenet_splits(tmp_path, 0.1)
    assert (folder / "0.1_train.txt").read_text() == text  # reproducible
    assert mini_imagenet_counts(100, 0.01)[:3] == [500, 477, 455] and mini_imagenet_counts(100, 0.01)[-1] == 5
    (folder / "0.01_train.txt").unlink(missing_ok=True)
    import shutil
    shutil.rmtree(tmp_path / "CLS-LOC/train/n02000000")
    with pytest.raises(DataError, match=r"n02000000 has 0 images; mini-ImageNet-LT needs 700 per class"):
        load_dataset("MiniImagenet", tmp_path, "exp", 0.01, 2)


def test_mini_imagenet_one_epoch_end_to_end(in_tmp, write_json):
    root = in_tmp / "data"
    _make_mini_imagenet(root, "0.1")
    cfg = _config("MiniImagenet", root, 2, {"name": "BNMLP", "mlp_hlayer_n": 1, "mlp_features_d": 8},
                  imb_factor=0.1)
    assert main("first", ["--json_path", write_json("c.json", cfg)]) == 0
    _acc(in_tmp / "exp/MiniImagenet/BNMLP/first/t/0")


# ---------------------------------------------------------------------------
# Helena
# ---------------------------------------------------------------------------

def test_helena_renumbering_splits_counts_and_standardisation(tmp_path):
    from utils.data.extra_datasets import HELENA_MEAN, HELENA_STD

    labels, feats, valid, test = _make_helena(tmp_path)
    data = load_dataset("Helena", tmp_path, "exp", 0.01, 3)
    assert data.kind == "features" and data.in_channels == 27
    # class sizes over the whole file (the original's), labels renumbered by size
    assert data.class_counts == [503, 250, 60]
    assert data.groups() == ["Many", "Medium", "Few"]  # Many n > 500, Few n < 200
    n_train = 813 - 2 * 3 * HELD
    assert len(data.train_labels) == n_train and len(data.val_labels) == 9 and len(data.test_labels) == 9
    # rows back from feature 0 (= row number): validation/test exactly as listed, in label order
    row_of = lambda x: torch.round(x[:, 0] * HELENA_STD[0] + HELENA_MEAN[0]).long().tolist()  # noqa: E731
    assert row_of(data.val_images) == valid["0"] + valid["1"] + valid["2"]
    assert row_of(data.test_images) == test["0"] + test["1"] + test["2"]
    assert data.val_labels.tolist() == [0] * HELD + [1] * HELD + [2] * HELD
    held = set(row_of(data.val_images)) | set(row_of(data.test_images))
    old_of_new = {0: 1, 1: 2, 2: 0}
    expected_train = [r for c in range(3) for r in np.flatnonzero(labels == old_of_new[c]) if r not in held]
    assert row_of(data.train_images) == expected_train
    assert data.train_labels.tolist() == [0] * (503 - 6) + [1] * (250 - 6) + [2] * (60 - 6)
    # the original's fixed standardisation, in float32
    r = expected_train[5]
    want = (torch.tensor(feats[r], dtype=torch.float32) - torch.tensor(HELENA_MEAN)) / torch.tensor(HELENA_STD)
    assert torch.allclose(data.train_images[5], want, atol=1e-5)
    # training-row counts on request: the largest class drops to Medium (497 <= 500)
    trained = load_dataset("Helena", tmp_path, "exp", 0.01, 3, helena_counts="train")
    assert trained.class_counts == [497, 244, 54] and trained.groups() == ["Medium", "Medium", "Few"]


def test_helena_missing_and_inconsistent_files(tmp_path):
    with pytest.raises(DataError, match=r"helena\.arff is missing"):
        load_dataset("Helena", tmp_path, "exp", 0.01, 100)
    _make_helena(tmp_path)
    with pytest.raises(DataError, match="data.n_classes = 100 does not match Helena.*3 classes"):
        load_dataset("Helena", tmp_path, "exp", 0.01, 100)
    (tmp_path / "helena_test_indices.json").unlink()
    with pytest.raises(DataError, match=r"helena_test_indices\.json is missing"):
        load_dataset("Helena", tmp_path, "exp", 0.01, 3)
    (tmp_path / "helena_test_indices.json").write_text(
        (tmp_path / "helena_valid_indices.json").read_text())
    with pytest.raises(DataError, match="share rows"):
        load_dataset("Helena", tmp_path, "exp", 0.01, 3)


def test_helena_two_stages_end_to_end_with_tablemlp(in_tmp, write_json):
    root = in_tmp / "data"
    _make_helena(root)
    cfg = _config("Helena", root, 3, {"name": "TableMLP", "use_etf": True}, exp_name="etf")
    cfg["data"]["batch_size"] = 64
    assert main("first", ["--json_path", write_json("c.json", cfg)]) == 0
    run = in_tmp / "exp/Helena/TableMLP/first/etf/0"
    _acc(run)
    state = torch.load(run / "best.paramOnly", weights_only=True)
    # the original's TableMLP layout: 9 x (Linear without bias + BN), 512 wide, classifier "fc"
    assert state["encoder.0.linear.weight"].shape == (512, 27)
    assert state["encoder.8.bn.running_mean"].shape == (512,)
    assert "encoder.9.linear.weight" not in state and "encoder.0.linear.bias" not in state
    assert state["fc.weight_vec"].shape == (3, 512) and state["fc.weight_norm"].shape == (3, 1)
    # stage 2 converts the ETF head under "fc." to Linear and applies logit adjustment
    second = _config("Helena", root, 3, {"name": "TableMLP", "is_pretrained": True,
                                         "pretrained_path": "exp/Helena/TableMLP/first/etf",
                                         "logit_adjustment_tau": 1.0}, epochs=0, exp_name="la")
    second["project_name"] = "second"
    assert main("second", ["--json_path", write_json("s.json", second)]) == 0
    state2 = torch.load(in_tmp / "exp/Helena/TableMLP/second/la/0/best.paramOnly", weights_only=True)
    assert "fc.weight" in state2 and "fc.weight_vec" not in state2
    assert torch.allclose(state2["fc.weight"], state["fc.weight_vec"] * state["fc.weight_norm"])


def test_lenet_on_8x8_digits_is_a_clear_error(in_tmp, capsys):
    assert main("first", ["--data_name", "Digits", "--data_n_classes", "10", "--model_name", "BNLeNet5",
                          "--optim_total_epoch_num", "1"]) == 2
    assert "model.name = 'BNLeNet5' needs images of at least 16 x 16 pixels; data.name = 'Digits' has inputs " \
           "of shape 1 x 8 x 8" in capsys.readouterr().err


def test_helena_needs_tablemlp_and_names_missing_file(in_tmp, write_json, capsys):
    cfg = _config("Helena", in_tmp / "nothing", 100, {"name": "ResNet18"})
    assert main("first", ["--json_path", write_json("c.json", cfg)]) == 2
    assert "needs model.name TableMLP" in capsys.readouterr().err
    cfg["model"]["name"] = "TableMLP"
    assert main("first", ["--json_path", write_json("c.json", cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(in_tmp / "nothing" / "helena.arff") + " is missing" in err
    assert not (in_tmp / "exp").exists()


# ---------------------------------------------------------------------------
# MNIST
# ---------------------------------------------------------------------------

def test_mnist_layout_and_stratified_split(tmp_path):
    from sklearn.model_selection import train_test_split

    data_arr, labels = _make_mnist(tmp_path)
    data = load_dataset("MNIST", tmp_path, "exp", 1.0, 10)
    assert data.train_images.shape == (100, 1, 28, 28) and data.train_images.dtype == torch.uint8
    assert len(data.val_labels) == 20 and len(data.test_labels) == 20  # round(140 / 7) each
    assert data.class_counts == [10] * 10 and data.groups() == ["Few"] * 10  # Many > 1000, Few < 200
    assert (data.many_threshold, data.few_threshold) == (1000, 200)
    assert data.mean == (0.1301,) and data.std == (0.3069,) and data.crop_padding == 4 and data.hflip
    index = lambda x: (x[:, 0, 0, 0].long() + 256 * x[:, 0, 0, 1].long()).tolist()  # noqa: E731
    # the original's two calls: test first, then validation from the rest
    rest, test_idx, rest_y, _ = train_test_split(np.arange(140), labels, test_size=20, random_state=0,
                                                 stratify=labels)
    train_idx, val_idx, _, _ = train_test_split(rest, rest_y, test_size=20, random_state=0, stratify=rest_y)
    assert index(data.test_images) == test_idx.tolist()
    assert index(data.val_images) == val_idx.tolist()
    assert index(data.train_images) == train_idx.tolist()
    assert data.train_labels.tolist() == labels[train_idx].astype(int).tolist()
    # row-major 28 x 28 from the 784 column: pixel (3, 16) is row 3 * 28 + 16 = 100
    assert data.train_images[0, 0, 3, 16] == data_arr[100, train_idx[0]]


def test_mnist_refuses_imbalance_and_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"mnist-original\.mat is missing"):
        load_dataset("MNIST", tmp_path, "exp", 1.0, 10)
    _make_mnist(tmp_path)
    with pytest.raises(DataError, match="MNIST is balanced.*set data.imb_factor 1"):
        load_dataset("MNIST", tmp_path, "exp", 0.01, 10)


@pytest.mark.parametrize("model", [{"name": "BNLeNet5"},
                                   {"name": "MLResBlock", "mlp_hlayer_n": 1, "mlp_features_d": 16}])
def test_mnist_one_epoch_end_to_end(in_tmp, write_json, model):
    root = in_tmp / "data"
    _make_mnist(root)
    cfg = _config("MNIST", root, 10, model, imb_factor=1.0)
    cfg["data"]["batch_size"] = 16
    assert main("first", ["--json_path", write_json("c.json", cfg)]) == 0
    run = in_tmp / f"exp/MNIST/{model['name']}/first/t/0"
    _acc(run)
    per_class = (run / "per_class.csv").read_text().splitlines()
    assert len(per_class) == 11 and per_class[1].startswith("0,0,10,Few,")


# ---------------------------------------------------------------------------
# Batch sources
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("n,bs", [(10, 4), (9, 4), (8, 4), (1, 4), (4, 4), (5, 4)])
def test_batch_count_matches_batch_slices(n, bs):
    from utils.data.batches import n_batches_of
    from utils.engine.train import batch_slices

    assert n_batches_of(n, bs) == len(batch_slices(n, bs, torch.Generator().manual_seed(0)))


def _random_file_split(tmp_path: Path, num_workers: int, n: int = 11):
    """A FileSplit of ``n`` small distinct images with random crops and flips."""
    from torchvision import transforms as T
    from utils.data.batches import FileSplit

    paths = []
    for i in range(n):
        path = tmp_path / f"img{i}.png"
        if not path.exists():
            from PIL import Image
            pixels = np.random.default_rng(i).integers(0, 256, (12, 10 + i, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path)
        paths.append(str(path))
    train_tf = T.Compose([T.RandomResizedCrop(6, antialias=True), T.RandomHorizontalFlip(), T.PILToTensor()])
    eval_tf = T.Compose([T.Resize(8, antialias=True), T.CenterCrop(6), T.PILToTensor()])
    return FileSplit(paths, torch.arange(n) % 3, train_tf, [0.5] * 3, [0.25] * 3, torch.device("cpu"),
                     num_workers, eval_transform=eval_tf)


def _epochs(split, generator: torch.Generator, epochs: int) -> list[list[torch.Tensor]]:
    return [[x for x, _, _ in split.epoch_batches(4, generator)] for _ in range(epochs)]


def test_file_split_images_do_not_depend_on_the_worker_count_and_resume_exactly(tmp_path, monkeypatch):
    import utils.data.batches as batches

    built = []

    class CountingLoader(batches.DataLoader):
        def __init__(self, *args, **kwargs):
            built.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(batches, "DataLoader", CountingLoader)
    inline = _epochs(_random_file_split(tmp_path, 0), torch.Generator().manual_seed(7), 3)
    workers = _random_file_split(tmp_path, 2)
    two = _epochs(workers, torch.Generator().manual_seed(7), 3)
    assert [len(e) for e in inline] == [3, 3, 3]  # 11 = 4 + 4 + 3
    for a, b in zip(inline, two):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(inline[0][0], inline[1][0])  # the crops are random: epochs differ
    # one training loader for every epoch, its workers kept between epochs
    assert len(built) == 2 and built[1]["persistent_workers"] and built[1]["prefetch_factor"] > 0
    # resume: the shuffle generator's state after epoch 1 (what the checkpoint holds) gives epochs 2 and 3
    gen = torch.Generator().manual_seed(7)
    _epochs(_random_file_split(tmp_path, 0), gen, 1)
    resumed = _epochs(_random_file_split(tmp_path, 2), torch.Generator().set_state(gen.get_state()), 2)
    for a, b in zip(inline[1:], resumed):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_file_split_evaluation_uses_the_eval_transform_and_one_loader(tmp_path):
    split = _random_file_split(tmp_path, 0)
    first = torch.cat([x for x, _, _ in split.eval_batches(4)])
    again = torch.cat([x for x, _, _ in split.eval_batches(4)])
    assert first.shape == (11, 3, 6, 6) and torch.equal(first, again)  # centre crops, not random ones
    assert len(split._eval_loaders) == 1
    assert split.subset(3, 7) is split.subset(3, 7)  # a rank's shard keeps its loader between evaluations
    assert torch.equal(torch.cat([x for x, _, _ in split.subset(3, 7).eval_batches(4)]), first[3:7])


def test_feature_split_batches_and_evaluate_dispatch():
    from models import build_model
    from utils.data.batches import FeatureSplit
    from utils.engine.evaluation import evaluate

    x = torch.randn(11, 27)
    y = torch.arange(11) % 3
    split = FeatureSplit(x, y)
    batches = list(split.epoch_batches(4, torch.Generator().manual_seed(1)))
    assert [len(b[1]) for b in batches] == [4, 4, 3]
    idx = torch.cat([b[2] for b in batches])
    assert sorted(idx.tolist()) == list(range(11))
    assert all(torch.equal(b[0], x[b[2]]) and torch.equal(b[1], y[b[2]]) for b in batches)
    model = build_model("TableMLP", 3, input_shape=(27,))
    result = evaluate(model, split, None, 3, batch_size=5, want_features=True, want_preds=True)
    model.eval()
    with torch.no_grad():
        assert torch.equal(result.preds, model(x).argmax(1))
    assert result.features.shape == (11, 512) and int(result.counts.sum()) == 11


# ---------------------------------------------------------------------------
# Small networks
# ---------------------------------------------------------------------------

def test_small_networks_keys_follow_the_original():
    from models import build_model

    lenet = build_model("BNLeNet5", 10, input_shape=(1, 28, 28))
    assert {k for k in lenet.state_dict() if k.endswith("weight")} == {
        "conv1.weight", "bn11.weight", "conv2.weight", "bn12.weight", "fc1.weight", "bn21.weight",
        "fc2.weight", "bn22.weight", "fc3.weight"}
    assert lenet.state_dict()["fc1.weight"].shape == (120, 256) and "conv1.bias" not in lenet.state_dict()
    assert lenet.classifier is lenet.fc3 and lenet.classifier_prefix == "fc3."
    mlp = build_model("BNMLP", 10, input_shape=(1, 28, 28), mlp_hlayer_n=2, mlp_features_d=32)
    sd = mlp.state_dict()
    assert sd["linearList.0.weight"].shape == (32, 784) and sd["linearList.1.weight"].shape == (32, 32)
    assert "bnList.1.running_var" in sd and "linearList.2.weight" not in sd and "linearList.0.bias" not in sd
    assert sd["fc.weight"].shape == (10, 32) and sd["fc.bias"].shape == (10,)
    res = build_model("MLResBlock", 10, input_shape=(1, 28, 28), mlp_hlayer_n=2, mlp_features_d=16)
    assert len([k for k in res.state_dict() if k.startswith("linearList.")]) == 4
    groups = {k: [n for n, _ in v] for k, v in res.named_parameter_groups().items()}
    assert groups["identity_bn"] == ["bn0.weight", "bn0.bias"]
    assert groups["classifier"] == ["fc.weight", "fc.bias"]
    assert "linear0.weight" in groups["conv"] and "fc.weight" not in groups["conv"]
    assert len(groups["bn"]) == 2 * (1 + 4)


def test_mlresblock_forward_is_the_residual_formula():
    from models import build_model

    torch.manual_seed(0)
    m = build_model("MLResBlock", 4, input_shape=(1, 5, 5), mlp_hlayer_n=1, mlp_features_d=6).eval()
    with torch.no_grad():
        for bn in (m.bn0, *m.bnList):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)
            bn.weight.normal_()
            bn.bias.normal_()
    x = torch.randn(3, 1, 5, 5)

    def bn(mod, v):
        return (v - mod.running_mean) / torch.sqrt(mod.running_var + mod.eps) * mod.weight + mod.bias

    with torch.no_grad():
        h0 = torch.relu(bn(m.bn0, x.flatten(1) @ m.linear0.weight.T))
        inner = torch.relu(bn(m.bnList[0], h0 @ m.linearList[0].weight.T))
        h = torch.relu(h0 + bn(m.bnList[1], inner @ m.linearList[1].weight.T))
        assert torch.allclose(m.features(x), h, atol=1e-5)
        assert torch.allclose(m(x), h @ m.fc.weight.T + m.fc.bias, atol=1e-5)


def test_small_network_head_options_and_etf():
    from models import ETFClassifier, build_model

    m = build_model("BNMLP", 5, input_shape=(1, 6, 6), mlp_hlayer_n=1, mlp_features_d=8, use_etf=True,
                    normalize_feature=True, use_feature_bias=True, la_tau=1.0, class_counts=[50, 20, 10, 5, 1],
                    la_additive=False)
    assert isinstance(m.classifier, ETFClassifier) and m.classifier_weight().shape == (5, 8)
    groups = m.named_parameter_groups()
    assert [n for n, _ in groups["classifier"]] == ["fc.bias"]  # directions fixed, norms untrained
    assert [n for n, _ in groups["feature_bias"]] == ["feature_bias"]
    m.eval()
    with torch.no_grad():
        m.feature_bias.fill_(0.5)
        x = torch.randn(4, 1, 6, 6)
        h = m.features(x)
        raw = m.pooled_features(x)
        assert torch.allclose(h, raw / raw.norm(dim=1, keepdim=True) + 0.5, atol=1e-6)
        prior = torch.tensor([50, 20, 10, 5, 1.0]) / 86
        assert torch.allclose(m.classify(h), m.classifier(h) / prior, rtol=1e-5)
    with pytest.raises(ValueError, match="at least 16 x 16"):
        build_model("BNLeNet5", 10, input_shape=(1, 8, 8))
