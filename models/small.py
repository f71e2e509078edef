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

The model interface is the project's (see models/resnet.py ``LTModel``): ``features(x)``
applies, after the backbone, feature L2-normalisation, last ReLU and feature bias (each
if enabled, in that order); ``classify(h)`` is the classifier (``nn.Linear`` or the
shared :class:`~models.classifiers.ETFClassifier`), then logit normalisation, then the
shared :class:`~models.logit_adjust.LogitAdjuster`.  The original refused ETF on the
MNIST networks; here every small network accepts both heads.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .classifiers import ETFClassifier
from .logit_adjust import LogitAdjuster

__all__ = ["SMALL_MODELS", "SmallLTModel", "TableMLP", "BNLeNet5", "BNMLP", "MLResBlock",
           "build_small_model", "small_model_options"]

_NORM_EPS = 1e-10
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
NamedParams = list[tuple[str, nn.Parameter]]


class SmallLTModel(nn.Module):
    """Backbone (``pooled_features``) + classifier at ``classifier_name`` + the options of LTModel."""

    classifier_name = "fc"
    #: BatchNorm modules on the identity path (the original's belongs_to_identity_bn)
    identity_bn_names: tuple[str, ...] = ()

    def _init_head(self, feature_dim: int, n_classes: int, *, use_etf: bool, train_etf_norm: bool,
                   etf_norm_rate: float, normalize_feature: bool, last_relu: bool, use_feature_bias: bool,
                   logit_normalization: bool, logit_adjuster: LogitAdjuster | None,
                   generator: torch.Generator | None) -> None:
        self.feature_dim = int(feature_dim)
        self.n_classes = int(n_classes)
        if use_etf:
            head = ETFClassifier(self.feature_dim, self.n_classes, norm_rate=etf_norm_rate,
                                 train_norm=train_etf_norm, generator=generator)
        else:
            head = nn.Linear(self.feature_dim, self.n_classes)
        setattr(self, self.classifier_name, head)
        self.normalize_feature = bool(normalize_feature)
        self.last_relu = bool(last_relu)
        self.logit_normalization = bool(logit_normalization)
        if use_feature_bias:
            self.feature_bias = nn.Parameter(torch.zeros(1, self.feature_dim))
        else:
            self.register_parameter("feature_bias", None)
        self.logit_adjuster = logit_adjuster if logit_adjuster is not None else LogitAdjuster(0.0)

    # ------------------------------------------------------------------ forward
    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pooled_features(x)
        if self.normalize_feature:
            h = h / (h.norm(p=2, dim=1, keepdim=True) + _NORM_EPS)
        if self.last_relu:
            h = F.relu(h)
        if self.feature_bias is not None:
            h = h + self.feature_bias
        return h

    def classify(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(h)
        if self.logit_normalization:
            logits = logits / (logits.norm(p=2, dim=1, keepdim=True) + _NORM_EPS)
        return self.logit_adjuster(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))

    # ------------------------------------------------------------------ helpers
    @property
    def classifier(self) -> nn.Module:
        return getattr(self, self.classifier_name)

    @property
    def classifier_prefix(self) -> str:
        """State-dict prefix of the classifier (stage 2's ETF <-> Linear conversion)."""
        return self.classifier_name + "."

    @property
    def uses_etf(self) -> bool:
        return isinstance(self.classifier, ETFClassifier)

    def classifier_weight(self) -> torch.Tensor:
        """Effective K x D classifier weight, detached (a copy)."""
        fc = self.classifier
        w = fc.weight() if isinstance(fc, ETFClassifier) else fc.weight
        return w.detach().clone()

    def named_parameter_groups(self) -> dict[str, NamedParams]:
        """The groups of LTModel, by module type: ``conv`` (the weights of every Conv2d and
        every Linear layer but the classifier), ``bn`` (BatchNorm weights and biases),
        ``identity_bn`` (subset of ``bn``), ``classifier``, ``feature_bias``."""
        groups: dict[str, NamedParams] = {
            "conv": [], "bn": [], "identity_bn": [], "classifier": [], "feature_bias": [],
        }
        head = self.classifier
        identity = {id(self.get_submodule(n)) for n in self.identity_bn_names}
        for mname, module in self.named_modules():
            items = [(f"{mname}.{n}", p) for n, p in module.named_parameters(recurse=False)]
            if module is head:
                groups["classifier"].extend((n, p) for n, p in items if p.requires_grad)
            elif isinstance(module, (nn.Conv2d, nn.Linear)):
                groups["conv"].extend(items)
            elif isinstance(module, _BN_TYPES):
                groups["bn"].extend(items)
                if id(module) in identity:
                    groups["identity_bn"].extend(items)
        if self.feature_bias is not None:
            groups["feature_bias"].append(("feature_bias", self.feature_bias))
        return groups

    def backbone_parameters(self) -> list[nn.Parameter]:
        g = self.named_parameter_groups()
        return [p for _, p in g["conv"]] + [p for _, p in g["bn"]]

    def classifier_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_parameter_groups()["classifier"]]


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
        self._init_head(self.WIDTH, n_classes, **head)

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        for layer in self.encoder:
            x = layer(x)
        return x


class BNLeNet5(SmallLTModel):
    classifier_name = "fc3"

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
        self._init_head(84, n_classes, **head)

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
        self._init_head(width, n_classes, **head)

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
        self._init_head(width, n_classes, **head)

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.linear0(torch.flatten(x, 1))))
        for i in range(self.blocks):
            skip = x
            x = F.relu(self.bnList[2 * i](self.linearList[2 * i](x)))
            x = self.bnList[2 * i + 1](self.linearList[2 * i + 1](x))
            x = F.relu(skip + x)
        return x


SMALL_MODELS = ("TableMLP", "BNLeNet5", "BNMLP", "MLResBlock")


def small_model_options(model_cfg, data) -> dict:
    """The build_model keywords only the small networks take (empty for the ResNets)."""
    if model_cfg.name not in SMALL_MODELS:
        return {}
    shape = (3, 224, 224) if data.train_images is None else tuple(data.train_images.shape[1:])
    if model_cfg.name == "BNLeNet5" and (len(shape) != 3 or min(shape[1:]) < 16):
        from utils.errors import ConfigError

        raise ConfigError(f"model.name = 'BNLeNet5' needs images of at least 16 x 16 pixels; "
                          f"data.name = {data.name!r} has inputs of shape {' x '.join(map(str, shape))}")
    return {"input_shape": shape, "mlp_hlayer_n": model_cfg.mlp_hlayer_n,
            "mlp_features_d": model_cfg.mlp_features_d}


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

