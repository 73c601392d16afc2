"""Field faults in the numeric paths of MADD layers (docs/nn.md, "Reduced precision" and
"NaN and inf inputs"):

* float16 / bfloat16 layers and autocast regions: MADD layers compute in float32 (the same
  numbers as a float32 twin holding the same parameter values) and return the input's dtype;
  training steps work and give gradients in each parameter's dtype.
* NaN / inf among the values an encoder reads are refused with an error that names the layer
  and the position, on every CPU path (fused conv kernels, the unfused gathered-values path,
  the tensor-op path, MaddLinear, MaddnessMatmul); values the encoder does not read (and zero
  padding) change nothing.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from maddnet import MaddnessMatmul
from maddnet.amm.hashing import NonFiniteInputError
from maddnet.nn import MaddConv2d, MaddLinear, convert
from maddnet.nn.functional import madd_lut

REDUCED = [torch.float16, torch.bfloat16]


def random_conv(seed: int = 0, cin: int = 4, cout: int = 6, ncodebooks: int = 4, **kw) -> MaddConv2d:
    """A MADD conv with random encoder and LUT (3x3, padding 1 unless given)."""
    gen = torch.Generator().manual_seed(seed)
    kw.setdefault("padding", 1)
    layer = MaddConv2d(cin, cout, 3, ncodebooks=ncodebooks, **kw)
    with torch.no_grad():
        layer.split_dims.copy_(torch.randint(0, layer.in_dim, layer.split_dims.shape, generator=gen))
        layer.thresholds.copy_(0.5 * torch.randn(layer.thresholds.shape, generator=gen))
        layer.lut.copy_(torch.randn(layer.lut.shape, generator=gen))
        layer.temperature.copy_(0.3 + torch.rand(layer.temperature.shape, generator=gen))
        layer.bias.copy_(torch.randn(cout, generator=gen))
    return layer


def random_linear(seed: int = 0, **kw) -> MaddLinear:
    gen = torch.Generator().manual_seed(seed)
    layer = MaddLinear(24, 5, ncodebooks=4, **kw)
    with torch.no_grad():
        layer.split_dims.copy_(torch.randint(0, 24, layer.split_dims.shape, generator=gen))
        layer.thresholds.copy_(0.5 * torch.randn(layer.thresholds.shape, generator=gen))
        layer.lut.copy_(torch.randn(layer.lut.shape, generator=gen))
        layer.temperature.copy_(0.3 + torch.rand(layer.temperature.shape, generator=gen))
        layer.bias.copy_(torch.randn(5, generator=gen))
    return layer


# (layer, input shape): every path a CPU training step / eval forward can take
CASES = {
    # fused kernels: eval conv_lut_forward, training MaddConvFunction
    "conv-fused": (lambda **kw: random_conv(**kw), (3, 4, 8, 7)),
    # training: gathered values (unfused) with the fused encoder's codes
    "conv-path": (lambda **kw: random_conv(surrogate="path", **kw), (3, 4, 8, 7)),
    # 3x3 outputs: below the fused training function's minimum map size
    "conv-small": (lambda **kw: random_conv(**kw), (3, 4, 3, 3)),
    "conv-stride": (lambda **kw: random_conv(stride=2, **kw), (2, 4, 9, 8)),
    "linear": (lambda **kw: random_linear(**kw), (2, 7, 24)),
    "linear-path": (lambda **kw: random_linear(surrogate="path", **kw), (2, 7, 24)),
}


def step(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor):
    """Output and gradients (input and every parameter) of ``sum(layer(x) * weight)``."""
    layer.zero_grad()
    x = x.detach().clone().requires_grad_()
    out = layer(x)
    (out.float() * weight).sum().backward()
    grads = {"x": x.grad, **{name: p.grad for name, p in layer.named_parameters()}}
    return out, grads


# ---------------------------------------------------------------- reduced precision
@pytest.mark.parametrize("dtype", REDUCED)
@pytest.mark.parametrize("case", sorted(CASES))
def test_reduced_precision_layer_computes_what_its_float32_twin_computes(case, dtype):
    make, shape = CASES[case]
    low = make(lut_bits=None).to(dtype)
    twin = copy.deepcopy(low).float()  # the same (rounded) parameter values, in float32
    x = torch.randn(shape).to(dtype)
    with torch.no_grad():
        out = low.eval()(x)
        assert out.dtype == dtype
        assert torch.equal(out, twin.eval()(x.float()).to(dtype))
    low.train(), twin.train()
    weight = torch.randn(out.shape).to(dtype).float()  # exact in dtype: both see the same grad_out
    out_low, grads_low = step(low, x, weight)
    out_twin, grads_twin = step(twin, x.float(), weight)
    assert out_low.dtype == dtype and torch.equal(out_low, out_twin.to(dtype))
    for name, grad in grads_twin.items():  # input and parameters: all of the layer's dtype
        assert grads_low[name].dtype == dtype, name
        assert torch.equal(grads_low[name], grad.to(dtype)), name
    assert float(grads_twin["encoder.thresholds"].abs().sum()) > 0


@pytest.mark.parametrize("dtype", REDUCED)
@pytest.mark.parametrize("case", ["conv-fused", "conv-path", "linear"])
def test_reduced_precision_integer_lut_and_qat_train(case, dtype):
    make, shape = CASES[case]
    low = make(lut_bits=8).to(dtype).train()
    twin = copy.deepcopy(low).float()  # the same parameter values in float32
    x = torch.randn(shape).to(dtype)
    weight = torch.randn(twin(x.float()).shape)
    out, grads = step(low, x, weight)
    assert out.dtype == dtype
    for name, grad in grads.items():
        assert grad.dtype == dtype and bool(torch.isfinite(grad).all()), name
    with torch.no_grad():
        # eval reads the integer LUT: the same codes and integers as the twin's; only the
        # offsets (a float buffer, cast to dtype with the layer) and the output are rounded
        reference = twin.eval()(x.float())
        error = (low.eval()(x).float() - reference).abs().max()
        assert float(error) < 0.02 * float(reference.abs().max())


@pytest.mark.parametrize("dtype", REDUCED)
def test_converted_model_trains_in_reduced_precision(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    convert(model, [torch.randn(300, 4, 6, 6)])
    model = model.to(dtype).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = torch.randn(3, 4, 6, 6, dtype=dtype, requires_grad=True)
    before = [p.detach().clone() for p in model.parameters()]
    model(x).float().pow(2).mean().backward()
    optimizer.step()
    assert all(p.dtype == dtype and p.grad.dtype == dtype for p in model.parameters())
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    assert x.grad.dtype == dtype and bool(torch.isfinite(x.grad).all())
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("case", ["conv-fused", "conv-path", "conv-small", "linear", "linear-path"])
@pytest.mark.parametrize("lut_bits", [None, 8])
def test_autocast_region_computes_in_float32(case, lut_bits):
    """Forward and backward inside ``torch.autocast("cpu", bfloat16)``: the same numbers as
    outside (MADD arithmetic stays float32); a bfloat16 input gives a bfloat16 output."""
    make, shape = CASES[case]
    layer = make(lut_bits=lut_bits).train()
    x = torch.randn(shape)
    weight = torch.randn(layer(x).shape).bfloat16().float()  # the bfloat16 output's grad is exact
    expected = step(layer, x, weight)
    expected_bf16 = step(layer, x.bfloat16().float(), weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = step(layer, x, weight)
        got_bf16 = step(layer, x.bfloat16(), weight)
    assert got[0].dtype == torch.float32 and torch.equal(got[0], expected[0])
    assert got_bf16[0].dtype == torch.bfloat16 and torch.equal(got_bf16[0], expected_bf16[0].bfloat16())
    for name in expected[1]:
        assert torch.equal(got[1][name], expected[1][name]), name
        grad = expected_bf16[1][name]
        assert torch.equal(got_bf16[1][name], grad.bfloat16() if name == "x" else grad), name


@pytest.mark.parametrize("dtype", REDUCED)
def test_functional_madd_lut_in_reduced_precision(dtype):
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(50, 3, 4, generator=gen).to(dtype)
    thresholds = (0.5 * torch.randn(3, 15, generator=gen)).to(dtype)
    lut = torch.randn(3, 16, 5, generator=gen).to(dtype)
    temperature = torch.full((3, 4), 0.5, dtype=dtype)
    weight = torch.randn(50, 5, generator=gen).to(dtype).float()
    results = []
    for t in (dtype, torch.float32):
        v, th, table = (a.detach().to(t).requires_grad_() for a in (values, thresholds, lut))
        out = madd_lut(v, th, table, temperature.to(t))
        (out.float() * weight).sum().backward()
        results.append((out, v.grad, th.grad, table.grad))
    for low, exact in zip(results[0], results[1], strict=True):
        assert low.dtype == dtype and torch.equal(low, exact.to(dtype))


# ---------------------------------------------------------------- NaN / inf inputs
def conv_case(name: str):
    """(layer, input shape) of the conv paths, including the tensor-op ones (float64; bfloat16
    and float16 layers compute in float32 through the kernels)."""
    if name == "conv-float64":
        return random_conv().double(), (2, 4, 8, 7), torch.float64
    if name == "conv-bfloat16":
        return random_conv().bfloat16(), (2, 4, 8, 7), torch.bfloat16
    if name == "conv-int-lut":
        return random_conv(lut_bits=8), (2, 4, 8, 7), torch.float32
    make, shape = CASES[name]
    return make(), (2, *shape[1:]), torch.float32


CONV_PATHS = [
    "conv-fused",
    "conv-path",
    "conv-small",
    "conv-stride",
    "conv-float64",
    "conv-bfloat16",
    "conv-int-lut",
]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("path", CONV_PATHS)
def test_conv_refuses_a_corrupted_image_on_every_path(path, value):
    layer, shape, dtype = conv_case(path)
    x = torch.randn(shape).to(dtype)
    x[1] = value
    for training in (False, True):
        layer.train(training)
        inputs = x.clone().requires_grad_(training)
        with torch.set_grad_enabled(training), pytest.raises(NonFiniteInputError) as info:
            layer(inputs)
        message = str(info.value)
        assert message.startswith("MaddConv2d(D=36, M=6, C=4): input image 1, channel "), message
        assert f"is {value}, a value the encoder reads" in message
    with pytest.raises(ValueError, match="input image 1"):  # NonFiniteInputError is a ValueError
        layer.codes(x)


def single_tap_conv(channel: int, ky: int, kx: int, **kw) -> MaddConv2d:
    """Every tree level of every codebook reads patch column (channel, ky, kx)."""
    layer = random_conv(**kw)
    with torch.no_grad():
        layer.split_dims.fill_(channel * 9 + ky * 3 + kx)
    return layer


@pytest.mark.parametrize("path", ["fused", "path", "float64"])
def test_conv_error_names_the_pixel(path):
    layer = single_tap_conv(2, 1, 2, surrogate="path" if path == "path" else "soft")
    x = torch.randn(2, 4, 8, 7)
    x[1, 2, 3, 4] = float("nan")
    if path == "float64":
        layer, x = layer.double(), x.double()
    for training in (False, True):
        layer.train(training)
        with torch.set_grad_enabled(training), pytest.raises(NonFiniteInputError) as info:
            layer(x.clone().requires_grad_(training))
        # padding 1: output position (oy, ox) reads pixel (oy, ox + 1)
        assert "input image 1, channel 2, pixel (y=3, x=4) is nan" in str(info.value)
        assert "output position (3, 3)" in str(info.value)


@pytest.mark.parametrize("surrogate", ["soft", "path"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_ignores_values_it_does_not_read(surrogate, dtype):
    """Padding 0, every codebook reads tap (channel 0, ky 2, kx 2): pixel (y, x) of channel 0
    is read for y, x >= 2 only. NaN elsewhere changes no output and no gradient, including
    pixels that the fused kernels' row-pitch trick visits at ignored positions (the start of
    the next row)."""
    layer = single_tap_conv(0, 2, 2, padding=0, surrogate=surrogate).to(dtype)
    x = torch.randn(2, 4, 9, 8, dtype=dtype)
    corrupted = x.clone()
    corrupted[:, 1:] = float("nan")  # channels no codebook reads
    corrupted[1, 0, 5, 0] = float("inf")  # read only at ignored (wrapped) positions
    corrupted[1, 0, 6, 1] = float("nan")
    corrupted[0, 0, 0, 0] = float("-inf")  # never read
    weight = torch.randn(2, 6, 7, 6, dtype=dtype)
    for training in (False, True):
        layer.train(training)
        with torch.set_grad_enabled(training):
            clean_out, clean_grads = step(layer, x, weight) if training else (layer(x), {})
            out, grads = step(layer, corrupted, weight) if training else (layer(corrupted), {})
        assert torch.equal(out, clean_out)
        for name, grad in clean_grads.items():
            if name == "x":  # unread pixels get no gradient (zero), read ones the same
                assert torch.equal(grads[name], grad), name
            else:
                assert torch.equal(grads[name], grad), name


def test_conv_zero_padding_is_not_an_input_value():
    """Taps in the zero padding read 0, never an input value: an image whose border is NaN
    is refused at the border pixel, not at a padding tap, and a clean image never is."""
    layer = single_tap_conv(1, 0, 0)  # padding 1: output (0, 0) reads padding, (1, 1) pixel (0, 0)
    x = torch.randn(1, 4, 5, 5)
    layer(x)
    x[0, 1, 0, 0] = float("nan")
    with pytest.raises(NonFiniteInputError, match=r"channel 1, pixel \(y=0, x=0\) is nan.*position \(1, 1\)"):
        layer(x)


@pytest.mark.parametrize("path", ["eval", "train", "path"])
def test_linear_refuses_nonfinite_read_values_and_ignores_others(path):
    layer = random_linear(surrogate="path" if path == "path" else "soft").train(path != "eval")
    read = sorted(set(layer.split_dims.reshape(-1).tolist()))
    unread = sorted(set(range(24)) - set(read))
    x = torch.randn(2, 7, 24)
    with torch.set_grad_enabled(path != "eval"):
        clean = layer(x)
        bad = x.clone()
        bad[:, :, unread] = float("nan")
        assert torch.equal(layer(bad), clean)
        bad[1, 3, read[-1]] = float("inf")
        with pytest.raises(NonFiniteInputError) as info:
            layer(bad.requires_grad_(path != "eval"))
    assert str(info.value).startswith(
        f"MaddLinear(D=24, M=5, C=4): input row 10 (index (1, 3)), feature {read[-1]} is inf"
    )


def test_matmul_and_layers_share_one_contract():
    """MaddnessMatmul refuses NaN among the values it reads with the same error type."""
    rows = torch.randn(300, 12)
    amm = MaddnessMatmul(ncodebooks=2).fit(rows, torch.randn(12, 3))
    bad = rows[:5].clone()
    bad[2, amm.split_dims_[0, 0]] = float("nan")
    with pytest.raises(NonFiniteInputError, match="row 2"):
        amm(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_rows_that_read_nonfinite_values_are_nan():
    """On a GPU, refusing would cost a host synchronisation per layer: the rows whose read
    values are not finite come out NaN instead (docs/nn.md), the others as computed."""
    for layer, shape in ((random_conv().cuda(), (2, 4, 8, 7)), (random_linear().cuda(), (2, 7, 24))):
        x = torch.randn(shape, device="cuda")
        bad = x.clone()
        bad[1] = float("nan")
        for training in (False, True):
            layer.train(training)
            with torch.set_grad_enabled(training):
                clean, out = layer(x), layer(bad.requires_grad_(training))
            assert bool(torch.isnan(out[1]).all())
            assert torch.equal(out[0], clean[0])
