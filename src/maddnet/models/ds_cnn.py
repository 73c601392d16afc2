"""DS-CNN keyword-spotting nets (Zhang et al. 2017, "Hello Edge"), sizes S, M and L.

Input: (N, 1, frames, coefficients) features, e.g. 49 frames × 10 MFCC for 1 s of
16 kHz audio with 40 ms windows and 20 ms hops. A first full conv, then depthwise-
separable blocks (3×3 depthwise conv → BN → ReLU → 1×1 conv → BN → ReLU), global
average pooling and a linear classifier.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from maddnet.models.registry import register_model


@dataclass(frozen=True)
class DSCNNConfig:
    channels: int
    num_blocks: int
    first_kernel: tuple[int, int] = (10, 4)
    first_stride: tuple[int, int] = (2, 2)


# channel counts and block counts of the paper's S/M/L models
DS_CNN_SIZES = {
    "s": DSCNNConfig(channels=64, num_blocks=4),
    "m": DSCNNConfig(channels=172, num_blocks=4),
    "l": DSCNNConfig(channels=276, num_blocks=5, first_stride=(2, 1)),
}


class DepthwiseSeparable(nn.Module):
    def __init__(self, chans: int):
        super().__init__()
        self.depthwise = nn.Conv2d(chans, chans, 3, padding=1, groups=chans, bias=False)
        self.bn1 = nn.BatchNorm2d(chans)
        self.pointwise = nn.Conv2d(chans, chans, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(chans)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.depthwise(x)))
        return self.act(self.bn2(self.pointwise(x)))


class DSCNN(nn.Module):
    """(N, in_chans, frames, coefficients) → logits (N, num_classes)."""

    def __init__(self, config: DSCNNConfig, num_classes: int = 12, in_chans: int = 1, dropout: float = 0.2):
        super().__init__()
        pad = (
            config.first_kernel[0] // 2 - 1 + config.first_kernel[0] % 2,
            config.first_kernel[1] // 2 - 1 + config.first_kernel[1] % 2,
        )
        self.stem = nn.Sequential(
            nn.Conv2d(
                in_chans, config.channels, config.first_kernel, config.first_stride, padding=pad, bias=False
            ),
            nn.BatchNorm2d(config.channels),
            nn.ReLU(inplace=True),
        )
        self.blocks = nn.Sequential(*[DepthwiseSeparable(config.channels) for _ in range(config.num_blocks)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(config.channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.blocks(self.stem(x)))
        return self.fc(self.dropout(torch.flatten(x, 1)))


def _register(size: str) -> None:
    @register_model(f"ds_cnn_{size}")
    def builder(num_classes: int = 12, in_chans: int = 1, **kwargs) -> DSCNN:
        return DSCNN(DS_CNN_SIZES[size], num_classes=num_classes, in_chans=in_chans, **kwargs)

    builder.__doc__ = f"DS-CNN-{size.upper()} ({DS_CNN_SIZES[size]})."


for _size in DS_CNN_SIZES:
    _register(_size)
