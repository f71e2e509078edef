"""Classifier heads: the fixed-direction simplex ETF classifier and the
state-dict conversions between an ETF head and a plain ``nn.Linear`` head.

Key names (``weight_vec``, ``weight_norm``, ``bias``) match the published
implementation so that checkpoints are interchangeable.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Mapping, Sequence

import torch
import torch.nn as nn

__all__ = [
    "ETFClassifier",
    "make_classifier",
    "classifier_matrix",
    "random_orthogonal_columns",
    "simplex_etf_directions",
    "etf_norm_profile",
    "dr_balancer_scale",
    "etf_state_to_linear",
    "linear_state_to_etf",
]


def random_orthogonal_columns(
    dim: int, n_cols: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """First ``n_cols`` columns of a Haar-random ``dim x dim`` orthogonal matrix.

    Computed as the QR decomposition of a standard normal matrix in float64 with
    the sign fix ``Q * sign(diag(R))`` (which makes Q Haar distributed), then
    cast to float32. Returns a ``dim x n_cols`` tensor.
    """
    if n_cols > dim:
        raise ValueError(f"cannot take {n_cols} orthonormal columns in dimension {dim}")
    a = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    d = torch.sign(torch.diagonal(r))
    d = torch.where(d == 0, torch.ones_like(d), d)
    q = q * d.unsqueeze(0)
    return q[:, :n_cols].to(torch.float32).contiguous()


def simplex_etf_directions(
    in_features: int, n_classes: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """K x D matrix whose rows are unit vectors with pairwise cosine -1/(K-1)."""
    k = n_classes
    if k < 2:
        raise ValueError(f"an ETF classifier needs at least 2 classes, got {k}")
    if k > in_features:
        raise ValueError(
            f"an ETF classifier needs n_classes <= in_features, got {k} > {in_features}"
        )
    u = random_orthogonal_columns(in_features, k, generator)  # D x K
    m = math.sqrt(k / (k - 1)) * (
        torch.eye(k, dtype=torch.float32) - torch.ones(k, k, dtype=torch.float32) / k
    )
    return (u @ m).t().contiguous()  # K x D


def etf_norm_profile(n_classes: int, norm_rate: float = 1.0) -> torch.Tensor:
    """Initial per-class norms, K x 1: ``1 - (r-1) * i / ((K-1) * r)`` for class i.

    All ones when ``norm_rate == 1``; decreasing linearly from 1 (class 0) to
    ``1/r`` (class K-1) otherwise.
    """
    k, r = n_classes, float(norm_rate)
    if r <= 0:
        raise ValueError(f"etf norm_rate must be > 0, got {norm_rate}")
    i = torch.arange(k, dtype=torch.float64)
    denom = (k - 1) * r if k > 1 else 1.0
    norms = 1.0 - (r - 1.0) * i / denom
    return norms.to(torch.float32).unsqueeze(1)


def dr_balancer_scale(class_counts: Sequence[int], n_classes: int) -> torch.Tensor:
    """``N / (K n_c)`` per class, K x 1 (1 for every class when balanced)."""
    counts = torch.as_tensor(list(class_counts), dtype=torch.float64)
    if counts.dim() != 1 or counts.numel() != n_classes:
        raise ValueError(f"the DR balancer needs {n_classes} class counts, got {counts.numel()}")
    if bool((counts <= 0).any()):
        raise ValueError("the DR balancer needs every class count > 0")
    return (counts.sum() / (n_classes * counts)).to(torch.float32).unsqueeze(1)


class ETFClassifier(nn.Module):
    """Linear classifier with fixed simplex-ETF directions.

    ``logits = h @ (weight_vec * weight_norm).T + bias``

    - ``weight_vec`` (K x D): persistent buffer, never trained.
    - ``weight_norm`` (K x 1): parameter, trainable only if ``train_norm``.
    - ``bias`` (K,): parameter, initialised uniform(-1/D, 1/D).

    ``dr_balancer_counts`` (optional, the training class counts n_c): the
    original's DR balancer, initial norms multiplied by ``N / (K n_c)`` (N = sum
    of n_c), so rarer classes start with larger norms.

    ``generator`` (optional) seeds both the random rotation and the bias init;
    the global RNG is used when it is ``None``.
    """

    def __init__(
        self,
        in_features: int,
        n_classes: int,
        norm_rate: float = 1.0,
        train_norm: bool = False,
        generator: torch.Generator | None = None,
        dr_balancer_counts: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(n_classes)
        self.norm_rate = float(norm_rate)
        self.train_norm = bool(train_norm)

        self.register_buffer(
            "weight_vec",
            simplex_etf_directions(self.in_features, self.out_features, generator),
            persistent=True,
        )
        norms = etf_norm_profile(self.out_features, self.norm_rate)
        if dr_balancer_counts is not None:
            norms = norms * dr_balancer_scale(dr_balancer_counts, self.out_features)
        self.weight_norm = nn.Parameter(norms, requires_grad=self.train_norm)
        bound = 1.0 / self.in_features
        bias = torch.empty(self.out_features, dtype=torch.float32)
        bias.uniform_(-bound, bound, generator=generator)
        self.bias = nn.Parameter(bias)

    def weight(self) -> torch.Tensor:
        """Effective K x D weight ``weight_vec * weight_norm`` (keeps the graph)."""
        return self.weight_vec * self.weight_norm

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.weight().t() + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"norm_rate={self.norm_rate}, train_norm={self.train_norm}"
        )


def make_classifier(
    in_features: int,
    n_classes: int,
    use_etf: bool = False,
    train_etf_norm: bool = False,
    etf_norm_rate: float = 1.0,
    generator: torch.Generator | None = None,
    dr_balancer_counts: Sequence[int] | None = None,
) -> nn.Module:
    """The classifier of every model: :class:`ETFClassifier`, or ``nn.Linear`` (torch's init)."""
    if use_etf:
        return ETFClassifier(in_features, n_classes, norm_rate=etf_norm_rate, train_norm=train_etf_norm,
                             generator=generator, dr_balancer_counts=dr_balancer_counts)
    return nn.Linear(in_features, n_classes)


def classifier_matrix(classifier: nn.Module) -> torch.Tensor:
    """The K x D weight a classifier applies (ETF: directions times norms), with its graph."""
    if isinstance(classifier, ETFClassifier):
        return classifier.weight()
    if isinstance(classifier, nn.Linear):
        return classifier.weight
    raise TypeError(f"unsupported classifier type {type(classifier).__name__}")


def _new_like(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        out._metadata = meta.copy()  # type: ignore[attr-defined]
    return out


def etf_state_to_linear(
    state_dict: Mapping[str, torch.Tensor], prefix: str = "encoder.fc."
) -> "OrderedDict[str, torch.Tensor]":
    """Return a new state dict in which ``prefix+weight_vec`` and
    ``prefix+weight_norm`` are replaced by ``prefix+weight = vec * norm``.

    All other entries (including ``prefix+bias``) are kept; the input is not
    modified. The new ``weight`` entry takes the position of ``weight_vec``.
    """
    kv, kn, kw = prefix + "weight_vec", prefix + "weight_norm", prefix + "weight"
    for k in (kv, kn):
        if k not in state_dict:
            raise KeyError(f"etf_state_to_linear: missing key '{k}'")
    weight = state_dict[kv].detach() * state_dict[kn].detach()
    out = _new_like(state_dict)
    for k, v in state_dict.items():
        if k == kv:
            out[kw] = weight.clone()
        elif k == kn:
            continue
        else:
            out[k] = v
    return out


def linear_state_to_etf(
    state_dict: Mapping[str, torch.Tensor], prefix: str = "encoder.fc."
) -> "OrderedDict[str, torch.Tensor]":
    """Return a new state dict in which ``prefix+weight`` (K x D) is replaced by
    ``prefix+weight_vec = w / ||w||`` (row-wise) and ``prefix+weight_norm = ||w||``
    (K x 1). Other entries are kept; the input is not modified.
    """
    kw, kv, kn = prefix + "weight", prefix + "weight_vec", prefix + "weight_norm"
    if kw not in state_dict:
        raise KeyError(f"linear_state_to_etf: missing key '{kw}'")
    w = state_dict[kw].detach()
    if w.dim() != 2:
        raise ValueError(f"linear_state_to_etf: '{kw}' must be 2-D, got shape {tuple(w.shape)}")
    norm = w.norm(dim=1, keepdim=True)
    vec = w / norm.clamp_min(torch.finfo(w.dtype).tiny)
    out = _new_like(state_dict)
    for k, v in state_dict.items():
        if k == kw:
            out[kv] = vec.clone()
            out[kn] = norm.clone()
        else:
            out[k] = v
    return out
