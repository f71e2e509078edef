"""ResNet backbones for long-tailed recognition.

``LTModel.encoder`` is a torchvision ResNet so that state-dict keys are exactly
torchvision's names under ``encoder.`` (interchangeable with the published
implementation). The classifier lives at ``encoder.fc`` (``nn.Linear`` or
:class:`~models.classifiers.ETFClassifier`).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck

from .backbone_options import OneParamBN, PreActBasicBlock, make_activation
from .classifiers import ETFClassifier
from .logit_adjust import LogitAdjuster

__all__ = ["LTModel", "build_model", "SUPPORTED_MODELS", "FEATURE_DIM", "LARGE_INPUT_MODELS",
           "BASIC_BLOCK_MODELS"]

_NORM_EPS = 1e-10

_CONSTRUCTORS = {
    "ResNet18": torchvision.models.resnet18,
    "ResNet34": torchvision.models.resnet34,
    "IMResNet18": torchvision.models.resnet18,
    "IMResNet34": torchvision.models.resnet34,
    "ResNeXt50": torchvision.models.resnext50_32x4d,
}
SUPPORTED_MODELS = tuple(_CONSTRUCTORS)
FEATURE_DIM = {"ResNet18": 512, "ResNet34": 512, "IMResNet18": 512, "IMResNet34": 512, "ResNeXt50": 2048}
# The 224-pixel variants: torchvision's 7x7 stride-2 stem and 3x3 stride-2 max-pool.
LARGE_INPUT_MODELS = ("IMResNet18", "IMResNet34")
# identity_skip and one_param_bn rebuild basic blocks; ResNeXt50's bottlenecks are
# not supported (the original raises NotImplementedError there too).
BASIC_BLOCK_MODELS = ("ResNet18", "ResNet34", "IMResNet18", "IMResNet34")

_CLASSIFIER_TYPES = (nn.Linear, ETFClassifier)

NamedParams = list[tuple[str, nn.Parameter]]


class LTModel(nn.Module):
    """torchvision ResNet encoder + (Linear | ETF) classifier + options.

    ``features(x)``: stem -> layer1..4 -> adaptive avg-pool -> flatten, then
    (1) L2 feature normalisation, (2) last ReLU, (3) feature bias, each if enabled.
    ``classify(h)``: ``encoder.fc`` -> optional per-row logit L2 normalisation ->
    logit adjuster. ``forward(x) = classify(features(x))``.
    """

    def __init__(
        self,
        encoder: torchvision.models.ResNet,
        *,
        small_input: bool = True,
        normalize_feature: bool = False,
        last_relu: bool = False,
        use_feature_bias: bool = False,
        logit_normalization: bool = False,
        logit_adjuster: LogitAdjuster | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.small_input = bool(small_input)
        self.normalize_feature = bool(normalize_feature)
        self.last_relu = bool(last_relu)
        self.use_feature_bias = bool(use_feature_bias)
        self.logit_normalization = bool(logit_normalization)
        fc = encoder.fc
        self.feature_dim = int(fc.in_features)
        self.n_classes = int(fc.out_features)
        if self.use_feature_bias:
            self.feature_bias = nn.Parameter(torch.zeros(1, self.feature_dim))
        else:
            self.register_parameter("feature_bias", None)
        # Holds only a non-persistent buffer -> contributes no state-dict keys.
        self.logit_adjuster = logit_adjuster if logit_adjuster is not None else LogitAdjuster(0.0)

    # ------------------------------------------------------------------ forward
    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """Raw globally pooled backbone features (B x D), before any option."""
        e = self.encoder
        x = e.relu(e.bn1(e.conv1(x)))
        if not self.small_input:
            x = e.maxpool(x)
        x = e.layer1(x)
        x = e.layer2(x)
        x = e.layer3(x)
        x = e.layer4(x)
        x = e.avgpool(x)  # AdaptiveAvgPool2d((1, 1)): any spatial size works
        return torch.flatten(x, 1)

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
        logits = self.encoder.fc(h)
        if self.logit_normalization:
            logits = logits / (logits.norm(p=2, dim=1, keepdim=True) + _NORM_EPS)
        return self.logit_adjuster(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))

    # ------------------------------------------------------------------ helpers
    @property
    def classifier(self) -> nn.Module:
        return self.encoder.fc

    @property
    def uses_etf(self) -> bool:
        return isinstance(self.encoder.fc, ETFClassifier)

    def classifier_weight(self) -> torch.Tensor:
        """Effective K x D classifier weight, detached (a copy)."""
        fc = self.encoder.fc
        if isinstance(fc, ETFClassifier):
            w = fc.weight()
        elif isinstance(fc, nn.Linear):
            w = fc.weight
        else:  # pragma: no cover - only the two classifier types are built
            raise TypeError(f"unsupported classifier type {type(fc).__name__}")
        return w.detach().clone()

    def _blocks(self) -> Iterator[nn.Module]:
        for layer in (self.encoder.layer1, self.encoder.layer2,
                      self.encoder.layer3, self.encoder.layer4):
            for block in layer:
                yield block

    def named_parameter_groups(self) -> dict[str, NamedParams]:
        """Parameters grouped by module type.

        Keys: ``conv`` (all Conv2d weights, incl. downsample convs), ``bn`` (all
        BatchNorm2d weights and biases), ``identity_bn`` (subset of ``bn``: the
        stem's ``bn1`` and every downsample BN), ``classifier`` (trainable params
        of ``encoder.fc``), ``feature_bias``. Each is a list of (name, param)
        with names as in ``named_parameters()``.
        """
        groups: dict[str, NamedParams] = {
            "conv": [], "bn": [], "identity_bn": [], "classifier": [], "feature_bias": [],
        }
        identity_bn_ids = {id(self.encoder.bn1)}
        for block in self._blocks():
            if isinstance(block, (BasicBlock, Bottleneck, PreActBasicBlock)) and block.downsample is not None:
                for m in block.downsample.modules():
                    if isinstance(m, nn.BatchNorm2d):
                        identity_bn_ids.add(id(m))

        for mname, module in self.named_modules():
            full = lambda p: f"{mname}.{p}" if mname else p  # noqa: E731
            if isinstance(module, nn.Conv2d):
                groups["conv"].extend(
                    (full(n), p) for n, p in module.named_parameters(recurse=False))
            elif isinstance(module, nn.BatchNorm2d):
                items = [(full(n), p) for n, p in module.named_parameters(recurse=False)]
                groups["bn"].extend(items)
                if id(module) in identity_bn_ids:
                    groups["identity_bn"].extend(items)
            elif isinstance(module, _CLASSIFIER_TYPES) and module is self.encoder.fc:
                groups["classifier"].extend(
                    (full(n), p) for n, p in module.named_parameters(recurse=False)
                    if p.requires_grad)
        if self.feature_bias is not None:
            groups["feature_bias"].append(("feature_bias", self.feature_bias))
        return groups

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Conv and BN parameters of the encoder (everything but ``encoder.fc``).
        Does not include ``feature_bias``."""
        g = self.named_parameter_groups()
        return [p for _, p in g["conv"]] + [p for _, p in g["bn"]]

    def classifier_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of ``encoder.fc``."""
        return [p for _, p in self.named_parameter_groups()["classifier"]]


def build_model(
    name: str,
    n_classes: int,
    *,
    in_channels: int = 3,
    small_input: bool | None = None,
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
    activation_type: str = "relu",
    activation_param: float = 0.03,
    identity_skip: bool = False,
    one_param_bn: bool = False,
    use_dr_balancer: bool = False,
) -> LTModel:
    """Build an :class:`LTModel` (torchvision default init throughout).

    ``small_input`` (CIFAR stem: 3x3 stride-1 conv, no max-pool) defaults to
    False for the IMResNet names and True otherwise.  ``activation_type`` replaces
    every ReLU of the backbone (stem and blocks; not ``last_relu``).
    ``identity_skip`` turns the basic blocks into pre-activation blocks;
    ``one_param_bn`` gives the stem BN and the blocks' BNs one shared scale and
    shift (downsample BNs keep per-channel parameters, as in the original).
    ``use_dr_balancer`` scales the initial ETF norms by N/(K n_c) (needs
    ``class_counts``).

    ``generator`` seeds only the ETF random rotation and ETF bias init; the
    backbone and a Linear head use the global RNG (torchvision's init).
    """
    if name not in _CONSTRUCTORS:
        raise ValueError(
            f"model.name '{name}' is not supported; choose one of "
            + ", ".join(SUPPORTED_MODELS))
    if int(n_classes) < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    if (identity_skip or one_param_bn) and name not in BASIC_BLOCK_MODELS:
        raise ValueError(f"identity_skip / one_param_bn are built for {', '.join(BASIC_BLOCK_MODELS)} "
                         f"(basic blocks), not {name}")
    if use_dr_balancer and (not use_etf or class_counts is None):
        raise ValueError("use_dr_balancer scales the ETF classifier's norms; it needs use_etf and class_counts")
    n_classes = int(n_classes)
    if small_input is None:
        small_input = name not in LARGE_INPUT_MODELS

    encoder = _CONSTRUCTORS[name](weights=None, num_classes=n_classes)
    if small_input:
        encoder.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1,
                                  padding=1, bias=False)
    elif in_channels != 3:
        # torchvision's stem already is Conv2d(3, 64, 7, 2, 3, bias=False);
        # only rebuild it when the channel count differs.
        encoder.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2,
                                  padding=3, bias=False)
    if one_param_bn:
        encoder.bn1 = OneParamBN(encoder.bn1.num_features)
    if identity_skip or one_param_bn:
        for layer_name in ("layer1", "layer2", "layer3", "layer4"):
            layer = getattr(encoder, layer_name)
            for i, block in enumerate(layer):
                if identity_skip:
                    layer[i] = PreActBasicBlock(block, one_param_bn=one_param_bn)
                else:  # post-activation block, only the BNs change
                    block.bn1 = OneParamBN(block.bn1.num_features)
                    block.bn2 = OneParamBN(block.bn2.num_features)
    if activation_type != "relu":
        encoder.relu = make_activation(activation_type, activation_param)
        for layer in (encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4):
            for block in layer:
                block.relu = make_activation(activation_type, activation_param)
    for m in encoder.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = float(bn_eps)

    d = encoder.fc.in_features
    if use_etf:
        encoder.fc = ETFClassifier(d, n_classes, norm_rate=etf_norm_rate,
                                   train_norm=train_etf_norm, generator=generator,
                                   dr_balancer_counts=class_counts if use_dr_balancer else None)

    adjuster = LogitAdjuster(la_tau, class_counts, for_training=la_for_training,
                             additive=la_additive)
    if adjuster.log_prior is not None and adjuster.log_prior.shape[1] != n_classes:
        raise ValueError(
            f"class_counts has {adjuster.log_prior.shape[1]} entries, expected {n_classes}")

    return LTModel(
        encoder,
        small_input=small_input,
        normalize_feature=normalize_feature,
        last_relu=last_relu,
        use_feature_bias=use_feature_bias,
        logit_normalization=logit_normalization,
        logit_adjuster=adjuster,
    )
