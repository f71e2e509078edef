"""What the long-tailed literature reports beside top-1 (SPEC 8): top-5 accuracy by class, and the
calibration of the softmax of the final (adjusted) logits: expected calibration error over 15
equal-width confidence bins (Guo et al. 2017; MiSLAS and OpenLT report it so), negative
log-likelihood and the Brier score.

Bins are right-closed: bin b holds the confidences in (b/15, (b+1)/15], so a confidence that
falls exactly on an edge belongs to the bin below it (the first bin also holds 0, which a
softmax never reaches).  Computed in float64 where the logits are, a block of images at a
time; only a few numbers per image reach the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ECE_BINS = 15
TOP_K = 5
BLOCK_ELEMENTS = 2 ** 24  # logits converted to float64 at a time (128 MB)


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
    confidence = confidence.double().cpu().contiguous()
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


def _per_image(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(confidence, correct, -log p_y, sum_c (p_c - [c = y])^2) per image, in float64 on the
    logits' device, a block of rows at a time: only per-image numbers are kept, never the N x K
    probabilities (iNaturalist's test set: 24,426 x 8,142, 1.6 GB in float64)."""
    rows = max(1, BLOCK_ELEMENTS // max(1, logits.shape[1]))
    out = []
    for start in range(0, logits.shape[0], rows):
        z = logits[start:start + rows].detach().double()
        y = labels[start:start + rows].to(z.device).long()[:, None]
        # one exp per logit: e = exp(z - max), p = e / sum(e); the max is the prediction's logit
        # (float32 -> float64 keeps the order, and max, like argmax, takes the first of ties:
        # acc.json's prediction), so its probability, the confidence, is 1 / sum(e)
        top, predicted = z.max(dim=1, keepdim=True)
        e = (z - top).exp_()
        total = e.sum(dim=1, keepdim=True)
        confidence = total.reciprocal()
        log_p_y = z.gather(1, y) - top - total.log()
        # sum_c (p_c - [c = y])^2 = sum_c p_c^2 - 2 p_y + 1
        brier = e.square_().sum(dim=1, keepdim=True) / total.square() - 2 * log_p_y.exp() + 1
        out.append(torch.cat([confidence, (predicted == y).double(), -log_p_y, brier], dim=1).cpu())
    table = torch.cat(out) if out else torch.zeros(0, 4, dtype=torch.float64)
    return tuple(table.T)


def calibration(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> dict:
    """{"ECE", "NLL", "Brier", "n_bins", "bins": {...}} of the softmax of ``logits``.

    NLL = mean -log p_y; Brier = mean sum_c (p_c - [c = y])^2 (summed over classes, as Brier
    1950 defines it; some papers divide by K)."""
    confidence, correct, nll, brier = _per_image(logits, labels)
    bins = calibration_bins(confidence, correct, n_bins)
    return {"ECE": expected_calibration_error(bins),
            "NLL": float(nll.mean()),
            "Brier": float(brier.mean()),
            "n_bins": int(n_bins),
            "bins": bins.to_dict()}
