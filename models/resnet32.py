"""ResNet-32 of He et al. (2016, section 4.2): the CIFAR backbone of the long-tailed literature
(LDAM-DRW, BBN, RIDE, PaCo; not in the published implementation of WB, whose code trains ResNet-34).

3x3 16-channel stem conv + BN + ReLU, three stages of 5 basic blocks with 16 / 32 / 64
channels (stride 2 entering stages 2 and 3), global average pooling: D = 64.  When a block
changes the shape, its shortcut is He et al.'s option A: parameter-free, the input subsampled
with stride 2 and its channels zero-padded (half the new channels on each side, as the LTR
codebases do).  464,154 parameters with a 10-class Linear classifier.

Names follow torchvision's ResNet under ``encoder`` (``encoder.conv1``, ``encoder.bn1``,
``encoder.layer1.0.conv1`` ... ``encoder.layer3``, the classifier at ``encoder.fc``), and the
blocks are torchvision's :class:`BasicBlock` with the option-A shortcut as ``downsample``, so
that every option built on those blocks (activations, pre-activation blocks, one-parameter
BN, the weight-decay module indices 0 stem / 1-3 stages / 5 classifier) applies unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock

__all__ = ["CifarResNetEncoder", "OptionAShortcut", "BLOCKS_PER_STAGE", "STAGE_WIDTHS"]

BLOCKS_PER_STAGE = 5  # depth 6n + 2 = 32 with n = 5
STAGE_WIDTHS = (16, 32, 64)


class OptionAShortcut(nn.Module):
    """He et al.'s option A: x subsampled by ``stride``, channels zero-padded to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.stride = int(in_channels), int(out_channels), int(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra = self.out_channels - self.in_channels
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}, stride {self.stride}, zero-padded"


class CifarResNetEncoder(nn.Module):
    """The ResNet-32 backbone with torchvision's attribute names, and the classifier at ``fc``."""

    def __init__(self, n_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, STAGE_WIDTHS[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0])
        self.relu = nn.ReLU(inplace=True)
        width = STAGE_WIDTHS[0]
        for i, out in enumerate(STAGE_WIDTHS):
            stride = 1 if i == 0 else 2
            blocks = []
            for b in range(BLOCKS_PER_STAGE):
                s = stride if b == 0 else 1
                shortcut = OptionAShortcut(width, out, s) if (s != 1 or width != out) else None
                blocks.append(BasicBlock(width, out, stride=s, downsample=shortcut))
                width = out
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width, n_classes)
        self._init_weights()

    def layers(self) -> tuple[nn.Sequential, ...]:
        return (self.layer1, self.layer2, self.layer3)

    def _init_weights(self) -> None:
        # Kaiming-normal (He et al. 2015: fan-in, ReLU gain) on every conv and the Linear
        # classifier, as the LTR codebases' resnet32 (LDAM-DRW's _weights_init); BN at 1 / 0.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (B x 64); the classifier is applied by the model's head."""
        x = self.relu(self.bn1(self.conv1(x)))
        for layer in self.layers():
            x = layer(x)
        return torch.flatten(self.avgpool(x), 1)
