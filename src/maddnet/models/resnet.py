"""ResNet-18/50 with the torchvision definitions (torchvision state dicts load as they are).

``small_input=True`` adapts the stem to small images (CIFAR/Fashion-MNIST): a 3×3
stride-1 first conv and no max pool, as in the usual CIFAR variants. The names of all
modules stay the same, so only ``conv1.weight`` differs in shape from ImageNet weights.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet as tv_resnet

from maddnet.models.registry import register_model


def _adapt(model: tv_resnet.ResNet, in_chans: int, small_input: bool) -> tv_resnet.ResNet:
    if small_input:
        model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_chans != 3:
        model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if small_input or in_chans != 3:
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


@register_model("resnet18")
def resnet18(
    num_classes: int = 1000, in_chans: int = 3, small_input: bool = False, **kwargs
) -> tv_resnet.ResNet:
    return _adapt(tv_resnet.resnet18(num_classes=num_classes, **kwargs), in_chans, small_input)


@register_model("resnet50")
def resnet50(
    num_classes: int = 1000, in_chans: int = 3, small_input: bool = False, **kwargs
) -> tv_resnet.ResNet:
    return _adapt(tv_resnet.resnet50(num_classes=num_classes, **kwargs), in_chans, small_input)
