"""ResNet-18/50 with the torchvision definitions (torchvision state dicts load as they are).

``small_input=True`` adapts the stem to small images (CIFAR/Fashion-MNIST): a 3×3
stride-1 first conv and no max pool, as in the usual CIFAR variants. ``stem_stride=2``
makes that conv stride 2: the stages then run at half the resolution (28×28 inputs: 14×14
in ``layer1``, 2×2 in ``layer4``) for a quarter of the MACs, which is what makes ResNet-50
trainable on Fashion-MNIST on a CPU (ImageNet's stem would leave ``layer4`` at 1×1, where
a 3×3 conv reads only its centre tap). The names of all modules stay the same, so only
``conv1.weight`` differs in shape from ImageNet weights.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet as tv_resnet

from maddnet.models.registry import register_model


def _adapt(model: tv_resnet.ResNet, in_chans: int, small_input: bool, stem_stride: int) -> tv_resnet.ResNet:
    if isinstance(stem_stride, bool) or not isinstance(stem_stride, int) or stem_stride not in (1, 2):
        raise ValueError(f"ResNet stem_stride must be the integer 1 or 2, got {stem_stride!r}")
    if stem_stride != 1 and not small_input:
        raise ValueError("stem_stride applies to the small-input stem only: pass small_input=True")
    if small_input:
        model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=stem_stride, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_chans != 3:
        model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if small_input or in_chans != 3:
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


@register_model("resnet18")
def resnet18(
    num_classes: int = 1000,
    in_chans: int = 3,
    small_input: bool = False,
    stem_stride: int = 1,
    **kwargs,
) -> tv_resnet.ResNet:
    return _adapt(tv_resnet.resnet18(num_classes=num_classes, **kwargs), in_chans, small_input, stem_stride)


@register_model("resnet50")
def resnet50(
    num_classes: int = 1000,
    in_chans: int = 3,
    small_input: bool = False,
    stem_stride: int = 1,
    **kwargs,
) -> tv_resnet.ResNet:
    return _adapt(tv_resnet.resnet50(num_classes=num_classes, **kwargs), in_chans, small_input, stem_stride)
