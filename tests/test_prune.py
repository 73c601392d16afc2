"""maddnet.nn.prune: needed inputs of MADD layers; producers computing only those."""

from __future__ import annotations

import pytest
import torch
from test_fuse import madd_conv, randomised
from torch import nn

from maddnet.nn import MaddLinear, conversion_plan, load_converted, save_converted
from maddnet.nn.prune import needed_inputs, prune_unread, read_columns


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # each test's data independent of the test order


def randomise(*norms: nn.BatchNorm2d) -> None:
    for norm in norms:
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)


def ds_block(lut_bits=None, granularity="codebook") -> nn.Sequential:
    """MADD 3x3 conv -> BN -> ReLU -> depthwise -> BN -> ReLU -> MADD 1x1 conv with C = 2
    (reads at most 8 of 16 channels) -> pool -> linear."""
    torch.manual_seed(1)
    spec = {"lut_bits": lut_bits, "lut_granularity": granularity}
    model = nn.Sequential(
        madd_conv(3, 16, 3, k=3, pad=1, **spec),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        madd_conv(16, 8, 2, **spec),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    randomise(model[1], model[4])
    return model.eval()


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_needed_inputs_match_split_dims():
    model = ds_block()
    x = torch.randn(2, 3, 8, 8)
    report = needed_inputs(model, x)
    consumer = model[6]
    channels = sorted(set(consumer.split_dims.reshape(-1).tolist()))  # 1x1: column = channel
    assert report["layers"]["6"]["channels"] == channels
    assert report["producers"]["0"]["needed"] == channels  # through BN, ReLU, depthwise, BN, ReLU
    assert report["producers"]["6"]["needed"] is None  # read by a dense linear: every channel
    taps = report["layers"]["0"]["taps"]
    cols = read_columns(model[0])
    assert [c * 9 + ky * 3 + kx for c, ky, kx in taps] == cols.tolist()


def test_prune_producer_exact_and_reloads(tmp_path):
    model = ds_block()
    x = torch.randn(4, 3, 8, 8)
    ref = outputs(model, x)
    needed = needed_inputs(model, x)["producers"]["0"]["needed"]
    prune_unread(model, x)
    assert model[0].out_channels == len(needed) < 16
    assert model[1].num_features == model[3].groups == model[6].in_channels == len(needed)
    assert torch.equal(outputs(model, x), ref)
    report = conversion_plan(model)["passes"][-1]["report"]
    assert report["pruned"]["0"] == [len(needed), 16]
    save_converted(model, tmp_path / "pruned.pt")
    fresh = ds_block()
    fresh[0], fresh[6] = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 1)  # dense skeleton
    load_converted(fresh, tmp_path / "pruned.pt")
    assert torch.equal(outputs(fresh, x), ref)


def test_prune_int8_column_luts_exact():
    model = ds_block(lut_bits=8, granularity="column")
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():  # a trained float LUT lies off the integer grid
        model[0].lut.add_(0.3 * torch.randn_like(model[0].lut))
    trained = model[0].lut.detach().clone()
    needed = needed_inputs(model, x)["producers"]["0"]["needed"]
    ref = outputs(model, x)
    prune_unread(model, x)
    assert model[0].out_channels < 16
    assert torch.equal(outputs(model, x), ref)
    assert torch.equal(model[0].lut.detach(), trained[:, :, needed])  # per-column grids: sliced as is


def test_prune_int8_codebook_luts_keep_their_integer_values(tmp_path):
    """A codebook-granular 8-bit LUT (one offset per codebook, one scale for all columns)
    keeps the values it computed with: the outputs stay those of the unpruned model to
    float32 rounding (re-quantising the trained float LUT would move them by up to half a
    LUT step per codebook), also after saving and loading."""
    model = ds_block(lut_bits=8, granularity="codebook")
    x = torch.randn(4, 3, 8, 8)
    needed = needed_inputs(model, x)["producers"]["0"]["needed"]
    unread = sorted(set(range(16)) - set(needed))
    with torch.no_grad():
        lut = model[0].lut
        lut.add_(0.3 * torch.randn_like(lut))  # a trained float LUT lies off the integer grid
        lut[:, :, unread[0]] = lut.amin() - 4.0  # the unread column sets the offsets and the scale
    ref = outputs(model, x)
    before = model[0].quantized_lut()
    prune_unread(model, x)
    assert model[0].out_channels == len(needed) < 16
    torch.testing.assert_close(outputs(model, x), ref, rtol=1e-6, atol=1e-6)
    after = model[0].quantized_lut()
    represented = lambda q: q.values.float() / q.scale + q.offsets[:, None, :]  # noqa: E731
    torch.testing.assert_close(represented(after), represented(before)[:, :, needed], rtol=0, atol=1e-6)
    save_converted(model, tmp_path / "pruned.pt")
    fresh = ds_block(lut_bits=8, granularity="codebook")
    fresh[0], fresh[6] = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 1)  # dense skeleton
    load_converted(fresh, tmp_path / "pruned.pt")
    torch.testing.assert_close(outputs(fresh, x), ref, rtol=1e-6, atol=1e-6)


def test_dense_linear_producer_with_few_codebooks():
    torch.manual_seed(2)
    consumer = randomised(MaddLinear(32, 3, 1))  # reads <= 4 of 32
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.1), consumer).eval()
    x = torch.randn(16, 6)
    ref = outputs(model, x)
    prune_unread(model, x)
    assert model[0].out_features == len(set(consumer.split_dims.reshape(-1).tolist())) <= 4
    assert torch.equal(outputs(model, x), ref)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(4, 8, 1), madd_conv(8, 8, 1)

    def forward(self, x):
        h = self.conv1(x)
        return h + self.conv2(h)


def test_residual_reader_leaves_producer_alone():
    model = Residual().eval()
    x = torch.randn(2, 4, 5, 5)
    ref = outputs(model, x)
    prune_unread(model, x)
    assert model.conv1.out_channels == 8
    report = conversion_plan(model)["passes"][-1]["report"]
    assert report["pruned"] == {} and torch.equal(outputs(model, x), ref)
    assert needed_inputs(model, x)["producers"]["conv1"]["needed"] is None


def test_consumer_with_too_many_codebooks_is_left_alone():
    torch.manual_seed(3)
    consumer = randomised(MaddLinear(8, 3, 8))  # C = D = 8
    with torch.no_grad():
        consumer.encoder.split_dims.zero_()  # every tree reads feature 0 only
    model = nn.Sequential(nn.Linear(5, 8), consumer).eval()
    prune_unread(model, torch.randn(4, 5))
    assert model[0].out_features == 8
    assert "codebooks" in conversion_plan(model)["passes"][-1]["report"]["left_alone"]["0"]


def test_retrain_flags_reach_config(tmp_path):
    import json

    from maddnet.cli import build_parser
    from maddnet.retrain.cli import config_from_args
    from maddnet.retrain.config import RetrainConfig

    base = ["retrain", "--model", "resnet9", "--data", "digits", "--baseline-steps", "1"]
    args = build_parser().parse_args([*base, "--fuse", "--prune-unread"])
    config = config_from_args(args)
    assert config.fuse and config.prune_unread
    assert not config_from_args(build_parser().parse_args(base)).fuse  # default off
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps({"model": "resnet9", "dataset": "digits", "baseline_steps": 1, "prune_unread": True})
    )
    from_file = config_from_args(
        build_parser().parse_args(["retrain", "--config", str(path), "--no-prune-unread"])
    )
    assert not from_file.prune_unread and RetrainConfig.from_dict(config.to_dict()).fuse


def test_levels_with_only_constant_nodes_read_nothing():
    layer = randomised(MaddLinear(16, 2, 2))
    with torch.no_grad():
        layer.encoder.split_dims.copy_(torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]]))
        layer.thresholds[:, 7:15] = float("inf")  # the last level of both trees is constant
        layer.thresholds[1, 3] = float("inf")  # one node of level 2 only: the level still reads
    assert read_columns(layer).tolist() == [0, 1, 2, 4, 5, 6]


def test_passes_refuse_inference_only_layers():
    from maddnet.nn import fuse

    model = ds_block(lut_bits=8, granularity="column")
    x = torch.randn(2, 3, 8, 8)
    model[0].drop_float_lut()
    for run, name in ((lambda: prune_unread(model, x), "prune_unread"), (lambda: fuse(model, x), "fuse")):
        with pytest.raises(ValueError, match=rf"{name}: layer\(s\) 0 are inference-only .*restore_float_lut"):
            run()
    model[0].restore_float_lut()
    prune_unread(model, x)  # works again
    assert model[0].out_channels < 16


def test_passes_refuse_train_mode_and_unconverted_models():
    from maddnet.nn import fuse

    x = torch.randn(2, 3, 8, 8)
    for run, name in ((prune_unread, "prune_unread"), (fuse, "fuse")):
        with pytest.raises(ValueError, match=rf"{name}: the model is in train mode; call model.eval"):
            run(ds_block().train(), x)
        with pytest.raises(ValueError, match=rf"{name}: the model has no MADD layer; convert it first"):
            run(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval(), x)
