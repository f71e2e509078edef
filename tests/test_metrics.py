import math

import pytest
import torch

from utils.data.lt_data import class_groups
from utils.engine.metrics import (class_averaged_accuracy, confusion_counts, fisher_discriminant_ratio, group_accuracy,
                           hoyer_sparsity, per_class_accuracy)


def _two_class_features():
    # dim 0 separates the classes (means 1 and 5, overall 3), dim 1 does not.
    x = torch.tensor([[0., 1], [2, 1], [0, -1], [2, -1],
                      [4, 1], [6, 1], [4, -1], [6, -1]])
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    return x, y


def test_fdr_hand_computed():
    # S_B = diag(4*(1-3)^2 + 4*(5-3)^2, 0) = diag(32, 0); S_W = diag(8, 8) -> trace(S_W^-1 S_B) = 4
    x, y = _two_class_features()
    assert fisher_discriminant_ratio(x, y, 2) == pytest.approx(4.0, abs=1e-12)


def test_fdr_drops_constant_dimensions():
    x, y = _two_class_features()
    x = torch.cat([x, torch.full((8, 1), 7.0)], dim=1)
    assert fisher_discriminant_ratio(x, y, 2) == pytest.approx(4.0, abs=1e-12)


def test_fdr_without_within_class_scatter_is_zero():
    # each class a single point: S_W vanishes, every dimension is dropped, the trace is empty
    x = torch.tensor([[0., 1], [0, 1], [2, 3], [2, 3]])
    assert fisher_discriminant_ratio(x, torch.tensor([0, 0, 1, 1]), 2) == 0.0


def test_fdr_finite_when_fewer_samples_than_dimensions():
    torch.manual_seed(0)
    x = torch.randn(12, 40)
    y = torch.arange(12) % 3
    value = fisher_discriminant_ratio(x, y, 3)
    assert math.isfinite(value) and value > 0


def test_confusion_and_class_average():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    preds = torch.tensor([0, 0, 1, 2, 1, 0, 2])
    counts = confusion_counts(preds, labels, 3)
    assert counts.tolist() == [[2, 1, 1], [1, 1, 0], [0, 0, 1]]
    assert per_class_accuracy(counts).tolist() == [0.5, 0.5, 1.0]
    assert class_averaged_accuracy(counts) == pytest.approx(2 / 3)


def test_groups_and_group_accuracy_with_empty_group():
    groups = class_groups([500, 100, 20, 19], many_threshold=100, few_threshold=20)
    assert groups == ["Many", "Medium", "Medium", "Few"]
    acc = group_accuracy([1.0, 0.5, 0.25, 0.0], groups)
    assert acc == {"All": pytest.approx(0.4375), "Many": 1.0, "Medium": 0.375, "Few": 0.0}
    acc = group_accuracy([0.5, 0.7], ["Many", "Many"])
    assert acc["Few"] == 0.0 and acc["Medium"] == 0.0


def test_hoyer_sparsity():
    x = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 1], [3, 4, 0, 0]])
    # (sqrt(4) - l1/l2) / (sqrt(4) - 1): one-hot -> 1, flat -> 0, (3,4,0,0) -> 2 - 7/5 = 0.6
    assert hoyer_sparsity(x).tolist() == pytest.approx([1.0, 0.0, 0.6])


def _fdr_by_solve_or_pinv(features, labels, n_classes):
    """The formula fisher_discriminant_ratio used before it took one eigendecomposition:
    S_B and S_W explicitly, then a rank test, solve() at full rank, pinv() otherwise."""
    feats = features.double()
    tol = feats.mean().abs() * 1e-3
    feats = feats[:, ((feats - feats[:1]).abs() > tol).any(dim=0)]
    counts = torch.bincount(labels, minlength=n_classes).double()
    means = torch.stack([feats[labels == c].mean(0) for c in range(n_classes)])
    between = means - feats.mean(0)
    s_b = (between.T * counts) @ between
    centred = feats - means[labels]
    s_w = centred.T @ centred
    if int(torch.linalg.matrix_rank(s_w)) == s_w.shape[0]:
        return float(torch.trace(torch.linalg.solve(s_w, s_b)))
    return float(torch.trace(torch.linalg.pinv(s_w, hermitian=True) @ s_b))


@pytest.mark.parametrize("n,d,k", [(300, 24, 6), (400, 64, 10),  # full rank: N - K > D
                                   (30, 40, 3), (12, 40, 4)])    # rank-deficient: N - K < D
def test_fdr_one_eigendecomposition_equals_solve_and_pinv(n, d, k):
    gen = torch.Generator().manual_seed(n + d)
    labels = torch.arange(n) % k
    centres = 3 * torch.randn(k, d, generator=gen)
    mixing = torch.randn(d, d, generator=gen)  # correlated dimensions, not a diagonal S_W
    x = (centres[labels] + torch.randn(n, d, generator=gen) @ mixing).float()
    expected = _fdr_by_solve_or_pinv(x, labels, k)
    assert expected > 0
    assert fisher_discriminant_ratio(x, labels, k) == pytest.approx(expected, rel=1e-9)
