"""Property test: small random models (Linear / Conv2d / BN / ReLU / pooling / residual
blocks / a tied module), converted, always give finite outputs for finite inputs, round-trip
through save/load into a fresh skeleton bit for bit, and compute in eval mode what
``MaddnessMatmul`` computes on the same rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from maddnet.nn import (
    MaddConfig,
    MaddConv2d,
    MaddLinear,
    convert,
    load_converted,
    madd_layers,
    prepare,
    save_converted,
)


class Residual(nn.Module):
    def __init__(self, channels: int, norm: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.BatchNorm2d(channels) if norm else nn.Identity()

    def forward(self, x):
        return x + torch.relu(self.norm(self.conv(x)))


class Head(nn.Module):
    """Linear -> ReLU -> a tied Linear used twice -> Linear."""

    def __init__(self, channels: int, hidden: int, classes: int, tied: bool):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.again = self.mid if tied else nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        x = torch.relu(self.fc1(x))
        return self.fc2(torch.relu(self.again(torch.relu(self.mid(x)))))


@st.composite
def architectures(draw):
    blocks = []
    channels = draw(st.integers(1, 3))
    size = side = draw(st.integers(6, 9))
    for _ in range(draw(st.integers(1, 3))):
        out = draw(st.integers(2, 6))
        kernel = draw(st.sampled_from([1, 3]))
        # an unpadded 3x3 conv shrinks the image by 2: keep at least 3 pixels for the next one
        padding = draw(st.sampled_from([0, 1])) if kernel == 3 and side >= 5 else int(kernel == 3)
        side -= (kernel - 1) - 2 * padding
        blocks.append(("conv", channels, out, kernel, padding))
        channels = out
        if draw(st.booleans()):
            blocks.append(("bn", channels))
        blocks.append(("relu",))
        if draw(st.booleans()):
            blocks.append(("residual", channels, draw(st.booleans())))
    pool = draw(st.booleans())
    head = (channels, draw(st.integers(4, 12)), draw(st.integers(2, 5)), draw(st.booleans()))
    return {
        "in_chans": blocks[0][1],
        "blocks": blocks,
        "pool": pool,
        "head": head,
        "size": size,
    }


def build(arch: dict, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for block in arch["blocks"]:
        if block[0] == "conv":
            layers.append(nn.Conv2d(block[1], block[2], block[3], padding=block[4]))
        elif block[0] == "bn":
            layers.append(nn.BatchNorm2d(block[1]))
        elif block[0] == "relu":
            layers.append(nn.ReLU())
        else:
            layers.append(Residual(block[1], block[2]))
    if arch["pool"]:
        layers.append(nn.MaxPool2d(2, ceil_mode=True))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), Head(*arch["head"])]
    model = nn.Sequential(*layers)
    for module in model.modules():  # BatchNorm with non-trivial statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.slow
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=architectures(), seed=st.integers(0, 10_000))
def test_random_models_convert_round_trip_and_match_the_estimator(arch, seed, tmp_path_factory, layer_amm):
    model = build(arch, seed)
    gen = torch.Generator().manual_seed(seed)
    size = arch["size"]
    batches = [torch.randn(16, arch["in_chans"], size, size, generator=gen) for _ in range(2)]
    config = MaddConfig(min_rows=16, max_rows=4096)
    prepare(model, config)
    with torch.no_grad():
        for x in batches:
            model(x)
    recorded = {name: r.rows().clone() for name, r in model._maddnet_prepared.recorders.items()}
    dense = {name: model.get_submodule(name) for name in recorded}
    dead = [name for name, rows in recorded.items() if bool((rows == rows[:1]).all())]
    if dead:  # every ReLU before a layer off: its input is constant, refused by name, none converted
        with pytest.raises(ValueError, match=r"^layer '.+': tree encoder: every training row is the same"):
            convert(model)
        assert not madd_layers(model)
        return
    convert(model)
    layers = madd_layers(model)
    assert set(layers) >= set(recorded)
    head = model[-1]
    assert (head.again is head.mid) == arch["head"][3]  # a tied module stays one module

    x = torch.randn(4, arch["in_chans"], size, size, generator=gen)
    with torch.no_grad():
        out = model(x)
    assert torch.isfinite(out).all()

    # save -> load into a freshly built (differently initialised) skeleton: bit for bit
    path = tmp_path_factory.mktemp("m") / "model.pt"
    save_converted(model, path)
    fresh = load_converted(build(arch, seed + 1), path).eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), out)

    # every layer computes what MaddnessMatmul fitted on the same rows computes
    for name, rows in recorded.items():
        layer, source = layers[name], dense[name]
        weight = source.weight.detach().reshape(source.weight.shape[0], -1).T
        amm = layer_amm(layer.ncodebooks, lut_bits=8).fit(rows, weight)
        assert torch.equal(layer.split_dims, amm.split_dims_), name
        assert torch.equal(layer.lut_q_values, amm.lut_q_.values), name
        probe = rows[:50]
        bias = 0 if layer.bias is None else layer.bias.detach()
        if isinstance(layer, MaddLinear):
            with torch.no_grad():
                torch.testing.assert_close(layer(probe), amm(probe) + bias, rtol=0, atol=1e-5)
        else:
            assert isinstance(layer, MaddConv2d)
            images = batches[0][:2] if name == next(iter(recorded)) else None
            if images is not None:  # the first conv reads the model's input: check it on images
                columns = F.unfold(images, layer.kernel_size, padding=layer.geometry.padding)
                patch_rows = columns.transpose(1, 2).reshape(-1, layer.in_dim)
                expected = (amm(patch_rows) + bias).reshape(2, -1, layer.out_dim).transpose(1, 2)
                with torch.no_grad():
                    got = layer(images).reshape(2, layer.out_dim, -1)
                torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
