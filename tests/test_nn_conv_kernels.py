"""The fused numba conv kernels (maddnet.nn._conv_kernels) against the unfused paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maddnet.amm.hashing import encode
from maddnet.amm.lut import quantized_lut_sum
from maddnet.nn import MaddConv2d, _kernels
from maddnet.nn._conv_kernels import _exp32
from maddnet.nn.functional import madd_lut
from maddnet.nn.patches import MaddConvFunction, encode_patches, gather_patch_columns

GEOMETRIES = [
    # kernel, stride, padding, dilation
    (3, 1, 1, 1),
    (3, 2, 1, 1),
    ((3, 2), (2, 1), (1, 0), 1),
    (5, 1, 2, 2),
    (3, 1, 0, 1),
    (1, 1, 0, 1),
]


def random_layer(cin, cout, kernel, ncodebooks, nprototypes, seed, **kw) -> MaddConv2d:
    """Random split dims (any channel), thresholds, LUT and bias: exercises the kernels."""
    gen = torch.Generator().manual_seed(seed)
    taps = kernel * kernel if isinstance(kernel, int) else kernel[0] * kernel[1]
    ncodebooks = min(ncodebooks, cin * taps)
    layer = MaddConv2d(cin, cout, kernel, ncodebooks=ncodebooks, nprototypes=nprototypes, **kw)
    with torch.no_grad():
        layer.split_dims.copy_(torch.randint(0, layer.in_dim, layer.split_dims.shape, generator=gen))
        layer.thresholds.copy_(0.5 * torch.randn(layer.thresholds.shape, generator=gen))
        layer.lut.copy_(torch.randn(layer.lut.shape, generator=gen))
        layer.temperature.copy_(0.3 + torch.rand(layer.temperature.shape, generator=gen))
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(cout, generator=gen))
    return layer


def unfold_rows(x, layer):
    g = layer.geometry
    cols = F.unfold(x, g.kernel_size, g.dilation, g.padding, g.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


@pytest.mark.parametrize("kernel,stride,padding,dilation", GEOMETRIES)
@pytest.mark.parametrize("nprototypes", [4, 16, 32])
def test_encode_equals_core_encoder_with_ties(kernel, stride, padding, dilation, nprototypes):
    layer = random_layer(
        4, 3, kernel, 5, nprototypes, seed=nprototypes, stride=stride, padding=padding, dilation=dilation
    )
    x = torch.randn(3, 4, 9, 8)
    # adversarial: many inputs sit exactly on thresholds (and on 0, the padding value)
    flat = x.view(-1)
    flat[::3] = layer.thresholds.detach().reshape(-1)[
        torch.arange(0, flat.numel(), 3) % layer.thresholds.numel()
    ]
    flat[1::7] = 0.0
    with torch.no_grad():
        layer.thresholds[:, 0] = 0.0
    codes = encode_patches(x, layer.geometry, layer.split_dims, layer.thresholds)
    expected = encode(unfold_rows(x, layer), layer.split_dims, layer.thresholds.detach())
    assert codes.dtype == torch.uint8
    assert torch.equal(codes, expected)


@pytest.mark.parametrize("kernel,stride,padding,dilation", GEOMETRIES[:3])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_eval_equals_integer_lut_sum(kernel, stride, padding, dilation, bias):
    # 64 outputs (the short LUT rows of a 64-channel conv), taps from every channel: the
    # fused eval forward is bit for bit the general path's encode + integer LUT sum + bias
    layer = random_layer(
        6, 64, kernel, 6, 16, seed=7, stride=stride, padding=padding, dilation=dilation, bias=bias
    ).eval()
    x = torch.randn(3, 6, 12, 11)
    with torch.no_grad():
        out = layer(x)
    codes = encode(unfold_rows(x, layer), layer.split_dims, layer.thresholds.detach())
    expected = quantized_lut_sum(codes, layer.quantized_lut())
    if bias:
        expected = expected + layer.bias.detach()
    out_h, out_w = layer.geometry.output_size(12, 11)
    assert torch.equal(out, expected.reshape(3, out_h, out_w, 64).permute(0, 3, 1, 2))


def reference_step(layer, x, grad_out, quantized, surrogate="soft"):
    """Output and gradients through the unfused path: gathered values + madd_lut."""
    x = x.clone().requires_grad_()
    values = gather_patch_columns(x, layer.geometry, layer.split_dims)
    qlut = layer.quantized_lut() if quantized else None
    out = madd_lut(values, layer.thresholds, layer.lut, layer.temperature, qlut, surrogate=surrogate)
    if layer.bias is not None:
        out = out + layer.bias
    out_h, out_w = grad_out.shape[2:]
    out = out.reshape(x.shape[0], out_h, out_w, -1).permute(0, 3, 1, 2)
    (out * grad_out).sum().backward()
    grads = [x.grad, layer.thresholds.grad, layer.lut.grad, None if layer.bias is None else layer.bias.grad]
    layer.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize("kernel,stride,padding,dilation", GEOMETRIES)
@pytest.mark.parametrize("quantized,bias", [(True, True), (False, False)])
@pytest.mark.parametrize("surrogate", ["soft", "soft-bf16", "path"])
def test_fused_training_step_equals_unfused(kernel, stride, padding, dilation, quantized, bias, surrogate):
    layer = random_layer(
        3, 5, kernel, 4, 16, seed=3, stride=stride, padding=padding, dilation=dilation, bias=bias
    ).train()
    x = torch.randn(2, 3, 10, 9)
    out_h, out_w = layer.geometry.output_size(10, 9)
    grad_out = torch.randn(2, 5, out_h, out_w)
    ref_out, ref_grads = reference_step(layer, x, grad_out, quantized, surrogate)

    xg = x.clone().requires_grad_()
    q = layer.quantized_lut() if quantized else None
    q_args = (None, None, None, 0) if q is None else (q.values, q.offsets, q.scale, q.bits)
    out = MaddConvFunction.apply(
        xg,
        layer.thresholds,
        layer.lut,
        layer.temperature,
        layer.bias,
        *q_args,
        layer.geometry,
        layer.split_dims,
        surrogate,
    )
    (out * grad_out).sum().backward()
    grads = [xg.grad, layer.thresholds.grad, layer.lut.grad, None if layer.bias is None else layer.bias.grad]
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(grads[2], ref_grads[2], rtol=1e-6, atol=1e-5)  # exact LUT gradient
    for got, want in zip(grads[:2] + grads[3:], ref_grads[:2] + ref_grads[3:], strict=True):
        if want is None:
            assert got is None
            continue
        scale = want.abs().max().clamp_min(1e-6)
        assert ((got - want).abs().max() / scale) < 1e-4


@pytest.mark.parametrize("nprototypes,sharp", [(8, False), (32, False), (16, True)])
def test_fused_training_step_general_tree_loop(nprototypes, sharp):
    """The soft backward's general loop (trees not of depth 4, or a codebook with a node far
    from its level's centre, which takes its own exp) beside the depth-4 register path."""
    layer = random_layer(3, 5, 3, 6, nprototypes, seed=11, padding=1, bias=False).train()
    if sharp:
        with torch.no_grad():  # codebooks 0 and 3: |2 / tau * (v - centre)| > 30 at some node
            layer.temperature[0::3] = 0.01
            layer.thresholds[0::3, 1:] *= 4.0
        thresholds = layer.thresholds.detach().numpy()
        inv_tau = (1.0 / layer.temperature.detach()).numpy()
        direct = _kernels.level_factors(thresholds, inv_tau)[2]
        assert direct[0::3].any(1).all() and not direct[1:3].any() and not direct[4:].any()
    x = torch.randn(2, 3, 7, 6)
    grad_out = torch.randn(2, 5, 7, 6)
    ref_out, ref_grads = reference_step(layer, x, grad_out, quantized=False)
    xg = x.clone().requires_grad_()
    out = MaddConvFunction.apply(
        xg, layer.thresholds, layer.lut, layer.temperature, None, None, None, None, 0,
        layer.geometry, layer.split_dims, "soft",
    )  # fmt: skip
    (out * grad_out).sum().backward()
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.lut.grad, ref_grads[2], rtol=1e-6, atol=1e-5)
    for got, want in ((xg.grad, ref_grads[0]), (layer.thresholds.grad, ref_grads[1])):
        assert ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)) < 1e-4


def test_layer_uses_fused_function_and_input_without_grad():
    layer = random_layer(3, 4, 3, 3, 16, seed=5, padding=1).train()
    x = torch.randn(2, 3, 7, 7)  # no grad: the first layer of a network
    out = layer(x)
    assert type(out.grad_fn).__name__ == "MaddConvFunctionBackward"
    out.square().sum().backward()
    assert layer.thresholds.grad.abs().sum() > 0 and layer.lut.grad.abs().sum() > 0
    # path surrogate: the fused function too, same forward numbers
    layer.surrogate = "path"
    out_path = layer(x)
    assert type(out_path.grad_fn).__name__ == "MaddConvFunctionBackward"
    torch.testing.assert_close(out, out_path, rtol=0, atol=1e-5)


def test_exp32_accuracy():
    z = np.linspace(-85, 85, 200_001, dtype=np.float32)
    out = np.empty_like(z)
    bits = np.empty(z.shape, np.int32)
    _exp32_array(z, out, bits)
    expected = np.exp(np.clip(z.astype(np.float64), -80, 80))
    assert np.max(np.abs(out / expected - 1)) < 3e-7


def _exp32_array(z, out, bits):
    import numba

    @numba.njit
    def run(z, out, bits):
        _exp32(z, out, bits, bits.view(np.float32))

    run(z, out, bits)


def test_set_threads_sets_torch_and_numba():
    import numba

    from maddnet.threads import set_threads

    before = (torch.get_num_threads(), numba.get_num_threads())
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1 and numba.get_num_threads() == 1
        with pytest.raises(ValueError, match="threads must be >= 1"):
            set_threads(0)
    finally:
        torch.set_num_threads(before[0])
        numba.set_num_threads(before[1])


def fused_step(layer, x, grad_out, surrogate):
    """Gradients (input, thresholds, LUT) of one fused float-LUT training step (with the
    layer's bias, if any)."""
    xg = x.clone().requires_grad_()
    out = MaddConvFunction.apply(
        xg, layer.thresholds, layer.lut, layer.temperature, layer.bias, None, None, None, 0,
        layer.geometry, layer.split_dims, surrogate,
    )  # fmt: skip
    (out * grad_out).sum().backward()
    grads = [xg.grad, layer.thresholds.grad, layer.lut.grad]
    layer.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("surrogate", ["soft", "soft-bf16", "path"])
def test_backward_chunks_and_thread_groups(monkeypatch, surrogate):
    """Gradients do not depend on how the backward cuts the batch into kernel calls (one
    image per call, a short last chunk, the whole batch in one) or on the thread groups."""
    import numba

    from maddnet.nn import patches

    layer = random_layer(3, 5, 3, 4, 16, seed=13, padding=1).train()
    x = torch.randn(5, 3, 6, 7)
    grad_out = torch.randn(5, 5, 6, 7)
    _, ref_grads = reference_step(layer, x, grad_out, quantized=False, surrogate=surrogate)

    before = numba.get_num_threads()
    try:
        for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(threads)
            for chunk_bytes in (1, 3 * 4 * 16 * 48 * 4, 16 << 20):  # chunks of 1, ~2-3, all 5
                monkeypatch.setattr(patches, "_BACKWARD_CHUNK_BYTES", chunk_bytes)
                for got, want in zip(fused_step(layer, x, grad_out, surrogate), ref_grads[:3], strict=True):
                    assert ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)) < 1e-4
    finally:
        numba.set_num_threads(before)


@pytest.mark.parametrize("kernel,stride,padding,dilation", GEOMETRIES[:4])
@pytest.mark.parametrize("nprototypes,sharp", [(16, False), (8, False), (32, False), (16, True)])
def test_fused_soft_bf16_equals_soft_where_bfloat16_is_exact(
    monkeypatch, kernel, stride, padding, dilation, nprototypes, sharp
):
    """surrogate="soft-bf16" (bfloat16 node differences, leaves rebuilt in the kernel) gives
    the soft surrogate's gradients when every bfloat16 value is exact: LUT entries in
    [-4, 4] and output gradients in [-2, 2], integers (differences <= 8, dot products over
    5 outputs <= 80 < 2^8). Depth-4 register path, the general loop (K = 8, 32, a node with
    its own exp) and one image per backward chunk."""
    from maddnet.nn import patches

    layer = random_layer(
        3, 5, kernel, 4, nprototypes, seed=17, stride=stride, padding=padding, dilation=dilation, bias=False
    ).train()
    gen = torch.Generator().manual_seed(18)
    with torch.no_grad():
        layer.lut.copy_(torch.randint(-4, 5, layer.lut.shape, generator=gen))
        if sharp:  # codebooks 0 and 3: a node far from its level's centre (the `direct` nodes)
            layer.temperature[0::3] = 0.01
            layer.thresholds[0::3, 1:] *= 4.0
    x = torch.randn(3, 3, 9, 8, generator=gen)
    out_h, out_w = layer.geometry.output_size(9, 8)
    grad_out = torch.randint(-2, 3, (3, 5, out_h, out_w), generator=gen).float()
    want = fused_step(layer, x, grad_out, "soft")
    _, unfused = reference_step(layer, x, grad_out, quantized=False, surrogate="soft-bf16")
    for chunk_bytes in (1, 16 << 20):  # one image per kernel call; the whole batch
        monkeypatch.setattr(patches, "_BACKWARD_CHUNK_BYTES", chunk_bytes)
        got = fused_step(layer, x, grad_out, "soft-bf16")
        torch.testing.assert_close(got[2], want[2], rtol=0, atol=0)  # the LUT gradient is exact
        for a, b, c in zip(got[:2], want[:2], unfused[:2], strict=True):
            scale = b.abs().max().clamp_min(1e-6)
            assert ((a - b).abs().max() / scale) < 1e-4
            assert ((c - b).abs().max() / scale) < 1e-4  # the unfused soft-bf16 path too


def test_fused_soft_bf16_is_close_to_soft_on_random_data():
    """On Gaussian data the bfloat16 product costs a relative L2 error of about 2^-8 in the
    input and threshold gradients (bfloat16 keeps 8 significant bits), never more than 1 %."""
    layer = random_layer(8, 16, 3, 16, 16, seed=19, padding=1, bias=False).train()
    gen = torch.Generator().manual_seed(20)
    x = torch.randn(4, 8, 12, 12, generator=gen)
    grad_out = torch.randn(4, 16, 12, 12, generator=gen)
    want = fused_step(layer, x, grad_out, "soft")
    got = fused_step(layer, x, grad_out, "soft-bf16")
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=0)
    for a, b in zip(got[:2], want[:2], strict=True):
        error = float((a - b).norm() / b.norm())
        assert 0 < error < 1e-2


@pytest.mark.parametrize("surrogate", ["soft", "soft-bf16", "path"])
def test_fused_training_step_on_an_empty_batch(surrogate):
    """A batch of 0 images trains to zero gradients (the backward used to divide it into
    chunks of 0 images and fail)."""
    layer = random_layer(3, 4, 3, 3, 16, seed=21, padding=1).train()
    layer.surrogate = surrogate
    x = torch.randn(0, 3, 7, 7, requires_grad=True)
    out = layer(x)
    assert out.shape == (0, 4, 7, 7) and type(out.grad_fn).__name__ == "MaddConvFunctionBackward"
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(layer.thresholds.grad, torch.zeros_like(layer.thresholds))
    assert torch.equal(layer.lut.grad, torch.zeros_like(layer.lut))
