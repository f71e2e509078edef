import copy

import pytest
import torch
from torch import nn

from models.classifiers import ETFClassifier
from utils.engine.regularizers import (MaxNorm, classifier_weight, feature_penalty, normalise_classifier,
                                foreach_penalty, weight_decay_penalty, weight_decay_penalty_value)


def _linear(rows):
    lin = nn.Linear(2, len(rows))
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(rows))
        lin.bias.fill_(5.0)
    return lin


def test_maxnorm_threshold_and_projection():
    lin = _linear([[3.0, 4.0], [0.0, 1.0], [0.0, 3.0]])  # norms 5, 1, 3
    mn = MaxNorm(lin, 0.25)
    assert mn.threshold == pytest.approx(1 + 0.25 * (5 - 1))  # 2
    with torch.no_grad():
        lin.weight[1] = torch.tensor([0.0, 10.0])  # grows after load; threshold stays fixed
    mn.project(lin)
    assert lin.weight.norm(dim=1).tolist() == pytest.approx([2.0, 2.0, 2.0])
    assert lin.weight[0].tolist() == pytest.approx([1.2, 1.6])  # direction kept
    assert lin.bias.tolist() == [5.0, 5.0, 5.0]                 # bias never projected


def test_maxnorm_leaves_rows_below_threshold():
    lin = _linear([[3.0, 4.0], [0.0, 1.0]])
    mn = MaxNorm(lin, 0.5)  # threshold 3
    mn.project(lin)
    assert lin.weight.norm(dim=1).tolist() == pytest.approx([3.0, 1.0])


def test_maxnorm_on_etf_scales_norms_only():
    torch.manual_seed(0)
    etf = ETFClassifier(8, 4, norm_rate=4.0)  # norms 1, 0.75, 0.5, 0.25
    directions = etf.weight_vec.clone()
    mn = MaxNorm(etf, 0.0)  # threshold = min norm
    mn.project(etf)
    assert classifier_weight(etf).norm(dim=1).tolist() == pytest.approx([0.25] * 4)
    assert torch.equal(etf.weight_vec, directions)


def test_l2_and_tau_normalisation():
    lin = _linear([[3.0, 4.0], [0.0, 2.0]])
    normalise_classifier(lin, "L2", 1.0)
    assert lin.weight.norm(dim=1).tolist() == pytest.approx([1.0, 1.0])
    lin = _linear([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]])
    normalise_classifier(lin, "L2", 2.0)  # profile 1 - (2-1) i / (2 * 2) -> 1, 0.75, 0.5
    assert lin.weight.norm(dim=1).tolist() == pytest.approx([1.0, 0.75, 0.5])
    lin = _linear([[3.0, 4.0], [0.0, 2.0]])
    normalise_classifier(lin, "tau", 1.9)  # w / ||w||^1.9
    assert lin.weight[0].tolist() == pytest.approx([3 / 5 ** 1.9, 4 / 5 ** 1.9])
    assert lin.weight[1].tolist() == pytest.approx([0.0, 2 / 2 ** 1.9])


def test_weight_decay_term_equals_coupled_sgd_weight_decay():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    twin = copy.deepcopy(model)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    wd = 0.05
    explicit = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    coupled = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, weight_decay=wd)
    for _ in range(3):  # several steps so momentum carries the decay too
        explicit.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + wd * weight_decay_penalty(list(model.parameters()))
        loss.backward()
        explicit.step()
        coupled.zero_grad()
        nn.functional.cross_entropy(twin(x), y).backward()
        coupled.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_weight_decay_penalty_value_and_feature_penalty():
    a = torch.tensor([3.0, 4.0])
    b = torch.tensor([[1.0, 2.0]])
    assert float(weight_decay_penalty([a, b])) == pytest.approx((25 + 5) / 2)
    h = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    assert float(feature_penalty(h)) == pytest.approx((25 + 1) / 2 / 2)


def test_weight_decay_value_without_graph_equals_the_penalty():
    """The value logged for the decay SGD applies itself: no graph; on the CPU the explicit sum bit
    for bit, on a GPU the foreach norms (checked here on small CPU tensors, where they are accurate)."""
    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(64, 3, 3, 3, generator=g)), nn.Parameter(torch.randn(10, generator=g))]
    value = weight_decay_penalty_value(params)
    assert not value.requires_grad
    assert torch.equal(value, weight_decay_penalty(params).detach())
    exact = sum(float(p.detach().double().pow(2).sum()) for p in params) / 2
    assert float(foreach_penalty(params)) == pytest.approx(exact, rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_foreach_weight_decay_value_is_accurate_on_cuda():
    """The GPU path of the logged decay term, on ResNet34's largest tensors (2.4M elements)."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(512, 512, 3, 3, generator=g) * 0.02, torch.randn(256, 256, 3, 3, generator=g) * 0.03,
              torch.randn(100, 512, generator=g)]
    exact = sum(float(p.double().pow(2).sum()) for p in params) / 2
    value = weight_decay_penalty_value([p.cuda() for p in params])
    assert value.device.type == "cuda" and float(value) == pytest.approx(exact, rel=1e-6)
