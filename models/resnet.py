"""ResNet backbones for long-tailed recognition.

``LTModel.encoder`` is a torchvision ResNet (or ResNet-32, models/resnet32.py, built with
torchvision's block and attribute names) so that state-dict keys are exactly
torchvision's names under ``encoder.`` (interchangeable with the published
implementation). The classifier lives at ``encoder.fc`` (``nn.Linear`` or
:class:`~models.classifiers.ETFClassifier`).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck

from utils.names import BASIC_BLOCK_MODELS, FEATURE_DIMS, LARGE_INPUT_MODELS, RESNET_MODELS

from .backbone_options import OneParamBN, PreActBasicBlock, make_activation
from .classifiers import make_classifier
from .head import LTHead
from .logit_adjust import LogitAdjuster
from .resnet32 import CifarResNetEncoder

__all__ = ["LTModel", "build_model", "SUPPORTED_MODELS", "FEATURE_DIM"]

_CONSTRUCTORS = {
    "ResNet18": torchvision.models.resnet18,
    "ResNet34": torchvision.models.resnet34,
    "IMResNet18": torchvision.models.resnet18,
    "IMResNet34": torchvision.models.resnet34,
    "ResNeXt50": torchvision.models.resnext50_32x4d,
    "ResNet50": torchvision.models.resnet50,
    "ResNet152": torchvision.models.resnet152,
}
assert set(_CONSTRUCTORS) | {"ResNet32"} == set(RESNET_MODELS)
SUPPORTED_MODELS = tuple(_CONSTRUCTORS) + ("ResNet32",)  # in the order the error messages list them
FEATURE_DIM = {name: FEATURE_DIMS[name] for name in RESNET_MODELS}
_STAGE_NAMES = ("layer1", "layer2", "layer3", "layer4")


def _stages(encoder: nn.Module) -> list[nn.Sequential]:
    """The residual stages: layer1-4 of torchvision's ResNets, layer1-3 of ResNet-32."""
    return [getattr(encoder, n) for n in _STAGE_NAMES if hasattr(encoder, n)]


class LTModel(LTHead):
    """torchvision ResNet encoder + (Linear | ETF) classifier at ``encoder.fc`` + the head options
    (models/head.py).  ``small_input``: the CIFAR stem (3x3 stride-1 conv, no max-pool)."""

    classifier_path = "encoder.fc"

    def __init__(self, encoder: torchvision.models.ResNet, *, small_input: bool = True, **head) -> None:
        super().__init__()
        self.encoder = encoder
        self.small_input = bool(small_input)
        self._init_head(**head)

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """Raw globally pooled backbone features (B x D), before any option."""
        e = self.encoder
        x = e.relu(e.bn1(e.conv1(x)))
        if not self.small_input:
            x = e.maxpool(x)
        for stage in _stages(e):
            x = stage(x)
        x = e.avgpool(x)  # AdaptiveAvgPool2d((1, 1)): any spatial size works
        return torch.flatten(x, 1)

    def _blocks(self) -> Iterator[nn.Module]:
        for layer in _stages(self.encoder):
            yield from layer

    def identity_bn_modules(self) -> list[nn.Module]:
        """The stem's ``bn1`` and every downsample BN (ResNet-32's option-A shortcuts have none:
        its stem BN alone)."""
        modules = [self.encoder.bn1]
        for block in self._blocks():
            if isinstance(block, (BasicBlock, Bottleneck, PreActBasicBlock)) and block.downsample is not None:
                modules.extend(m for m in block.downsample.modules() if isinstance(m, nn.BatchNorm2d))
        return modules


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
    """Build an :class:`LTModel` (torchvision's default init; ResNet32: Kaiming normal, models/resnet32.py).

    ``small_input`` (CIFAR stem: 3x3 stride-1 conv, no max-pool) defaults to
    False for the IMResNet names and ResNet50/152 and True otherwise; ResNet32 always has its
    3x3 stem.  ``activation_type`` replaces
    every ReLU of the backbone (stem and blocks; not ``last_relu``).
    ``identity_skip`` turns the basic blocks into pre-activation blocks;
    ``one_param_bn`` gives the stem BN and the blocks' BNs one shared scale and
    shift (downsample BNs keep per-channel parameters, as in the original).
    ``use_dr_balancer`` scales the initial ETF norms by N/(K n_c) (needs
    ``class_counts``).

    ``generator`` seeds only the ETF random rotation and ETF bias init; the
    backbone and a Linear head use the global RNG (torchvision's init).
    """
    _check_options(name, n_classes, identity_skip, one_param_bn, use_dr_balancer, use_etf, class_counts)
    n_classes = int(n_classes)
    if small_input is None:
        small_input = name not in LARGE_INPUT_MODELS
    if name == "ResNet32":
        encoder = CifarResNetEncoder(n_classes, in_channels)  # its own 3x3 stem, never the 224-pixel one
        small_input = True
    else:
        encoder = _CONSTRUCTORS[name](weights=None, num_classes=n_classes)
        _set_stem(encoder, in_channels, small_input)
    _set_blocks(encoder, identity_skip, one_param_bn)
    _set_activations(encoder, activation_type, activation_param)
    for m in encoder.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = float(bn_eps)
    if use_etf:  # otherwise torchvision's own Linear head stays (its init drew from the global RNG)
        encoder.fc = make_classifier(encoder.fc.in_features, n_classes, use_etf=True, train_etf_norm=train_etf_norm,
                                     etf_norm_rate=etf_norm_rate, generator=generator,
                                     dr_balancer_counts=class_counts if use_dr_balancer else None)
    adjuster = LogitAdjuster(la_tau, class_counts, for_training=la_for_training, additive=la_additive)
    if adjuster.log_prior is not None and adjuster.log_prior.shape[1] != n_classes:
        raise ValueError(f"class_counts has {adjuster.log_prior.shape[1]} entries, expected {n_classes}")
    return LTModel(encoder, small_input=small_input, normalize_feature=normalize_feature, last_relu=last_relu,
                   use_feature_bias=use_feature_bias, logit_normalization=logit_normalization,
                   logit_adjuster=adjuster)


def _check_options(name, n_classes, identity_skip, one_param_bn, use_dr_balancer, use_etf, class_counts) -> None:
    if name not in RESNET_MODELS:
        raise ValueError(f"model.name '{name}' is not supported; choose one of " + ", ".join(SUPPORTED_MODELS))
    if int(n_classes) < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    if (identity_skip or one_param_bn) and name not in BASIC_BLOCK_MODELS:
        raise ValueError(f"identity_skip / one_param_bn are built for {', '.join(BASIC_BLOCK_MODELS)} "
                         f"(basic blocks), not {name}")
    if use_dr_balancer and (not use_etf or class_counts is None):
        raise ValueError("use_dr_balancer scales the ETF classifier's norms; it needs use_etf and class_counts")


def _set_stem(encoder: torchvision.models.ResNet, in_channels: int, small_input: bool) -> None:
    if small_input:
        encoder.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    elif in_channels != 3:
        # torchvision's stem already is Conv2d(3, 64, 7, 2, 3, bias=False); only rebuild it
        # when the channel count differs
        encoder.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)


def _set_blocks(encoder: torchvision.models.ResNet, identity_skip: bool, one_param_bn: bool) -> None:
    if one_param_bn:
        encoder.bn1 = OneParamBN(encoder.bn1.num_features)
    if not (identity_skip or one_param_bn):
        return
    for layer in _stages(encoder):
        for i, block in enumerate(layer):
            if identity_skip:
                layer[i] = PreActBasicBlock(block, one_param_bn=one_param_bn)
            else:  # post-activation block, only the BNs change
                block.bn1 = OneParamBN(block.bn1.num_features)
                block.bn2 = OneParamBN(block.bn2.num_features)


def _set_activations(encoder: torchvision.models.ResNet, activation_type: str, activation_param: float) -> None:
    if activation_type == "relu":
        return
    encoder.relu = make_activation(activation_type, activation_param)
    for layer in _stages(encoder):
        for block in layer:
            block.relu = make_activation(activation_type, activation_param)
