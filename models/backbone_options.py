"""Backbone options of the published implementation, as small building blocks:
activations that replace the ReLUs, the one-parameter BatchNorm, the
pre-activation ("identity skip") basic block and the BN-weight re-initialisation.

Every block keeps torchvision's attribute names (``conv1``, ``bn1``, ``conv2``,
``bn2``, ``downsample``, ``relu``), so state-dict keys stay the original's.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock

__all__ = [
    "ACTIVATIONS",
    "BN_INIT_DISTRIBUTIONS",
    "MReLU",
    "make_activation",
    "OneParamBN",
    "PreActBasicBlock",
    "reinit_bn_weights",
]

ACTIVATIONS = ("relu", "lrelu", "selu", "elu", "mrelu")
BN_INIT_DISTRIBUTIONS = ("uniform", "gauss", "rectified_gauss", "pretrained")


class MReLU(nn.Module):
    """``floor + relu(x - floor) = max(x, floor)``; the original's "mrelu" with its
    fixed floor -1 (its ``activation_param`` is not read for mrelu)."""

    def __init__(self, floor: float = -1.0) -> None:
        super().__init__()
        self.floor = float(floor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.floor + F.relu(x - self.floor)

    def extra_repr(self) -> str:
        return f"floor={self.floor}"


def make_activation(kind: str, param: float = 0.03) -> nn.Module:
    """A fresh activation module: relu | lrelu (negative slope ``param``) | selu | elu | mrelu."""
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "lrelu":
        return nn.LeakyReLU(float(param))
    if kind == "selu":
        return nn.SELU()
    if kind == "elu":
        return nn.ELU()
    if kind == "mrelu":
        return MReLU()
    raise ValueError(f"activation_type {kind!r} is not supported; choose one of {', '.join(ACTIVATIONS)}")


class _BroadcastMeanGrad(torch.autograd.Function):
    """Forward: a 1-element tensor repeated ``n`` times.  Backward: the mean (not
    the sum) of the ``n`` incoming gradients, so that a shared BN scale gets a
    gradient of the same size as one per-channel scale would, and weight decay
    keeps the same relative strength (the original's ``copy_and_aggregate``)."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, n: int) -> torch.Tensor:  # type: ignore[override]
        return value.expand(n).contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad.mean(0, keepdim=True), None


class OneParamBN(nn.BatchNorm2d):
    """BatchNorm2d with one scale and one shift shared by all channels.

    ``weight`` and ``bias`` have shape (1,) (state-dict keys unchanged, as in the
    original); running statistics stay per channel.  The gradient of the shared
    scale/shift is the mean over channels of the per-channel gradients.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True, track_running_stats=True)
        self.weight = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def affine_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-channel (weight, bias) this module normalises with."""
        return (_BroadcastMeanGrad.apply(self.weight, self.num_features),
                _BroadcastMeanGrad.apply(self.bias, self.num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return F.batch_norm(
            x,
            self.running_mean if track else None,
            self.running_var if track else None,
            *self.affine_params(), use_batch_stats, factor, self.eps)


def new_bn(num_features: int, one_param: bool) -> nn.BatchNorm2d:
    return OneParamBN(num_features) if one_param else nn.BatchNorm2d(num_features)


class PreActBasicBlock(nn.Module):
    """The original's ``identity_skip`` block: BN -> act -> conv1 -> BN -> act -> conv2,
    plus the (unchanged) shortcut, with no activation after the addition.

    Built from a torchvision :class:`BasicBlock`: the convolutions, ``bn2`` and the
    downsample path are reused; ``bn1`` now normalises the block *input*, so in a
    downsampling block it has the input's channel count (half the output's).
    """

    def __init__(self, block: BasicBlock, one_param_bn: bool = False) -> None:
        super().__init__()
        self.conv1 = block.conv1
        self.bn1 = new_bn(block.conv1.in_channels, one_param_bn)
        self.conv2 = block.conv2
        self.bn2 = new_bn(block.bn2.num_features, one_param_bn) if one_param_bn else block.bn2
        self.downsample = block.downsample
        self.stride = block.stride
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        return out + identity


def _bn_modules(model: nn.Module) -> Iterable[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None:
            yield name, module


@torch.no_grad()
def reinit_bn_weights(
    model: nn.Module,
    distribution: str,
    *,
    low: Optional[float] = None,
    high: Optional[float] = None,
    mean: Optional[float] = None,
    std: Optional[float] = None,
    include_identity: bool = True,
    identity_bn_names: Iterable[str] = (),
    pretrained_state: Optional[Mapping[str, torch.Tensor]] = None,
    gamma: Optional[float] = None,
    beta: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> list[str]:
    """Overwrite BN scales (``weight``; biases untouched), as ``modify_bn_weight``:

    - ``uniform``: U(low, high); ``gauss``: N(mean, std^2); ``rectified_gauss``:
      relu(N(mean, std^2)); each skips the BNs in ``identity_bn_names`` (stem and
      downsample BNs) unless ``include_identity``.
    - ``pretrained``: ``gamma * w + beta`` with ``w`` the same BN's weight in
      ``pretrained_state``, for every BN (``include_identity`` is not read, as in
      the original).

    Returns the names of the BN modules changed.  Draws from ``generator`` (the
    global RNG when None).
    """
    if distribution not in BN_INIT_DISTRIBUTIONS:
        raise ValueError(f"bn_weight_init_distribution {distribution!r} is not supported; "
                         f"choose one of {', '.join(BN_INIT_DISTRIBUTIONS)}")
    identity = set(identity_bn_names)
    changed = []
    for name, bn in _bn_modules(model):
        w = bn.weight
        if distribution == "pretrained":
            key = f"{name}.weight"
            if pretrained_state is None or key not in pretrained_state:
                raise KeyError(f"the pretrained state dict has no '{key}'")
            source = pretrained_state[key]
            if tuple(source.shape) != tuple(w.shape):
                raise ValueError(f"'{key}' has shape {tuple(source.shape)} in the pretrained state dict "
                                 f"but {tuple(w.shape)} in this model")
            w.copy_(gamma * source.to(w.dtype) + beta)
        else:
            if not include_identity and name in identity:
                continue
            if distribution == "uniform":
                draw = torch.rand(w.shape, generator=generator, dtype=w.dtype)
                w.copy_((high - low) * draw + low)
            else:
                draw = torch.randn(w.shape, generator=generator, dtype=w.dtype) * std + mean
                w.copy_(draw.clamp_min(0.0) if distribution == "rectified_gauss" else draw)
        changed.append(name)
    return changed
