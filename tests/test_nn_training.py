"""Training through MADD layers: exact LUT gradients, surrogate threshold gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maddnet.nn import MaddConv2d, MaddLinear, functional
from maddnet.nn.functional import encode_values, madd_lut


def random_tree_inputs(nrows=300, ncodebooks=3, depth=4, nout=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(nrows, ncodebooks, depth, generator=gen, dtype=torch.float64)
    thresholds = 0.5 * torch.randn(ncodebooks, 2**depth - 1, generator=gen, dtype=torch.float64)
    lut = torch.randn(ncodebooks, 2**depth, nout, generator=gen, dtype=torch.float64)
    temperature = 0.3 + torch.rand(ncodebooks, depth, generator=gen, dtype=torch.float64)
    return values, thresholds, lut, temperature


def soft_tree_output(values, thresholds, lut, temperature):
    """Reference: soft decision tree written out leaf by leaf (no shared code)."""
    nrows, ncodebooks, depth = values.shape
    nleaves = 2**depth
    scores = []
    for leaf in range(nleaves):
        prob = torch.ones(nrows, ncodebooks, dtype=values.dtype)
        node = 0
        for level in range(depth):
            bit = (leaf >> (depth - 1 - level)) & 1
            heap = 2**level - 1 + node
            margin = (values[:, :, level] - thresholds[:, heap]) / temperature[:, level]
            right = 0.5 + 0.5 * torch.tanh(margin)
            prob = prob * (right if bit else 1 - right)
            node = 2 * node + bit
        scores.append(prob)
    scores = torch.stack(scores, dim=-1)  # (N, C, K)
    return torch.einsum("nck,ckm->nm", scores, lut)


def test_forward_is_hard_encoding_and_lut_sum():
    values, thresholds, lut, temperature = random_tree_inputs()
    out = madd_lut(values, thresholds, lut, temperature)
    codes = encode_values(values, thresholds)
    expected = sum(lut[c, codes[:, c].long()] for c in range(values.shape[1]))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@pytest.fixture(params=["kernel", "torch"])
def backend(request, monkeypatch):
    """Run the backward through the numba kernels (CPU default) or the tensor-op twins."""
    if request.param == "torch":
        monkeypatch.setattr(functional, "_surrogate_cpu", functional._surrogate_torch)
        monkeypatch.setattr(functional, "lut_gradient", functional._lut_gradient_torch)
    return request.param


def test_lut_gradient_equals_one_hot_autograd(backend):
    values, thresholds, lut, temperature = random_tree_inputs(seed=1)
    weight = torch.randn(values.shape[0], lut.shape[2], dtype=torch.float64)
    lut_a = lut.clone().requires_grad_()
    (madd_lut(values, thresholds, lut_a, temperature) * weight).sum().backward()
    # explicit one-hot formulation: Y = G @ T with G (N, C*K)
    codes = encode_values(values, thresholds)
    one_hot = F.one_hot(codes.long(), lut.shape[1]).reshape(values.shape[0], -1).to(lut.dtype)
    lut_b = lut.clone().requires_grad_()
    ((one_hot @ lut_b.reshape(-1, lut.shape[2])) * weight).sum().backward()
    torch.testing.assert_close(lut_a.grad, lut_b.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("chunk_elements", [1 << 22, 3 * 16 * 64])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_surrogate_gradients_equal_soft_tree_autograd(monkeypatch, backend, chunk_elements, dtype):
    monkeypatch.setattr(functional, "_SURROGATE_CHUNK_ELEMENTS", chunk_elements)
    values, thresholds, lut, temperature = random_tree_inputs(nrows=1000, seed=2)
    if dtype == torch.float32:  # the layers' dtype: compare with the float64 reference
        values, thresholds, lut, temperature = (t.float() for t in (values, thresholds, lut, temperature))
    tol = {"rtol": 1e-9, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    weight = torch.randn(values.shape[0], lut.shape[2], dtype=dtype)
    va, ta = values.clone().requires_grad_(), thresholds.clone().requires_grad_()
    (madd_lut(va, ta, lut, temperature) * weight).sum().backward()
    vb, tb = values.double().requires_grad_(), thresholds.double().requires_grad_()
    (soft_tree_output(vb, tb, lut.double(), temperature.double()) * weight.double()).sum().backward()
    torch.testing.assert_close(va.grad, vb.grad.to(dtype), **tol)
    torch.testing.assert_close(ta.grad, tb.grad.to(dtype), **tol)
    assert float(ta.grad.abs().sum()) > 0


@pytest.mark.parametrize("nprototypes", [2, 4, 16, 32])
def test_tree_difference_table_rebuilds_the_leaf_rows(nprototypes):
    """Leaf k's LUT row is leaf 0's plus the node differences of the nodes whose right
    subtree holds k (walked leaf by leaf here, as in soft_tree_output)."""
    table = torch.randn(3, nprototypes, 5, dtype=torch.float64)
    diffs = functional.tree_difference_table(table)
    right = functional.right_subtree_matrix(nprototypes, dtype=torch.float64)
    assert diffs.shape == (3, nprototypes - 1, 5) and right.shape == (nprototypes - 1, nprototypes)
    depth = nprototypes.bit_length() - 1
    for leaf in range(nprototypes):
        node, on_right = 0, []
        for level in range(depth):
            bit = (leaf >> (depth - 1 - level)) & 1
            if bit:
                on_right.append(2**level - 1 + node)
            node = 2 * node + bit
        assert right[:, leaf].nonzero().flatten().tolist() == on_right
        rebuilt = table[:, 0] + diffs[:, on_right].sum(1)
        torch.testing.assert_close(rebuilt, table[:, leaf], rtol=0, atol=1e-12)


@pytest.mark.parametrize("depth", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_soft_bf16_surrogate_equals_soft_where_bfloat16_is_exact(backend, depth, dtype):
    """With LUT entries and output gradients small integers (every bfloat16 product and sum
    exact), surrogate="soft-bf16" gives the soft surrogate's gradients (K = 4 ... 256)."""
    values, thresholds, _, temperature = (
        t.to(dtype) for t in random_tree_inputs(nrows=400, depth=depth, seed=4)
    )
    gen = torch.Generator().manual_seed(5)
    lut = torch.randint(-4, 5, (3, 2**depth, 5), generator=gen).to(dtype)
    weight = torch.randint(-2, 3, (values.shape[0], 5), generator=gen).to(dtype)
    grads = {}
    for surrogate in ("soft", "soft-bf16"):
        v, t = values.clone().requires_grad_(), thresholds.clone().requires_grad_()
        (madd_lut(v, t, lut, temperature, surrogate=surrogate) * weight).sum().backward()
        grads[surrogate] = (v.grad, t.grad)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for got, want in zip(grads["soft-bf16"], grads["soft"], strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_soft_bf16_surrogate_is_close_to_soft_on_random_data(backend):
    values, thresholds, lut, temperature = (t.float() for t in random_tree_inputs(nrows=500, seed=6))
    weight = torch.randn(values.shape[0], lut.shape[2], generator=torch.Generator().manual_seed(7))
    grads = {}
    for surrogate in ("soft", "soft-bf16"):
        v, t = values.clone().requires_grad_(), thresholds.clone().requires_grad_()
        (madd_lut(v, t, lut, temperature, surrogate=surrogate) * weight).sum().backward()
        grads[surrogate] = (v.grad, t.grad)
    for got, want in zip(grads["soft-bf16"], grads["soft"], strict=True):
        assert 0 < float((got - want).norm() / want.norm()) < 1e-2


def test_surrogate_precision_is_checked():
    values, thresholds, lut, temperature = random_tree_inputs(nrows=10)
    with pytest.raises(ValueError, match="precision must be one of"):
        functional.tree_surrogate_grads(
            values, thresholds, lut, temperature, torch.zeros(10, 5, dtype=values.dtype), precision="fp8"
        )


def test_qat_forward_reads_fake_quantized_lut_and_gradient_goes_straight_through():
    torch.manual_seed(3)
    linear = nn.Linear(16, 6)
    rows = torch.randn(400, 16)
    layer = MaddLinear.from_dense(linear, rows, ncodebooks=4, lut_bits=4).train()
    out = layer(rows)
    deq = layer.quantized_lut().dequantize()
    codes = layer.codes(rows)
    expected = sum(deq[c, codes[:, c].long()] for c in range(4)) + linear.bias
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    one_hot = F.one_hot(codes.long(), 16).reshape(400, -1).float()
    torch.testing.assert_close(layer.lut.grad.reshape(-1, 6), one_hot.T @ grad_out, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer.bias.grad, grad_out.sum(0), rtol=1e-5, atol=1e-5)


def make_toy_layer(root_threshold: float) -> MaddLinear:
    """C=1, K=4 tree on x[0] then x[1]; outputs the leaf index (a step function)."""
    layer = MaddLinear(2, 1, ncodebooks=1, nprototypes=4, bias=False, lut_bits=None)
    with torch.no_grad():
        layer.split_dims.copy_(torch.tensor([[0, 1]]))
        layer.thresholds.copy_(torch.tensor([[root_threshold, 0.0, 0.0]]))
        layer.lut.copy_(torch.tensor([[[0.0], [0.0], [4.0], [4.0]]]))
        layer.temperature.fill_(0.3)
    return layer


def test_threshold_gradient_points_the_right_way_and_training_lowers_loss():
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(1000, 2, generator=gen) * 2 - 1
    target = make_toy_layer(0.2)(x).detach()
    for start in (-0.4, 0.6):  # left and right of the true root threshold 0.2
        layer = make_toy_layer(start)
        layer.lut.requires_grad_(False)
        loss = F.mse_loss(layer(x), target)
        loss.backward()
        grad = float(layer.thresholds.grad[0, 0])
        assert grad != 0 and (start - 0.2) * grad > 0  # descent moves the threshold to 0.2
        optimizer = torch.optim.Adam([layer.thresholds], lr=0.02)
        first = loss.item()
        for _ in range(60):
            optimizer.zero_grad()
            loss = F.mse_loss(layer(x), target)
            loss.backward()
            optimizer.step()
        assert loss.item() < 0.2 * first
        assert abs(layer.thresholds[0, 0].item() - 0.2) < 0.05
        assert torch.equal(layer.split_dims, torch.tensor([[0, 1]]))  # never trained


def test_training_madd_conv_on_regression_lowers_loss_and_trains_layer_before():
    torch.manual_seed(5)
    pre = nn.Conv2d(3, 4, 1)
    target_conv = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        hidden = pre(x)
        target = target_conv(hidden) + 0.3 * torch.tanh(hidden).sum(1, keepdim=True)
        rows = F.unfold(hidden, 3, padding=1).transpose(1, 2).reshape(-1, 36)
    layer = MaddConv2d.from_dense(target_conv, rows, ncodebooks=4, lut_bits=None)
    model = nn.Sequential(pre, layer)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), target)
        loss.backward()
        if not losses:
            assert float(pre.weight.grad.abs().sum()) > 0  # gradient reaches the layer before
            assert float(layer.thresholds.grad.abs().sum()) > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_frozen_thresholds_and_lut():
    torch.manual_seed(6)
    linear = nn.Linear(8, 3)
    rows = torch.randn(100, 8)
    layer = MaddLinear.from_dense(linear, rows, ncodebooks=2)
    layer.thresholds.requires_grad_(False)
    layer(rows).sum().backward()
    assert layer.thresholds.grad is None and layer.lut.grad is not None
    layer.lut.requires_grad_(False)
    layer.bias.requires_grad_(False)
    out = layer(rows)
    assert out.grad_fn is None  # nothing to train: fast path


def path_reference(values, thresholds, lut, temperature, grad_out):
    """Hard-path surrogate written row by row (no shared code)."""
    nrows, ncodebooks, depth = values.shape
    grad_values = torch.zeros_like(values)
    grad_thresholds = torch.zeros_like(thresholds)
    for n in range(nrows):
        for c in range(ncodebooks):
            x = values[n, c]

            def descend(node_index, level, x=x, c=c):
                # continue the hard descent from node ``node_index`` of ``level``
                while level < depth:
                    right = bool(x[level] > thresholds[c, 2**level - 1 + node_index])
                    node_index = 2 * node_index + int(right)
                    level += 1
                return node_index

            index = 0
            for t in range(depth):
                heap = 2**t - 1 + index
                go_right = bool(x[t] > thresholds[c, heap])
                right_leaf = descend(2 * index + 1, t + 1)
                left_leaf = descend(2 * index, t + 1)
                diff = float(grad_out[n] @ (lut[c, right_leaf] - lut[c, left_leaf]))
                tanh = torch.tanh((x[t] - thresholds[c, heap]) / temperature[c, t])
                grad = float((1 - tanh**2) / (2 * temperature[c, t])) * diff
                grad_values[n, c, t] = grad
                grad_thresholds[c, heap] -= grad
                index = 2 * index + int(go_right)
    return grad_values, grad_thresholds


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_path_surrogate_equals_reference(backend, monkeypatch, dtype):
    values, thresholds, lut, temperature = random_tree_inputs(nrows=60, ncodebooks=3, seed=7)
    values, thresholds, lut, temperature = (t.to(dtype) for t in (values, thresholds, lut, temperature))
    if backend == "torch":

        def torch_path(values, thresholds, table, temperature, grad_out, codes, need_values, need_thresholds):
            inv_tau = 1.0 / temperature.to(values.dtype)
            return functional._path_torch(
                values.detach(),
                thresholds.detach().to(values.dtype),
                inv_tau,
                table.to(values.dtype),
                grad_out.to(values.dtype),
                codes,
                need_values,
                need_thresholds,
            )

        monkeypatch.setattr(functional, "path_surrogate_grads", torch_path)
    grad_out = torch.randn(60, lut.shape[2], dtype=dtype)
    va, ta = values.clone().requires_grad_(), thresholds.clone().requires_grad_()
    out = madd_lut(va, ta, lut, temperature, surrogate="path")
    torch.testing.assert_close(out, madd_lut(values, thresholds, lut, temperature))  # same forward
    out.backward(grad_out)
    ref_values, ref_thresholds = path_reference(
        values.double(), thresholds.double(), lut.double(), temperature.double(), grad_out.double()
    )
    tol = {"rtol": 1e-9, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(va.grad, ref_values.to(dtype), **tol)
    torch.testing.assert_close(ta.grad, ref_thresholds.to(dtype), **tol)
    assert float(ta.grad.abs().sum()) > 0


def test_path_surrogate_trains_thresholds_on_toy_problem():
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(1000, 2, generator=gen) * 2 - 1
    target = make_toy_layer(0.2)(x).detach()
    layer = make_toy_layer(-0.4)
    layer.surrogate = "path"
    layer.lut.requires_grad_(False)
    optimizer = torch.optim.Adam([layer.thresholds], lr=0.02)
    first = None
    for _ in range(60):
        optimizer.zero_grad()
        loss = F.mse_loss(layer(x), target)
        loss.backward()
        optimizer.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.2 * first
    assert abs(layer.thresholds[0, 0].item() - 0.2) < 0.05
