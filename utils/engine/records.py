"""Per-class summaries of the per-epoch records (trackRecords.ckpt): the
numbers the plots and the report read.  Plain tensors in, plain tensors out."""
from __future__ import annotations

from typing import Sequence

import torch


def head_to_tail(class_counts: Sequence[int]) -> list[int]:
    """Class indices from the largest training count to the smallest (stable:
    equal counts keep label order), the order of every per-class axis."""
    return sorted(range(len(class_counts)), key=lambda c: (-int(class_counts[c]), c))


def class_mean(values: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Mean of ``values`` (N, or E x N) over the samples of each class, NaNs
    (samples not seen) ignored; a class with no value is NaN.  Returns K or E x K."""
    v = values.double()
    squeeze = v.dim() == 1
    if squeeze:
        v = v[None]
    labels = labels.long()
    seen = ~torch.isnan(v)
    sums = torch.zeros(v.shape[0], n_classes, dtype=torch.float64)
    counts = torch.zeros(v.shape[0], n_classes, dtype=torch.float64)
    sums.index_add_(1, labels, torch.where(seen, v, torch.zeros_like(v)))
    counts.index_add_(1, labels, seen.double())
    out = torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, float("nan")))
    return out[0] if squeeze else out


def forgetting_scores(correct: torch.Tensor) -> torch.Tensor:
    """Per training image (SPEC 8): the number of epochs at which it went from
    correctly to wrongly classified; an image never classified correctly gets
    the number of epochs.  ``correct`` is E x N bool (epochs x images)."""
    correct = correct.bool()
    epochs = correct.shape[0]
    forgotten = (correct[:-1] & ~correct[1:]).sum(dim=0) if epochs > 1 else torch.zeros(correct.shape[1], dtype=torch.long)
    never = ~correct.any(dim=0)
    return torch.where(never, torch.full_like(forgotten, epochs), forgotten)
