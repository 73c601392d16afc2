"""maddnet.nn.fuse: BatchNorm / activation folding into MADD layers, exact on data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from maddnet.amm.hashing import encode_torch
from maddnet.nn import MaddConv2d, MaddLinear, conversion_plan, load_converted, save_converted
from maddnet.nn.fuse import _from_ordinal, _ordinal, fuse, fuse_report, permute_tree
from maddnet.nn.graph import GraphError


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # each test's data independent of the test order


def randomised(layer, threshold_scale: float = 2.5):
    """A fresh MADD layer with random split dims, thresholds (wide enough that folding finds
    constant outcomes), LUT and bias: what folding and pruning must preserve, without the
    cost of learning it."""
    with torch.no_grad():
        layer.encoder.split_dims.copy_(torch.randint(0, layer.in_dim, layer.split_dims.shape))
        layer.thresholds.normal_(0, threshold_scale)
        layer.lut.normal_()
        if layer.bias is not None:
            layer.bias.normal_()
    return layer


def madd_conv(cin: int, cout: int, ncodebooks: int, k: int = 1, pad: int = 0, **spec) -> MaddConv2d:
    return randomised(MaddConv2d(cin, cout, k, ncodebooks, padding=pad, **spec))


def bn(nchannels: int, weights: list[float] | None = None, seed: int = 1, dims: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    norm = nn.BatchNorm2d(nchannels) if dims == 2 else nn.BatchNorm1d(nchannels)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor(weights) if weights else torch.randn(nchannels))
        norm.bias.normal_()
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.3, 3.0)
    return norm


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


ACTIVATIONS = [nn.ReLU(), nn.ReLU6(), nn.Hardtanh(-1.0, 2.0), nn.LeakyReLU(0.1), nn.GELU(), nn.Hardswish()]


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: type(a).__name__)
def test_bn_and_activation_fold_bit_exact(act):
    weights = [1.5, -2.0, 0.0, 0.3, -0.1, 1.0]  # negative and zero scales
    model = nn.Sequential(nn.Conv2d(3, 6, 3), bn(6, weights), act, madd_conv(6, 5, 6)).eval()
    x = 3 * torch.randn(6, 3, 9, 9)
    ref = outputs(model, x)
    fuse(model)
    fold = fuse_report(model)[-1]["layers"]["3"]
    assert torch.equal(outputs(model, x), ref)
    if isinstance(act, nn.GELU | nn.Hardswish):  # exact only where single compares suffice
        assert fold["approximate_nodes"] == 0
    else:
        assert fold["folded"] == ["2", "1"]
        assert isinstance(model[1], nn.Identity) and isinstance(model[2], nn.Identity)
        assert fold["flipped_nodes"] > 0 and fold["compares_removed"] > 0


def test_linear_consumer_needs_example_for_batchnorm():
    model = nn.Sequential(
        nn.Linear(5, 8),
        bn(8, dims=1),
        nn.ReLU(),
        randomised(MaddLinear(8, 3, 2)),
    )
    x = torch.randn(64, 5)
    ref = outputs(model, x)
    fuse(model)  # no example: the ReLU folds, the BatchNorm's axis is unknown
    assert isinstance(model[2], nn.Identity) and isinstance(model[1], nn.BatchNorm1d)
    assert "example" in fuse_report(model)[-1]["left_alone"]["1"]
    fuse(model, example=x)
    assert isinstance(model[1], nn.Identity)
    assert torch.equal(outputs(model, x), ref)


def test_gelu_approximate_counts_and_measures():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.GELU(), madd_conv(6, 5, 6)).eval()
    with torch.no_grad():  # GELU(u) > -0.1 holds on both branches: u < -1.9 or u > -0.1
        model[2].thresholds.fill_(-0.1)
    x = 3 * torch.randn(32, 3, 9, 9)
    ref = outputs(model, x)
    fuse(model, approximate=True)
    fold = fuse_report(model)[-1]["layers"]["2"]
    assert fold["approximate_nodes"] == model[2].thresholds.numel()
    mismatch = (outputs(model, x) != ref).any(1).float().mean().item()  # output positions
    assert 0 < mismatch < 0.9  # positions where some tap lies on the far left branch differ


def test_zero_padding_keeps_batchnorm_with_shift():
    norm = bn(6)
    with torch.no_grad():  # BN(0) = 3: padded taps read 3 unfused, a 0 the fused compare maps elsewhere
        norm.running_mean.zero_()
        norm.bias.fill_(3.0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), norm, nn.ReLU(), madd_conv(6, 4, 6, k=3, pad=1)).eval()
    x = torch.randn(4, 3, 10, 10)
    ref = outputs(model, x)
    fuse(model)
    report = fuse_report(model)[-1]
    assert isinstance(model[2], nn.Identity) and isinstance(model[1], nn.BatchNorm2d)
    assert "zero-padded" in report["left_alone"]["1"]
    assert torch.equal(outputs(model, x), ref)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.act, self.conv = bn(6), nn.ReLU(), madd_conv(6, 6, 6)

    def forward(self, x):
        h = self.act(self.norm(x))
        return h + self.conv(h)


def test_residual_reader_keeps_activation():
    model = Residual().eval()
    x = torch.randn(4, 6, 5, 5)
    ref = outputs(model, x)
    fuse(model)
    assert isinstance(model.act, nn.ReLU) and isinstance(model.norm, nn.BatchNorm2d)
    assert "also read by" in fuse_report(model)[-1]["layers"]["conv"]["left_alone"]
    assert torch.equal(outputs(model, x), ref)


def test_bn_after_folds_into_lut_float_and_int8():
    for bits in (None, 8):
        layer = madd_conv(4, 6, 4, k=3, pad=1, lut_bits=bits, bias=False)
        model = nn.Sequential(layer, bn(6, [1.0, -0.5, 2.0, 0.0, 0.25, -3.0])).eval()
        x = torch.randn(4, 4, 7, 7)
        ref = outputs(model, x)
        fuse(model, bn_after=True)
        fold = fuse_report(model)[-1]["layers"]["0"]
        assert fold["bn_after"] == "1" and isinstance(model[1], nn.Identity) and layer.bias is not None
        diff = (outputs(model, x) - ref).abs().max().item()
        if bits is None:
            assert diff <= 1e-5 * (1 + ref.abs().max().item())  # LUT-sum rounding only
        else:
            assert diff <= fold["int8_bound"]


def test_saved_fused_model_loads_into_fresh_skeleton(tmp_path):
    def build():
        return nn.Sequential(
            nn.Conv2d(3, 6, 3), bn(6, [1.0, -1.0, 0.5, 2.0, -0.2, 0.0]), nn.ReLU(), madd_conv(6, 5, 6)
        ).eval()

    model = build()
    x = torch.randn(4, 3, 8, 8)
    fuse(model)
    save_converted(model, tmp_path / "fused.pt")
    fresh = build()
    fresh[3] = nn.Conv2d(6, 5, 1)  # a dense skeleton
    load_converted(fresh, tmp_path / "fused.pt")
    assert isinstance(fresh[1], nn.Identity)
    assert torch.equal(outputs(fresh, x), outputs(model, x))
    assert conversion_plan(fresh)["passes"][0]["pass"] == "fuse"


def test_hw_exact_mode_after_fusing():
    from maddnet.hw.exact import set_hw_exact

    model = nn.Sequential(nn.Conv2d(3, 6, 3), bn(6), nn.ReLU(), madd_conv(6, 5, 6, lut_bits=8)).eval()
    x = torch.randn(16, 3, 9, 9)
    set_hw_exact(model, True)
    before = outputs(model, x)
    fuse(model)
    after = outputs(model, x)
    # FP16 compares: only inputs whose float16 rounding crosses a threshold can differ
    assert (before != after).any(1).float().mean().item() < 0.02


def test_permute_tree_against_naive_loop():
    torch.manual_seed(0)
    ncodebooks, depth = 3, 4
    thresholds = torch.randn(ncodebooks, 2**depth - 1)
    lut = torch.randn(ncodebooks, 2**depth, 2)
    flip = torch.rand(ncodebooks, 2**depth - 1) < 0.5
    new_thr, new_lut = permute_tree(thresholds, lut, flip)
    rows = torch.randn(200, depth)
    for c in range(ncodebooks):
        for row in rows:
            node = 0
            for level in range(depth):  # the old tree, each flipped node's outcome inverted
                bit = int(row[level] > thresholds[c, node]) ^ int(flip[c, node])
                node = 2 * node + 1 + bit
            new = int(encode_torch(row[None], torch.arange(depth)[None], new_thr[c : c + 1]))
            assert torch.equal(new_lut[c, new], lut[c, node - (2**depth - 1)])


def test_float_order_round_trip():
    x = torch.tensor([-float("inf"), -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, float("inf")])
    keys = _ordinal(x)
    assert torch.all(keys[1:] >= keys[:-1])
    assert torch.equal(_from_ordinal(keys), x)  # -0.0 comes back as +0.0, an equal value


def test_untraceable_model_is_refused_unchanged():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act, self.conv = nn.ReLU(), madd_conv(4, 4, 4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                x = -x
            return self.conv(self.act(x))

    model = Branchy().eval()
    with pytest.raises(GraphError, match="Branchy"):
        fuse(model)
    assert isinstance(model.act, nn.ReLU) and conversion_plan(model)["passes"] == []
