"""The small networks of the original for the tabular and MNIST datasets.

Layer layout and parameter names follow the published implementation
(utils/model_units.py there), so state dicts keep its keys:

* ``TableMLP`` (Helena): ``encoder.0 .. encoder.8``, each Linear (no bias) ->
  BatchNorm1d -> ReLU (``encoder.<i>.linear``, ``encoder.<i>.bn``), 512 wide; the
  classifier is ``fc``.  Its depth and width are fixed as in the original (it ignores
  ``mlp_hlayer_n`` / ``mlp_features_d``).
* ``BNLeNet5`` (MNIST): conv1 5x5 (1 -> 6, no bias) -> ReLU -> max-pool 2 -> ``bn11``;
  conv2 5x5 (6 -> 16) -> ReLU -> max-pool 2 -> ``bn12``; ``fc1`` (256 -> 120, no bias)
  -> ``bn21`` -> ReLU; ``fc2`` (120 -> 84) -> ``bn22`` -> ReLU = the 84-d features; the
  classifier is ``fc3``.  (BN after the pooling, as in the original.)
* ``BNMLP`` (MNIST): flatten, then ``mlp_hlayer_n`` x [Linear (no bias) -> BatchNorm1d ->
  ReLU] of width ``mlp_features_d`` (``linearList.<i>``, ``bnList.<i>``); classifier ``fc``.
* ``MLResBlock`` (MNIST): flatten -> ``linear0`` -> ``bn0`` -> ReLU, then
  ``mlp_hlayer_n`` residual blocks x -> ReLU(x + BN(Linear(ReLU(BN(Linear(x)))))) using
  ``linearList.<2i>, <2i+1>`` and ``bnList.<2i>, <2i+1>``; classifier ``fc``.

The model interface is every model's (models/head.py): ``features(x)`` applies, after
the backbone, feature L2-normalisation, last ReLU and feature bias (each if enabled, in
that order); ``classify(h)`` is the classifier (``nn.Linear`` or
:class:`~models.classifiers.ETFClassifier`), then logit normalisation, then the
:class:`~models.logit_adjust.LogitAdjuster`.  The original refused ETF on the
MNIST networks; here every small network accepts both heads.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.names import SMALL_MODELS

from .classifiers import make_classifier
from .head import LTHead
from .logit_adjust import LogitAdjuster

__all__ = ["SMALL_MODELS", "SmallLTModel", "TableMLP", "BNLeNet5", "BNMLP", "MLResBlock", "build_small_model"]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


class SmallLTModel(LTHead):
    """A small network: its layers (``pooled_features``), then the classifier at ``classifier_path``
    and the head options of every model (models/head.py)."""

    classifier_path = "fc"
    #: BatchNorm modules on the identity path (the original's belongs_to_identity_bn)
    identity_bn_names: tuple[str, ...] = ()

    def _attach_head(self, feature_dim: int, n_classes: int, *, use_etf: bool, train_etf_norm: bool,
                     etf_norm_rate: float, generator: torch.Generator | None, **options) -> None:
        """The classifier, registered after the layers (so state-dict keys keep the original's order)."""
        classifier = make_classifier(feature_dim, n_classes, use_etf=use_etf, train_etf_norm=train_etf_norm,
                                     etf_norm_rate=etf_norm_rate, generator=generator)
        setattr(self, self.classifier_path, classifier)
        self._init_head(**options)

    def identity_bn_modules(self) -> list[nn.Module]:
        return [self.get_submodule(n) for n in self.identity_bn_names]


class LinearBNReLU(nn.Module):
    """Linear (no bias) -> BatchNorm1d -> ReLU; names ``linear``, ``bn`` as the original's LinearBNAct."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.bn = nn.BatchNorm1d(out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.linear(x)))


class TableMLP(SmallLTModel):
    LAYERS = 1 + 8  # the original's first layer + LAYER_N = 8
    WIDTH = 512

    def __init__(self, in_features: int, n_classes: int, **head):
        super().__init__()
        self.encoder = nn.ModuleList(
            [LinearBNReLU(in_features if i == 0 else self.WIDTH, self.WIDTH) for i in range(self.LAYERS)])
        self._attach_head(self.WIDTH, n_classes, **head)

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        for layer in self.encoder:
            x = layer(x)
        return x


class BNLeNet5(SmallLTModel):
    classifier_path = "fc3"

    def __init__(self, input_shape: Sequence[int], n_classes: int, **head):
        super().__init__()
        channels, height, width = input_shape
        side_h, side_w = ((height - 4) // 2 - 4) // 2, ((width - 4) // 2 - 4) // 2
        if side_h < 1 or side_w < 1:
            raise ValueError(f"BNLeNet5 needs images of at least 16 x 16 pixels, got {height} x {width}")
        self.conv1 = nn.Conv2d(channels, 6, kernel_size=5, bias=False)
        self.bn11 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5, bias=False)
        self.bn12 = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16 * side_h * side_w, 120, bias=False)
        self.bn21 = nn.BatchNorm1d(120)
        self.fc2 = nn.Linear(120, 84, bias=False)
        self.bn22 = nn.BatchNorm1d(84)
        self._attach_head(84, n_classes, **head)

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn11(F.max_pool2d(F.relu(self.conv1(x)), 2))
        x = self.bn12(F.max_pool2d(F.relu(self.conv2(x)), 2))
        x = torch.flatten(x, 1)
        x = F.relu(self.bn21(self.fc1(x)))
        return F.relu(self.bn22(self.fc2(x)))


class BNMLP(SmallLTModel):
    def __init__(self, in_features: int, n_classes: int, hidden_layers: int, width: int, **head):
        super().__init__()
        if hidden_layers < 1:
            raise ValueError(f"mlp_hlayer_n must be >= 1, got {hidden_layers}")
        self.linearList = nn.ModuleList(
            [nn.Linear(in_features if i == 0 else width, width, bias=False) for i in range(hidden_layers)])
        self.bnList = nn.ModuleList([nn.BatchNorm1d(width) for _ in range(hidden_layers)])
        self._attach_head(width, n_classes, **head)

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        for linear, bn in zip(self.linearList, self.bnList):
            x = F.relu(bn(linear(x)))
        return x


class MLResBlock(SmallLTModel):
    identity_bn_names = ("bn0",)

    def __init__(self, in_features: int, n_classes: int, hidden_layers: int, width: int, **head):
        super().__init__()
        if hidden_layers < 1:
            raise ValueError(f"mlp_hlayer_n must be >= 1, got {hidden_layers}")
        self.blocks = int(hidden_layers)
        self.linear0 = nn.Linear(in_features, width, bias=False)
        self.bn0 = nn.BatchNorm1d(width)
        self.linearList = nn.ModuleList([nn.Linear(width, width, bias=False) for _ in range(2 * hidden_layers)])
        self.bnList = nn.ModuleList([nn.BatchNorm1d(width) for _ in range(2 * hidden_layers)])
        self._attach_head(width, n_classes, **head)

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.linear0(torch.flatten(x, 1))))
        for i in range(self.blocks):
            skip = x
            x = F.relu(self.bnList[2 * i](self.linearList[2 * i](x)))
            x = self.bnList[2 * i + 1](self.linearList[2 * i + 1](x))
            x = F.relu(skip + x)
        return x


def build_small_model(
    name: str,
    n_classes: int,
    *,
    input_shape: Sequence[int],
    mlp_hlayer_n: int = 3,
    mlp_features_d: int = 1024,
    use_etf: bool = False,
    train_etf_norm: bool = False,
    etf_norm_rate: float = 1.0,
    normalize_feature: bool = False,
    last_relu: bool = False,
    use_feature_bias: bool = False,
    logit_normalization: bool = False,
    bn_eps: float = 1e-5,
    class_counts: Sequence[int] | None = None,
    la_tau: float = 0.0,
    la_for_training: bool = False,
    la_additive: bool = True,
    generator: torch.Generator | None = None,
    **backbone_options,
) -> SmallLTModel:
    """Build one of :data:`SMALL_MODELS` for inputs of ``input_shape`` (C x H x W, or (F,)).

    ``backbone_options`` are the ResNet-only keywords of build_model (``in_channels``,
    ``small_input``); the small networks take their input size from ``input_shape``.
    """
    if name not in SMALL_MODELS:
        raise ValueError(f"model.name '{name}' is not a small model; choose one of " + ", ".join(SMALL_MODELS))
    if int(n_classes) < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    adjuster = LogitAdjuster(la_tau, class_counts, for_training=la_for_training, additive=la_additive)
    if adjuster.log_prior is not None and adjuster.log_prior.shape[1] != n_classes:
        raise ValueError(f"class_counts has {adjuster.log_prior.shape[1]} entries, expected {n_classes}")
    head = dict(use_etf=use_etf, train_etf_norm=train_etf_norm, etf_norm_rate=etf_norm_rate,
                normalize_feature=normalize_feature, last_relu=last_relu, use_feature_bias=use_feature_bias,
                logit_normalization=logit_normalization, logit_adjuster=adjuster, generator=generator)
    in_features = int(math.prod(input_shape))
    if name == "TableMLP":
        model: SmallLTModel = TableMLP(in_features, n_classes, **head)
    elif name == "BNLeNet5":
        if len(input_shape) != 3:
            raise ValueError(f"BNLeNet5 needs C x H x W images, got input shape {tuple(input_shape)}")
        model = BNLeNet5(input_shape, n_classes, **head)
    elif name == "BNMLP":
        model = BNMLP(in_features, n_classes, mlp_hlayer_n, mlp_features_d, **head)
    else:
        model = MLResBlock(in_features, n_classes, mlp_hlayer_n, mlp_features_d, **head)
    for m in model.modules():
        if isinstance(m, _BN_TYPES):
            m.eps = float(bn_eps)
    return model

