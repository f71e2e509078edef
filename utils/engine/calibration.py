"""What the long-tailed literature reports beside top-1 (SPEC 8): top-5 accuracy by class, and the
calibration of the softmax of the final (adjusted) logits: expected calibration error over 15
equal-width confidence bins (Guo et al. 2017; MiSLAS and OpenLT report it so), negative
log-likelihood and the Brier score.

Bins are right-closed: bin b holds the confidences in (b/15, (b+1)/15], so a confidence that
falls exactly on an edge belongs to the bin below it (the first bin also holds 0, which a
softmax never reaches).  Computed in float64 on the CPU: a few numbers per image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ECE_BINS = 15
TOP_K = 5


def per_class_topk(logits: torch.Tensor, labels: torch.Tensor, n_classes: int, k: int = TOP_K) -> torch.Tensor:
    """Per class, the fraction of its images whose label is among the ``k`` largest logits
    (0 for a class without images, as the top-1 per-class accuracy); ``k`` is capped at K."""
    k = min(int(k), logits.shape[1])
    labels = labels.long().cpu()
    hits = (logits.topk(k, dim=1).indices.cpu() == labels[:, None]).any(dim=1).double()
    totals = torch.bincount(labels, minlength=n_classes).double()
    found = torch.zeros(n_classes, dtype=torch.float64).index_add_(0, labels, hits)
    return torch.where(totals > 0, found / totals.clamp_min(1), torch.zeros_like(found))


@dataclass
class CalibrationBins:
    """Per confidence bin: its edges, how many images, their accuracy and mean confidence
    (0 for an empty bin)."""
    lower: torch.Tensor
    upper: torch.Tensor
    count: torch.Tensor
    accuracy: torch.Tensor
    confidence: torch.Tensor

    def to_dict(self) -> dict:
        return {name: getattr(self, name).tolist() for name in ("lower", "upper", "count", "accuracy", "confidence")}


def calibration_bins(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = ECE_BINS) -> CalibrationBins:
    """Equal-width, right-closed bins (b/n, (b+1)/n] of the confidences."""
    edges = torch.arange(n_bins + 1, dtype=torch.float64) / n_bins  # k / n, correctly rounded
    confidence = confidence.double().cpu()
    correct = correct.double().cpu()
    # bucketize(right=False): index i with edges[i-1] < x <= edges[i], on the inner edges
    index = torch.bucketize(confidence, edges[1:-1], right=False)
    count = torch.bincount(index, minlength=n_bins).double()
    hits = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, correct)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, confidence)
    safe = count.clamp_min(1)
    empty = count == 0
    return CalibrationBins(edges[:-1], edges[1:], count.long(),
                           torch.where(empty, 0.0, hits / safe), torch.where(empty, 0.0, conf_sum / safe))


def expected_calibration_error(bins: CalibrationBins) -> float:
    """sum_b (n_b / N) |acc_b - conf_b|; an empty bin adds 0."""
    n = int(bins.count.sum())
    if n == 0:
        return 0.0
    return float((bins.count.double() / n * (bins.accuracy - bins.confidence).abs()).sum())


def calibration(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> dict:
    """{"ECE", "NLL", "Brier", "n_bins", "bins": {...}} of the softmax of ``logits``.

    NLL = mean -log p_y; Brier = mean sum_c (p_c - [c = y])^2 (summed over classes, as Brier
    1950 defines it; some papers divide by K)."""
    logits = logits.detach().double().cpu()
    labels = labels.long().cpu()
    log_p = torch.log_softmax(logits, dim=1)
    p = log_p.exp()
    predicted = logits.argmax(dim=1)  # the prediction acc.json counts
    confidence = p.gather(1, predicted[:, None]).squeeze(1)
    bins = calibration_bins(confidence, predicted == labels, n_bins)
    one_hot = torch.nn.functional.one_hot(labels, logits.shape[1]).double()
    return {"ECE": expected_calibration_error(bins),
            "NLL": float(-log_p.gather(1, labels[:, None]).mean()),
            "Brier": float((p - one_hot).square().sum(dim=1).mean()),
            "n_bins": int(n_bins),
            "bins": bins.to_dict()}
