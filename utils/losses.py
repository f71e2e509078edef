"""Per-sample classification losses (SPEC 6.2)."""
from __future__ import annotations

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


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)


def class_balanced_softmax(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """mean_i w_{y_i} * CE_i (the original multiplies per-sample CE by the weight, then averages)."""
    per_sample = F.cross_entropy(logits.float(), labels, reduction="none")
    return (weights[labels] * per_sample).mean()
