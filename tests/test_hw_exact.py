"""Hardware-exact inference mode (maddnet.hw.set_hw_exact) against the numpy datapath model
(maddnet.hw.datapath): FP16 encoder compares, integer LUT accumulator, de-quantisation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maddnet.hw import AccumulatorOverflowError, set_hw_exact
from maddnet.hw import datapath as dp
from maddnet.nn import MaddConv2d, MaddLinear
from maddnet.nn.layers import MaddUnsupportedError


def _linear(seed=0, d=32, m=12, c=4, bias=True, **spec):
    g = torch.Generator().manual_seed(seed)
    dense = nn.Linear(d, m, bias=bias)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(m, d, generator=g))
        if bias:
            dense.bias.copy_(torch.randn(m, generator=g))
    rows = torch.randn(512, d, generator=g)
    return MaddLinear.from_dense(dense, rows, c, **spec)


def _conv(seed=0, cin=3, cout=8, **kw):
    g = torch.Generator().manual_seed(seed)
    dense = nn.Conv2d(cin, cout, 3, padding=1, **kw)
    with torch.no_grad():
        dense.weight.mul_(4.0)
    images = torch.randn(8, cin, 10, 10, generator=g)
    rows = F.unfold(images, 3, padding=1).transpose(1, 2).reshape(-1, cin * 9)
    return MaddConv2d.from_dense(dense, rows)


def _reference(layer, rows: torch.Tensor, **kw) -> dp.DatapathResult:
    """The numpy datapath on a layer's (N, D) rows."""
    q = layer.quantized_lut()
    values = dp.gather_rows(rows.detach().numpy(), layer.split_dims.numpy())
    bias = None if layer.bias is None else layer.bias.detach().numpy()
    return dp.run_layer(
        values,
        layer.thresholds.detach().numpy(),
        q.values.numpy(),
        q.offsets.numpy(),
        q.scale.numpy(),
        bias,
        **kw,
    )


def _conv_rows(layer, x):
    rows = F.unfold(x, layer.kernel_size, padding=layer.padding, stride=layer.stride, dilation=layer.dilation)
    return rows.transpose(1, 2).reshape(-1, rows.shape[1])


def _conv_out(layer, x, flat):
    out_h, out_w = layer.geometry.output_size(x.shape[2], x.shape[3])
    return torch.from_numpy(flat).reshape(x.shape[0], out_h, out_w, -1).permute(0, 3, 1, 2)


def _adversarial_rows(layer, nrows=64, seed=1):
    """Rows whose split values sit on the edges of FP16: exactly at a threshold, rounding onto it
    in FP16 only, subnormal, past FP16's range; returns (rows, whether some FP16 code differs
    from the float32 code is expected)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(nrows, layer.in_dim, generator=g)
    dims = layer.split_dims
    t = layer.thresholds.detach()
    t16 = t.half().float()
    ulp = (t16.abs() * 2.0**-10).clamp(min=2.0**-24)
    for n in range(nrows):
        kind = n % 8
        for c in range(layer.ncodebooks):
            col = int(dims[c, 0])
            if kind == 0:  # exactly the float32 threshold
                rows[n, col] = t[c, 0]
            elif kind == 1:  # the FP16 threshold exactly
                rows[n, col] = t16[c, 0]
            elif kind == 2:  # above the FP16 threshold in float32, onto it in FP16
                rows[n, col] = t16[c, 0] + 0.25 * ulp[c, 0]
            elif kind == 3:  # below, onto it in FP16
                rows[n, col] = t16[c, 0] - 0.25 * ulp[c, 0]
            elif kind == 4:  # subnormal FP16 and below its smallest subnormal
                rows[n, col] = float((-1) ** c) * (3e-6 if c % 2 else 1e-9)
            elif kind == 5:  # overflows FP16 to +-inf
                rows[n, col] = 70000.0 if c % 2 == 0 else -70000.0
            elif kind == 6:  # the largest finite FP16 and just past the rounding point
                rows[n, col] = 65504.0 if c % 2 == 0 else 65519.0
    return rows


def _edge_thresholds(layer):
    """Put some thresholds on FP16 edges: zero, subnormal, past the range (+-inf in FP16)."""
    with torch.no_grad():
        t = layer.thresholds
        if layer.ncodebooks > 1:
            t[1, 0] = 0.0
            t[1, 1] = 2.0**-20  # FP16 subnormal
        if layer.ncodebooks > 2:
            t[2, 0] = 1e5  # +inf in FP16: every row goes left
            t[2, 2] = -1e5  # -inf in FP16: every finite row goes right
        if layer.ncodebooks > 3:
            t[3, 0] = 1e-9  # below the smallest FP16 subnormal: 0


def _check_linear(layer, rows, **kw):
    set_hw_exact(layer, True, **kw)
    with torch.no_grad():
        out = layer(rows)
        codes = layer.codes(rows)
    ref = _reference(layer, rows, **kw)
    assert np.array_equal(codes.numpy(), ref.codes)
    assert torch.equal(out, torch.from_numpy(ref.out))
    return ref


@pytest.mark.parametrize("bias", [True, False])
def test_linear_random_equals_datapath(bias):
    layer = _linear(bias=bias).eval()
    rows = torch.randn(300, 32, generator=torch.Generator().manual_seed(5)) * 3
    _check_linear(layer, rows)


def test_linear_adversarial_equals_datapath():
    layer = _linear(c=8).eval()
    rows = _adversarial_rows(layer)
    _edge_thresholds(layer)  # codebooks 1-3; the rows' edges still hold for the others
    ref = _check_linear(layer, rows)
    set_hw_exact(layer, False)
    with torch.no_grad():
        float_codes = layer.codes(rows).numpy()
    changed = float_codes != ref.codes
    assert changed.any()  # the FP16 rounding does decide some codes here
    # FP16 threshold exactly: not greater, goes left in both; the float32 threshold went right
    # (or left) in float32, so only rows of the "onto it in FP16" kinds must differ
    assert changed[2::8].any()


def test_linear_leading_dims_and_float64():
    layer = _linear().eval()
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(2))
    set_hw_exact(layer, True)
    with torch.no_grad():
        out = layer(x)
    ref = _reference(layer, x.reshape(-1, 32))
    assert torch.equal(out.reshape(-1, 12), torch.from_numpy(ref.out))
    layer64 = _linear().double().eval()
    set_hw_exact(layer64, True)
    with torch.no_grad():
        out64 = layer64(x.double())
    assert out64.dtype == torch.float64
    ref64 = _reference(layer64, x.reshape(-1, 32).double())
    assert torch.equal(out64.reshape(-1, 12), torch.from_numpy(ref64.out).double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_random_and_adversarial_equal_datapath(dtype):
    # float32: the fused CPU kernel encodes the rounded image; float64: the gathered-values path
    layer = _conv(cin=4).to(dtype).eval()
    _edge_thresholds(layer)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 9, 7, generator=g).to(dtype)
    # adversarial pixels: put taps of the split columns on the FP16 edges
    flat = x.view(-1)
    t16 = layer.thresholds.detach().float().half().float()
    edges = [float(t16[0, 0]), float(t16[0, 0]) * (1 + 2.0**-13), 1e-9, 3e-6, 70000.0, -70000.0, 65519.0]
    for i, value in enumerate(edges * 8):
        flat[(i * 37) % flat.numel()] = value
    set_hw_exact(layer, True)
    with torch.no_grad():
        out = layer(x)
        codes = layer.codes(x)
    ref = _reference(layer, _conv_rows(layer, x).float() if dtype == torch.float32 else _conv_rows(layer, x))
    assert np.array_equal(codes.numpy(), ref.codes)
    expected = _conv_out(layer, x, ref.out).to(dtype)
    assert torch.equal(out, expected)


def test_conv_stride_unbatched():
    g = torch.Generator().manual_seed(4)
    dense = nn.Conv2d(2, 5, 3, stride=2, padding=1, bias=False)
    images = torch.randn(6, 2, 8, 8, generator=g)
    rows = F.unfold(images, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 18)
    layer = MaddConv2d.from_dense(dense, rows).eval()
    set_hw_exact(layer, True)
    x = torch.randn(2, 9, 9, generator=g)
    with torch.no_grad():
        out = layer(x)
    ref = _reference(layer, _conv_rows(layer, x[None]))
    assert torch.equal(out, _conv_out(layer, x[None], ref.out)[0])


def test_toggle_back_is_float_mode_bit_for_bit():
    model = nn.Sequential(_conv(cin=3, cout=4), nn.ReLU(), nn.Flatten(), _linear(d=400, m=5, c=10)).eval()
    x = torch.randn(4, 3, 10, 10, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        before = model(x)
        assert set_hw_exact(model, True) == 2
        hw = model(x)
        set_hw_exact(model, False)
        after = model(x)
    assert torch.equal(before, after)
    assert hw.shape == before.shape
    assert all(not m.hw_exact for m in (model[0], model[3]))


def test_accumulator_width_refuse_and_saturate():
    layer = _linear(c=8).eval()
    rows = torch.randn(200, 32, generator=torch.Generator().manual_seed(7))
    q = layer.quantized_lut()
    # an INT10 accumulator (max 511) cannot hold 8 entries of up to 255
    with torch.no_grad():
        set_hw_exact(layer, True)
        full = layer(rows)
    assert int(_reference(layer, rows).acc.max()) > 511
    set_hw_exact(layer, True, accumulator_bits=10, overflow="refuse")
    with pytest.raises(AccumulatorOverflowError), torch.no_grad():
        layer(rows)
    with pytest.raises(AccumulatorOverflowError):
        _reference(layer, rows, accumulator_bits=10, overflow="refuse")
    ref = _check_linear(layer, rows, accumulator_bits=10, overflow="saturate")
    assert ref.acc.max() == 511
    assert (ref.acc <= 511).all()
    # INT32 never overflows: C * 255 < 2**31
    assert q.values.shape[0] * 255 < 2**31
    set_hw_exact(layer, True)
    with torch.no_grad():
        assert torch.equal(layer(rows), full)


def test_datapath_signed_entries_and_saturation_order():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 256, size=(6, 16, 5), dtype=np.uint8)
    offsets = rng.normal(size=(6, 5)).astype(np.float32)
    scale = np.full(5, 64.0, np.float32)
    codes = rng.integers(0, 16, size=(40, 6)).astype(np.uint8)
    acc = dp.accumulate(codes, values)
    signed, shifted = dp.signed_entries(values, offsets, scale)
    acc_signed = dp.accumulate(codes, signed)
    assert np.array_equal(acc_signed, acc - 128 * 6)
    out = dp.dequantize(acc, scale, dp.accumulator_init(offsets))
    out_signed = dp.dequantize(acc_signed, scale, dp.accumulator_init(shifted))
    np.testing.assert_allclose(out, out_signed, rtol=0, atol=1e-5)
    # signed entries: a saturating adder clamps at every add (not only the final sum)
    small = dp.accumulate(codes, signed, accumulator_bits=8, overflow="saturate")
    assert small.min() >= -128 and small.max() <= 127
    with pytest.raises(ValueError):
        dp.accumulate(codes, values, overflow="wrap")


def test_datapath_fp16_compare_semantics():
    thresholds = np.array([[1.0, 0.0, 0.0]], np.float32)  # depth 2, one codebook
    values = np.array(
        [
            [[1.0, 0.0]],  # at the threshold: left, then at 0: left -> code 0
            [[1.0 + 2.0**-12, 1.0]],  # rounds onto 1.0 in FP16: left -> code 1
            [[70000.0, 1.0]],  # +inf: right -> code 3
            [[1e-9, -1e-9]],  # both round to (signed) zero: left, left
        ],
        np.float32,
    )
    assert dp.encode(values, thresholds)[:, 0].tolist() == [0, 1, 3, 0]
    inf_threshold = np.array([[1e5, 0.0, 0.0]], np.float32)
    assert dp.encode(values[2:3], inf_threshold)[0, 0] == 1  # inf > inf is false


def test_refusals():
    layer = _linear().eval()
    float_layer = _linear(lut_bits=None).eval()
    with pytest.raises(ValueError, match="integer LUT"):
        set_hw_exact(nn.Sequential(layer, float_layer), True)
    assert not layer.hw_exact  # nothing changed
    set_hw_exact(layer, True)
    x = torch.randn(4, 32)
    with pytest.raises(MaddUnsupportedError, match="inference only"):
        layer(x)  # the LUT requires a gradient
    x[1, int(layer.split_dims[0, 0])] = float("inf")
    with pytest.raises(ValueError, match="inf"), torch.no_grad():
        layer(x)
    with pytest.raises(ValueError):
        set_hw_exact(layer, True, overflow="wrap")


def test_hw_output_differs_from_float_only_where_codes_differ():
    layer = _linear(c=8).eval()
    rows = torch.randn(400, 32, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        float_out, float_codes = layer(rows), layer.codes(rows)
        set_hw_exact(layer, True)
        hw_out, hw_codes = layer(rows), layer.codes(rows)
    same = (hw_codes == float_codes).all(1)
    assert same.float().mean() > 0.9
    # same codes: the two de-quantisations differ by float32 rounding only
    torch.testing.assert_close(hw_out[same], float_out[same], rtol=1e-6, atol=1e-5)
