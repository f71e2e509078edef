"""Evaluation options: flip test-time augmentation, param_search (validation
set instead of test), save_features (penultimate features as .npy)."""
import csv
import json

import numpy as np
import pytest
import torch

from models import build_model
from tests.conftest import digits_config
from utils.data.augment import BatchAugment
from utils.cli import main
from utils.data.datasets import load_dataset
from utils.engine.evaluation import extract_features, logits_of
from utils.engine.metrics import confusion_counts, group_accuracy, per_class_accuracy
from utils.engine.train import SplitTensors


def test_flip_tta_averages_logits_of_image_and_flip():
    torch.manual_seed(0)
    data = load_dataset("Digits", "datasets", "exp", 0.05, 10)
    model = build_model("ResNet18", 10, in_channels=1).eval()
    augment = BatchAugment(data.mean, data.std, 0, False)
    split = SplitTensors(data.val_images[:50], data.val_labels[:50])
    feats = extract_features(model, split, augment, 16, hflip=True)
    x = augment.eval(split.images)
    with torch.no_grad():
        expected = (model(x) + model(torch.flip(x, dims=[3]))) / 2
        plain = model(x)
    assert torch.allclose(logits_of(model.classify, feats), expected, atol=1e-5)
    assert torch.allclose(feats.plain, model.features(x).detach(), atol=1e-5)
    no_tta = extract_features(model, split, augment, 16)
    assert no_tta.flipped is None and torch.allclose(logits_of(model.classify, no_tta), plain, atol=1e-5)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalopts")
    path = root / "s1.json"
    path.write_text(json.dumps(digits_config("s1", epochs=1, save_features=True)))
    assert main("first", ["--json_path", str(path), "--exp_root", str(root / "exp")]) == 0
    return root, root / "exp/Digits/ResNet18/first/s1/0"


def _model_and_data(run):
    data = load_dataset("Digits", "datasets", "exp", 0.05, 10)
    model = build_model("ResNet18", 10, in_channels=1)
    model.load_state_dict(torch.load(run / "best.paramOnly", weights_only=True))
    return model.eval(), data, BatchAugment(data.mean, data.std, 0, False)


def _expected_acc(model, data, augment, images, labels, flip):
    with torch.no_grad():
        x = augment.eval(images)
        logits = model(x)
        if flip:
            logits = (logits + model(x.flip(3))) / 2
    counts = confusion_counts(logits.argmax(1), labels, 10)
    return group_accuracy(per_class_accuracy(counts).tolist(), data.groups())


def test_save_features_writes_penultimate_features(stage1):
    _, run = stage1
    model, data, augment = _model_and_data(run)
    train = np.load(run / "features_train.npy")
    test = np.load(run / "features_test.npy")
    assert train.shape == (341, 512) and test.shape == (597, 512)
    assert np.array_equal(np.load(run / "labels_train.npy"), data.train_labels.numpy())
    assert np.array_equal(np.load(run / "labels_test.npy"), data.test_labels.numpy())
    with torch.no_grad():
        expected = model.features(augment.eval(data.test_images[:64])).numpy()
    assert np.allclose(test[:64], expected, atol=1e-4)


def _second(root, stage1_run, name, model=None, **top):
    cfg = digits_config(name, "second", epochs=0, optim={"base_lr": 0.0},
                        model={"is_pretrained": True, "pretrained_path": str(stage1_run.parent),
                               "logit_adjustment_tau": 0.5, **(model or {})}, **top)
    path = root / f"{name}.json"
    path.write_text(json.dumps(cfg))
    assert main("second", ["--json_path", str(path), "--exp_root", str(root / "exp")]) == 0


def test_flip_tta_and_param_search_runs(stage1):
    root, run1 = stage1
    model, data, augment = _model_and_data(run1)
    from models import LogitAdjuster
    model.logit_adjuster = LogitAdjuster(0.5, data.class_counts).eval()

    _second(root, run1, "tta", data={**digits_config("x")["data"], "eval_hflip": True})
    run = root / "exp/Digits/ResNet18/second/tta/0"
    acc = json.loads((run / "acc.json").read_text())
    expected = _expected_acc(model, data, augment, data.test_images, data.test_labels, flip=True)
    assert acc == pytest.approx(expected)
    assert "test accuracy (flip TTA)" in (run / "train.log").read_text()

    # a sweep with a single tau (the same 0.5) keeps the comparison exact, and must leave out the test set
    _second(root, run1, "ps", model={"logit_adjustment_tau_sweep": "0.5"}, param_search=True, param_search_id=3)
    run = root / "exp/Digits/ResNet18/second/ps/3"
    acc = json.loads((run / "acc.json").read_text())
    expected = _expected_acc(model, data, augment, data.val_images, data.val_labels, flip=False)
    assert acc == pytest.approx(expected)
    with open(run / "tau_sweep.csv") as fh:
        sweep = list(csv.DictReader(fh))
    assert list(sweep[0]) == ["tau", "val_All", "val_Many", "val_Medium", "val_Few", "val_ECE"]
    assert float(sweep[0]["val_All"]) == pytest.approx(expected["All"], abs=1e-6)
    assert set(json.loads((run / "tau_sweep.json").read_text())) == {"best_tau", "additive", "taus", "val"}
    assert set(json.loads((run / "fdr.json").read_text())) == {"train", "val"}
    with open(run / "per_class.csv") as fh:
        assert "val_acc" in next(csv.DictReader(fh))
    assert np.load(run / "confMat.npy").shape == (10, 10)
    assert "val accuracy" in (run / "train.log").read_text()
