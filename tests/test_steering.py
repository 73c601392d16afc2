"""Channel steering: ``LayerSpec.channel_budget`` limits the input channels the trees split on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maddnet.amm import hashing
from maddnet.amm.encoders import TreeEncoder
from maddnet.amm.encoders.tree import channel_scores, steering_columns
from maddnet.nn import MaddConfig, MaddConv2d, MaddLinear, convert
from maddnet.nn.prune import needed_inputs, prune_unread
from maddnet.nn.spec import LayerSpec


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def patches(x: torch.Tensor, k: int = 3) -> torch.Tensor:
    """(N, Cin k k) rows of a stride-1 'same' conv, unfold order (channel, ky, kx)."""
    return F.unfold(x, k, padding=k // 2).transpose(1, 2).reshape(-1, x.shape[1] * k * k)


def conv_data(cin: int = 12, cout: int = 6) -> tuple[nn.Conv2d, torch.Tensor, torch.Tensor]:
    conv = nn.Conv2d(cin, cout, 3, padding=1)
    scale = torch.linspace(0.2, 2.0, cin)[torch.randperm(cin)]  # channels of unequal energy
    x = torch.randn(24, cin, 6, 6) * scale[None, :, None, None]
    return conv, x, patches(x)


def naive_allowed(rows: torch.Tensor, weight: torch.Tensor, size: int, count: int) -> set[int]:
    """The ``count`` channels with the largest ||A_c B_c||_F, forming each product."""
    scores = [
        torch.linalg.norm(
            rows[:, c * size : (c + 1) * size].double() @ weight[c * size : (c + 1) * size].double()
        )
        for c in range(rows.shape[1] // size)
    ]
    return set(torch.tensor(scores).topk(count).indices.tolist())


def test_default_and_full_budget_are_the_unrestricted_trees():
    conv, _, rows = conv_data()
    base = MaddConv2d.from_dense(conv, rows, 12, lut_bits=None)
    full = MaddConv2d.from_dense(conv, rows, 12, lut_bits=None, channel_budget=1.0)
    for name, value in base.state_dict().items():
        assert torch.equal(value, full.state_dict()[name]), name
    block = rows[:, :9]
    plain = hashing.learn_tree(block, 4, 4)
    same = hashing.learn_tree(block, 4, 4, split_columns=block.clone())
    assert torch.equal(plain.split_dims, same.split_dims)
    assert torch.equal(plain.thresholds, same.thresholds)
    assert torch.equal(plain.leaf_means, same.leaf_means)


def test_channel_scores_match_the_formed_products():
    conv, _, rows = conv_data()
    weight = conv.weight.detach().reshape(6, -1).T
    expected = torch.stack(
        [
            torch.linalg.norm(rows[:, c * 9 : (c + 1) * 9].double() @ weight[c * 9 : (c + 1) * 9].double())
            for c in range(12)
        ]
    )
    torch.testing.assert_close(channel_scores(rows, weight, 9), expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("budget, count", [(0.5, 6), (0.25, 3), (5, 5), (1, 1)])
def test_conv_trees_read_only_allowed_channels(budget, count):
    conv, x, rows = conv_data()
    layer = MaddConv2d.from_dense(conv, rows, 12, lut_bits=None, channel_budget=budget)
    weight = conv.weight.detach().reshape(6, -1).T
    allowed = naive_allowed(rows, weight, 9, count)
    read = set((layer.split_dims // 9).reshape(-1).tolist())
    assert read <= allowed
    assert layer.split_dims.shape == (12, 4)  # still L = 4 compares and reads per codebook
    assert needed_inputs(nn.Sequential(layer), x)["layers"]["0"]["channels"] == sorted(read)
    # no codebook degenerates to one constant code: every tree sends rows to several leaves
    codes = layer.encoder.encode_values(rows.index_select(1, layer.split_dims.reshape(-1)).reshape(-1, 12, 4))
    assert all(len(codes[:, c].unique()) > 1 for c in range(12))


def test_block_without_allowed_channel_splits_on_the_column_that_explains_it():
    """Columns 0, 1 carry the product (allowed at a budget of 2); block [2, 3] copies column 1
    (scaled, plus a little noise), so its tree splits on column 1 (all 4 levels)."""
    rows = torch.randn(2000, 4)
    rows[:, 2] = 2 * rows[:, 1] + 0.01 * torch.randn(2000)
    rows[:, 3] = -rows[:, 1] + 0.01 * torch.randn(2000)
    weight = torch.tensor([[3.0, 1.0], [2.0, -1.0], [0.01, 0.0], [0.0, 0.01]])
    columns = steering_columns(rows, weight, hashing.subspace_bounds(4, 2), 2, 1)
    assert columns[0] is None  # whole block allowed: the unrestricted tree
    assert columns[1].tolist() == [0, 1]
    encoder = TreeEncoder(2, channel_budget=2).fit(rows, weight)
    assert encoder.split_dims_[1].tolist() == [1, 1, 1, 1]


def test_convert_then_prune_computes_only_allowed_channels_and_stays_exact():
    """conv -> BN -> ReLU -> 3x3 conv at C = Cin: with a budget of half the channels the
    producer computes half of them after ``prune_unread``, with unchanged outputs."""
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1)
    ).eval()
    with torch.no_grad():
        model[1].weight.uniform_(0.2, 3.0)
    calib = [torch.randn(16, 3, 8, 8) for _ in range(2)]
    spec = LayerSpec(lut_bits=None, channel_budget=0.5)
    convert(model, calib, MaddConfig(ncodebooks={"3": 16}, layers=["3"], spec=spec), check_training=False)
    assert isinstance(model[3], MaddConv2d) and model[3].spec.channel_budget == 0.5
    x = torch.randn(4, 3, 8, 8)
    report = needed_inputs(model, x)
    needed = report["producers"]["0"]["needed"]
    assert len(needed) <= 8 and needed == report["layers"]["3"]["channels"]
    with torch.no_grad():
        ref = model(x)
    prune_unread(model, x)
    assert model[0].out_channels == model[1].num_features == model[3].in_channels == len(needed)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_linear_budget_counts_features():
    linear = nn.Linear(20, 5)
    rows = torch.randn(500, 20) * torch.linspace(0.1, 3, 20)
    layer = MaddLinear.from_dense(linear, rows, 4, lut_bits=None, channel_budget=0.25)
    allowed = naive_allowed(rows, linear.weight.detach().T, 1, 5)
    assert set(layer.split_dims.reshape(-1).tolist()) <= allowed


@pytest.mark.parametrize("budget", [0, 0.0, -1, 1.5, float("nan"), True, [0.5]])
def test_bad_budget_values_are_named(budget):
    with pytest.raises(ValueError, match="LayerSpec.channel_budget"):
        LayerSpec(channel_budget=budget)
    with pytest.raises(ValueError, match="channel_budget"):
        TreeEncoder(4, channel_budget=budget)


def test_budget_text_and_other_errors():
    assert LayerSpec(channel_budget="0.5").channel_budget == 0.5
    assert LayerSpec(channel_budget="64").channel_budget == 64
    assert LayerSpec(channel_budget="none").channel_budget is None
    with pytest.raises(ValueError, match="LayerSpec.channel_budget"):
        LayerSpec(channel_budget="half")
    with pytest.raises(ValueError, match="tree encoder"):
        LayerSpec(encoder="tree-global", channel_budget=0.5)
    rows = torch.randn(100, 8)
    with pytest.raises(ValueError, match="needs the weight"):
        TreeEncoder(2, channel_budget=0.5).fit(rows)
    weight = torch.randn(8, 3)
    # a count at or above the channels allows them all: the default trees
    clamped, default = TreeEncoder(2, channel_budget=9).fit(rows, weight), TreeEncoder(2).fit(rows, weight)
    assert torch.equal(clamped.split_dims_, default.split_dims_)
    with pytest.raises(ValueError, match="not whole channels of 3"):
        TreeEncoder(2, channel_budget=0.5, channel_size=3).fit(rows, torch.randn(8, 3))
    with pytest.raises(ValueError, match="channel_size"):
        TreeEncoder(2, channel_budget=0.5, channel_size=0)
    conv, _, rows = conv_data()
    wide = MaddConv2d.from_dense(conv, rows, 12, channel_budget=13)
    default = MaddConv2d.from_dense(conv, rows, 12)
    assert torch.equal(wide.split_dims, default.split_dims)


def test_output_objective_with_budget_reads_only_allowed_columns():
    rows = torch.randn(800, 24) * torch.linspace(0.2, 2.0, 24)
    weight = torch.randn(24, 5)
    encoder = TreeEncoder(6, hash_objective="output", channel_budget=0.5, channel_size=2).fit(rows, weight)
    allowed = naive_allowed(rows, weight, 2, 6)
    assert set((encoder.split_dims_ // 2).reshape(-1).tolist()) <= allowed


def test_channel_budget_flag_error_is_the_settings_message(capsys):
    from maddnet.cli import main

    with pytest.raises(SystemExit) as exit_info:  # argparse's own error
        main(["retrain", "--model", "resnet9", "--data", "digits", "--channel-budget", "abc"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--channel-budget: LayerSpec.channel_budget must be none, a fraction" in err
    assert "parse_channel_budget" not in err
