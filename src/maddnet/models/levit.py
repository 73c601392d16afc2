"""LeViT with the timm definitions (timm state dicts load as they are).

The timm stem downsamples by 16 (or 8). For small images (28×28, 32×32) that leaves one
or two tokens, so ``small_input=True`` swaps in a stride-4 stem (two 3×3 stride-2
conv+BN, the first two layers of timm's stem): 28×28 → 7×7 tokens, then 4×4 and 2×2 in
the later stages. ``img_size`` must match the input size because LeViT's attention
biases are sized for a fixed token grid.
"""

from __future__ import annotations

import timm
from timm.models.levit import ConvNorm
from torch import nn

from maddnet.models.registry import register_model

LEVIT_VARIANTS = ("levit_128s", "levit_128", "levit_192", "levit_256", "levit_384")
# smaller than any timm variant, for small images on CPUs: timm's levit_128s definition
# with these settings (no pretrained weights exist for it)
LEVIT_TINY = {"embed_dim": (64, 128, 192), "key_dim": 16, "num_heads": (2, 4, 6), "depth": (1, 2, 2)}


class Stem4(nn.Sequential):
    """Two 3×3 stride-2 ConvNorm layers with an activation between: stride 4."""

    def __init__(self, in_chans: int, out_chans: int, act_layer: type[nn.Module] = nn.Hardswish):
        super().__init__()
        self.stride = 4
        self.add_module("conv1", ConvNorm(in_chans, out_chans // 2, 3, stride=2, padding=1))
        self.add_module("act1", act_layer())
        self.add_module("conv2", ConvNorm(out_chans // 2, out_chans, 3, stride=2, padding=1))


def _build(
    variant: str, num_classes: int, in_chans: int, img_size: int = 224, small_input: bool = False, **kwargs
) -> nn.Module:
    if small_input:
        embed_dim = kwargs.get("embed_dim", timm.models.levit.model_cfgs[variant]["embed_dim"])
        kwargs.update(stem_backbone=Stem4(in_chans, embed_dim[0]), stem_stride=4)
    return timm.create_model(
        variant, pretrained=False, num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs
    )


def _register(variant: str) -> None:
    @register_model(variant)
    def builder(
        num_classes: int = 1000, in_chans: int = 3, img_size: int = 224, small_input: bool = False, **kwargs
    ) -> nn.Module:
        return _build(variant, num_classes, in_chans, img_size, small_input, **kwargs)

    builder.__doc__ = f"timm {variant}; see the module docstring for ``small_input``."


for _variant in LEVIT_VARIANTS:
    _register(_variant)


@register_model("levit_tiny")
def levit_tiny(
    num_classes: int = 1000, in_chans: int = 3, img_size: int = 224, small_input: bool = False, **kwargs
) -> nn.Module:
    """A 3-stage LeViT of width 64/128/192 (see LEVIT_TINY); same code as timm's LeViTs."""
    return _build("levit_128s", num_classes, in_chans, img_size, small_input, **{**LEVIT_TINY, **kwargs})
