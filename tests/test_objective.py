"""Which parameters train and which decay for every targeting key; SGD / AdamW; the
stage-1 and stage-2 options end to end on tiny Digits-LT runs."""
import csv
import json
import math
import re
from pathlib import Path

import pytest
import torch

from models import build_model
from tests.conftest import digits_config
from utils.cli import main
from utils.config import ConfigError, from_dict
from utils.engine.objective import make_objective
from utils.engine.params import decayed_parameters, describe_parameters, make_optimizer, trained_parameters

# ResNet18 (torchvision layout): 20 conv weights (conv1, 16 in the blocks, 3 downsample convs);
# 20 BatchNorms = 40 tensors (stem bn1, 16 in the blocks, 3 downsample BNs = 4 identity BNs);
# Linear classifier = weight + bias.
N_CONV, N_BN, N_IDENTITY_BN, N_FC = 20, 40, 8, 2
K = 10
# Digits-LT at imb_factor 0.05: counts 100 72 51 37 26 19 14 10 7 5, Many n > 40, Few n < 10
GROUPS = ["Many"] * 3 + ["Medium"] * 5 + ["Few"] * 2


def _cfg(project_name="first", model=None, **optim):
    return from_dict({"project_name": project_name, "data": {"name": "Digits", "n_classes": K},
                      "model": {"name": "ResNet18", **(model or {})}, "optim": optim})


def _model(**kw):
    torch.manual_seed(0)
    return build_model("ResNet18", K, in_channels=1, **kw)


def _sets(cfg, model=None, stage="first"):
    model = model or _model()
    trained = trained_parameters(model, stage, cfg.optim)
    decayed = decayed_parameters(model, trained, cfg.optim, GROUPS)
    return model, trained, decayed


def _names(entries):
    return {e.name for e in entries}


def test_default_every_trained_tensor_decays():
    _, trained, decayed = _sets(_cfg(weight_decay=0.1))
    assert len(trained) == N_CONV + N_BN + N_FC == 62
    assert [d.name for d in decayed] == [n for n, _ in trained]
    assert all(d.rows is None for d in decayed)


@pytest.mark.parametrize("key, n_decayed, gone", [
    ("weight_decay_conv", N_BN + N_FC, {"encoder.conv1.weight", "encoder.layer2.0.downsample.0.weight"}),
    ("weight_decay_bn", N_CONV + N_FC, {"encoder.bn1.weight", "encoder.layer1.0.bn2.bias"}),
    ("weight_decay_identity_bn", 62 - N_IDENTITY_BN,
     {"encoder.bn1.weight", "encoder.bn1.bias", "encoder.layer2.0.downsample.1.weight",
      "encoder.layer4.0.downsample.1.bias"}),
])
def test_each_module_type_key_removes_its_tensors(key, n_decayed, gone):
    _, trained, decayed = _sets(_cfg(weight_decay=0.1, **{key: False}))
    assert len(trained) == 62  # decay targeting never changes what trains
    assert len(decayed) == n_decayed
    names = _names(decayed)
    assert not (gone & names)
    assert {n for n, _ in trained} - names >= gone


def test_identity_bn_keeps_the_residual_bns():
    _, _, decayed = _sets(_cfg(weight_decay=0.1, weight_decay_identity_bn=False))
    names = _names(decayed)
    assert {"encoder.layer1.0.bn1.weight", "encoder.layer2.0.bn2.bias"} <= names
    # parameters: identity BNs have 64 + 128 + 256 + 512 channels, weight and bias each
    model, trained, _ = _sets(_cfg())
    all_decayed = sum(p.numel() for _, p in trained)
    assert sum(d.numel() for d in decayed) == all_decayed - 2 * (64 + 128 + 256 + 512)


@pytest.mark.parametrize("modules, expected", [
    ([0], {"encoder.conv1.weight", "encoder.bn1.weight", "encoder.bn1.bias"}),
    ([5], {"encoder.fc.weight", "encoder.fc.bias"}),
    ([1], {f"encoder.layer1.{b}.{m}.{p}" for b in (0, 1) for m, ps in
           (("conv1", ("weight",)), ("conv2", ("weight",)), ("bn1", ("weight", "bias")), ("bn2", ("weight", "bias")))
           for p in ps}),
])
def test_weight_decay_limit_keeps_only_target_modules(modules, expected):
    _, _, decayed = _sets(_cfg(weight_decay=0.1, weight_decay_limit=True, weight_decay_target_modules=modules))
    assert _names(decayed) == expected


def test_weight_decay_limit_layer2_has_the_downsample_and_combines_with_conv_key():
    _, _, decayed = _sets(_cfg(weight_decay=0.1, weight_decay_limit=True, weight_decay_target_modules=[2, 5]))
    assert len(decayed) == 12 + 3 + 2  # two blocks, the downsample conv + BN, the classifier
    _, _, decayed = _sets(_cfg(weight_decay=0.1, weight_decay_limit=True, weight_decay_target_modules=[2, 5],
                               weight_decay_conv=False))
    assert len(decayed) == 8 + 2 + 2 and not any(n.endswith("conv1.weight") for n in _names(decayed))


def test_weight_decay_target_selects_classifier_rows_and_the_penalty_value():
    cfg = _cfg(weight_decay=0.5, weight_decay_target=[True, False, True])  # Many and Few rows
    model, trained, decayed = _sets(cfg)
    assert len(decayed) == 62
    fc = {d.name: d for d in decayed if d.name.startswith("encoder.fc.")}
    rows = [0, 1, 2, 8, 9]
    assert fc["encoder.fc.weight"].rows.tolist() == rows and fc["encoder.fc.weight"].rows.dtype == torch.long
    assert fc["encoder.fc.bias"].rows.tolist() == rows
    assert fc["encoder.fc.weight"].numel() == 5 * 512
    # the weight-decay term by hand: 0.5 * sum ||w||^2 / 2 over whole backbone tensors + chosen rows
    w, b = model.encoder.fc.weight, model.encoder.fc.bias
    expected = sum(float(p.detach().double().pow(2).sum()) for n, p in trained if not n.startswith("encoder.fc."))
    expected += sum(float(w[r].detach().double().pow(2).sum()) + float(b[r].detach().double()) ** 2 for r in rows)
    objective = make_objective(cfg.optim, [100, 72, 51, 37, 26, 19, 14, 10, 7, 5], decayed, torch.device("cpu"))
    terms = objective(torch.zeros(2, K), torch.tensor([0, 1]), torch.zeros(2, 512))
    assert float(terms["weight_decay"].detach()) == pytest.approx(0.5 * expected / 2, rel=1e-5)
    # the gradient reaches only the chosen rows
    terms["weight_decay"].backward()
    assert float(w.grad[3:8].abs().sum()) == 0.0 and float(w.grad[rows].abs().sum()) > 0
    # no class chosen: the classifier leaves the decayed set
    _, _, none = _sets(_cfg(weight_decay=0.5, weight_decay_target=[False, False, False]))
    assert len(none) == 60 and not any(n.startswith("encoder.fc.") for n in _names(none))


def test_weight_decay_target_on_etf_norms_and_bias():
    cfg = _cfg(weight_decay=0.1, weight_decay_target=[False, False, True], model={"use_etf": True,
                                                                                  "train_etf_norm": True})
    model, trained, decayed = _sets(cfg, _model(use_etf=True, train_etf_norm=True))
    fc = {d.name: d for d in decayed if d.name.startswith("encoder.fc.")}
    assert set(fc) == {"encoder.fc.weight_norm", "encoder.fc.bias"}  # directions are a buffer
    assert fc["encoder.fc.weight_norm"].tensor().shape == (2, 1)


@pytest.mark.parametrize("keys, n_trained", [
    ({"train_bn_weight": False}, 62 - 20),
    ({"train_bn_bias": False}, 62 - 20),
    ({"train_bn_weight": False, "train_bn_bias": False}, 62 - 40),
])
def test_train_bn_keys_freeze_bn_and_decay_only_trained(keys, n_trained):
    _, trained, decayed = _sets(_cfg(weight_decay=0.1, **keys))
    assert len(trained) == n_trained
    names = {n for n, _ in trained}
    if not keys.get("train_bn_weight", True):
        assert "encoder.bn1.weight" not in names and "encoder.layer1.0.bn1.weight" not in names
        assert "encoder.layer2.0.downsample.0.weight" in names  # a conv, still trained
    if not keys.get("train_bn_bias", True):
        assert "encoder.layer3.1.bn2.bias" not in names
    assert _names(decayed) == names


def test_etf_feature_bias_and_stage2_sets():
    _, trained, _ = _sets(_cfg(model={"use_etf": True}), _model(use_etf=True))
    assert len(trained) == 61 and "encoder.fc.bias" in {n for n, _ in trained}  # norms frozen, directions a buffer
    cfg = _cfg(weight_decay=0.1, weight_decay_limit=True, weight_decay_target_modules=[5],
               model={"use_feature_bias": True})
    _, trained, decayed = _sets(cfg, _model(use_feature_bias=True))
    assert len(trained) == 63 and _names(decayed) == {"encoder.fc.weight", "encoder.fc.bias", "feature_bias"}
    _, trained, decayed = _sets(_cfg("second", weight_decay=0.1), stage="second")
    assert [n for n, _ in trained] == ["encoder.fc.weight", "encoder.fc.bias"] == [d.name for d in decayed]
    # stage 2 with no classifier row chosen (the original's no-JSON default): nothing decays, no term
    cfg = _cfg("second", weight_decay=0.1, weight_decay_target=[False, False, False])
    _, trained, decayed = _sets(cfg, stage="second")
    assert decayed == []
    terms = make_objective(cfg.optim, [5] * K, decayed, torch.device("cpu"))(
        torch.zeros(1, K), torch.tensor([0]), torch.zeros(1, 512))
    assert set(terms) == {"ce"}
    assert "weight decay 0.1 on 0 tensors (0 parameters), classifier rows of no classes" in describe_parameters(
        cfg.optim, trained, decayed)


def test_describe_parameters_counts():
    cfg = _cfg(weight_decay=0.1, weight_decay_bn=False, weight_decay_target=[True, False, False])
    _, trained, decayed = _sets(cfg)
    n_trained = sum(p.numel() for _, p in trained)
    n_decayed = n_trained - sum(p.numel() for n, p in trained if ".bn" in n or "downsample.1" in n) - 7 * 513
    text = describe_parameters(cfg.optim, trained, decayed)
    assert f"trained tensors: 62 ({n_trained:,} parameters)" in text
    assert f"weight decay 0.1 on 22 tensors ({n_decayed:,} parameters), classifier rows of Many classes" in text
    adamw = _cfg(weight_decay=0.1, optimizer="AdamW")
    assert "weight decay 0.1 (AdamW, decoupled) on all of them" in describe_parameters(adamw.optim, trained, decayed)


# ---------------------------------------------------------------------------
# Optimisers
# ---------------------------------------------------------------------------

def test_sgd_momentum_and_adamw_decoupled_decay():
    lin = torch.nn.Linear(3, 2)
    plain = _cfg(base_lr=0.1)
    sgd = make_optimizer(plain.optim, list(lin.parameters()), make_objective(plain.optim, [5, 5], [], torch.device("cpu")))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9
    assert [g["weight_decay"] for g in sgd.param_groups] == [0.0]
    cfg = _cfg(optimizer="AdamW", weight_decay=0.1, base_lr=0.5)
    before = [p.detach().clone() for p in lin.parameters()]
    objective = make_objective(cfg.optim, [5, 5], [], torch.device("cpu"))
    opt = make_optimizer(cfg.optim, list(lin.parameters()), objective)
    assert isinstance(opt, torch.optim.AdamW)
    terms = objective(torch.zeros(1, 2), torch.tensor([0]), torch.zeros(1, 3))
    assert set(terms) == {"ce"}  # no explicit decay term with AdamW
    # zero gradient: Adam's step is 0, only the decoupled decay acts: p <- p (1 - lr wd) = 0.95 p
    loss = 0.0 * sum(p.sum() for p in lin.parameters())
    opt.zero_grad()
    loss.backward()
    opt.step()
    for p, p0 in zip(lin.parameters(), before):
        assert torch.allclose(p.detach(), 0.95 * p0, atol=1e-7)
    # SGD with the same weight decay: the term is logged, its gradient goes through SGD's weight_decay
    decay = _cfg(weight_decay=0.1)
    sgd_objective = make_objective(decay.optim, [5, 5], list(lin.parameters()), torch.device("cpu"))
    sgd_terms = sgd_objective(torch.zeros(1, 2), torch.tensor([0]), torch.zeros(1, 3))
    expected = 0.1 * sum(float(p.detach().pow(2).sum()) for p in lin.parameters()) / 2
    assert float(sgd_terms["weight_decay"].detach()) == pytest.approx(expected, rel=1e-5)
    assert not sgd_terms["weight_decay"].requires_grad
    sgd = make_optimizer(decay.optim, list(lin.parameters()), sgd_objective)
    assert [(len(g["params"]), g["weight_decay"]) for g in sgd.param_groups] == [(2, 0.1)]


@pytest.mark.parametrize("optim, message", [
    ({"optimizer": "AdamW", "weight_decay_limit": True, "weight_decay_target_modules": [5]},
     "optim.weight_decay_limit = true is not supported with optim.optimizer = 'AdamW' (AdamW's decay is the "
     "optimiser's decoupled decay, applied to every trained parameter)"),
    ({"optimizer": "AdamW", "weight_decay_bn": False}, "optim.weight_decay_bn = false is not supported with "
                                                       "optim.optimizer = 'AdamW'"),
    ({"optimizer": "AdamW", "weight_decay_conv": False}, "optim.weight_decay_conv = false is not supported"),
    ({"optimizer": "AdamW", "weight_decay_identity_bn": False}, "optim.weight_decay_identity_bn = false is not"),
    ({"optimizer": "AdamW", "weight_decay_target": [True, False, False]},
     "optim.weight_decay_target = [true, false, false] is not supported with optim.optimizer = 'AdamW'"),
    ({"weight_decay_limit": True}, "optim.weight_decay_limit = true needs optim.weight_decay_target_modules"),
    ({"weight_decay_limit": True, "weight_decay_target_modules": [6]}, "expected module indices 0-5"),
    ({"weight_decay_target": [True, False]}, "optim.weight_decay_target = [true, false] is not allowed; "
                                             "expected [many, medium, few]"),
    ({"weight_decay_target": [1, 0, 1]}, "optim.weight_decay_target = [1, 0, 1] is not allowed"),
])
def test_refused_combinations_say_why(optim, message):
    with pytest.raises(ConfigError) as err:
        from_dict({"optim": optim})
    assert message in str(err.value)


@pytest.mark.parametrize("optim, message", [
    ({"optimizer": "AdamW", "momentum": 0.5}, "optim.momentum = 0.5 has no effect with AdamW"),
    ({"weight_decay_target_modules": [1]}, "optim.weight_decay_target_modules = [1] has no effect with "
                                           "optim.weight_decay_limit = false"),
    ({"drw": 3}, "optim.drw = 3 has no effect with optim.loss_type = 'CE'"),
    ({"loss_type": "CB", "nc_lambda1": 0.1}, "optim.nc_lambda1 = 0.1 has no effect with optim.loss_type = 'CB'"),
])
def test_values_without_effect_are_loaded_with_a_warning(optim, message):
    """Not refused, so that an old args.json that carries one stays loadable, but never silent."""
    with pytest.warns(UserWarning, match=re.escape(message)):
        from_dict({"optim": optim})


def test_the_losses_and_keys_are_accepted_now():
    for optim in ({"loss_type": "FL"}, {"loss_type": "DR"}, {"loss_type": "NC", "nc_lambda1": 1.0, "drw": 2},
                  {"loss_type": "CB", "cb_type": "sigmoid"}, {"loss_type": "CB", "cb_type": "dr", "drw": 1},
                  {"optimizer": "AdamW", "weight_decay": 0.1}, {"train_bn_bias": False, "train_bn_weight": False},
                  {"weight_decay_limit": True, "weight_decay_target_modules": [0, 5]},
                  {"weight_decay_target": [False, True, True]}):
        from_dict({"optim": optim})


# ---------------------------------------------------------------------------
# End to end on Digits-LT
# ---------------------------------------------------------------------------

EXP = Path("exp/Digits/ResNet18")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _quick(exp_name, project_name="first", epochs=1, model=None, **optim):
    """digits_config without the per-epoch FDR passes (the slow part of a tiny run)."""
    return digits_config(exp_name, project_name, epochs=epochs, model=model, optim={"fdr_every": 0, **optim})


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _acc(run):
    acc = json.loads((run / "acc.json").read_text())
    assert set(acc) == {"All", "Many", "Medium", "Few"} and all(0 <= v <= 1 for v in acc.values())
    return acc


def test_sigmoid_losses_start_at_minus_log_k_minus_1():
    from utils.run.pipeline import prepare
    for optim in ({"loss_type": "FL"}, {"loss_type": "CB", "cb_type": "sigmoid"},
                  {"loss_type": "CB", "cb_type": "focal"}):
        p = prepare(from_dict(digits_config("b", optim=optim)), "first")
        assert p.model.classifier.bias.tolist() == pytest.approx([-math.log(9)] * 10)
    p = prepare(from_dict(digits_config("b", optim={"loss_type": "CB", "cb_type": "softmax"})), "first")
    assert p.model.classifier.bias.abs().max() < 1 / math.sqrt(512) + 1e-6  # torchvision's init, untouched


def test_focal_with_adamw_and_dr_with_etf_end_to_end(in_tmp, write_json):
    fl = write_json("fl.json", _quick("fl", **{
        "loss_type": "CB", "cb_type": "focal", "cb_beta": 0.999, "optimizer": "AdamW", "weight_decay": 0.01,
        "base_lr": 0.002}))
    assert main("first", ["--json_path", fl]) == 0
    run = in_tmp / EXP / "first/fl/0"
    _acc(run)
    rows = _rows(run / "metrics.csv")
    assert "train_cb_focal" in rows[0] and "train_weight_decay" not in rows[0]
    log = (run / "train.log").read_text()
    assert "weight decay 0.01 (AdamW, decoupled) on all of them" in log

    dr = write_json("dr.json", _quick("dr", model={"use_etf": True}, loss_type="DR", weight_decay=5e-3))
    assert main("first", ["--json_path", dr]) == 0
    run = in_tmp / EXP / "first/dr/0"
    _acc(run)
    r = _rows(run / "metrics.csv")[0]
    assert float(r["train_loss"]) == pytest.approx(float(r["train_dr"]) + float(r["train_weight_decay"]), rel=1e-4)
    assert "trained tensors: 61" in (run / "train.log").read_text()  # ETF: no directions, no norms


def test_nc_with_drw_and_bn_keys_end_to_end(in_tmp, write_json):
    path = write_json("nc.json", _quick("nc", epochs=2, **{
        "loss_type": "NC", "nc_lambda1": 0.01, "nc_lambda2": 0.1, "drw": 1, "weight_decay": 5e-3,
        "weight_decay_bn": False, "train_bn_bias": False}))
    assert main("first", ["--json_path", path]) == 0
    run = in_tmp / EXP / "first/nc/0"
    _acc(run)
    rows = _rows(run / "metrics.csv")
    # DRW: epoch 1 is plain CE (the NC terms are logged as 0), epoch 2 adds them
    assert float(rows[0]["train_nc_within"]) == 0.0 and float(rows[0]["train_nc_angle"]) == 0.0
    assert float(rows[1]["train_nc_within"]) > 0.0 and float(rows[1]["train_nc_angle"]) < 0.0
    log = (run / "train.log").read_text()
    assert "trained tensors: 42" in log and "on 22 tensors" in log  # no BN biases; BN not decayed
    assert "DRW: epochs 1-1 train with plain CE, NC from epoch 2" in log
    state = torch.load(run / "best.paramOnly", weights_only=True)
    bn_biases = [k for k in state if k.endswith(".bias") and not k.startswith("encoder.fc.")]
    assert len(bn_biases) == 20 and all(float(state[k].abs().max()) == 0.0 for k in bn_biases)  # never trained


def test_norm_types_both_stages_end_to_end(in_tmp, write_json):
    # stage 1 with MaxNorm after every epoch (threshold from the initial weights)
    s1 = write_json("s1.json", _quick("mn", norm_type="maxnorm", norm_param=0.2, weight_decay=5e-3))
    assert main("first", ["--json_path", s1]) == 0
    run = in_tmp / EXP / "first/mn/0"
    threshold = float(re.search(r"MaxNorm threshold ([0-9.]+)", (run / "train.log").read_text()).group(1))
    assert int(torch.load(run / "trackRecords.ckpt", weights_only=True)["best_epoch"]) > 0
    stage1 = torch.load(run / "best.paramOnly", weights_only=True)
    assert (stage1["encoder.fc.weight"].norm(dim=1) <= threshold + 1e-4).all()

    # stage 2, evaluation only: tau-normalisation of the loaded classifier (L2 shares the code path
    # and is checked value by value in test_regularizers)
    w = stage1["encoder.fc.weight"]
    cfg = _quick("s2_tau", "second", epochs=0, norm_type="tau", norm_param=1.5,
                 model={"is_pretrained": True, "pretrained_path": str(EXP / "first/mn")})
    assert main("second", ["--json_path", write_json("tau.json", cfg)]) == 0
    out = torch.load(in_tmp / EXP / "second/s2_tau/0/best.paramOnly", weights_only=True)
    assert torch.allclose(out["encoder.fc.weight"], w / w.norm(dim=1, keepdim=True) ** 1.5, atol=1e-6)
    assert torch.equal(out["encoder.fc.bias"], stage1["encoder.fc.bias"])
