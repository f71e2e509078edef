import math

import pytest
import torch
import torch.nn as nn
import torchvision

from models import (
    ETFClassifier,
    LogitAdjuster,
    LTModel,
    build_model,
    etf_state_to_linear,
    linear_state_to_etf,
)

D = 512


def _batch(n=4, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


# --------------------------------------------------------------------- keys
def test_resnet34_etf_state_dict_keys():
    torch.manual_seed(0)
    m = build_model("ResNet34", 10, use_etf=True)
    sd = m.state_dict()
    assert len(sd) == 219
    assert sd["encoder.fc.weight_vec"].shape == (10, D)
    assert sd["encoder.fc.weight_norm"].shape == (10, 1)
    assert sd["encoder.fc.bias"].shape == (10,)
    assert "encoder.fc.weight" not in sd
    ref = {"encoder." + k for k in torchvision.models.resnet34().state_dict()
           if not k.startswith("fc.")}
    backbone = {k for k in sd if not k.startswith("encoder.fc.")}
    assert backbone == ref
    assert sd["encoder.conv1.weight"].shape == (64, 3, 3, 3)
    assert not any("log_prior" in k for k in sd)


def test_resnet34_linear_state_dict_keys():
    m = build_model("ResNet34", 10)
    sd = m.state_dict()
    assert len(sd) == 218
    assert sd["encoder.fc.weight"].shape == (10, D)
    assert sd["encoder.fc.bias"].shape == (10,)
    ref = {"encoder." + k for k in torchvision.models.resnet34().state_dict()}
    assert set(sd) == ref


def test_no_la_buffer_in_state_dict_and_feature_bias_key():
    m = build_model("ResNet18", 3, class_counts=[5, 3, 1], la_tau=1.0,
                    use_feature_bias=True)
    sd = m.state_dict()
    assert not any("log_prior" in k for k in sd)
    assert "feature_bias" in sd and sd["feature_bias"].shape == (1, D)
    ref = {"encoder." + k for k in torchvision.models.resnet18().state_dict()}
    assert set(sd) == ref | {"feature_bias"}
    assert m.logit_adjuster.log_prior.shape == (1, 3)


def test_large_input_variant_and_in_channels():
    m = build_model("ResNet18", 5, small_input=False)
    assert m.encoder.conv1.weight.shape == (64, 3, 7, 7)
    assert m.encoder.conv1.stride == (2, 2)
    m.eval()
    assert m(_batch(2, 32)).shape == (2, 5)
    m1 = build_model("ResNet18", 5, in_channels=1)
    assert m1.encoder.conv1.weight.shape == (64, 1, 3, 3)
    m2 = build_model("ResNet18", 5, in_channels=1, small_input=False)
    assert m2.encoder.conv1.weight.shape == (64, 1, 7, 7)


def test_unsupported_name():
    with pytest.raises(ValueError, match=r"model.name 'ResNet101' is not supported; "
                                         r"choose one of ResNet18, ResNet34, IMResNet18, IMResNet34, ResNeXt50, "
                                         r"ResNet50, ResNet152, ResNet32$"):
        build_model("ResNet101", 10)


def test_bn_eps():
    m = build_model("ResNet18", 10, bn_eps=1e-3)
    bns = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)]
    assert len(bns) == 20  # stem + 8 blocks x 2 + 3 downsample BNs
    assert all(b.eps == 1e-3 for b in bns)


def test_forward_shapes_small_inputs():
    m = build_model("ResNet18", 7).eval()
    for s in (8, 16):
        x = _batch(3, s)
        h = m.features(x)
        assert h.shape == (3, D)
        assert m(x).shape == (3, 7)
        torch.testing.assert_close(m(x), m.classify(h))


# --------------------------------------------------------------------- ETF
def test_etf_geometry():
    g = torch.Generator().manual_seed(1)
    etf = ETFClassifier(D, 10, generator=g)
    w = etf.weight_vec
    assert w.shape == (10, D)
    torch.testing.assert_close(w.norm(dim=1), torch.ones(10), atol=1e-5, rtol=0)
    cos = w @ w.t()
    off = cos[~torch.eye(10, dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, -1.0 / 9), atol=1e-5, rtol=0)
    torch.testing.assert_close(etf.weight_norm, torch.ones(10, 1))
    torch.testing.assert_close(etf.weight(), w)


def test_etf_buffers_and_params():
    etf = ETFClassifier(D, 10)
    names = dict(etf.named_parameters())
    assert "weight_vec" not in names
    assert "weight_vec" in dict(etf.named_buffers())
    assert "weight_vec" in etf.state_dict()
    assert not etf.weight_norm.requires_grad
    assert etf.bias.requires_grad
    etf2 = ETFClassifier(D, 10, train_norm=True)
    assert etf2.weight_norm.requires_grad
    # bias init range
    assert etf.bias.abs().max().item() < 1.0 / D


def test_etf_norm_profile():
    etf = ETFClassifier(D, 5, norm_rate=4.0)
    expected = torch.tensor([1.0, 13 / 16, 10 / 16, 7 / 16, 4 / 16]).unsqueeze(1)
    torch.testing.assert_close(etf.weight_norm.data, expected)
    torch.testing.assert_close(etf.weight().norm(dim=1, keepdim=True), expected,
                               atol=1e-5, rtol=0)


def test_etf_seeded():
    a = ETFClassifier(D, 10, generator=torch.Generator().manual_seed(3))
    b = ETFClassifier(D, 10, generator=torch.Generator().manual_seed(3))
    c = ETFClassifier(D, 10, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.weight_vec, b.weight_vec)
    assert torch.equal(a.bias, b.bias)
    assert not torch.allclose(a.weight_vec, c.weight_vec)
    m1 = build_model("ResNet18", 10, use_etf=True, generator=torch.Generator().manual_seed(5))
    m2 = build_model("ResNet18", 10, use_etf=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(m1.encoder.fc.weight_vec, m2.encoder.fc.weight_vec)
    assert torch.equal(m1.encoder.fc.bias, m2.encoder.fc.bias)


def test_etf_forward_matches_formula():
    etf = ETFClassifier(D, 6, norm_rate=2.0)
    h = torch.randn(4, D)
    ref = h @ (etf.weight_vec * etf.weight_norm).t() + etf.bias
    torch.testing.assert_close(etf(h), ref)


def test_etf_invalid():
    with pytest.raises(ValueError):
        ETFClassifier(4, 8)
    with pytest.raises(ValueError):
        ETFClassifier(D, 1)


# --------------------------------------------------------------------- conversion
def test_etf_to_linear_conversion():
    torch.manual_seed(0)
    etf_m = build_model("ResNet18", 10, use_etf=True, etf_norm_rate=3.0).eval()
    lin_m = build_model("ResNet18", 10).eval()
    sd = etf_m.state_dict()
    keys_before = list(sd)
    new = etf_state_to_linear(sd, prefix="encoder.fc.")
    assert list(sd) == keys_before  # input untouched
    assert "encoder.fc.weight_vec" not in new and "encoder.fc.weight_norm" not in new
    assert new["encoder.fc.weight"].shape == (10, D)
    lin_m.load_state_dict(new)
    x = _batch(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(lin_m(x), etf_m(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(lin_m.classifier_weight(), etf_m.classifier_weight())


def test_linear_to_etf_round_trip():
    torch.manual_seed(1)
    lin_m = build_model("ResNet18", 10).eval()
    etf_m = build_model("ResNet18", 10, use_etf=True).eval()
    sd = lin_m.state_dict()
    new = linear_state_to_etf(sd)
    assert "encoder.fc.weight" in sd and "encoder.fc.weight" not in new
    assert new["encoder.fc.weight_norm"].shape == (10, 1)
    torch.testing.assert_close(new["encoder.fc.weight_vec"].norm(dim=1), torch.ones(10))
    etf_m.load_state_dict(new)
    x = _batch(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(etf_m(x), lin_m(x), atol=1e-5, rtol=0)
    back = etf_state_to_linear(etf_m.state_dict())
    torch.testing.assert_close(back["encoder.fc.weight"], sd["encoder.fc.weight"],
                               atol=1e-6, rtol=0)
    assert set(back) == set(sd)


def test_conversion_custom_prefix():
    etf = ETFClassifier(16, 4, norm_rate=2.0)
    new = etf_state_to_linear(etf.state_dict(), prefix="")
    assert set(new) == {"weight", "bias"}
    lin = nn.Linear(16, 4)
    lin.load_state_dict(new)
    h = torch.randn(3, 16)
    torch.testing.assert_close(lin(h), etf(h))
    with pytest.raises(KeyError):
        etf_state_to_linear(lin.state_dict(), prefix="")


# --------------------------------------------------------------------- logit adjustment
def test_logit_adjuster_additive_eval():
    la = LogitAdjuster(1.0, [3, 1], for_training=False, additive=True).eval()
    z = torch.tensor([[1.0, 2.0]])
    exp = torch.tensor([[1 - math.log(0.75), 2 - math.log(0.25)]])
    torch.testing.assert_close(la(z), exp)
    assert la.log_prior.shape == (1, 2) and la.log_prior.dtype == torch.float32
    # training mode, not for_training: unchanged
    la.train()
    torch.testing.assert_close(la(z), z)


def test_logit_adjuster_for_training():
    la = LogitAdjuster(1.0, [3, 1], for_training=True, additive=True).train()
    z = torch.tensor([[1.0, 2.0]])
    exp = torch.tensor([[1 + math.log(0.75), 2 + math.log(0.25)]])
    torch.testing.assert_close(la(z), exp)
    la.eval()
    torch.testing.assert_close(la(z), z)
    la2 = LogitAdjuster(2.0, [3, 1], for_training=True).train()
    torch.testing.assert_close(
        la2(z), torch.tensor([[1 + 2 * math.log(0.75), 2 + 2 * math.log(0.25)]]))


def test_logit_adjuster_multiplicative():
    z = torch.tensor([[1.0, 2.0]])
    exp = torch.tensor([[1 / 0.75, 2 / 0.25]])
    for for_training in (False, True):
        la = LogitAdjuster(1.0, [3, 1], for_training=for_training, additive=False)
        la.eval()
        torch.testing.assert_close(la(z), exp)
        la.train()
        torch.testing.assert_close(la(z), exp)


def test_logit_adjuster_identity_and_errors():
    z = torch.tensor([[1.0, 2.0]])
    for la in (LogitAdjuster(0.0, [3, 1], False, True), LogitAdjuster(0.0, None, False, True),
               LogitAdjuster(-1.0, [3, 1], False, False)):
        la.eval()
        torch.testing.assert_close(la(z), z)
        la.train()
        torch.testing.assert_close(la(z), z)
    with pytest.raises(ValueError):
        LogitAdjuster(1.0, None, False, True)
    with pytest.raises(ValueError):
        build_model("ResNet18", 3, la_tau=1.0)
    with pytest.raises(ValueError):
        build_model("ResNet18", 3, la_tau=1.0, class_counts=[1, 2])


def test_model_applies_logit_adjustment():
    counts = [30, 10, 5]
    m = build_model("ResNet18", 3, class_counts=counts, la_tau=1.0).eval()
    x = _batch(2, 8)
    with torch.no_grad():
        h = m.features(x)
        raw = m.encoder.fc(h)
        prior = torch.tensor(counts, dtype=torch.float32) / sum(counts)
        torch.testing.assert_close(m(x), raw - torch.log(prior))


# --------------------------------------------------------------------- forward options
def test_normalize_feature():
    m = build_model("ResNet18", 4, normalize_feature=True).eval()
    h = m.features(_batch(3, 8))
    torch.testing.assert_close(h.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)


def test_last_relu_and_order():
    m = build_model("ResNet18", 4, last_relu=True).eval()
    with torch.no_grad():
        h = m.features(_batch(3, 8))
    assert (h >= 0).all()
    # pooled ResNet features are already >= 0, so check the ordering of the
    # options on a synthetic pooled vector with negative entries
    m = build_model("ResNet18", 4, normalize_feature=True, last_relu=True,
                    use_feature_bias=True).eval()
    raw = torch.tensor([[3.0, -4.0] + [0.0] * (D - 2)])
    m.pooled_features = lambda x: raw
    with torch.no_grad():
        m.feature_bias.fill_(-0.1)
        h = m.features(_batch(1, 8))
    expected = torch.zeros(1, D)
    expected[0, 0] = 0.6  # 3/5 after normalisation, relu keeps it
    expected = expected - 0.1  # bias added after relu (so it can go negative)
    torch.testing.assert_close(h, expected)


def test_feature_bias_shifts_features():
    m = build_model("ResNet18", 4, use_feature_bias=True).eval()
    x = _batch(2, 8)
    assert torch.equal(m.feature_bias, torch.zeros(1, D))
    with torch.no_grad():
        h0 = m.features(x)
        m.feature_bias.fill_(0.5)
        h1 = m.features(x)
    torch.testing.assert_close(h1 - h0, torch.full_like(h0, 0.5))
    m2 = build_model("ResNet18", 4)
    assert m2.feature_bias is None
    assert "feature_bias" not in m2.state_dict()


def test_logit_normalization():
    m = build_model("ResNet18", 6, logit_normalization=True, use_etf=True).eval()
    z = m(_batch(3, 8))
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)


def test_backward_train_mode():
    m = build_model("ResNet18", 5, use_etf=True, train_etf_norm=True, use_feature_bias=True)
    m.train()
    loss = nn.functional.cross_entropy(m(_batch(4, 8)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert m.encoder.fc.weight_norm.grad is not None
    assert m.feature_bias.grad is not None
    assert m.encoder.conv1.weight.grad is not None


# --------------------------------------------------------------------- parameter groups
def test_named_parameter_groups_resnet18():
    m = build_model("ResNet18", 10, use_feature_bias=True)
    g = m.named_parameter_groups()
    assert set(g) == {"conv", "bn", "identity_bn", "classifier", "feature_bias"}
    assert len(g["conv"]) == 20
    assert all(p.dim() == 4 for _, p in g["conv"])
    assert len(g["bn"]) == 2 * 20
    ids = {n for n, _ in g["identity_bn"]}
    assert ids == {
        "encoder.bn1.weight", "encoder.bn1.bias",
        "encoder.layer2.0.downsample.1.weight", "encoder.layer2.0.downsample.1.bias",
        "encoder.layer3.0.downsample.1.weight", "encoder.layer3.0.downsample.1.bias",
        "encoder.layer4.0.downsample.1.weight", "encoder.layer4.0.downsample.1.bias",
    }
    assert ids <= {n for n, _ in g["bn"]}
    assert [n for n, _ in g["classifier"]] == ["encoder.fc.weight", "encoder.fc.bias"]
    assert [n for n, _ in g["feature_bias"]] == ["feature_bias"]
    # every parameter is in exactly one of conv / bn / classifier / feature_bias
    covered = [n for k in ("conv", "bn", "classifier", "feature_bias") for n, _ in g[k]]
    assert sorted(covered) == sorted(n for n, _ in m.named_parameters())
    named = dict(m.named_parameters())
    assert all(named[n] is p for k in g for n, p in g[k])
    assert len(g["conv"]) + len(g["bn"]) == 60  # the backbone's parameters (conv and BN of the encoder)
    assert len(g["classifier"]) == 2


def test_named_parameter_groups_etf():
    m = build_model("ResNet18", 10, use_etf=True, train_etf_norm=False)
    g = m.named_parameter_groups()
    assert [n for n, _ in g["classifier"]] == ["encoder.fc.bias"]
    assert g["feature_bias"] == []
    m2 = build_model("ResNet18", 10, use_etf=True, train_etf_norm=True)
    g2 = m2.named_parameter_groups()
    assert {n for n, _ in g2["classifier"]} == {"encoder.fc.weight_norm", "encoder.fc.bias"}
    classifier = [p for _, p in g2["classifier"]]
    assert classifier[0] is m2.encoder.fc.weight_norm or classifier[1] is m2.encoder.fc.weight_norm


def test_classifier_helpers():
    m = build_model("ResNet18", 10, use_etf=True, etf_norm_rate=2.0)
    assert m.classifier is m.encoder.fc
    assert isinstance(m, LTModel)
    w = m.classifier_weight()
    assert w.shape == (10, D) and not w.requires_grad
    torch.testing.assert_close(w, m.encoder.fc.weight_vec * m.encoder.fc.weight_norm.detach())
    lin = build_model("ResNet18", 10)
    torch.testing.assert_close(lin.classifier_weight(), lin.encoder.fc.weight.detach())
