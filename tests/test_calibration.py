"""Top-5, ECE, NLL and Brier (utils/engine/calibration.py) against values computed by hand."""
import math

import pytest
import torch

from utils.engine.calibration import calibration, calibration_bins, expected_calibration_error, per_class_topk


def _logits(*probabilities):
    """Logits whose softmax is the given rows (log p, up to the softmax's shift)."""
    return torch.tensor([[math.log(v) for v in row] for row in probabilities], dtype=torch.float64)


# Four images, three classes; the softmax rows and labels:
#   A p = (1/2, 1/4, 1/4)  y = 0: predicted 0 (right), confidence 0.50, -log p_y = ln 2
#   B p = (1/4, 1/4, 1/2)  y = 0: predicted 2 (wrong), confidence 0.50, -log p_y = ln 4
#   C p = (3/4, 1/8, 1/8)  y = 0: predicted 0 (right), confidence 0.75, -log p_y = ln 4/3
#   D p = (1/8, 3/4, 1/8)  y = 2: predicted 1 (wrong), confidence 0.75, -log p_y = ln 8
LOGITS = _logits((2, 1, 1), (1, 1, 2), (6, 1, 1), (1, 6, 1))
LABELS = torch.tensor([0, 0, 0, 2])


def test_ece_nll_brier_by_hand():
    result = calibration(LOGITS, LABELS)
    # bins of width 1/15: 0.50 in bin 7 = (7/15, 8/15] = (0.467, 0.533]: A, B: accuracy 1/2, confidence 1/2;
    # 0.75 in bin 11 = (11/15, 12/15] = (0.733, 0.800]: C, D: accuracy 1/2, confidence 3/4;
    # the 13 other bins are empty and add 0.  ECE = 2/4 |0.5 - 0.5| + 2/4 |0.5 - 0.75| = 0.125
    assert result["ECE"] == pytest.approx(0.125, abs=1e-12)
    # NLL = (ln 2 + ln 4 + ln 4/3 + ln 8) / 4 = (0.693147 + 1.386294 + 0.287682 + 2.079442) / 4 = 1.111641
    assert result["NLL"] == pytest.approx(1.1116412890, abs=1e-9)
    # Brier per image, sum_c (p_c - [c = y])^2:
    #   A (1/2)^2 + (1/4)^2 + (1/4)^2 = 0.375;  B (3/4)^2 + (1/4)^2 + (1/2)^2 = 0.875
    #   C (1/4)^2 + (1/8)^2 + (1/8)^2 = 0.09375;  D (1/8)^2 + (3/4)^2 + (7/8)^2 = 1.34375
    #   mean = 2.6875 / 4 = 0.671875
    assert result["Brier"] == pytest.approx(0.671875, abs=1e-12)
    bins = result["bins"]
    assert result["n_bins"] == 15 and len(bins["count"]) == 15
    assert bins["count"] == [0] * 7 + [2, 0, 0, 0, 2, 0, 0, 0]
    assert bins["accuracy"][7] == 0.5 and bins["confidence"][7] == pytest.approx(0.5)
    assert bins["accuracy"][11] == 0.5 and bins["confidence"][11] == pytest.approx(0.75)
    assert bins["accuracy"][0] == 0 and bins["confidence"][0] == 0  # an empty bin
    assert bins["lower"][11] == pytest.approx(11 / 15) and bins["upper"][11] == pytest.approx(12 / 15)


def test_a_confidence_on_a_bin_edge_belongs_to_the_bin_below():
    # 0.4 = 6/15 is the edge between bin 5 (1/3, 0.4] and bin 6 (0.4, 7/15]: right-closed bins put it in 5;
    # 0.41 is inside bin 6; 1.0 is the top edge of the last bin (14)
    bins = calibration_bins(torch.tensor([0.4, 0.41, 1.0], dtype=torch.float64), torch.tensor([True, False, True]))
    assert bins.count.tolist() == [0, 0, 0, 0, 0, 1, 1] + [0] * 7 + [1]
    # ECE = 1/3 |1 - 0.4| + 1/3 |0 - 0.41| + 1/3 |1 - 1| = (0.6 + 0.41) / 3 = 0.336667
    assert expected_calibration_error(bins) == pytest.approx(1.01 / 3, abs=1e-12)


def test_top5_per_class_by_hand():
    # 7 classes; logits 6, 5, 4, 3, 2, 1, 0 for classes 0..6 in every row, so the top 5 are classes 0-4
    row = [6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    logits = torch.tensor([row] * 4)
    labels = torch.tensor([4, 5, 4, 0])
    top5 = per_class_topk(logits, labels, n_classes=7)
    # class 0: 1 image, ranked 1st -> 1;  class 4: 2 images ranked 5th -> 1;  class 5: ranked 6th -> 0;
    # classes 1, 2, 3, 6 have no image -> 0
    assert top5.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    top1 = per_class_topk(logits, labels, n_classes=7, k=1)
    assert top1.tolist() == [1.0, 0, 0, 0, 0, 0, 0]


def test_top5_with_fewer_than_five_classes_is_every_label():
    assert per_class_topk(LOGITS.float(), LABELS, n_classes=3).tolist() == [1.0, 0.0, 1.0]


def test_blockwise_calibration_equals_the_plain_softmax(monkeypatch):
    """Block by block, without the N x K probabilities: the same numbers as the whole softmax."""
    import utils.engine.calibration as calibration_module
    torch.manual_seed(0)
    logits, labels = torch.randn(300, 40) * 4, torch.randint(0, 40, (300,))
    p = torch.softmax(logits.double(), dim=1)
    nll = float(-p.gather(1, labels[:, None]).log().mean())
    brier = float((p - torch.nn.functional.one_hot(labels, 40).double()).square().sum(dim=1).mean())
    whole = calibration(logits, labels)
    monkeypatch.setattr(calibration_module, "BLOCK_ELEMENTS", 7 * 40)  # blocks of 7 rows, the last one short
    blocks = calibration(logits, labels)
    for result in (whole, blocks):
        assert result["NLL"] == pytest.approx(nll, rel=1e-12)
        assert result["Brier"] == pytest.approx(brier, rel=1e-12)
    assert blocks["bins"] == whole["bins"] and blocks["ECE"] == pytest.approx(whole["ECE"], abs=1e-15)


def test_a_tie_is_predicted_as_acc_json_predicts_it():
    # logits (1, 1, 0): argmax takes the first maximum, class 0, so label 1 is wrong and label 0 right;
    # confidence e / (2e + 1) = 0.42232 in bin 6 = (0.4, 0.4667]
    logits = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    bins = calibration(logits, torch.tensor([1, 0]))["bins"]
    assert bins["count"][6] == 2 and bins["accuracy"][6] == 0.5
    assert bins["confidence"][6] == pytest.approx(math.e / (2 * math.e + 1), abs=1e-12)
