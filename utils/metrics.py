"""Evaluation metrics (SPEC 8): class-averaged accuracy, Many/Medium/Few,
Fisher's discriminant ratio and Hoyer sparsity."""
from __future__ import annotations

import math
from typing import Sequence

import torch

GROUPS = ("Many", "Medium", "Few")


def confusion_counts(preds: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """K x K counts, rows = true class, columns = prediction (on the inputs' device)."""
    flat = labels.long() * n_classes + preds.long()
    return torch.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def row_normalise(counts: torch.Tensor) -> torch.Tensor:
    counts = counts.double()
    totals = counts.sum(dim=1, keepdim=True)
    return torch.where(totals > 0, counts / totals.clamp_min(1), torch.zeros_like(counts))


def per_class_accuracy(counts: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(row_normalise(counts))


def class_averaged_accuracy(counts: torch.Tensor) -> float:
    """'All' of the papers: the mean of the diagonal of the row-normalised confusion matrix."""
    return float(per_class_accuracy(counts).mean())


def class_groups(class_counts: Sequence[int], many_threshold: int, few_threshold: int) -> list[str]:
    """Many: n_c > many_threshold; Few: n_c < few_threshold; Medium otherwise."""
    out = []
    for n in class_counts:
        out.append("Many" if n > many_threshold else "Few" if n < few_threshold else "Medium")
    return out


def group_accuracy(per_class: Sequence[float], groups: Sequence[str]) -> dict[str, float]:
    """{"All", "Many", "Medium", "Few"}; an empty group counts as 0 (as the original)."""
    per_class = [float(a) for a in per_class]
    result = {"All": sum(per_class) / len(per_class)}
    for g in GROUPS:
        members = [a for a, gg in zip(per_class, groups) if gg == g]
        result[g] = sum(members) / len(members) if members else 0.0
    return result


def fisher_discriminant_ratio(features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> float:
    """trace(S_W^-1 S_B) of the features, in float64.

    Feature dimensions that are constant over all samples are dropped first,
    with the published code's tolerance (|h - h_0| <= |mean(h)| * 1e-3), and
    so are dimensions whose within-class scatter vanishes.  Classes absent
    from ``labels`` contribute nothing.
    """
    feats = features.double()
    labels = labels.long().to(feats.device)
    tol = feats.mean().abs() * 1e-3
    varying = ((feats - feats[:1]).abs() > tol).any(dim=0)
    feats = feats[:, varying]
    if feats.shape[1] == 0:
        return float("nan")
    counts = torch.bincount(labels, minlength=n_classes).double()
    sums = torch.zeros(n_classes, feats.shape[1], dtype=torch.float64, device=feats.device)
    sums.index_add_(0, labels, feats)
    present = counts > 0
    class_means = torch.zeros_like(sums)
    class_means[present] = sums[present] / counts[present, None]
    overall = feats.mean(dim=0)
    between = class_means[present] - overall
    s_b = (between.T * counts[present]) @ between
    centred = feats - class_means[labels]
    s_w = centred.T @ centred
    zero_rows = (s_w.abs() <= tol).all(dim=0)
    if zero_rows.any():
        keep = ~zero_rows
        s_w = s_w[keep][:, keep]
        s_b = s_b[keep][:, keep]
    # With fewer samples than dimensions (N - K < D) S_W is singular and a
    # plain solve returns noise; the pseudo-inverse keeps the ratio finite and
    # equals the inverse whenever S_W has full rank.
    if int(torch.linalg.matrix_rank(s_w)) == s_w.shape[0]:
        ratio = torch.linalg.solve(s_w, s_b)
    else:
        ratio = torch.linalg.pinv(s_w, hermitian=True) @ s_b
    return float(torch.trace(ratio))


def hoyer_sparsity(features: torch.Tensor) -> torch.Tensor:
    """Per-row (sqrt(D) - ||x||_1/||x||_2) / (sqrt(D) - 1); a zero row counts as 0."""
    x = features.double()
    d = x.shape[1]
    l1 = x.abs().sum(dim=1)
    l2 = x.norm(dim=1)
    ratio = torch.where(l2 > 0, l1 / l2.clamp_min(1e-300), torch.full_like(l1, math.sqrt(d)))
    return (math.sqrt(d) - ratio) / (math.sqrt(d) - 1)
