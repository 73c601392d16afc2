"""MADD layers on a CUDA device: the same numbers as on the CPU, no host round trips in a
training step. Skipped without a GPU (CI has none); run on one with
``python -m pytest -q tests/test_cuda.py``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from maddnet import MaddnessMatmul
from maddnet.amm.hashing import encode, encode_torch
from maddnet.nn import LayerSpec, MaddConv2d, MaddLinear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def low_rank(nrows: int, ndims: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(nrows, 8, generator=gen) @ torch.randn(8, ndims, generator=gen)


def test_encode_on_cuda_equals_cpu_kernels_bit_for_bit():
    rows = low_rank(5000, 32)
    amm = MaddnessMatmul(ncodebooks=8).fit(rows, torch.randn(32, 4))
    exact = rows.clone()
    exact[:100, amm.split_dims_[0, 0]] = amm.thresholds_[0, 0]  # values exactly at a threshold
    cpu = encode(exact, amm.split_dims_, amm.thresholds_)
    gpu = encode_torch(exact.cuda(), amm.split_dims_.cuda(), amm.thresholds_.cuda())
    assert torch.equal(gpu.cpu(), cpu)


def test_estimator_state_on_cuda_predicts_as_on_cpu():
    rows, weight = low_rank(4000, 48), torch.randn(48, 10)
    amm = MaddnessMatmul(ncodebooks=6).fit(rows[:3000], weight)
    twin = MaddnessMatmul(**amm.get_config()).load_state_dict(amm.state_dict()).to("cuda")
    test = rows[3000:]
    assert torch.equal(twin.encode(test.cuda()).cpu(), amm.encode(test))
    torch.testing.assert_close(twin(test.cuda()).cpu(), amm(test), rtol=1e-6, atol=1e-5)
    # learning on the device (torch backend) reaches the same error
    on_gpu = MaddnessMatmul(ncodebooks=6).fit(rows[:3000].cuda(), weight.cuda())
    exact = test @ weight
    nmse_cpu = float(((amm(test) - exact) ** 2).sum() / (exact**2).sum())
    nmse_gpu = float(((on_gpu(test.cuda()).cpu() - exact) ** 2).sum() / (exact**2).sum())
    assert abs(nmse_gpu - nmse_cpu) < 0.02 * nmse_cpu + 1e-4


def layers_for(kind: str, spec: LayerSpec):
    torch.manual_seed(0)
    if kind == "linear":
        dense, x = nn.Linear(32, 12), low_rank(600, 32)
        layer = MaddLinear.from_dense(dense, x, 4, spec=spec)
    else:
        dense, x = nn.Conv2d(4, 6, 3, padding=1, stride=2), torch.randn(6, 4, 12, 12)
        rows = nn.functional.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 36)
        layer = MaddConv2d.from_dense(dense, rows, 4, spec=spec)
    return layer, x


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("surrogate,qat,bits", [("soft", True, 8), ("path", True, 8), ("soft", False, None)])
def test_training_step_on_cuda_equals_cpu(kind, surrogate, qat, bits):
    layer, x = layers_for(kind, LayerSpec(surrogate=surrogate, qat=qat, lut_bits=bits))
    gpu_layer = copy.deepcopy(layer).cuda()
    outs, grads = [], []
    for module, device in ((layer, "cpu"), (gpu_layer, "cuda")):
        module.train()
        inputs = x.detach().to(device).requires_grad_()
        out = module(inputs)
        weight = torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(device)
        (out * weight).sum().backward()
        outs.append(out.detach().cpu())
        grads.append({"x": inputs.grad.cpu(), **{n: p.grad.cpu() for n, p in module.named_parameters()}})
        module.eval()
        with torch.no_grad():
            outs.append(module(x.to(device)).cpu())
    torch.testing.assert_close(outs[2], outs[0], rtol=1e-5, atol=1e-4)  # train forward
    torch.testing.assert_close(outs[3], outs[1], rtol=1e-5, atol=1e-4)  # eval forward
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_soft_bf16_training_step_on_cuda(kind):
    """surrogate="soft-bf16" on the GPU (the torch path: bfloat16 product, leaves rebuilt by
    tensor ops). Where every bfloat16 value is exact (integer LUT entries in [-4, 4], output
    gradients in [-2, 2], at most 12 outputs) it gives the CPU soft surrogate's gradients,
    whatever precision cuBLAS reduces in; on random data it differs from soft (it does round)."""
    layer, x = layers_for(kind, LayerSpec(surrogate="soft-bf16", lut_bits=None))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.lut.copy_(torch.randint(-4, 5, layer.lut.shape, generator=gen))
    grads = {}
    for surrogate, device in (("soft", "cpu"), ("soft-bf16", "cuda")):
        module = copy.deepcopy(layer).to(device).train()
        module.surrogate = surrogate
        inputs = x.detach().to(device).requires_grad_()
        out = module(inputs)
        weight = torch.randint(-2, 3, out.shape, generator=torch.Generator().manual_seed(2)).float()
        (out * weight.to(device)).sum().backward()
        grads[surrogate] = {"x": inputs.grad.cpu(), **{n: p.grad.cpu() for n, p in module.named_parameters()}}
    for name, want in grads["soft"].items():
        torch.testing.assert_close(grads["soft-bf16"][name], want, rtol=1e-4, atol=1e-4, msg=name)
    # random LUT and output gradient: soft-bf16 against soft, both on the GPU
    layer, x = layers_for(kind, LayerSpec(lut_bits=None))
    results = []
    for surrogate in ("soft", "soft-bf16"):
        module = copy.deepcopy(layer).cuda().train()
        module.surrogate = surrogate
        inputs = x.detach().cuda().requires_grad_()
        out = module(inputs)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape).cuda()).sum().backward()
        results.append(inputs.grad.cpu())
    error = float((results[1] - results[0]).norm() / results[0].norm())
    assert 0 < error < 1e-2


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_training_step_on_cuda_makes_no_host_round_trip(kind):
    layer, x = layers_for(kind, LayerSpec())
    layer = layer.cuda().train()
    x = x.cuda().requires_grad_()
    layer(x).square().sum().backward()  # warm-up (first use quantises the LUT)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = layer(x)
        out.square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert layer.thresholds.grad is not None
