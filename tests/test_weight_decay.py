"""SGD's coupled weight_decay on whole decayed tensors (utils/engine/objective.py) against the explicit
term wd * sum ||w||^2 / 2 with its autograd gradient (SPEC 6.1, the published code's way).

What must agree to float32 rounding: the logged loss (the term keeps its name and value), the
gradients (explicit term's grad = grad + wd * w) and the SGD steps with momentum, for the
fused, foreach and for-loop implementations, with the whole network decayed and with
weight_decay_target picking classifier rows (those keep an explicit term).

Tolerances (measured on this CPU, BNLeNet5, batch 6, lr 0.1, wd 0.05): the gradients agree
exactly; the coupled form rounds g + wd w once (a fused multiply-add) where autograd rounds
wd w and the sum separately, so after one step the weights differ by at most 1.5e-8 (two
float32 ulps of weights ~0.1), and after the second step, whose forward and backward carry
that difference through BatchNorm at batch 6, by at most 6e-8 (a ResNet18 in the same test:
6e-7).  We allow 1e-6.  Leaving the
decay out moves the weights by about lr * wd * |w| ~ 1e-4, far outside it (asserted, so the
comparison can fail).
"""
from __future__ import annotations

import copy

import pytest
import torch

from models import build_model
from utils.config import from_dict
from utils.engine.objective import make_objective
from utils.engine.params import decayed_parameters, make_optimizer, trained_parameters

K = 10
# the CUDA variants prove the GPU paths (fused CUDA SGD, the foreach value) where a device exists
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
GROUPS = ["Many"] * 3 + ["Medium"] * 5 + ["Few"] * 2
COUNTS = [100, 72, 51, 37, 26, 19, 14, 10, 7, 5]
WD, LR = 5e-2, 0.1
STEPS = 2


def _cfg(target=None, sgd_impl="for-loop"):
    return from_dict({"data": {"name": "Digits", "n_classes": K}, "model": {"name": "BNLeNet5"},
                      "optim": {"weight_decay": WD, "features_regularization": 1e-2, "base_lr": LR,
                                "weight_decay_target": target, "sgd_impl": sgd_impl}})


def _setup(cfg, couple_decay: bool, model):
    device = next(model.parameters()).device
    trained = trained_parameters(model, "first", cfg.optim)
    decayed = decayed_parameters(model, trained, cfg.optim, GROUPS)
    objective = make_objective(cfg.optim, COUNTS, decayed, device, classifier=model.classifier,
                               couple_decay=couple_decay)
    return objective, make_optimizer(cfg.optim, [p for _, p in trained], objective)


@pytest.fixture(params=DEVICES)
def model(request):
    torch.manual_seed(0)  # convolutions, BatchNorm, linear layers and a classifier, small enough to be quick
    return build_model("BNLeNet5", K, input_shape=(1, 16, 16)).train().to(request.param)


@pytest.fixture(autouse=True)
def plain_fp32_convolutions():
    """On a GPU: no TF32, no autotuner, deterministic kernels, so that the three runs of a
    comparison differ only by the weight decay's form."""
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        yield


def _batch(seed, device):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 1, 16, 16, generator=g).to(device), torch.randint(0, K, (6,), generator=g).to(device)


def w_device(model):
    return next(model.parameters()).device


def _loss(model, objective, x, y):
    h = model.features(x)
    terms = objective(model.classify(h), y, h)
    return sum(terms.values()), terms


@pytest.mark.parametrize("target", [None, [True, False, True]], ids=["whole-network", "classifier-rows"])
def test_loss_value_and_gradients_equal_the_explicit_term(model, target):
    cfg = _cfg(target)
    explicit_model, coupled_model = copy.deepcopy(model), copy.deepcopy(model)
    explicit, _ = _setup(cfg, False, explicit_model)
    coupled, _ = _setup(cfg, True, coupled_model)
    n_decayed = len(coupled.decayed)
    assert not explicit.coupled_decay and len(coupled.coupled_decay) == (n_decayed if target is None else n_decayed - 2)
    x, y = _batch(1, w_device(model))
    loss_e, terms_e = _loss(explicit_model, explicit, x, y)
    loss_c, terms_c = _loss(coupled_model, coupled, x, y)
    assert terms_c.keys() == terms_e.keys() and "weight_decay" in terms_c
    for name in terms_e:
        assert float(terms_c[name].detach()) == pytest.approx(float(terms_e[name].detach()), rel=1e-6), name
    assert float(loss_c.detach()) == pytest.approx(float(loss_e.detach()), rel=1e-6)
    loss_e.backward()
    loss_c.backward()
    coupled_ids = {id(p) for p in coupled.coupled_decay}
    worst = 0.0
    for (name, pe), pc in zip(explicit_model.named_parameters(), coupled_model.parameters()):
        expected = pc.grad + WD * pc.detach() if id(pc) in coupled_ids else pc.grad
        worst = max(worst, float((pe.grad - expected).abs().max()))
        assert torch.allclose(pe.grad, expected, rtol=1e-6, atol=1e-8), name
        if id(pc) in coupled_ids and bool(pc.detach().abs().max() > 0.01):  # BN biases start at 0
            # the decay gradient really is missing from the loss's own graph
            assert not torch.allclose(pe.grad, pc.grad, rtol=1e-6, atol=1e-8), name
    print(f"largest gradient difference: {worst:.3g}")
    if target is not None:  # the explicit row term: wd * w on the Many and Few rows, nothing on Medium rows
        w = coupled_model.classifier.weight
        h = coupled_model.features(x)
        (grad,) = torch.autograd.grad(coupled(coupled_model.classify(h), y, h)["weight_decay"], w)
        rows = torch.tensor([0, 1, 2, 8, 9], device=w.device)
        assert torch.allclose(grad[rows], WD * w.detach()[rows], rtol=1e-6) and not grad[3:8].any()


@pytest.mark.parametrize("sgd_impl", ["for-loop", "foreach", "fused"])
@pytest.mark.parametrize("target", [None, [True, False, True]], ids=["whole-network", "classifier-rows"])
def test_sgd_steps_with_momentum_equal_the_explicit_term(model, sgd_impl, target):
    cfg = _cfg(target, sgd_impl)
    runs = {}
    for kind in ("explicit", "coupled", "no-decay"):
        m = copy.deepcopy(model)
        objective, optimizer = _setup(cfg, kind != "explicit", m)
        if kind == "no-decay":  # what a missing coupled decay would do
            for group in optimizer.param_groups:
                group["weight_decay"] = 0.0
        for step in range(STEPS):  # the second step carries the first one's decay through momentum
            x, y = _batch(10 + step, w_device(model))
            loss, _ = _loss(m, objective, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        runs[kind] = [p.detach() for p in m.parameters()]
    worst = max(float((a - b).abs().max()) for a, b in zip(runs["explicit"], runs["coupled"]))
    print(f"{sgd_impl}: largest weight difference after two steps {worst:.3g}")
    assert worst <= 1e-6
    assert max(float((a - b).abs().max()) for a, b in zip(runs["explicit"], runs["no-decay"])) > 1e-5


def test_optimizer_groups_follow_the_objective(model):
    cfg = _cfg([True, False, True])
    objective, optimizer = _setup(cfg, True, copy.deepcopy(model))
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == WD and plain["weight_decay"] == 0.0
    assert [id(p) for p in decayed["params"]] == [id(p) for p in objective.coupled_decay]
    assert len(plain["params"]) == 2  # the classifier weight and bias: their chosen rows decay explicitly
    assert [d.name for d in objective.explicit_decay] == ["fc3.weight", "fc3.bias"]
    with pytest.raises(ValueError, match="does not train"):
        make_optimizer(cfg.optim, plain["params"], objective)
