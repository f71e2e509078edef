import math

import pytest
import torch

from utils.engine.losses import class_balanced_softmax, class_balanced_weights, cross_entropy


def test_class_balanced_weights_hand_computed():
    counts = [3, 1]
    beta = 0.5
    raw = [(1 - beta) / (1 - beta ** 3), (1 - beta) / (1 - beta ** 1)]  # 4/7, 1
    expected = [r / sum(raw) * 2 for r in raw]                           # 8/11, 14/11
    assert class_balanced_weights(counts, beta).tolist() == pytest.approx(expected)
    assert expected == pytest.approx([8 / 11, 14 / 11])


def test_class_balanced_weights_beta_one_is_inverse_frequency():
    w = class_balanced_weights([4, 1], 1.0)
    assert w.tolist() == pytest.approx([0.4, 1.6])  # (1/4, 1) rescaled to sum 2


def test_class_balanced_softmax_hand_computed():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1])
    weights = torch.tensor([0.5, 1.5])
    ce0 = -math.log(math.exp(2) / (math.exp(2) + 1))
    ce1 = math.log(2)
    expected = (0.5 * ce0 + 1.5 * ce1) / 2
    assert float(class_balanced_softmax(logits, labels, weights)) == pytest.approx(expected, rel=1e-6)
    assert float(cross_entropy(logits, labels)) == pytest.approx((ce0 + ce1) / 2, rel=1e-6)


# ---------------------------------------------------------------------------
# Every loss on a small fixed batch against numbers worked out by hand
# (plain math on the same inputs, never a second call of the code under test).
# ---------------------------------------------------------------------------

from utils.config import from_dict  # noqa: E402
from utils.engine.losses import (class_balanced_focal, class_balanced_sigmoid, dot_regression,  # noqa: E402
                          nc_terms, sigmoid_bias_init)
from utils.engine.objective import make_objective  # noqa: E402

# Two samples, K = 3: sample 0 of class 0, sample 1 of class 2.
LOGITS = [[2.0, 0.0, -1.0], [0.5, 1.0, -0.5]]
LABELS = [0, 2]
COUNTS = [4, 2, 1]


def _bce(z, y):
    """-y log sigma(z) - (1-y) log(1 - sigma(z)) by hand."""
    s = 1 / (1 + math.exp(-z))
    return -(y * math.log(s) + (1 - y) * math.log(1 - s))


def _ce(row, y):
    return -math.log(math.exp(row[y]) / sum(math.exp(v) for v in row))


def _cfg(**optim):
    return from_dict({"data": {"n_classes": 3}, "optim": optim})


def _terms(cfg, features=None, classifier=None, epoch=None):
    obj = make_objective(cfg.optim, COUNTS, [], torch.device("cpu"), classifier=classifier)
    if epoch is not None:
        obj.set_epoch(epoch)
    h = features if features is not None else torch.zeros(2, 2)
    return {k: float(v) for k, v in obj(torch.tensor(LOGITS), torch.tensor(LABELS), h).items()}


def _inverse_frequency_weights():
    raw = [1 / 4, 1 / 2, 1 / 1]                          # 1/n_c
    return [r / sum(raw) * 3 for r in raw]               # 3/7, 6/7, 12/7


def test_ce_objective_hand_computed():
    expected = (_ce(LOGITS[0], 0) + _ce(LOGITS[1], 2)) / 2
    assert _terms(_cfg(loss_type="CE")) == {"ce": pytest.approx(expected, rel=1e-6)}


def test_cb_softmax_objective_hand_computed():
    w = _inverse_frequency_weights()
    expected = (w[0] * _ce(LOGITS[0], 0) + w[2] * _ce(LOGITS[1], 2)) / 2
    assert _terms(_cfg(loss_type="CB", cb_type="softmax", cb_beta=1.0)) == {"cb": pytest.approx(expected, rel=1e-6)}


def test_cb_sigmoid_hand_computed():
    w = _inverse_frequency_weights()
    s0 = _bce(2.0, 1) + _bce(0.0, 0) + _bce(-1.0, 0)     # summed over classes, one-hot target
    s1 = _bce(0.5, 0) + _bce(1.0, 0) + _bce(-0.5, 1)
    expected = (w[0] * s0 + w[2] * s1) / 2
    assert _terms(_cfg(loss_type="CB", cb_type="sigmoid", cb_beta=1.0)) == {
        "cb_sigmoid": pytest.approx(expected, rel=1e-6)}
    # by hand: s0 = 0.126928 + 0.693147 + 0.313262, s1 = 0.974077 + 1.313262 + 0.974077; w = 3/7, 12/7
    assert expected == pytest.approx((3 / 7 * 1.133337 + 12 / 7 * 3.261416) / 2, abs=1e-5)


def _focal_row(row, y, gamma):
    total = 0.0
    for c, z in enumerate(row):
        p = 1 / (1 + math.exp(-z))
        p_t = p if c == y else 1 - p
        total += (1 - p_t) ** gamma * _bce(z, 1 if c == y else 0)
    return total


def test_cb_focal_hand_computed():
    w = _inverse_frequency_weights()
    expected = (w[0] * _focal_row(LOGITS[0], 0, 2.0) + w[2] * _focal_row(LOGITS[1], 2, 2.0)) / 2
    got = _terms(_cfg(loss_type="CB", cb_type="focal", cb_beta=1.0, cb_gamma=2.0))
    assert got == {"cb_focal": pytest.approx(expected, rel=1e-6)}


def test_fl_is_focal_with_unit_weights_hand_computed():
    expected = (_focal_row(LOGITS[0], 0, 1.5) + _focal_row(LOGITS[1], 2, 1.5)) / 2
    assert _terms(_cfg(loss_type="FL", cb_gamma=1.5)) == {"focal": pytest.approx(expected, rel=1e-6)}
    # gamma = 0: plain sigmoid BCE summed over classes
    bce = (sum(_bce(z, int(c == 0)) for c, z in enumerate(LOGITS[0]))
           + sum(_bce(z, int(c == 2)) for c, z in enumerate(LOGITS[1]))) / 2
    assert _terms(_cfg(loss_type="FL", cb_gamma=0.0)) == {"focal": pytest.approx(bce, rel=1e-6)}


def test_focal_stable_form_has_no_overflow_at_large_logits():
    logits = torch.tensor([[200.0, -200.0]], requires_grad=True)
    loss = class_balanced_focal(logits, torch.tensor([1]), torch.ones(2), 2.0)
    loss.backward()
    # both classes are confidently wrong: BCE ~ 200 each, modulator ~ 1 -> ~400
    assert float(loss.detach()) == pytest.approx(400.0, rel=1e-4)
    assert torch.isfinite(logits.grad).all()
    right = class_balanced_focal(torch.tensor([[-200.0, 200.0]]), torch.tensor([1]), torch.ones(2), 2.0)
    assert float(right) == 0.0


def _dr_setup():
    lin = torch.nn.Linear(2, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]]))  # norms 5, 1, 2
        lin.bias.zero_()
    h = torch.tensor([[0.6, 0.8], [0.0, 3.0]])                                 # norms 1, 3
    return lin, h


def test_dr_hand_computed():
    lin, h = _dr_setup()
    # sample 0: z_0 = 2.0, p = 1 * 5 = 5 -> (2-5)^2 / 10 = 0.9
    # sample 1: z_2 = -0.5, p = 3 * 2 = 6 -> (-0.5-6)^2 / 12 = 42.25 / 12
    expected = (0.9 + 42.25 / 12) / 2
    assert _terms(_cfg(loss_type="DR"), features=h, classifier=lin) == {"dr": pytest.approx(expected, rel=1e-6)}
    w = _inverse_frequency_weights()
    got = _terms(_cfg(loss_type="CB", cb_type="dr", cb_beta=1.0), features=h, classifier=lin)
    assert got == {"cb_dr": pytest.approx((w[0] * 0.9 + w[2] * 42.25 / 12) / 2, rel=1e-6)}


def test_dr_treats_p_as_a_constant():
    lin, h = _dr_setup()
    z = torch.tensor(LOGITS, requires_grad=True)
    hh = h.clone().requires_grad_(True)
    dot_regression(z, torch.tensor(LABELS), hh, lin.weight).backward()
    # d/dz_y of (z_y - p)^2 / (2p) / B = (z_y - p) / p / 2
    assert z.grad[0].tolist() == pytest.approx([(2 - 5) / 5 / 2, 0, 0])
    assert z.grad[1].tolist() == pytest.approx([0, 0, (-0.5 - 6) / 6 / 2])
    assert hh.grad is None or float(hh.grad.abs().sum()) == 0.0  # no gradient through p


def test_dr_with_etf_uses_directions_times_norms():
    from models.classifiers import ETFClassifier
    torch.manual_seed(0)
    etf = ETFClassifier(4, 3, norm_rate=2.0)  # norms 1, 0.75, 0.5
    h = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    # p = ||h|| * ||w_y||: sample 0 -> 1 * 1, sample 1 -> 2 * 0.5
    expected = ((2.0 - 1.0) ** 2 / 2 + (-0.5 - 1.0) ** 2 / 2) / 2
    got = dot_regression(torch.tensor(LOGITS), torch.tensor(LABELS), h, etf.weight())
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_nc_hand_computed():
    # classes 0 (two samples), 1 (one sample); means mu_0 = (1, 1), mu_1 = (0, 3)
    labels = torch.tensor([0, 0, 1])
    h = torch.tensor([[2.0, 1.0], [0.0, 1.0], [0.0, 3.0]])
    within, angle = nc_terms(labels, h, 2)
    # ||h - mu||^2 / m: (1 + 1) / 2 for class 0, 0 for class 1
    assert float(within) == pytest.approx(1.0)
    # cos(mu_0, mu_1) = 3 / (sqrt 2 * 3) = 1/sqrt 2; both classes' nearest other is each other
    assert float(angle) == pytest.approx(math.acos(1 / math.sqrt(2) - 0.01), rel=1e-5)
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    cfg = from_dict({"data": {"n_classes": 2}, "optim": {"loss_type": "NC", "nc_lambda1": 0.5, "nc_lambda2": 0.25}})
    terms = make_objective(cfg.optim, [2, 1], [], torch.device("cpu"))(logits, labels, h)
    ce = (_ce([1.0, 0.0], 0) + _ce([0.0, 1.0], 0) + _ce([0.5, 0.5], 1)) / 3
    assert float(terms["ce"]) == pytest.approx(ce, rel=1e-6)
    assert float(terms["nc_within"]) == pytest.approx(0.5 * 1.0)
    assert float(terms["nc_angle"]) == pytest.approx(-0.25 * math.acos(1 / math.sqrt(2) - 0.01), rel=1e-5)


def test_nc_angle_is_the_smallest_to_another_class_and_zero_with_one_class():
    # three class means along angles 0, 30 and 120 degrees (unit length)
    deg = [0.0, 30.0, 120.0]
    h = torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in deg])
    _, angle = nc_terms(torch.tensor([0, 1, 2]), h, 3)
    def a(d):
        return math.acos(math.cos(math.radians(d)) - 0.01)
    assert float(angle) == pytest.approx((a(30) + a(30) + a(90)) / 3, rel=1e-5)
    within, angle = nc_terms(torch.tensor([1, 1]), torch.tensor([[1.0, 0.0], [3.0, 0.0]]), 4)
    assert float(within) == pytest.approx((1 + 1) / 2) and float(angle) == 0.0


def _nc_terms_with_masks(labels, features):
    """The NC terms as first written: classes found by reading the batch back (host syncs on
    CUDA: int(labels.max()), bincount, a boolean mask), kept as the reference."""
    h = features.float()
    k = int(labels.max()) + 1
    counts = torch.bincount(labels, minlength=k).to(h.dtype)
    means = torch.zeros(k, h.shape[1]).index_add(0, labels, h) / counts.clamp_min(1).unsqueeze(1)
    within = ((h - means[labels]).pow(2).sum(dim=1) / counts[labels]).sum()
    norms = means.norm(dim=1)
    present = (counts > 0) & (norms > 0)
    if int(present.sum()) < 2:
        return within, h.new_zeros(())
    unit = means[present] / norms[present].unsqueeze(1)
    angles = torch.arccos((unit @ unit.t() - 0.01).clamp(min=-1.0 + 1e-6))
    angles = angles.masked_fill(torch.eye(angles.shape[0], dtype=torch.bool), math.inf)
    return within, angles.min(dim=1).values.mean()


@pytest.mark.parametrize("batch, k, seed", [(16, 10, 0), (8, 40, 1), (64, 3, 2), (5, 100, 3)])
def test_nc_fixed_shape_terms_equal_the_masked_reference(batch, k, seed):
    """Sync-free NC terms (K known, absent classes masked): the same values and gradients as the
    masked computation, also with most classes absent from the batch and zero-mean classes."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (batch,), generator=g)
    h = torch.randn(batch, 6, generator=g)
    h[labels == labels[0]] = 0.0  # a present class whose mean is 0: excluded from the angle term
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    within, angle = nc_terms(labels, h1, k)
    ref_within, ref_angle = _nc_terms_with_masks(labels, h2)
    assert float(within) == pytest.approx(float(ref_within), rel=1e-6, abs=1e-7)
    assert float(angle) == pytest.approx(float(ref_angle), rel=1e-6, abs=1e-7)
    (within + angle).backward()
    (ref_within + ref_angle).backward()
    assert torch.allclose(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(h1.grad).all()
    # a larger K than the labels reach changes nothing
    assert torch.equal(torch.stack(nc_terms(labels, h, k)), torch.stack(nc_terms(labels, h, k + 7)))


def test_nc_one_present_class_has_zero_angle_and_finite_gradients():
    h = torch.tensor([[1.0, 2.0], [3.0, 1.0]], requires_grad=True)
    within, angle = nc_terms(torch.tensor([2, 2]), h, 5)
    assert float(angle) == 0.0
    (within + angle).backward()
    assert torch.isfinite(h.grad).all()


def test_drw_switch_falls_back_to_ce_for_the_first_drw_epochs():
    cfg = _cfg(loss_type="CB", cb_beta=1.0, drw=2)
    ce = (_ce(LOGITS[0], 0) + _ce(LOGITS[1], 2)) / 2
    w = _inverse_frequency_weights()
    cb = (w[0] * _ce(LOGITS[0], 0) + w[2] * _ce(LOGITS[1], 2)) / 2
    assert _terms(cfg, epoch=1) == {"cb": pytest.approx(ce, rel=1e-6)}
    assert _terms(cfg, epoch=2) == {"cb": pytest.approx(ce, rel=1e-6)}
    assert _terms(cfg, epoch=3) == {"cb": pytest.approx(cb, rel=1e-6)}
    assert cb != pytest.approx(ce)
    # NC keeps its logged terms (as zeros) during the warm-up
    nc = from_dict({"data": {"n_classes": 3}, "optim": {"loss_type": "NC", "nc_lambda1": 1.0, "drw": 1}})
    assert _terms(nc, features=torch.ones(2, 2), epoch=1) == {
        "ce": pytest.approx(ce, rel=1e-6), "nc_within": 0.0, "nc_angle": 0.0}


def test_sigmoid_bias_init_and_direct_functions():
    assert sigmoid_bias_init(10) == pytest.approx(-math.log(9))
    assert 1 / (1 + math.exp(-sigmoid_bias_init(10))) == pytest.approx(1 / 10)  # every class starts at 1/K
    w = torch.tensor([1.0, 2.0, 3.0])
    got = class_balanced_sigmoid(torch.tensor(LOGITS), torch.tensor(LABELS), w)
    s0 = _bce(2.0, 1) + _bce(0.0, 0) + _bce(-1.0, 0)
    s1 = _bce(0.5, 0) + _bce(1.0, 0) + _bce(-0.5, 1)
    assert float(got) == pytest.approx((1 * s0 + 3 * s1) / 2, rel=1e-6)
