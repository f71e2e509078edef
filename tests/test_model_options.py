"""Model options of the original (activations, one-parameter BN, identity skip,
BN re-initialisation, DR balancer, stage-2 loading options) and the
IMResNet/ResNeXt50 backbones: unit values, then tiny Digits runs end to end."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.resnet import BasicBlock

from models import build_model
from models.backbone_options import MReLU, OneParamBN, PreActBasicBlock, make_activation, reinit_bn_weights
from models.classifiers import ETFClassifier, dr_balancer_scale, etf_norm_profile
from tests.conftest import digits_config
from utils.cli import main
from utils.config import ConfigError, from_dict
from utils.errors import Stage1Error
from utils.run.stage1 import apply_bn_weight_init, load_into

EXP = Path("exp/Digits/ResNet18")


def _x(n=2, c=3, size=8, seed=0):
    return torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def _keys(tv_model):
    return {"encoder." + k for k in tv_model.state_dict()}


# ------------------------------------------------------------------ activations
def test_activation_values_on_known_inputs():
    x = torch.tensor([-3.0, -0.5, 0.0, 2.0])
    torch.testing.assert_close(make_activation("lrelu", 0.1)(x), torch.tensor([-0.3, -0.05, 0.0, 2.0]))
    torch.testing.assert_close(make_activation("mrelu")(x), torch.tensor([-1.0, -0.5, 0.0, 2.0]))
    torch.testing.assert_close(make_activation("elu")(x), torch.tensor([math.exp(-3) - 1, math.exp(-0.5) - 1, 0, 2]))
    a, s = 1.6732632423543772, 1.0507009873554805
    torch.testing.assert_close(make_activation("selu")(x),
                               s * torch.tensor([a * (math.exp(-3) - 1), a * (math.exp(-0.5) - 1), 0, 2]))
    torch.testing.assert_close(make_activation("relu")(x.clone()), torch.tensor([0.0, 0.0, 0.0, 2.0]))
    with pytest.raises(ValueError, match="choose one of relu, lrelu, selu, elu, mrelu"):
        make_activation("gelu")


def test_activation_replaces_every_backbone_relu():
    m = build_model("ResNet34", 5, activation_type="lrelu", activation_param=0.2)
    acts = [mod for mod in m.encoder.modules() if isinstance(mod, (nn.ReLU, nn.LeakyReLU))]
    assert len(acts) == 1 + 16  # stem + one per block (used twice inside it)
    assert all(isinstance(a, nn.LeakyReLU) and a.negative_slope == 0.2 for a in acts)
    m = build_model("ResNet18", 5, activation_type="mrelu")
    assert sum(isinstance(mod, MReLU) for mod in m.modules()) == 9
    assert not any(isinstance(mod, nn.ReLU) for mod in m.modules())


def test_lrelu_slope_changes_the_forward_pass_exactly_as_relu_at_zero():
    torch.manual_seed(0)
    relu = build_model("ResNet18", 4).eval()
    zero = build_model("ResNet18", 4, activation_type="lrelu", activation_param=0.0).eval()
    slope = build_model("ResNet18", 4, activation_type="lrelu", activation_param=0.3).eval()
    zero.load_state_dict(relu.state_dict())
    slope.load_state_dict(relu.state_dict())
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(zero(x), relu(x))
        assert not torch.allclose(slope(x), relu(x))
        # the stem activation: negative pre-activations are scaled by the slope
        e = slope.encoder
        pre = e.bn1(e.conv1(x))
        torch.testing.assert_close(e.relu(pre), torch.where(pre > 0, pre, 0.3 * pre))


# ------------------------------------------------------------------ one_param_bn
def test_one_param_bn_matches_batchnorm_and_averages_the_gradient():
    torch.manual_seed(0)
    x = torch.randn(6, 4, 3, 3)
    target = torch.randn(6, 4, 3, 3)
    one = OneParamBN(4)
    with torch.no_grad():
        one.weight.fill_(1.7)
        one.bias.fill_(-0.4)
    ref = nn.BatchNorm2d(4)
    with torch.no_grad():
        ref.weight.fill_(1.7)
        ref.bias.fill_(-0.4)
    out_one, out_ref = one(x), ref(x)
    torch.testing.assert_close(out_one, out_ref)
    ((out_one - target) ** 2).sum().backward()
    ((out_ref - target) ** 2).sum().backward()
    assert one.weight.shape == (1,) and one.bias.shape == (1,)
    # one shared scale/shift whose gradient is the MEAN of the per-channel gradients
    torch.testing.assert_close(one.weight.grad, ref.weight.grad.mean().reshape(1))
    torch.testing.assert_close(one.bias.grad, ref.bias.grad.mean().reshape(1))
    torch.testing.assert_close(one.running_mean, ref.running_mean)
    assert int(one.num_batches_tracked) == 1
    one.eval()
    ref.eval()
    torch.testing.assert_close(one(x), ref(x))


def test_one_param_bn_in_resnet18():
    m = build_model("ResNet18", 3, one_param_bn=True, bn_eps=1e-3)
    ones = [n for n, mod in m.named_modules() if isinstance(mod, OneParamBN)]
    plain = [n for n, mod in m.named_modules() if type(mod) is nn.BatchNorm2d]
    assert len(ones) == 1 + 16  # stem BN and both BNs of the 8 blocks
    assert plain == ["encoder.layer2.0.downsample.1", "encoder.layer3.0.downsample.1",
                     "encoder.layer4.0.downsample.1"]  # the original keeps these per-channel
    sd = m.state_dict()
    assert set(sd) == _keys(torchvision.models.resnet18())
    assert sd["encoder.bn1.weight"].shape == (1,) and sd["encoder.bn1.running_mean"].shape == (64,)
    assert sd["encoder.layer4.1.bn2.bias"].shape == (1,)
    assert all(mod.eps == 1e-3 for mod in m.modules() if isinstance(mod, nn.BatchNorm2d))
    groups = m.named_parameter_groups()
    assert ("encoder.bn1.weight", m.encoder.bn1.weight) in groups["identity_bn"]
    m.train()
    F.cross_entropy(m(_x(4)), torch.tensor([0, 1, 2, 0])).backward()
    assert m.encoder.layer1[0].bn1.weight.grad.shape == (1,)


# ------------------------------------------------------------------ identity_skip
def _rand_bn(bn, g):
    with torch.no_grad():
        bn.weight.copy_(torch.rand(bn.weight.shape, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(bn.bias.shape, generator=g))
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g))
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)


def test_identity_skip_block_is_the_hand_built_preactivation():
    g = torch.Generator().manual_seed(3)
    down = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
    block = PreActBasicBlock(BasicBlock(4, 8, stride=2, downsample=down))
    assert block.bn1.num_features == 4  # normalises the block input (half the output channels)
    for bn in (block.bn1, block.bn2, down[1]):
        _rand_bn(bn, g)
    block.eval()
    x = torch.randn(2, 4, 6, 6, generator=g)

    def bn(t, mod):
        return (t - mod.running_mean[None, :, None, None]) / torch.sqrt(mod.running_var[None, :, None, None] + mod.eps) \
            * mod.weight[None, :, None, None] + mod.bias[None, :, None, None]

    h = torch.clamp(bn(x, block.bn1), min=0)
    h = F.conv2d(h, block.conv1.weight, stride=2, padding=1)
    h = torch.clamp(bn(h, block.bn2), min=0)
    h = F.conv2d(h, block.conv2.weight, stride=1, padding=1)
    shortcut = bn(F.conv2d(x, down[0].weight, stride=2), down[1])
    with torch.no_grad():
        out = block(x)
    torch.testing.assert_close(out, h + shortcut)
    assert (out < 0).any(), "no activation after the addition"


def test_identity_skip_resnet34_keys_and_shapes():
    m = build_model("ResNet34", 10, identity_skip=True, use_etf=True)
    sd = m.state_dict()
    ref = torchvision.models.resnet34().state_dict()
    assert len(sd) == 219
    assert {k for k in sd if not k.startswith("encoder.fc.")} == {"encoder." + k for k in ref if not k.startswith("fc.")}
    assert sd["encoder.layer2.0.bn1.weight"].shape == (64,)  # was 128 in the post-activation block
    assert sd["encoder.layer2.1.bn1.weight"].shape == (128,)
    assert sd["encoder.layer1.0.bn1.weight"].shape == (64,)
    assert all(isinstance(b, PreActBasicBlock) for layer in (m.encoder.layer1, m.encoder.layer4) for b in layer)
    m.eval()
    assert m(_x(1)).shape == (1, 10)
    with pytest.raises(ValueError, match="not ResNeXt50"):
        build_model("ResNeXt50", 10, identity_skip=True)


# ------------------------------------------------------------------ DR balancer
def test_dr_balancer_norms_are_n_over_k_nc():
    counts = [50, 30, 20]  # N = 100, K = 3
    torch.testing.assert_close(dr_balancer_scale(counts, 3), torch.tensor([[2 / 3], [10 / 9], [5 / 3]]))
    m = build_model("ResNet18", 3, use_etf=True, use_dr_balancer=True, class_counts=counts)
    torch.testing.assert_close(m.encoder.fc.weight_norm.detach(), torch.tensor([[2 / 3], [10 / 9], [5 / 3]]))
    # with etf_norm_rate 2 the profile [1, 0.75, 0.5] is scaled too
    fc = ETFClassifier(512, 3, norm_rate=2.0, dr_balancer_counts=counts)
    torch.testing.assert_close(etf_norm_profile(3, 2.0), torch.tensor([[1.0], [0.75], [0.5]]))
    torch.testing.assert_close(fc.weight_norm.detach(), torch.tensor([[2 / 3], [5 / 6], [5 / 6]]))
    assert not build_model("ResNet18", 3, use_etf=True, class_counts=counts).encoder.fc.weight_norm.ne(1).any()
    with pytest.raises(ValueError, match="needs use_etf and class_counts"):
        build_model("ResNet18", 3, use_dr_balancer=True, class_counts=counts)
    with pytest.raises(ValueError, match="needs 3 class counts, got 2"):
        dr_balancer_scale([1, 2], 3)


# ------------------------------------------------------------------ modify_bn_weight
def _bn_weights(model, skip=()):
    return torch.cat([mod.weight.detach() for n, mod in model.named_modules()
                      if isinstance(mod, nn.BatchNorm2d) and n not in skip])


IDENTITY = {"encoder.bn1", "encoder.layer2.0.downsample.1", "encoder.layer3.0.downsample.1",
            "encoder.layer4.0.downsample.1"}


def test_bn_weight_distributions_statistics():
    torch.manual_seed(0)
    m = build_model("ResNet18", 4)  # 4,800 BN channels
    g = torch.Generator().manual_seed(1)
    reinit_bn_weights(m, "uniform", low=0.2, high=0.6, generator=g)
    w = _bn_weights(m)
    assert w.numel() == 4800
    assert w.min() >= 0.2 and w.max() <= 0.6
    assert abs(w.mean() - 0.4) < 0.01 and abs(w.std() - 0.4 / math.sqrt(12)) < 0.005
    reinit_bn_weights(m, "gauss", mean=0.5, std=0.1, generator=g)
    w = _bn_weights(m)
    assert abs(w.mean() - 0.5) < 0.005 and abs(w.std() - 0.1) < 0.005
    reinit_bn_weights(m, "rectified_gauss", mean=0.0, std=1.0, generator=g)
    w = _bn_weights(m)
    assert w.min() == 0.0 and abs((w == 0).float().mean() - 0.5) < 0.03
    assert abs(w.mean() - 1 / math.sqrt(2 * math.pi)) < 0.03  # mean of max(0, N(0,1))
    assert all(mod.bias.eq(0).all() for mod in m.modules() if isinstance(mod, nn.BatchNorm2d))


def test_bn_weight_init_skips_identity_bns_unless_asked():
    m = build_model("ResNet18", 4)
    groups = m.named_parameter_groups()
    identity = {n.rsplit(".", 1)[0] for n, _ in groups["identity_bn"]}
    assert identity == IDENTITY
    changed = reinit_bn_weights(m, "gauss", mean=3.0, std=0.0, include_identity=False, identity_bn_names=identity)
    assert len(changed) == 16 and not IDENTITY & set(changed)
    assert _bn_weights(m, skip=IDENTITY).eq(3.0).all()
    for name in IDENTITY:
        assert m.get_submodule(name).weight.eq(1.0).all()


def test_bn_weight_init_pretrained_from_a_run(tmp_path):
    source = build_model("ResNet18", 4)
    with torch.no_grad():
        for mod in source.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.0, 1.0)
    (tmp_path / "run/7").mkdir(parents=True)
    torch.save(source.state_dict(), tmp_path / "run/7/best.paramOnly")
    cfg = from_dict({"seeds": 7, "model": {
        "name": "ResNet18", "modify_bn_weight": True, "bn_weight_init_distribution": "pretrained",
        "pretrained_gamma": 2.0, "pretrained_beta": 0.5, "init_identity_bn": False,
        "pretrained_path": str(tmp_path / "run")}})
    m = build_model("ResNet18", 4)
    assert len(apply_bn_weight_init(m, cfg.model, cfg.seeds)) == 20  # every BN, identity ones too (as the original)
    torch.testing.assert_close(_bn_weights(m), 2.0 * _bn_weights(source) + 0.5)
    other = build_model("ResNet18", 4, one_param_bn=True)
    with pytest.raises(Stage1Error, match=r"'encoder.bn1.weight' has shape \(64,\) in the pretrained state dict "
                                          r"but \(1,\) in this model"):
        apply_bn_weight_init(other, cfg.model, cfg.seeds)
    cfg.seeds = 8
    with pytest.raises(Stage1Error, match="run/8/best.paramOnly is missing"):
        apply_bn_weight_init(m, cfg.model, cfg.seeds)


@pytest.mark.parametrize("model, message", [
    ({"modify_bn_weight": True}, "model.modify_bn_weight = true needs model.bn_weight_init_distribution"),
    ({"modify_bn_weight": True, "bn_weight_init_distribution": "uniform", "bn_weight_init_min": 0.1},
     "model.bn_weight_init_distribution = 'uniform' needs model.bn_weight_init_max"),
    ({"modify_bn_weight": True, "bn_weight_init_distribution": "uniform", "bn_weight_init_min": 2,
      "bn_weight_init_max": 1}, "model.bn_weight_init_min = 2.0 is above model.bn_weight_init_max = 1.0"),
    ({"modify_bn_weight": True, "bn_weight_init_distribution": "gauss", "bn_weight_init_mean": 1.0},
     "'gauss' needs model.bn_weight_init_std"),
    ({"modify_bn_weight": True, "bn_weight_init_distribution": "rectified_gauss", "bn_weight_init_mean": 1.0,
      "bn_weight_init_std": -1}, "model.bn_weight_init_std = -1.0 must be >= 0"),
    ({"modify_bn_weight": True, "bn_weight_init_distribution": "pretrained", "pretrained_gamma": 1.0,
      "pretrained_beta": 0.0}, "model.pretrained_path is empty"),
    ({"use_dr_balancer": True}, "model.use_dr_balancer = true scales the ETF classifier's norms; set model.use_etf"),
    ({"name": "ResNeXt50", "one_param_bn": True}, "model.one_param_bn = true is built for ResNet34, ResNet18, "
                                                  "IMResNet34, IMResNet18, ResNet32 (basic blocks), not ResNeXt50"),
    ({"use_bn": False}, "model.use_bn = false does not apply to ResNet34: the original's ResNets support only true"),
    ({"add_skip": True}, "model.add_skip = true does not apply to ResNet34"),
    ({"activation_type": "tanh"}, "model.activation_type = 'tanh' is not allowed; choose one of: relu, lrelu"),
])
def test_model_option_rules(model, message):
    with pytest.raises(ConfigError) as err:
        from_dict({"model": model})
    assert message in str(err.value)


# ------------------------------------------------------------------ backbones
def test_imresnet_stem_and_keys():
    for name, tv in (("IMResNet18", torchvision.models.resnet18), ("IMResNet34", torchvision.models.resnet34)):
        m = build_model(name, 6)
        assert not m.small_input
        assert set(m.state_dict()) == _keys(tv())
        assert m.encoder.conv1.kernel_size == (7, 7) and m.encoder.conv1.stride == (2, 2)
        assert m.feature_dim == 512
    m = build_model("IMResNet18", 6, in_channels=1).eval()
    seen = []
    m.encoder.layer1.register_forward_hook(lambda mod, i, o: seen.append(tuple(o.shape)))
    with torch.no_grad():
        assert m.features(_x(1, 1, 32)).shape == (1, 512)
    assert seen == [(1, 64, 8, 8)]  # 32 -> conv stride 2 -> 16 -> max-pool stride 2 -> 8
    cifar = build_model("ResNet18", 6).eval()
    cifar.encoder.layer1.register_forward_hook(lambda mod, i, o: seen.append(tuple(o.shape)))
    with torch.no_grad():
        cifar.features(_x(1, 3, 32))
    assert seen[-1] == (1, 64, 32, 32)


def test_resnext50_keys_and_feature_dim():
    torch.manual_seed(0)
    m = build_model("ResNeXt50", 10, use_etf=True, activation_type="elu").eval()
    sd = m.state_dict()
    tv = torchvision.models.resnext50_32x4d()
    assert {k for k in sd if not k.startswith("encoder.fc.")} == {k for k in _keys(tv) if not k.startswith("encoder.fc.")}
    assert sd["encoder.fc.weight_vec"].shape == (10, 2048) and m.feature_dim == 2048
    assert sd["encoder.conv1.weight"].shape == (64, 3, 3, 3)
    assert sd["encoder.layer1.0.conv2.weight"].shape == (128, 4, 3, 3)  # 32 groups of width 4
    assert isinstance(m.encoder.layer3[2].relu, nn.ELU)
    with torch.no_grad():
        h = m.features(_x(1, 3, 8))
    assert h.shape == (1, 2048)
    lin = build_model("ResNeXt50", 10)
    assert lin.state_dict()["encoder.fc.weight"].shape == (10, 2048)


# ------------------------------------------------------------------ stage-2 loading
def test_load_into_shapes_and_ignore_restrict_load(tmp_path):
    m = build_model("ResNet18", 4)
    state = dict(build_model("ResNet18", 4).state_dict())
    state["encoder.bn1.weight"] = torch.ones(1)
    state["extra"] = torch.zeros(2)
    del state["encoder.layer1.0.conv1.weight"]
    with pytest.raises(Stage1Error, match=r"1 tensors have another shape \(e.g. encoder.bn1.weight: \(1,\) in the "
                                          r"file, \(64,\) in the model\)"):
        load_into(m, state, strict=True, source=tmp_path / "x")
    before = m.encoder.layer1[0].conv1.weight.clone()
    skipped = load_into(m, state, strict=True, source=tmp_path / "x", ignore_restrict_load=True)
    assert skipped == ["encoder.bn1.weight", "encoder.layer1.0.conv1.weight", "extra"]
    assert torch.equal(m.encoder.layer1[0].conv1.weight, before)
    torch.testing.assert_close(m.encoder.layer2[0].conv1.weight, state["encoder.layer2.0.conv1.weight"])


def _fake_data(name="Digits", channels=1, counts=(40, 20, 10, 5)):
    from types import SimpleNamespace
    return SimpleNamespace(name=name, n_classes=len(counts), class_counts=list(counts),
                           train_images=torch.zeros(2, channels, 8, 8, dtype=torch.uint8), in_channels=channels)


def test_make_model_passes_every_option_from_the_config():
    from utils.engine.params import trained_parameters
    from utils.run.prepare import make_model
    cfg = from_dict({"data": {"name": "Digits", "n_classes": 4}, "model": {
        "name": "ResNet18", "use_etf": True, "use_dr_balancer": True, "etf_norm_rate": 2.0, "bn_eps": 1e-4,
        "activation_type": "selu", "one_param_bn": True, "normalize_feature": True, "last_relu": True,
        "use_feature_bias": True, "logit_normalization": True, "modify_bn_weight": True,
        "bn_weight_init_distribution": "gauss", "bn_weight_init_mean": 0.25, "bn_weight_init_std": 0.0,
        "init_identity_bn": False}})
    m = make_model(cfg.model, _fake_data())
    assert m.small_input and m.encoder.conv1.weight.shape == (64, 1, 3, 3)
    assert all(mod.eps == 1e-4 for mod in m.modules() if isinstance(mod, nn.BatchNorm2d))
    assert isinstance(m.encoder.relu, nn.SELU) and isinstance(m.encoder.layer4[1].relu, nn.SELU)
    assert isinstance(m.encoder.layer1[0].bn2, OneParamBN)
    assert m.normalize_feature and m.last_relu and m.logit_normalization and m.feature_bias is not None
    # N/(K n_c) = 75/(4 n_c) times the rate-2 profile [1, 5/6, 2/3, 1/2]
    torch.testing.assert_close(m.encoder.fc.weight_norm.detach(),
                               torch.tensor([[75 / 160], [75 / 80 * 5 / 6], [75 / 40 * 2 / 3], [75 / 20 * 0.5]]))
    assert m.encoder.layer2[0].bn1.weight.item() == 0.25 and m.encoder.bn1.weight.item() == 1.0
    assert m.encoder.layer2[0].downsample[1].weight.eq(1.0).all()
    # train_etf_norm decides whether the ETF norms train in stage 1
    names = {n for n, _ in trained_parameters(m, "first")}
    assert "encoder.fc.bias" in names and "encoder.fc.weight_norm" not in names
    cfg.model.train_etf_norm = True
    names = {n for n, _ in trained_parameters(make_model(cfg.model, _fake_data()), "first")}
    assert "encoder.fc.weight_norm" in names
    # the 224-pixel stem: IMResNet names, or ImageNet-sized data with any ResNet (the original's rule)
    cfg = from_dict({"data": {"name": "Digits", "n_classes": 4}, "model": {"name": "IMResNet34"}})
    assert not make_model(cfg.model, _fake_data()).small_input
    cfg = from_dict({"data": {"name": "Digits", "n_classes": 4}, "model": {"name": "ResNet18"}})
    assert make_model(cfg.model, _fake_data(name="ImageNet", channels=3)).encoder.conv1.kernel_size == (7, 7)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_digits_runs_with_model_options(in_tmp, write_json):
    """Stage 1 with many options on, then stage 2 with the loading options."""
    options = {"use_etf": True, "use_dr_balancer": True, "train_etf_norm": True, "etf_norm_rate": 2.0,
               "activation_type": "lrelu", "activation_param": 0.1, "identity_skip": True,
               "modify_bn_weight": True, "bn_weight_init_distribution": "uniform", "bn_weight_init_min": 0.5,
               "bn_weight_init_max": 0.9, "init_identity_bn": False, "bn_eps": 1e-3,
               "use_feature_bias": True, "last_relu": True}
    # 2 epochs: with the cosine schedule stepped first, a 1-epoch run trains at lr 0
    first = write_json("first.json", digits_config("opts", epochs=2, model=options,
                                                   optim={"weight_decay": 5e-3, "fdr_every": 0}))
    assert main("first", ["--json_path", first]) == 0
    run = in_tmp / EXP / "first/opts/0"
    acc = json.loads((run / "acc.json").read_text())
    assert set(acc) == {"All", "Many", "Medium", "Few"} and 0 <= acc["All"] <= 1
    args = json.loads((run / "args.json").read_text())["model"]
    assert {k: args[k] for k in options} == options
    state = torch.load(run / "best.paramOnly", weights_only=True)
    assert state["encoder.layer2.0.bn1.weight"].shape == (64,) and "feature_bias" in state
    assert state["encoder.conv1.weight"].shape == (64, 1, 3, 3)
    # train_etf_norm: the DR-balanced norms (counts 100 .. 5) moved during the epoch
    counts = torch.tensor([100, 72, 51, 37, 26, 19, 14, 10, 7, 5], dtype=torch.float32)
    init = etf_norm_profile(10, 2.0) * (counts.sum() / (10 * counts))[:, None]
    assert not torch.allclose(state["encoder.fc.weight_norm"], init)
    assert torch.allclose(state["encoder.fc.weight_norm"], init, atol=0.2)

    # stage 2 keeps the backbone and drops the classifier
    base = {"is_pretrained": True, "pretrained_path": str(EXP / "first/opts"), "activation_type": "lrelu",
            "activation_param": 0.1, "identity_skip": True, "use_feature_bias": True, "last_relu": True,
            "bn_eps": 1e-3}
    from utils.run.pipeline import prepare
    for exp, extra in (("rep", {"load_only_representation": True}), ("nolast", {"load_last_linear": False})):
        second = digits_config(exp, "second", epochs=0, model={**base, **extra})
        if exp == "rep":  # the whole second.py run once; the other option through the same loading step
            assert main("second", ["--json_path", write_json(f"{exp}.json", second)]) == 0
            assert (in_tmp / EXP / f"second/{exp}/0/acc.json").is_file()
            state2 = torch.load(in_tmp / EXP / f"second/{exp}/0/best.paramOnly", weights_only=True)
        else:
            state2 = prepare(from_dict(second), "second").model.state_dict()
        for key, value in state.items():
            if not key.startswith("encoder.fc."):
                assert torch.equal(value, state2[key]), key
        w = state2["encoder.fc.weight"]  # a fresh Linear head: torchvision's init, bound 1/sqrt(512)
        assert w.shape == (10, 512) and w.abs().max() <= 1 / math.sqrt(512)
        assert not torch.allclose(w, state["encoder.fc.weight_vec"] * state["encoder.fc.weight_norm"], atol=1e-3)


def test_stage2_architecture_and_restrict_load(in_tmp, write_json, capsys):
    run = in_tmp / EXP / "first/fb/0"  # a stage-1 run written by hand (no training needed)
    run.mkdir(parents=True)
    s1_cfg = digits_config("fb", epochs=0, model={"use_feature_bias": True, "activation_type": "elu"})
    (run / "args.json").write_text(json.dumps(from_dict(s1_cfg).to_dict()))
    s1 = build_model("ResNet18", 10, in_channels=1, use_feature_bias=True, activation_type="elu").state_dict()
    torch.save(s1, run / "best.paramOnly")
    (run / "acc.json").write_text('{"All": 0, "Many": 0, "Medium": 0, "Few": 0}')  # finished, as the original's runs
    base = {"is_pretrained": True, "pretrained_path": str(EXP / "first/fb")}
    second = write_json("s2.json", digits_config("s2", "second", epochs=0, model=base))
    assert main("second", ["--json_path", second]) == 2
    assert "used model.activation_type = 'elu', but this run has 'relu'" in capsys.readouterr().err
    assert main("second", ["--json_path", second, "--model_activation_type", "elu"]) == 2
    assert "unexpected 1 keys (e.g. feature_bias)" in capsys.readouterr().err
    assert main("second", ["--json_path", second, "--model_activation_type", "elu",
                           "--model_ignore_restrict_load", "true"]) == 0
    log = (in_tmp / EXP / "second/s2/0/train.log").read_text()
    assert "ignore_restrict_load: 1 keys not loaded: feature_bias" in log
    s2 = torch.load(in_tmp / EXP / "second/s2/0/best.paramOnly", weights_only=True)
    assert torch.equal(s2["encoder.layer3.1.conv2.weight"], s1["encoder.layer3.1.conv2.weight"])


def test_digits_imresnet_one_param_bn_and_pretrained_bn_init(in_tmp, write_json):
    first = write_json("a.json", digits_config(
        "a", epochs=1, model={"name": "IMResNet18", "one_param_bn": True, "activation_type": "mrelu",
                              "normalize_feature": True, "logit_normalization": True}))
    assert main("first", ["--json_path", first]) == 0
    run = in_tmp / "exp/Digits/IMResNet18/first/a/0"
    assert json.loads((run / "acc.json").read_text())["All"] >= 0
    state = torch.load(run / "best.paramOnly", weights_only=True)
    assert state["encoder.conv1.weight"].shape == (64, 1, 7, 7)
    assert state["encoder.layer1.0.bn1.weight"].shape == (1,)
    assert state["encoder.layer2.0.downsample.1.weight"].shape == (128,)
    # stage 1 again, BN scales initialised from run "a": w = 2 w_a + 0.5 (0 epochs: the initial model is saved)
    second = write_json("b.json", digits_config(
        "b", epochs=0, model={"name": "IMResNet18", "one_param_bn": True, "activation_type": "mrelu",
                              "modify_bn_weight": True, "bn_weight_init_distribution": "pretrained",
                              "pretrained_gamma": 2.0, "pretrained_beta": 0.5,
                              "pretrained_path": str(run.parent)}))
    assert main("first", ["--json_path", second]) == 0
    state_b = torch.load(in_tmp / "exp/Digits/IMResNet18/first/b/0/best.paramOnly", weights_only=True)
    for key in ("encoder.bn1.weight", "encoder.layer3.1.bn2.weight", "encoder.layer4.0.downsample.1.weight"):
        torch.testing.assert_close(state_b[key], 2.0 * state[key] + 0.5)
