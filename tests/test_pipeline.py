"""End to end: both stages on tiny Digits-LT runs, every output file, stage-2 errors."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY_EXP, digits_config, tiny_config
from utils.cli import main

EXP = Path("exp/Digits/ResNet18")
WB_EXP = Path("exp/Digits/ResNet32")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_paper_method_two_stages_write_every_file(in_tmp, write_json, capsys):
    first = write_json("first.json", digits_config(
        "etf", model={"use_etf": True}, optim={"weight_decay": 5e-3, "features_regularization": 1e-2}))
    assert main("first", ["--json_path", first, "--seeds", "0"]) == 0
    out = capsys.readouterr().out
    assert "#examples in train-set: 341" in out and "#examples in valid-set: 200" in out
    run = in_tmp / EXP / "first/etf/0"
    for name in ("args.json", "best.paramOnly", "acc.json", "fdr.json", "sparsity.json", "confMat.npy",
                 "train.log", "note_bestModel.log", "metrics.csv", "per_class.csv", "trackRecords.ckpt"):
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*")), "TensorBoard events in the run directory"
    acc = json.loads((run / "acc.json").read_text())
    assert set(acc) == {"All", "Many", "Medium", "Few"} and all(0 <= v <= 1 for v in acc.values())
    conf = np.load(run / "confMat.npy")
    assert conf.shape == (10, 10) and np.allclose(conf.sum(axis=1), 1.0)
    assert acc["All"] == pytest.approx(float(np.mean(np.diag(conf))))
    topk = json.loads((run / "topk.json").read_text())
    assert topk["top1"] == acc and topk["top5"]["All"] >= acc["All"]
    calib = json.loads((run / "calibration.json").read_text())
    assert sum(calib["bins"]["count"]) == 597 and 0 <= calib["ECE"] <= 1 and calib["NLL"] > 0
    assert 0 <= calib["Brier"] <= 2
    rows = _read_csv(run / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"lr", "train_loss", "train_ce", "train_weight_decay", "train_feature_reg", "val_acc", "seconds"} <= set(rows[0])
    # the loss is the sum of its logged terms
    r = rows[0]
    assert float(r["train_loss"]) == pytest.approx(
        float(r["train_ce"]) + float(r["train_weight_decay"]) + float(r["train_feature_reg"]), rel=1e-4)
    # cosine schedule stepped at the start of each epoch: epoch 1 at step-1 rate, last at 0
    assert float(rows[0]["lr"]) == pytest.approx(0.05 * 0.5 * (1 + np.cos(np.pi / 2)))
    assert float(rows[1]["lr"]) == pytest.approx(0.0, abs=1e-12)
    state = torch.load(run / "best.paramOnly", weights_only=True)
    assert {"encoder.fc.weight_vec", "encoder.fc.weight_norm", "encoder.fc.bias"} <= set(state)
    assert json.loads((run / "args.json").read_text())["model"]["use_etf"] is True
    fdr = json.loads((run / "fdr.json").read_text())
    assert set(fdr) == {"train", "test"} and np.isfinite(fdr["test"])
    per_class = _read_csv(run / "per_class.csv")
    assert [int(p["n_train"]) for p in per_class] == [100, 72, 51, 37, 26, 19, 14, 10, 7, 5]
    assert [p["group"] for p in per_class[:3]] == ["Many"] * 3
    track = torch.load(run / "trackRecords.ckpt", weights_only=True)
    assert track["correct"].shape == (2, 341) and track["weight_norm"].shape == (2, 10)

    # Stage 2: multiplicative logit adjustment on the converted (ETF -> Linear) classifier.
    second = write_json("second.json", digits_config(
        "la", "second", epochs=0,
        model={"is_pretrained": True, "pretrained_path": str(EXP / "first/etf"), "logit_adjustment_tau": 1.0,
               "use_additive_logit_adjustment": False},
        optim={"base_lr": 0.0}))
    assert main("second", ["--json_path", second]) == 0
    run2 = in_tmp / EXP / "second/la/0"
    for name in ("args.json", "best.paramOnly", "acc.json", "fdr.json", "sparsity.json", "confMat.npy"):
        assert (run2 / name).is_file(), name
    state2 = torch.load(run2 / "best.paramOnly", weights_only=True)
    assert "encoder.fc.weight" in state2 and "encoder.fc.weight_vec" not in state2
    assert torch.allclose(state2["encoder.fc.weight"], state["encoder.fc.weight_vec"] * state["encoder.fc.weight_norm"])
    # the features are stage 1's, so feature statistics are unchanged by post-hoc logit adjustment
    assert json.loads((run2 / "fdr.json").read_text())["test"] == pytest.approx(fdr["test"], rel=1e-6)


def test_wb_two_stages_retrain_only_the_classifier(in_tmp, write_json):
    # 2 epochs: the cosine schedule is stepped first, so a 1-epoch stage 1 would train at lr 0
    # ResNet-32: a conv net with BatchNorm (whose running statistics matter below), cheaper than ResNet18
    first = write_json("wb1.json", digits_config("wd", epochs=2, model={"name": "ResNet32"},
                                                 optim={"weight_decay": 5e-3}))
    assert main("first", ["--json_path", first]) == 0
    stage1 = torch.load(in_tmp / WB_EXP / "first/wd/0/best.paramOnly", weights_only=True)
    second = write_json("wb2.json", digits_config(
        "wb", "second", epochs=2, model={"name": "ResNet32", "is_pretrained": True,
                                         "pretrained_path": str(WB_EXP / "first/wd")},
        optim={"loss_type": "CB", "cb_beta": 0.9999, "weight_decay": 0.1, "norm_type": "maxnorm",
               "norm_param": 0.1, "base_lr": 0.01}))
    assert main("second", ["--json_path", second, "--retrain"]) == 0
    run = in_tmp / WB_EXP / "second/wb/0"
    rows = _read_csv(run / "metrics.csv")
    assert len(rows) == 2 and "train_cb" in rows[0] and "train_weight_decay" in rows[0]
    state = torch.load(run / "best.paramOnly", weights_only=True)
    for key, value in stage1.items():
        if key.startswith("encoder.fc.") or "running" in key or "num_batches" in key:
            continue
        assert torch.equal(value, state[key]), f"{key} changed in stage 2"
    norms1 = stage1["encoder.fc.weight"].norm(dim=1)
    threshold = norms1.min() + 0.1 * (norms1.max() - norms1.min())
    best_epoch = int(torch.load(run / "trackRecords.ckpt", weights_only=True)["best_epoch"])
    assert best_epoch > 0, "a retrained epoch should beat the stage-1 classifier here"
    # after an epoch, MaxNorm holds every row at or below the load-time threshold
    assert (state["encoder.fc.weight"].norm(dim=1) <= threshold + 1e-5).all()
    assert (norms1 > threshold + 1e-3).any(), "the projection had something to do"
    # the original keeps BN in train mode while retraining the classifier: running stats move
    assert not torch.equal(stage1["encoder.bn1.running_mean"], state["encoder.bn1.running_mean"])

    # options: frozen BN in eval mode keeps stage 1's statistics; MaxNorm after every step
    assert main("second", ["--json_path", second, "--retrain", "--exp_name", "wb_eval", "--optim_frozen_bn_mode",
                           "eval", "--optim_maxnorm_every", "step"]) == 0
    state = torch.load(in_tmp / WB_EXP / "second/wb_eval/0/best.paramOnly", weights_only=True)
    for key, value in stage1.items():
        if not key.startswith("encoder.fc."):
            assert torch.equal(value, state[key]), f"{key} changed with frozen_bn_mode=eval"
    assert not torch.equal(state["encoder.fc.weight"], stage1["encoder.fc.weight"]), "a retrained epoch won"
    assert (state["encoder.fc.weight"].norm(dim=1) <= threshold + 1e-5).all()


# The refusal tests copy the session's stage-1 run (conftest.stage1_run: first.py, the tiny network).
def _stage1_run(in_tmp, template):
    import shutil
    run = in_tmp / TINY_EXP / "first/s1/0"
    shutil.copytree(template, run)
    return run


def _second(write_json, **model):
    cfg = tiny_config("s2", "second", epochs=0,
                      model={"is_pretrained": True, "pretrained_path": str(TINY_EXP / "first/s1"), **model})
    return write_json("s2.json", cfg)


@pytest.mark.parametrize("damage, message", [
    (lambda run: (run / "best.paramOnly").unlink(), "best.paramOnly is missing"),
    (lambda run: (run / "args.json").unlink(), "args.json is missing"),
    (lambda run: (run / "best.paramOnly").write_bytes((run / "best.paramOnly").read_bytes()[:200]),
     "unreadable or truncated"),
    (lambda run: (run / "args.json").write_text("{"), "args.json is unreadable"),
    (lambda run: ((run / "checkpoint.ckpt").unlink(), (run / "acc.json").unlink()),
     "has not finished (no checkpoint.ckpt and no acc.json)"),
])
def test_stage2_refuses_broken_stage1_run(in_tmp, write_json, capsys, stage1_run, damage, message):
    run = _stage1_run(in_tmp, stage1_run)
    damage(run)
    capsys.readouterr()
    assert main("second", ["--json_path", _second(write_json)]) == 2
    assert message in capsys.readouterr().err
    assert not (in_tmp / TINY_EXP / "second").exists()


class _Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


def test_stage2_refuses_checkpoint_that_would_run_code(in_tmp, write_json, capsys, stage1_run):
    run = _stage1_run(in_tmp, stage1_run)
    torch.save({"fc.weight": _Exploit()}, run / "best.paramOnly")
    capsys.readouterr()
    assert main("second", ["--json_path", _second(write_json)]) == 2
    captured = capsys.readouterr()
    assert "not a plain weights-only state_dict" in captured.err and "pwned" not in captured.out


def test_stage2_refuses_other_class_count_and_missing_run(in_tmp, write_json, capsys, stage1_run):
    run = _stage1_run(in_tmp, stage1_run)
    args = json.loads((run / "args.json").read_text())
    args["data"]["n_classes"] = 100
    (run / "args.json").write_text(json.dumps(args))
    capsys.readouterr()
    assert main("second", ["--json_path", _second(write_json)]) == 2
    assert "has 100 classes, but data.n_classes = 10" in capsys.readouterr().err
    args["data"].update(n_classes=10, imb_factor=0.02)
    (run / "args.json").write_text(json.dumps(args))
    assert main("second", ["--json_path", _second(write_json)]) == 2
    assert "used data.imb_factor = 0.02, but this run has 0.05" in capsys.readouterr().err
    assert main("second", ["--json_path", _second(write_json, pretrained_path="exp/nowhere")]) == 2
    assert "stage-1 run directory exp/nowhere/0 not found" in capsys.readouterr().err
    assert not (in_tmp / TINY_EXP / "second").exists()


def test_stage2_reads_an_original_style_run(in_tmp, write_json):
    """args.json as the published code writes it (every BaseArgs key) and its state_dict layout."""
    from models import build_model
    run = in_tmp / "orig/0"
    run.mkdir(parents=True)
    original_args = {
        "data": {"name": "Digits", "imb_type": "exp", "imb_factor": 0.05, "n_classes": 10, "batch_size": 64},
        "model": {"name": "ResNet18", "is_pretrained": False, "load_last_linear": True,
                  "load_only_representation": False, "use_etf": True, "use_dr_balancer": False,
                  "normalize_feature": False, "etf_norm_rate": 1, "logit_adjustment_tau": 0.0,
                  "logit_adjustment_for_training": False, "logit_normalization": False,
                  "use_additive_logit_adjustment": True, "activation_type": "relu", "activation_param": 0.03,
                  "use_feature_bias": False, "bn_weight_init_val": 1.0, "bn_eps": 1e-05, "last_relu": False,
                  "one_param_bn": False, "dropout": 0, "use_bn": True, "add_skip": False,
                  "ignore_restrict_load": False, "modify_bn_weight": False, "init_identity_bn": True,
                  "mlp_hlayer_n": 3, "mlp_features_d": 1024, "identity_skip": False, "train_etf_norm": False},
        "optim": {"total_epoch_num": 320, "loss_type": "CE", "weight_decay": 0.005, "weight_decay_conv": True,
                  "weight_decay_bn": True, "weight_decay_identity_bn": True, "weight_decay_limit": False,
                  "norm_type": "none", "train_bn_bias": True, "train_bn_weight": True,
                  "features_regularization": 0.01, "optimizer": "SGD", "drw": 0, "nc_lambda1": 0.0,
                  "nc_lambda2": 0.0, "base_lr": 0.01},
        "exp_name": "orig", "project_name": "first", "seeds": 0, "description": "", "save_features": False,
        "param_search": False, "param_search_id": 0, "save_checkpoint": False, "load_checkpoint": False,
    }
    (run / "args.json").write_text(json.dumps(original_args))
    (run / "acc.json").write_text('{"All": 0.5, "Many": 0.6, "Medium": 0.5, "Few": 0.4}')  # its last file: finished
    model = build_model("ResNet18", 10, in_channels=1, use_etf=True)
    state = model.state_dict()
    # their ETF directions are an nn.Parameter; in a saved state_dict that is just a tensor of the same key
    torch.save(dict(state), run / "best.paramOnly")
    cfg = digits_config("from_orig", "second", epochs=0,
                        model={"is_pretrained": True, "pretrained_path": "orig", "logit_adjustment_tau": 0.5})
    assert main("second", ["--json_path", write_json("o.json", cfg)]) == 0
    assert (in_tmp / EXP / "second/from_orig/0/acc.json").is_file()
