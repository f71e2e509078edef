import math

import pytest
import torch

from utils.losses import class_balanced_softmax, class_balanced_weights, cross_entropy


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
