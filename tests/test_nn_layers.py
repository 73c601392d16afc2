"""MaddLinear / MaddConv2d: outputs equal MaddnessMatmul on the layer's rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maddnet.amm.hashing import encode
from maddnet.amm.lut import lut_sum, quantized_lut_sum
from maddnet.nn import MaddConv2d, MaddLinear
from maddnet.nn.patches import (
    ConvGeometry,
    conv_lut_forward,
    encode_patches,
    gather_patch_columns,
    gather_patches,
)


def unfold_rows(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def rows_to_image(y: torch.Tensor, batch: int, out_h: int, out_w: int) -> torch.Tensor:
    return y.reshape(batch, out_h, out_w, -1).permute(0, 3, 1, 2)


@pytest.mark.parametrize(
    "kernel,stride,padding,dilation,bias",
    [(3, 1, 1, 1, True), ((3, 2), 2, (1, 0), 1, False), (3, 1, 2, 2, True), (1, 1, 0, 1, True)],
)
@pytest.mark.parametrize("lut_bits", [None, 8])
@pytest.mark.parametrize("maddness", [False, True], ids=["default", "maddness"])
def test_conv_equals_maddness_on_unfolded_rows(
    kernel, stride, padding, dilation, bias, lut_bits, maddness, layer_amm
):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias)
    x = torch.randn(3, 6, 11, 9)
    rows = unfold_rows(x, conv)
    ncodebooks = 6 if conv.kernel_size != (1, 1) else 2
    trees = {"hash_objective": "input", "refine_sweeps": 0} if maddness else {}
    layer = MaddConv2d.from_dense(conv, rows, ncodebooks=ncodebooks, lut_bits=lut_bits, **trees).eval()
    amm = layer_amm(ncodebooks, maddness=maddness, lut_bits=lut_bits)
    amm.fit(rows, conv.weight.detach().reshape(10, -1).T)
    expected = amm(rows) + (conv.bias if bias else 0)
    with torch.no_grad():
        out = layer(x)
        dense = conv(x)
    assert out.shape == dense.shape
    out_h, out_w = dense.shape[2:]
    torch.testing.assert_close(out, rows_to_image(expected, 3, out_h, out_w), rtol=0, atol=1e-5)
    assert torch.equal(layer.split_dims, amm.split_dims_)
    assert torch.equal(layer.codes(x), amm.encode(rows))
    assert out.is_contiguous()


def test_linear_any_leading_dims_equals_maddness(layer_amm):
    torch.manual_seed(1)
    linear = nn.Linear(24, 7)
    x = torch.randn(5, 13, 24)
    rows = x.reshape(-1, 24)
    for bits in (None, 8):
        layer = MaddLinear.from_dense(linear, rows, ncodebooks=3, lut_bits=bits).eval()
        amm = layer_amm(3, lut_bits=bits).fit(rows, linear.weight.detach().T)
        with torch.no_grad():
            out = layer(x)
        assert out.shape == (5, 13, 7)
        torch.testing.assert_close(out.reshape(-1, 7), amm(rows) + linear.bias, rtol=0, atol=1e-5)
        # error is small relative to the exact product (a sanity bound, not the test's point)
        with torch.no_grad():
            exact = linear(x)
        assert float((out - exact).norm() / exact.norm()) < 0.8


def test_eval_fast_path_matches_training_path():
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    x = torch.randn(2, 4, 8, 8)
    for bits in (None, 8):
        layer = MaddConv2d.from_dense(conv, unfold_rows(x, conv), lut_bits=bits)
        layer.eval()
        with torch.no_grad():
            fast = layer(x)
        differentiable = layer(x.clone().requires_grad_())  # grad path, eval mode
        assert differentiable.grad_fn is not None
        torch.testing.assert_close(differentiable, fast, rtol=0, atol=1e-5)
        layer.train()  # qat=True: training forward reads the integer LUT too
        torch.testing.assert_close(layer(x.clone().requires_grad_()), fast, rtol=0, atol=1e-5)


def test_int8_eval_uses_quantized_lut_and_float_train_without_qat(layer_amm):
    torch.manual_seed(3)
    linear = nn.Linear(16, 5)
    rows = torch.randn(300, 16)
    layer = MaddLinear.from_dense(linear, rows, ncodebooks=2, lut_bits=8, qat=False)
    amm_q = layer_amm(2, lut_bits=8).fit(rows, linear.weight.detach().T)
    amm_f = layer_amm(2, lut_bits=None).fit(rows, linear.weight.detach().T)
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(rows), amm_q(rows) + linear.bias, rtol=0, atol=1e-5)
        torch.testing.assert_close(layer.train()(rows), amm_f(rows) + linear.bias, rtol=0, atol=1e-5)
    assert torch.equal(layer.lut_q_values, amm_q.lut_q_.values)


def test_quantized_buffers_follow_lut_changes(layer_amm):
    torch.manual_seed(4)
    linear = nn.Linear(8, 3)
    rows = torch.randn(200, 8)
    layer = MaddLinear.from_dense(linear, rows, ncodebooks=2).eval()
    with torch.no_grad():
        layer.lut.mul_(2.0)
        out = layer(rows)
    amm = layer_amm(2).fit(rows, 2 * linear.weight.detach().T)
    torch.testing.assert_close(out, amm(rows) + linear.bias, rtol=0, atol=1e-5)


def test_gather_matches_unfold():
    torch.manual_seed(5)
    x = torch.randn(2, 3, 7, 6)
    geometry = ConvGeometry((3, 2), (2, 1), (1, 2), (2, 1))
    conv = nn.Conv2d(3, 1, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1))
    rows = unfold_rows(x, conv)
    columns = torch.tensor([[0, 5, 17], [3, 3, 1]])
    got = gather_patch_columns(x, geometry, columns)
    assert got.shape == (rows.shape[0], 2, 3)
    assert torch.equal(got, rows[:, columns])
    npos = rows.shape[0] // 2
    picks = torch.tensor([0, 7, npos + 3, 2 * npos - 1])
    assert torch.equal(gather_patches(x, geometry, picks // npos, picks % npos), rows[picks])


def test_unbatched_conv_input_and_config_rebuild():
    torch.manual_seed(6)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(3, 5, 5)
    layer = MaddConv2d.from_dense(conv, unfold_rows(x[None], conv)).eval()
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x[None])[0])
    twin = MaddConv2d.from_config(layer.get_config())
    twin.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert torch.equal(twin.eval()(x), layer(x))


def test_named_parameters_and_buffers():
    # the tree's state lives in the encoder submodule (layer.thresholds etc. are aliases)
    layer = MaddConv2d(4, 8, 3, ncodebooks=4, padding=1)
    assert {n for n, _ in layer.named_parameters()} == {"encoder.thresholds", "lut", "bias"}
    assert {n for n, _ in layer.named_buffers()} == {
        "encoder.split_dims",
        "encoder.temperature",
        "lut_q_values",
        "lut_q_offsets",
        "lut_q_scale",
    }
    assert layer.thresholds is layer.encoder.thresholds
    assert layer.lut.shape == (4, 16, 8) and layer.thresholds.shape == (4, 15)
    assert layer.split_dims.shape == (4, 4) and layer.encoder_reads == 16
    assert layer.lut_bytes == 4 * 16 * 8
    float_layer = MaddLinear(16, 3, ncodebooks=2, lut_bits=None, bias=False)
    assert {n for n, _ in float_layer.named_buffers()} == {"encoder.split_dims", "encoder.temperature"}
    assert float_layer.lut_bytes == 2 * 16 * 3 * 4


def test_layer_encoding_is_core_encode():
    torch.manual_seed(7)
    linear = nn.Linear(12, 4)
    rows = torch.randn(100, 12)
    layer = MaddLinear.from_dense(linear, rows, ncodebooks=3)
    assert torch.equal(layer.codes(rows), encode(rows, layer.split_dims, layer.thresholds.detach()))


def test_layer_errors():
    with pytest.raises(ValueError, match="groups=1 only"):
        MaddConv2d(4, 4, 3, ncodebooks=4, groups=2)
    with pytest.raises(ValueError, match="groups=1 only"):
        MaddConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=4), torch.randn(50, 9))
    with pytest.raises(ValueError, match="padding_mode"):
        MaddConv2d.from_dense(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), torch.randn(50, 18))
    with pytest.raises(ValueError, match="cannot exceed"):
        MaddLinear(4, 2, ncodebooks=5)
    with pytest.raises(ValueError, match="power of two"):
        MaddLinear(8, 2, ncodebooks=2, nprototypes=12)
    with pytest.raises(TypeError, match="nn.Linear"):
        MaddLinear.from_dense(nn.Conv2d(2, 2, 1), torch.randn(50, 2), ncodebooks=1)
    with pytest.raises(ValueError, match="columns"):
        MaddLinear.from_dense(nn.Linear(8, 2), torch.randn(50, 9), ncodebooks=2)
    with pytest.raises(ValueError, match="at least 16"):
        MaddLinear.from_dense(nn.Linear(8, 2), torch.randn(10, 8), ncodebooks=2)
    layer = MaddConv2d(3, 4, 3, ncodebooks=3)
    with pytest.raises(ValueError, match="expected input"):
        layer(torch.randn(2, 5, 8, 8))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        layer(torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match="features"):
        MaddLinear(8, 2, ncodebooks=2)(torch.randn(3, 9))


def test_padding_same_resolved():
    torch.manual_seed(8)
    conv = nn.Conv2d(2, 3, 3, padding="same")
    x = torch.randn(1, 2, 6, 6)
    rows = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 18)
    layer = MaddConv2d.from_dense(conv, rows, ncodebooks=2)
    assert layer.geometry.padding == (1, 1)
    assert layer.eval()(x).shape == (1, 3, 6, 6)


def random_conv_layer(cin, cout, kernel, ncodebooks, seed=0, **kw) -> MaddConv2d:
    """A MADD conv with random (not learned) encoder and LUT: exercises the kernels only."""
    gen = torch.Generator().manual_seed(seed)
    layer = MaddConv2d(cin, cout, kernel, ncodebooks=ncodebooks, **kw)
    ndims = layer.in_dim
    with torch.no_grad():
        layer.split_dims.copy_(torch.randint(0, ndims, layer.split_dims.shape, generator=gen))
        layer.thresholds.copy_(0.5 * torch.randn(layer.thresholds.shape, generator=gen))
        layer.lut.copy_(torch.randn(layer.lut.shape, generator=gen))
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(cout, generator=gen))
    return layer


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 2, 2), (3, 0, 1)])
def test_cpu_kernels_equal_tensor_op_paths(stride, padding, dilation):
    torch.manual_seed(9)
    layer = random_conv_layer(5, 6, 3, 5, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(2, 5, 10, 9)
    # gather: numba (float32) vs index_select (float64 runs the tensor-op path)
    x32, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    v32 = gather_patch_columns(x32, layer.geometry, layer.split_dims)
    v64 = gather_patch_columns(x64, layer.geometry, layer.split_dims)
    assert torch.equal(v32, v64.float())
    weights = torch.randn(v32.shape)
    (v32 * weights).sum().backward()
    (v64 * weights.double()).sum().backward()
    torch.testing.assert_close(x32.grad, x64.grad.float(), rtol=0, atol=1e-5)
    # fused encode vs core encode of the gathered values
    codes = encode_patches(x, layer.geometry, layer.split_dims, layer.thresholds)
    rows = unfold_rows(x, nn.Conv2d(5, 6, 3, stride, padding, dilation))
    assert torch.equal(codes, encode(rows, layer.split_dims, layer.thresholds.detach()))
    # fused eval forward vs the unfused one (float and integer LUT)
    for bits in (None, 8):
        layer.lut_bits = bits
        q = layer.quantized_lut() if bits else None
        geometry, dims, thresholds = layer.geometry, layer.split_dims, layer.thresholds
        fused = conv_lut_forward(x, geometry, dims, thresholds, layer.lut, q, layer.bias)
        summed = quantized_lut_sum(codes, q) if bits else lut_sum(codes, layer.lut.detach())
        expected = rows_to_image(summed + layer.bias.detach(), 2, *fused.shape[2:])
        torch.testing.assert_close(fused, expected, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_fused_forward_wide_integer_accumulator():
    # C * 255 >= 2**16: the integer sums need int32 accumulators
    layer = random_conv_layer(300, 4, 1, 300, seed=1).eval()
    x = torch.randn(2, 300, 3, 3)
    codes = encode_patches(x, layer.geometry, layer.split_dims, layer.thresholds)
    q = layer.quantized_lut()
    expected = quantized_lut_sum(codes, q) + layer.bias.detach()
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(out, rows_to_image(expected, 2, 3, 3), rtol=1e-6, atol=1e-4)
