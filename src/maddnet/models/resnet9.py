"""ResNet-9, the CIFAR-10 net of the DAWNBench entries (Page 2018 / Myrtle.ai).

prep conv → [conv, pool, residual] → [conv, pool] → [conv, pool, residual] → global max
pool → linear. ``width`` is the channel count of the prep layer (64 in the original);
the stages use 2×, 4× and 8× of it.
"""

from __future__ import annotations

import torch
from torch import nn

from maddnet.models.registry import register_model


def conv_bn(in_chans: int, out_chans: int, pool: bool = False) -> nn.Sequential:
    """3×3 conv (no bias: the BN shift replaces it) → BN → ReLU (→ 2×2 max pool)."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_chans, out_chans, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_chans),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    """x + two conv_bn blocks of x."""

    def __init__(self, chans: int):
        super().__init__()
        self.res1 = conv_bn(chans, chans)
        self.res2 = conv_bn(chans, chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res2(self.res1(x))


class ResNet9(nn.Module):
    """Input (N, in_chans, H, W) with H, W ≥ 8 → logits (N, num_classes)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 64, logit_scale: float = 0.125):
        super().__init__()
        self.prep = conv_bn(in_chans, width)
        self.layer1 = nn.Sequential(conv_bn(width, 2 * width, pool=True), Residual(2 * width))
        self.layer2 = conv_bn(2 * width, 4 * width, pool=True)
        self.layer3 = nn.Sequential(conv_bn(4 * width, 8 * width, pool=True), Residual(8 * width))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(8 * width, num_classes, bias=False)
        # the original scales the logits down; it keeps early training stable with high lr
        self.logit_scale = logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x) * self.logit_scale


@register_model("resnet9")
def resnet9(num_classes: int = 10, in_chans: int = 3, width: int = 64, **kwargs) -> ResNet9:
    return ResNet9(num_classes=num_classes, in_chans=in_chans, width=width, **kwargs)
