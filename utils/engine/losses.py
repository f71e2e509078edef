"""Per-sample classification losses (SPEC 6.2)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def class_balanced_weights(class_counts: Sequence[int], beta: float) -> torch.Tensor:
    """Cui et al.'s w_c = (1 - beta) / (1 - beta^n_c) (1 / n_c when beta = 1), rescaled to sum to K."""
    counts = torch.as_tensor(list(class_counts), dtype=torch.float64)
    if beta == 1.0:
        weights = 1.0 / counts
    else:
        weights = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts))
    weights = weights / weights.sum() * len(counts)
    return weights.float()


def one_hot_like(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Targets [c = y_i] in the logits' shape and dtype.  A scatter rather than F.one_hot, whose
    CPU version reads the labels' min and max back (a host read in every step)."""
    return torch.zeros_like(logits).scatter_(1, labels.unsqueeze(1), 1.0)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)


def class_balanced_softmax(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """mean_i w_{y_i} * CE_i (the original multiplies per-sample CE by the weight, then averages)."""
    per_sample = F.cross_entropy(logits.float(), labels, reduction="none")
    return (weights[labels] * per_sample).mean()


def sigmoid_bias_init(n_classes: int) -> float:
    """Initial classifier bias for the sigmoid losses: -log(K-1), so that every
    class starts at sigmoid probability 1/K (Cui et al.)."""
    return -math.log(n_classes - 1)


def class_balanced_sigmoid(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """mean_i w_{y_i} * sum_c BCE(z_ic, [c = y_i]) (one-hot targets, summed over classes)."""
    logits = logits.float()
    one_hot = one_hot_like(logits, labels)
    bce = F.binary_cross_entropy_with_logits(logits, one_hot, reduction="none").sum(dim=1)
    return (weights[labels] * bce).mean()


def class_balanced_focal(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                         gamma: float) -> torch.Tensor:
    """Sigmoid focal loss: mean_i w_{y_i} * sum_c m_ic * BCE(z_ic, y_ic) with the modulator
    m = (1 - p_t)^gamma written in the numerically stable form
    exp(-gamma * y * z - gamma * log(1 + exp(-z))) (log(1 + exp(-z)) as softplus(-z))."""
    logits = logits.float()
    one_hot = one_hot_like(logits, labels)
    bce = F.binary_cross_entropy_with_logits(logits, one_hot, reduction="none")
    modulator = torch.exp(-gamma * one_hot * logits - gamma * F.softplus(-logits))
    return (weights[labels] * (modulator * bce).sum(dim=1)).mean()


def dot_regression_per_sample(logits: torch.Tensor, labels: torch.Tensor, features: torch.Tensor,
                              class_weight: torch.Tensor) -> torch.Tensor:
    """Dot-regression loss (Yang et al., 2022), per sample: (z_y - p)^2 / (2p) with
    p = ||h|| * ||w_y|| treated as a constant (no gradient flows through p).

    ``class_weight`` is the K x D weight the classifier applies (ETF: directions x norms).
    """
    z_y = logits.float().gather(1, labels.unsqueeze(1)).squeeze(1)
    p = (features.float().norm(dim=1) * class_weight.float()[labels].norm(dim=1)).detach()
    return (z_y - p).pow(2) / (2 * p)


def dot_regression(logits: torch.Tensor, labels: torch.Tensor, features: torch.Tensor,
                   class_weight: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Batch mean of the dot-regression loss, each sample weighted by w_{y_i} when ``weights`` is given."""
    per_sample = dot_regression_per_sample(logits, labels, features, class_weight)
    if weights is not None:
        per_sample = weights[labels] * per_sample
    return per_sample.mean()


def nc_terms(labels: torch.Tensor, features: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two feature terms of the NC loss on a mini-batch (before lambda1 / lambda2).

    within = sum_i ||h_i - mu_{y_i}||^2 / m_{y_i}   (batch class means mu_c and counts m_c)
    angle  = mean over the classes present in the batch of min_{c' != c} arccos(cos(mu_c, mu_c') - 0.01)
    The angle term is 0 when fewer than two classes (with a non-zero mean) are present.

    Written on fixed K x K shapes with masks (classes absent from the batch have mean 0 and
    are masked out), so that no step waits for the device to learn which classes are present.
    """
    h = features.float()
    counts = torch.zeros(n_classes, dtype=h.dtype, device=h.device).index_add_(0, labels, torch.ones_like(h[:, 0]))
    sums = torch.zeros(n_classes, h.shape[1], dtype=h.dtype, device=h.device).index_add(0, labels, h)
    means = sums / counts.clamp_min(1).unsqueeze(1)
    within = ((h - means[labels]).pow(2).sum(dim=1) / counts[labels]).sum()
    norms = means.norm(dim=1)
    present = (counts > 0) & (norms > 0)
    unit = means / torch.where(present, norms, torch.ones_like(norms)).unsqueeze(1)
    cos = unit @ unit.t()
    # cos - 0.01 keeps arccos away from its infinite slope at 1; the clamp only guards cos ~ -1.
    angles = torch.arccos((cos - 0.01).clamp(min=-1.0 + 1e-6))
    others = present.unsqueeze(0) & ~torch.eye(n_classes, dtype=torch.bool, device=h.device)
    nearest = angles.masked_fill(~others, math.inf).min(dim=1).values
    n_present = present.sum()
    mean_nearest = torch.where(present, nearest, torch.zeros_like(nearest)).sum() / n_present.clamp_min(1)
    return within, torch.where(n_present >= 2, mean_nearest, torch.zeros_like(mean_nearest))
