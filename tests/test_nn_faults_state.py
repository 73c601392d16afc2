"""Derived state never goes stale: integer LUTs, sum tables and packed tables follow the
float LUT they come from, whatever way it was changed (field case 03)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maddnet import MaddnessMatmul
from maddnet.amm.lut import quantize_lut, quantized_lut_sum, unchanged_since
from maddnet.nn import MaddConv2d, MaddLinear


def linear_layer() -> tuple[MaddLinear, torch.Tensor]:
    torch.manual_seed(0)
    rows = torch.randn(2000, 32)
    return MaddLinear.from_dense(nn.Linear(32, 16), rows, ncodebooks=4).eval(), rows[:64]


def conv_layer() -> tuple[MaddConv2d, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 10, 10)
    rows = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 27)
    return MaddConv2d.from_dense(nn.Conv2d(3, 5, 3, padding=1), rows).eval(), x[:2]


EDITS = {
    "data_mul": lambda lut: lut.data.mul_(2.0),  # an in-place write the version counter misses
    "data_clamp": lambda lut: lut.data.clamp_(-0.1, 0.1),
    "data_copy": lambda lut: lut.data.copy_(torch.randn_like(lut)),
}


@pytest.mark.parametrize("make", [linear_layer, conv_layer], ids=["linear", "conv"])
@pytest.mark.parametrize("edit", sorted(EDITS))
def test_eval_output_follows_the_float_lut_after_any_edit(make, edit):
    layer, x = make()
    with torch.no_grad():
        layer(x)  # the integer LUT is made and used once
    tracked = copy.deepcopy(layer)
    torch.manual_seed(1)
    EDITS[edit](layer.lut)
    with torch.no_grad():
        tracked.lut.copy_(layer.lut)  # the same values written through a tracked in-place op
        assert torch.equal(layer(x), tracked(x))
        # and both are the integer LUT of the edited float LUT
        q = quantize_lut(layer.lut.detach(), 8)
        assert torch.equal(layer.lut_q_values, q.values) and torch.equal(layer.lut_q_offsets, q.offsets)


def test_saved_state_is_consistent_after_a_data_edit():
    layer, x = linear_layer()
    with torch.no_grad():
        layer(x)
    layer.lut.data.mul_(3.0)
    state = layer.state_dict()
    q = quantize_lut(state["lut"], 8)
    assert torch.equal(state["lut_q_values"], q.values) and torch.equal(state["lut_q_scale"], q.scale)
    # a stale state saved by older code (integer buffers of another float LUT) is made consistent
    stale = dict(state)
    stale["lut_q_values"] = torch.zeros_like(stale["lut_q_values"])
    twin = MaddLinear.from_config(layer.get_config())
    twin.load_state_dict(stale)
    with torch.no_grad():
        assert torch.equal(twin.eval()(x), layer(x))


def test_qat_training_forward_follows_a_data_edit():
    layer, x = linear_layer()
    layer.train()
    layer(x).sum().backward()
    layer.lut.data.mul_(0.5)
    expected = quantized_lut_sum(layer.codes(x), layer.quantized_lut()) + layer.bias.detach()
    torch.testing.assert_close(layer(x).detach(), expected, rtol=0, atol=1e-6)
    assert torch.equal(layer.lut_q_values, quantize_lut(layer.lut.detach(), 8).values)


def test_estimator_follows_in_place_edits_of_its_fitted_luts():
    torch.manual_seed(0)
    rows, weight = torch.randn(3000, 24), torch.randn(24, 6)
    amm = MaddnessMatmul(ncodebooks=6).fit(rows, weight)
    test = rows[:100]
    amm(test)  # packed tables made
    amm.lut_.mul_(2.0)  # the float LUT edited in place
    fresh = MaddnessMatmul(**amm.get_config()).fit_encoder(rows)
    fresh._set_lut(amm.lut_.clone())
    assert torch.equal(amm(test), fresh(test))
    # an edit of the integer LUT itself reaches the packed CPU tables and the sum table
    amm.lut_q_.values[:, 0] = 0
    expected = quantized_lut_sum(amm.encode(test), amm.lut_q_)
    assert torch.equal(amm(test), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8])
def test_unchanged_since_compares_bit_patterns(dtype):
    torch.manual_seed(0)
    lut = (torch.rand(4, 16, 10) * 100).to(dtype)
    snapshot = lut.clone()
    assert unchanged_since(lut, snapshot)
    assert unchanged_since(lut.transpose(0, 2), snapshot.transpose(0, 2).contiguous())  # strided views
    for first_or_last in (0, -1):  # a difference in any word counts, at either end too
        changed = snapshot.clone()
        changed.view(-1)[first_or_last] += 1
        assert not unchanged_since(lut, changed)
    lut.data[1, 2, 3] += 1  # unseen by the version counter
    assert not unchanged_since(lut, snapshot)
    assert not unchanged_since(lut, None)
    assert not unchanged_since(lut[:2], snapshot)  # another shape
    assert not unchanged_since(lut.double() if dtype != torch.float64 else lut.float(), snapshot)
    if dtype.is_floating_point:
        nan = torch.full((3,), float("nan"), dtype=dtype)
        assert unchanged_since(nan, nan.clone())  # the same bits: nothing to re-derive
        assert not unchanged_since(torch.zeros(3, dtype=dtype), -torch.zeros(3, dtype=dtype))


def test_same_words_compares_bits_of_any_item_size():
    from maddnet.amm._lut_kernel import same_words

    values = np.array([1.5, -0.0, np.nan], np.float32)  # floats, as a traced call may pass
    assert same_words(values, values.copy())
    assert not same_words(values, np.array([1.5, 0.0, np.nan], np.float32))  # -0.0 vs 0.0
    assert same_words(values.view(np.int32), values.copy().view(np.int32))
    assert not same_words(np.arange(5, dtype=np.uint8), np.arange(1, 6, dtype=np.uint8))


def test_half_precision_cast_keeps_the_integer_lut_scale_finite():
    # a LUT spread below ~0.004 needs a power-of-two scale above 65504: inf in float16
    torch.manual_seed(0)
    rows = torch.randn(2000, 16)
    dense = nn.Linear(16, 4)
    with torch.no_grad():
        dense.weight.mul_(1e-4)
        dense.bias.zero_()
    layer = MaddLinear.from_dense(dense, rows, ncodebooks=2).eval()
    assert float(layer.lut_q_scale.max()) > 65504
    half = copy.deepcopy(layer).half()
    assert half.lut_q_scale.dtype == torch.float32 and torch.isfinite(half.lut_q_scale).all()
    with torch.no_grad():
        out = half(rows[:64].half()).float()
        reference = layer(rows[:64])
    assert torch.isfinite(out).all()
    assert float((out - reference).abs().max()) < 0.05 * float(reference.abs().max())


def test_fitting_under_autocast_gives_the_float32_lut():
    torch.manual_seed(0)
    rows, weight = torch.randn(2000, 16), torch.randn(16, 4)
    exact = MaddnessMatmul(ncodebooks=4).fit(rows, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = MaddnessMatmul(ncodebooks=4).fit(rows, weight)
    assert under.lut_.dtype == torch.float32 and torch.equal(under.lut_, exact.lut_)
