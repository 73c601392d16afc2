"""Fast inference paths compute exactly what the reference path computes, and inference-only
(float-LUT-free) layers and files give the same eval outputs.

Layers are filled with random trees and LUTs (no learning: fast, and every code is hit);
references are a naive heap walk of the tree and ``quantized_lut_sum`` (embedding bag).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from maddnet.amm import lut as lut_mod
from maddnet.amm.hashing import NonFiniteInputError
from maddnet.nn import MaddConv2d, MaddLinear
from maddnet.nn.layers import MaddUnsupportedError, TreeLinearFastPath, fast_path_for
from maddnet.nn.plan import load_converted, save_converted


def random_linear(
    in_dim: int, out_dim: int, ncodebooks: int, seed: int = 0, **fields
) -> tuple[MaddLinear, torch.Tensor]:
    """A MaddLinear with random split columns, thresholds around the data's median, LUT
    and bias, in eval mode; and 3-D Gaussian inputs (batch, tokens, features)."""
    gen = torch.Generator().manual_seed(seed)
    layer = MaddLinear(in_dim, out_dim, ncodebooks, **fields).eval()
    with torch.no_grad():
        layer.encoder.split_dims.copy_(torch.randint(0, in_dim, (ncodebooks, 4), generator=gen))
        layer.encoder.thresholds.copy_(0.5 * torch.randn(ncodebooks, 15, generator=gen))
        layer.lut.copy_(torch.randn(ncodebooks, 16, out_dim, generator=gen))
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(out_dim, generator=gen))
    return layer, torch.randn(3, 37, in_dim, generator=gen)


def naive_codes(rows: torch.Tensor, split_dims: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """The heap walk of docs/design.md, one row and codebook at a time."""
    codes = torch.empty(rows.shape[0], split_dims.shape[0], dtype=torch.uint8)
    for n in range(rows.shape[0]):
        for c in range(split_dims.shape[0]):
            i = 0
            for t in range(split_dims.shape[1]):
                i = 2 * i + int(rows[n, split_dims[c, t]] > thresholds[c, 2**t - 1 + i])
            codes[n, c] = i
    return codes


def reference_eval(layer: MaddLinear, x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, layer.in_features)
    codes = naive_codes(rows, layer.split_dims, layer.thresholds.detach())
    out = lut_mod.quantized_lut_sum(codes, layer.quantized_lut())
    if layer.bias is not None:
        out = out + layer.bias.detach()
    return out.reshape(*x.shape[:-1], layer.out_features)


@pytest.mark.parametrize(
    ("in_dim", "out_dim", "ncodebooks", "fields"),
    [
        (64, 100, 8, {}),  # M not a multiple of 64, pair table
        (96, 70, 12, {"bias": False, "lut_granularity": "column"}),
        (80, 65, 10, {"lut_bits": 4}),  # C not a multiple of 4
        (256, 130, 32, {}),  # uint8 table without pairs (C*K*K*Mp*2 > 1 MB)
    ],
)
def test_linear_fast_path_equals_reference(in_dim, out_dim, ncodebooks, fields):
    layer, x = random_linear(in_dim, out_dim, ncodebooks, **fields)
    assert isinstance(fast_path_for(layer), TreeLinearFastPath)
    expected = reference_eval(layer, x)
    with torch.no_grad():
        assert torch.equal(layer(x), expected)
        # column-major rows (x.T contiguous) and a 2-D input take the same path
        rows = x.reshape(-1, in_dim)
        assert torch.equal(layer(rows.T.contiguous().T), expected.reshape(-1, out_dim))
    assert torch.equal(layer(x), expected)  # no tensor requires grad: no autograd path either
    packed = layer.packed_lut()
    assert (packed.pairs is not None) == (ncodebooks < 32)


def test_linear_fast_path_follows_lut_changes_and_gradients():
    layer, x = random_linear(64, 40, 8)
    with torch.no_grad():
        first = layer(x)
        layer.lut.data.mul_(2)  # not seen by version counters
        second = layer(x)
    assert not torch.equal(first, second)
    assert torch.equal(second, reference_eval(layer, x))
    with torch.no_grad():
        layer.lut_q_values[:, 0].add_(1)  # a write to the integer LUT itself: re-packed too
        assert torch.equal(layer(x), reference_eval(layer, x))
        layer.load_state_dict(layer.state_dict())  # consistent again (re-derived from lut)
        second = layer(x)
        assert torch.equal(second, reference_eval(layer, x))
    # the training path (gathered values, autograd) gives the same values as eval
    x.requires_grad_(True)
    out = layer(x)
    assert torch.equal(out.detach(), second)
    out.sum().backward()
    assert x.grad is not None and layer.lut.grad is not None


def test_linear_fast_path_refuses_nonfinite_input_by_name():
    layer, x = random_linear(64, 40, 8)
    column = int(layer.split_dims[3, 2])
    x[1, 5, column] = float("nan")
    with torch.no_grad(), pytest.raises(NonFiniteInputError, match=r"MaddLinear\(D=64.*row 42.*feature"):
        layer(x)


def test_packed_lut_sum_fuses_bias_exactly():
    gen = torch.Generator().manual_seed(1)
    qlut = lut_mod.quantize_lut(torch.randn(6, 16, 70, generator=gen))
    codes = torch.randint(0, 16, (50, 6), generator=gen, dtype=torch.uint8)
    bias = torch.randn(70, generator=gen)
    packed = lut_mod.pack_lut(qlut)
    expected = lut_mod.quantized_lut_sum(codes, qlut) + bias
    assert torch.equal(lut_mod.packed_lut_sum(codes, packed, bias), expected)
    with pytest.raises(ValueError, match=r"bias must be a \(70,\) float32 CPU tensor"):
        lut_mod.packed_lut_sum(codes, packed, bias.double())


def test_inference_only_layer_same_eval_and_clear_training_error():
    layer, x = random_linear(64, 40, 8)
    with torch.no_grad():
        expected = layer(x)
    layer.drop_float_lut()
    assert not layer.has_float_lut and layer.get_config()["float_lut"] is False
    assert "lut" not in layer.state_dict()
    assert torch.equal(layer(x), expected)  # eval, nothing requires grad
    layer.train()
    with pytest.raises(MaddUnsupportedError, match="inference-only.*restore_float_lut"):
        layer(x)
    layer.restore_float_lut()
    assert layer.lut.shape == (8, 16, 40) and layer.lut.requires_grad
    layer(x).sum().backward()  # trains again, from the de-quantised LUT
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), expected)  # same integer LUT
    with pytest.raises(ValueError, match="no integer LUT"):
        MaddLinear(8, 4, 2, lut_bits=None).drop_float_lut()


def test_save_for_inference_is_smaller_and_loads_identical(tmp_path):
    def skeleton():
        return nn.Sequential(nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 24))

    model = skeleton().eval()
    model[0], x = random_linear(64, 40, 8)
    model[2], _ = random_linear(40, 24, 5, seed=2)
    with torch.no_grad():
        expected = model(x)
    save_converted(model, tmp_path / "full.pt")
    save_converted(model, tmp_path / "infer.pt", for_inference=True)
    assert model[0].has_float_lut  # the model saved is not changed
    full, infer = (tmp_path / "full.pt").stat().st_size, (tmp_path / "infer.pt").stat().st_size
    assert infer < 0.6 * full
    loaded = load_converted(skeleton(), tmp_path / "infer.pt").eval()
    assert not loaded[0].has_float_lut
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    loaded.train()
    with pytest.raises(MaddUnsupportedError, match="inference-only"):
        loaded(x)
    # a full state loaded into an inference-only layer makes it trainable again
    loaded.load_state_dict(model.state_dict())
    assert loaded[0].has_float_lut and torch.equal(loaded[0].lut, model[0].lut)


@pytest.mark.parametrize(("bias", "stride"), [(True, 1), (False, 2)])
def test_inference_only_conv_same_eval(bias, stride):
    gen = torch.Generator().manual_seed(3)
    layer = MaddConv2d(4, 6, 3, 4, stride=stride, padding=1, bias=bias).eval()
    with torch.no_grad():
        layer.encoder.split_dims.copy_(torch.randint(0, 36, (4, 4), generator=gen))
        layer.lut.copy_(torch.randn(4, 16, 6, generator=gen))
        if bias:
            layer.bias.copy_(torch.randn(6, generator=gen))
    x = torch.randn(2, 4, 8, 8, generator=gen)
    expected = layer(x)
    layer.drop_float_lut()
    assert torch.equal(layer(x), expected)
    assert set(layer.state_dict()) == ({"bias"} if bias else set()) | {
        "lut_q_values",
        "lut_q_offsets",
        "lut_q_scale",
        "encoder.thresholds",
        "encoder.split_dims",
        "encoder.temperature",
    }
