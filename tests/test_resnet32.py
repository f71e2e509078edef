"""ResNet-32 (models/resnet32.py), ResNet50/152 and model.init_weights, and the ETF's D >= K rule."""
import json

import pytest
import torch
import torchvision
from torch import nn

from models import build_model
from models.resnet32 import OptionAShortcut
from tests.conftest import digits_config
from tests.test_data import write_cifar10
from utils.cli import main
from utils.errors import ConfigError
from utils.run.init_weights import load_init_weights


def test_resnet32_parameter_count_and_shapes():
    model = build_model("ResNet32", 10)
    # stem 3*16*9 + BN 2*16 = 464; stage 1: 10 convs 16*16*9 + 10 BNs 2*16 = 23,360;
    # stage 2: 16*32*9 + 9 convs 32*32*9 + 10 BNs 2*32 = 88,192; stage 3: 32*64*9 + 9 * 64*64*9 + 10 * 2*64
    # = 351,488; classifier 64*10 + 10 = 650; option-A shortcuts: none.  Total 464,154 (He et al.: 0.46 M)
    assert sum(p.numel() for p in model.parameters()) == 464_154
    x = torch.randn(2, 3, 32, 32)
    e = model.encoder
    h = e.relu(e.bn1(e.conv1(x)))
    for layer, shape in zip((e.layer1, e.layer2, e.layer3), ((16, 32, 32), (32, 16, 16), (64, 8, 8))):
        h = layer(h)
        assert tuple(h.shape[1:]) == shape
    assert all(len(layer) == 5 for layer in (e.layer1, e.layer2, e.layer3))
    assert model.features(x).shape == (2, 64) and model(x).shape == (2, 10)
    assert model.feature_dim == 64 and model.classifier_prefix == "encoder.fc."
    assert list(model.state_dict())[:2] == ["encoder.conv1.weight", "encoder.bn1.weight"]


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 8, 8)
    out = OptionAShortcut(16, 32, 2)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])  # 8 zero channels on each side
    assert not out[:, :8].any() and not out[:, 24:].any()


def test_resnet32_head_options_and_parameter_groups():
    counts = [50, 20, 5]
    model = build_model("ResNet32", 3, use_etf=True, train_etf_norm=True, use_feature_bias=True,
                        normalize_feature=True, logit_normalization=True, class_counts=counts, la_tau=1.0,
                        activation_type="lrelu", identity_skip=True, one_param_bn=True)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 3)
    groups = model.named_parameter_groups()
    # the stem BN is the only identity-path BN: option-A shortcuts have no BN
    assert [n for n, _ in groups["identity_bn"]] == ["encoder.bn1.weight", "encoder.bn1.bias"]
    assert [n for n, _ in groups["classifier"]] == ["encoder.fc.weight_norm", "encoder.fc.bias"]
    assert groups["feature_bias"][0][0] == "feature_bias"
    assert isinstance(model.encoder.layer2[0].relu, nn.LeakyReLU) and isinstance(model.encoder.relu, nn.LeakyReLU)


def test_resnet32_kaiming_normal_init():
    torch.manual_seed(0)
    w = build_model("ResNet32", 10).encoder.layer3[1].conv1.weight
    # Kaiming normal, fan-in 64*3*3 = 576, ReLU gain sqrt(2): std sqrt(2/576) = 0.0589
    assert w.std().item() == pytest.approx((2 / 576) ** 0.5, rel=0.05)


@pytest.mark.parametrize("which", ["digits", "cifar"])
def test_resnet32_one_epoch_writes_acc_json(tmp_path, write_json, which):
    cfg = digits_config("r32", epochs=1, model={"name": "ResNet32"})
    if which == "cifar":
        write_cifar10(tmp_path / "data", train_per_class=22, test_per_class=3)
        cfg["data"].update({"name": "Cifar10", "n_classes": 10, "imb_factor": 0.5, "root": str(tmp_path / "data"),
                            "download": False, "batch_size": 8})
    exp = tmp_path / "exp"
    assert main("first", ["--json_path", write_json("c.json", cfg), "--exp_root", str(exp), "--no_figures"]) == 0
    run = exp / f"{cfg['data']['name']}/ResNet32/first/r32/0"
    acc = json.loads((run / "acc.json").read_text())
    assert set(acc) == {"All", "Many", "Medium", "Few"}  # exactly the original's layout
    assert torch.load(run / "best.paramOnly", weights_only=True)["encoder.fc.weight"].shape == (10, 64)


@pytest.mark.parametrize("data, model, d, k", [
    ({"name": "Cifar100", "n_classes": 100}, {"name": "ResNet32"}, 64, 100),
    ({"name": "MNIST", "n_classes": 100, "imb_factor": 1.0}, {"name": "BNLeNet5"}, 84, 100),
    ({"name": "Digits", "n_classes": 10}, {"name": "BNMLP", "mlp_features_d": 8, "mlp_hlayer_n": 1}, 8, 10),
])
def test_etf_with_more_classes_than_features_is_refused(tmp_path, write_json, capsys, data, model, d, k):
    cfg = digits_config("etf", epochs=1, model={**model, "use_etf": True})
    cfg["data"].update({**data, "root": str(tmp_path / "nowhere")})
    exp = tmp_path / "exp"
    assert main("first", ["--json_path", write_json("c.json", cfg), "--exp_root", str(exp)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"error: model.use_etf = true needs D >= K, but model.name = {model['name']!r} has "
                          f"D = {d} features and data.n_classes = {k} (K)")
    assert not exp.exists()


def test_resnet50_and_152_are_torchvision_with_the_224_stem():
    for name, blocks in (("ResNet50", [3, 4, 6, 3]), ("ResNet152", [3, 8, 36, 3])):
        model = build_model(name, 7)
        e = model.encoder
        assert [len(layer) for layer in (e.layer1, e.layer2, e.layer3, e.layer4)] == blocks
        assert e.conv1.kernel_size == (7, 7) and not model.small_input and model.feature_dim == 2048
    assert build_model("ResNet50", 7)(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def _torchvision_state(tmp_path, constructor, name="w.pth"):
    torch.manual_seed(1)
    state = constructor(weights=None).state_dict()  # the layout of torchvision's ImageNet weights
    path = tmp_path / name
    torch.save(state, path)
    return state, path


def test_init_weights_loads_the_backbone_and_drops_fc(tmp_path):
    state, path = _torchvision_state(tmp_path, torchvision.models.resnet18)
    model = build_model("IMResNet18", 5)
    fresh_fc = model.encoder.fc.weight.detach().clone()
    assert load_init_weights(model, path, "IMResNet18") == len(state) - 2
    own = model.state_dict()
    assert torch.equal(own["encoder.layer4.1.conv2.weight"], state["layer4.1.conv2.weight"])
    assert torch.equal(own["encoder.bn1.running_var"], state["bn1.running_var"])
    assert torch.equal(own["encoder.fc.weight"], fresh_fc)  # 5 classes, not ImageNet's 1,000


def test_init_weights_errors_name_the_file_and_the_keys(tmp_path):
    model = build_model("IMResNet18", 5)
    with pytest.raises(ConfigError, match=r"model.init_weights = '.*nope.pth' is missing"):
        load_init_weights(model, tmp_path / "nope.pth", "IMResNet18")
    _, path34 = _torchvision_state(tmp_path, torchvision.models.resnet34, "r34.pth")
    with pytest.raises(ConfigError, match=r"is not a torchvision IMResNet18 state_dict: 96 keys the model does not "
                                          r"have \(layer1\.2\.bn1\.bias, "):
        load_init_weights(model, path34, "IMResNet18")
    _, path18 = _torchvision_state(tmp_path, torchvision.models.resnet18, "r18.pth")
    cifar_stem = build_model("ResNet18", 5)  # 3x3 stem: conv1 has another shape
    with pytest.raises(ConfigError, match=r"1 tensors have another shape \(conv1\.weight \(64, 3, 7, 7\) in the "
                                          r"file, \(64, 3, 3, 3\) in the model\)"):
        load_init_weights(cifar_stem, path18, "ResNet18")
    (tmp_path / "bad.pth").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match=r"bad.pth' is unreadable"):
        load_init_weights(model, tmp_path / "bad.pth", "IMResNet18")
    torch.save({"w": torch.ones(1), "f": OptionAShortcut(1, 2, 1)}, tmp_path / "unsafe.pth")
    with pytest.raises(ConfigError, match=r"unsafe.pth' was refused: it is not a plain weights-only state_dict"):
        load_init_weights(model, tmp_path / "unsafe.pth", "IMResNet18")


def test_init_weights_on_the_command_line(tmp_path, write_json, capsys):
    exp = tmp_path / "exp"
    cfg = digits_config("iw", epochs=1, model={"name": "ResNet32", "init_weights": str(tmp_path / "w.pth")})
    assert main("first", ["--json_path", write_json("a.json", cfg), "--exp_root", str(exp)]) == 2
    assert "model.init_weights loads a torchvision state_dict; model.name = 'ResNet32' is not" in capsys.readouterr().err
    cfg["model"]["name"] = "IMResNet18"
    assert main("first", ["--json_path", write_json("b.json", cfg), "--exp_root", str(exp)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "w.pth' is missing" in err
    assert not exp.exists()


def test_the_resnet32_config_files_mirror_the_resnet34_ones():
    from pathlib import Path

    from utils.config.load import resolve
    root = Path(__file__).resolve().parents[1] / "jsons/Cifar100"
    for stem, stage in (("naive", "first"), ("wb_first", "first"), ("wb_second", "second"), ("first", "first"),
                        ("second", "second")):
        ours, theirs = (resolve(stage, str(root / f"{stem}{tail}.json"), {}) for tail in ("_resnet32", ""))
        assert ours.model.name == "ResNet32" and not ours.model.use_etf, stem
        # the same experiment but for the backbone and the ETF (D = 64 < 100 classes)
        assert ours.optim == theirs.optim, stem
        assert ours.data == theirs.data, stem
    pairs = (("wb_first", "wb_second"), ("first", "second"))
    for first, second in pairs:
        stage1 = resolve("first", str(root / f"{first}_resnet32.json"), {})
        stage2 = resolve("second", str(root / f"{second}_resnet32.json"), {})
        assert Path(stage2.model.pretrained_path) == Path("exp") / stage1.run_subdir().parent


@pytest.mark.parametrize("section, values, message", [
    ("optim", {"weight_decay_limit": True, "weight_decay_target_modules": [0, 4]},
     r"optim.weight_decay_target_modules = \[0, 4\] names module 4 \(layer4\), which model.name = 'ResNet32' does "
     r"not have; its modules are 0 stem, 1-3 layer1-3, 5 classifier"),
    ("model", {"identity_skip": True, "name": "ResNet50"},
     r"model.identity_skip = true is built for .*ResNet32 \(basic blocks\), not ResNet50"),
    ("model", {"is_pretrained": True, "pretrained_path": "exp/x", "init_weights": "w.pth", "name": "ResNet50"},
     r"model.init_weights with model.is_pretrained = true: stage 2 loads the stage-1 weights"),
])
def test_options_that_do_not_fit_the_new_backbones_are_refused(section, values, message):
    from utils.config.load import from_dict
    cfg = digits_config("x", "second" if "is_pretrained" in values else "first", model={"name": "ResNet32"})
    cfg[section].update(values)
    with pytest.raises(ConfigError, match=message):
        from_dict(cfg)
