"""Every figure of SPEC 8 from tiny runs, the per-class records behind them,
and the TensorBoard extras (weight-norm histograms, figures, hparams)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import digits_config
from utils.cli import main
from utils.viz.figures import group_confusion
from utils.engine.records import class_mean, forgetting_scores, head_to_tail

STAGE1_PNGS = {"confusion_matrix", "confusion_groups", "per_class_accuracy", "weight_norm", "weight_cosine",
               "feature_norm", "feature_weight", "train_loss_per_class", "accuracy_curves",
               "weight_norm_evolution", "forgetting", "montage", "reliability"}


def _check_png(path):
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as im:
        im.load()
        w, h = im.size
        pixels = np.asarray(im.convert("L"), dtype=float)
    assert 300 <= w <= 3000 and 300 <= h <= 5000, (path.name, im.size)
    assert pixels.std() > 5, f"{path.name} is blank"


def test_records_helpers_by_hand():
    assert head_to_tail([5, 100, 5, 40]) == [1, 3, 0, 2]
    correct = torch.tensor([[1, 0, 0, 1],
                            [0, 0, 1, 1],
                            [1, 0, 0, 0],
                            [0, 0, 1, 1]], dtype=torch.bool)
    # image 0: 1->0 twice; image 1: never correct -> 4 epochs; image 2: 1->0 once; image 3: 1->0 once
    assert forgetting_scores(correct).tolist() == [2, 4, 1, 1]
    values = torch.tensor([1.0, 3.0, float("nan"), 5.0])
    labels = torch.tensor([0, 0, 1, 2])
    out = class_mean(values, labels, 4)

    assert out[0] == 2.0 and torch.isnan(out[1]) and out[2] == 5.0 and torch.isnan(out[3])
    conf = np.array([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0], [0.0, 0.4, 0.6]])
    g = group_confusion(conf, ["Many", "Many", "Few"])
    # Many rows: class 0 -> Many 0.9, Few 0.1; class 1 -> Many 1.0, Few 0 ; mean 0.95 / 0.05
    assert g[0].tolist() == pytest.approx([0.95, 0.0, 0.05])
    assert g[1].tolist() == [0.0, 0.0, 0.0]
    assert g[2].tolist() == pytest.approx([0.4, 0.0, 0.6])


@pytest.mark.figures
def test_every_plot_of_a_two_stage_run(tmp_path, write_json):
    exp = tmp_path / "exp"
    first = write_json("p1.json", digits_config("p1", epochs=2, model={"name": "ResNet32"}))  # a small conv net
    assert main("first", ["--json_path", first, "--exp_root", str(exp)]) == 0
    run = exp / "Digits/ResNet32/first/p1/0"
    imgs = {p.stem: p for p in (run / "imgs").glob("*.png")}
    assert set(imgs) == STAGE1_PNGS
    for path in imgs.values():
        _check_png(path)

    track = torch.load(run / "trackRecords.ckpt", weights_only=True)
    assert track["class_loss"].shape == (2, 10) and torch.isfinite(track["class_loss"]).all()
    assert track["labels"].tolist() == sorted(track["labels"].tolist()) and track["labels"].numel() == 341
    assert track["weight_norm"].shape == (2, 10) and track["acc_val"].shape == (2,)
    import csv
    with open(run / "per_class.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["class", "name", "n_train", "group", "test_acc", "weight_norm", "train_feature_norm",
                             "test_feature_norm", "train_feature_weight_cos", "test_feature_weight_cos"]
    weight = np.load(run / "classifier_weight.npy")
    assert [float(r["weight_norm"]) for r in rows] == pytest.approx(np.linalg.norm(weight, axis=1).tolist(), rel=1e-5)
    assert all(-1 <= float(r["test_feature_weight_cos"]) <= 1 for r in rows)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(run), size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    ea.Reload()
    tags = ea.Tags()
    assert "classifier/weight_norm_per_class" in tags["histograms"]
    assert len(ea.Histograms("classifier/weight_norm_per_class")) == 2
    assert {"figures/confusion_matrix", "figures/per_class_accuracy", "figures/weight_norm",
            "figures/accuracy_curves"} <= set(tags["images"])
    assert [e.step for e in ea.Scalars("FDR/val")] == [1, 2]  # fdr_every 1 in the test config

    second = write_json("p2.json", digits_config(
        "p2", "second", epochs=0, model={"name": "ResNet32", "is_pretrained": True,
                                         "pretrained_path": str(run.parent), "logit_adjustment_tau": 1.0},
        optim={"base_lr": 0.0}))
    assert main("second", ["--json_path", second, "--exp_root", str(exp)]) == 0
    run2 = exp / "Digits/ResNet32/second/p2/0"
    imgs2 = {p.stem for p in (run2 / "imgs").glob("*.png")}
    # no training epochs: no per-epoch figures, but the comparison with stage 1
    assert imgs2 == (STAGE1_PNGS - {"train_loss_per_class", "accuracy_curves", "weight_norm_evolution",
                                    "forgetting"}) | {"per_class_accuracy_vs_stage1", "weight_norm_vs_stage1"}
    _check_png(run2 / "imgs/per_class_accuracy_vs_stage1.png")

    # command line: compare runs class by class; redraw a run
    from utils.viz.plots import main as plots_main
    out = tmp_path / "cmp.png"
    assert plots_main(["compare", str(run), str(run2), "--labels", "stage 1", "LA", "--out", str(out)]) == 0
    _check_png(out)
    assert plots_main(["compare", str(run), "--column", "nope", "--out", str(out)]) == 2
    (run / "imgs/montage.png").unlink()
    assert plots_main(["redraw", str(run)]) == 0
    _check_png(run / "imgs/montage.png")


def test_plot_run_from_files_with_many_classes_and_rgb_images(tmp_path):
    """plot_run reads only files (plus images): 30 classes, RGB images, classes not in size order."""
    import csv
    from utils.data.lt_data import class_groups
    from utils.viz.plots import plot_run
    k, epochs, per_class = 30, 3, 4
    counts = [5 + (c * 7) % 60 for c in range(k)]
    groups = class_groups(counts, 40, 10)
    rng = np.random.default_rng(0)
    with open(tmp_path / "per_class.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["class", "name", "n_train", "group", "test_acc", "weight_norm", "train_feature_norm",
                    "test_feature_norm", "train_feature_weight_cos", "test_feature_weight_cos"])
        for c in range(k):
            w.writerow([c, f"c{c}", counts[c], groups[c]] + list(rng.random(6)))
    conf = rng.random((k, k))
    np.save(tmp_path / "confMat.npy", conf / conf.sum(1, keepdims=True))
    np.save(tmp_path / "classifier_weight.npy", rng.standard_normal((k, 16)).astype(np.float32))
    labels = torch.arange(k).repeat_interleave(per_class)
    torch.save({"acc_train": torch.rand(epochs), "acc_val": torch.rand(epochs), "weight_norm": torch.rand(epochs, k),
                "correct": torch.rand(epochs, len(labels)) > 0.5, "class_loss": torch.rand(epochs, k),
                "labels": labels, "best_epoch": 2}, tmp_path / "trackRecords.ckpt")
    from utils.engine.calibration import calibration
    (tmp_path / "calibration.json").write_text(json.dumps(calibration(torch.randn(len(labels), k) * 3, labels)))
    images = torch.randint(0, 256, (len(labels), 3, 16, 16), dtype=torch.uint8)
    paths = plot_run(tmp_path, images, labels)
    assert {p.stem for p in paths} == STAGE1_PNGS
    for p in paths:
        _check_png(p)
