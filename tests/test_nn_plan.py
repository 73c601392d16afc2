"""Conversion plans (format 2: passes + layers), old checkpoints, the dense->MADD mapping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from maddnet.nn import (
    LayerSpec,
    MaddConfig,
    MaddConv2d,
    MaddLinear,
    conversion_plan,
    convert,
    kept_dense,
    load_converted,
    madd_type_for,
    prepare,
    rebuild,
    record_pass,
    register_pass,
    save_converted,
    summary,
    unsupported_reason,
)
from maddnet.nn.plan import PLAN_FORMAT, set_submodule

DATA = Path(__file__).parent / "data"


def fixture_model() -> nn.Module:
    """The model tests/data/converted_v0.pt was saved from (before the encoder submodule)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


def test_checkpoint_of_format_1_loads_with_identical_outputs():
    # saved by maddnet before the Encoder seam: flat layer configs, tree tensors on the layer
    saved = torch.load(DATA / "converted_v0.pt", weights_only=True)
    assert "format" not in saved["plan"] and "0.thresholds" in saved["state_dict"]
    model = load_converted(fixture_model(), DATA / "converted_v0.pt").eval()
    io = torch.load(DATA / "converted_v0_io.pt", weights_only=True)
    with torch.no_grad():
        assert torch.equal(model(io["inputs"]), io["outputs"])
    maddness = LayerSpec(hash_objective="input", refine_sweeps=0)  # what a plan of then meant
    assert model[0].spec == maddness and model[6].spec == maddness
    assert conversion_plan(model)["format"] == PLAN_FORMAT


def _drop_relu(model: nn.Module, record: dict) -> None:
    set_submodule(model, record["name"], nn.Identity())


register_pass("test_drop_relu", _drop_relu)


def test_rebuild_replays_recorded_passes(tmp_path):
    torch.manual_seed(0)
    model = fixture_model()
    convert(
        model, [(torch.randn(8, 3, 6, 6), None) for _ in range(4)], MaddConfig(layers=["0", "2"], min_rows=32)
    )
    _drop_relu(model, {"name": "1"})
    record_pass(model, "test_drop_relu", {"name": "1"})
    plan = conversion_plan(model)
    assert plan["passes"] == [{"pass": "test_drop_relu", "name": "1"}]
    assert set(plan["layers"]) == {"0", "2"}
    save_converted(model, tmp_path / "m.pt")
    fresh = load_converted(fixture_model(), tmp_path / "m.pt").eval()
    assert isinstance(fresh[1], nn.Identity) and isinstance(fresh[2], MaddConv2d)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(fresh(x), model.eval()(x))
    assert conversion_plan(fresh)["passes"] == plan["passes"]  # a rebuilt model plans the same
    with pytest.raises(ValueError, match="does not know"):
        rebuild(fixture_model(), {"format": 2, "passes": [{"pass": "nope"}], "layers": {}})
    with pytest.raises(ValueError, match="not registered"):
        record_pass(model, "nope", {})
    with pytest.raises(ValueError, match="newer"):
        rebuild(fixture_model(), {"format": PLAN_FORMAT + 1, "passes": [], "layers": {}})


def test_the_mapping_says_what_converts_and_why_not():
    assert madd_type_for(nn.Linear(4, 2)) is MaddLinear and madd_type_for(nn.Conv2d(2, 2, 3)) is MaddConv2d
    assert madd_type_for(nn.BatchNorm2d(3)) is None
    # MultiheadAttention's out_proj is a Linear subclass its owner reads through .weight
    assert "NonDynamicallyQuantizableLinear" in unsupported_reason(nn.MultiheadAttention(8, 2).out_proj)
    assert "groups=1 only" in unsupported_reason(nn.Conv2d(4, 4, 3, groups=4))
    assert "padding_mode='zeros' only" in unsupported_reason(
        nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")
    )
    assert unsupported_reason(nn.Conv2d(2, 2, 3)) is None


def test_default_selection_skips_unconvertible_layers_and_names_them():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(4, 4, 3, groups=4),
        nn.Flatten(),
        nn.Linear(64, 2),
    )
    config = MaddConfig()
    assert set(config.skipped(model)) == {"1", "2"} and "reflect" in config.skipped(model)["1"]
    prepare(model, config)
    assert set(model._maddnet_prepared.recorders) == {"0", "4"}
    # an explicit selection of an unconvertible layer fails before any hook is attached
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="'1' cannot be converted.*reflect"):
        prepare(plain, MaddConfig(layers=["0", "1"]))
    assert not plain[0]._forward_pre_hooks and getattr(plain, "_maddnet_prepared", None) is None


def test_failed_convert_leaves_the_model_unchanged_and_prepared():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    prepare(model, MaddConfig(min_rows=16, spec=LayerSpec(lut_bits=None)))
    with torch.no_grad():
        model(torch.randn(64, 8))
    model._maddnet_prepared.recorders["2"]._rows[3, 0] = float("inf")  # rows of the 2nd layer overflowed
    with pytest.raises(ValueError, match="layer '2'.*NaN/inf"):
        convert(model)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    model._maddnet_prepared.recorders["2"]._rows[3, 0] = 0.0  # fixed: the retry converts both
    convert(model)
    assert isinstance(model[0], MaddLinear) and isinstance(model[2], MaddLinear)


def test_summary_lists_what_stays_dense_with_the_reason():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
        nn.Flatten(),
        nn.Linear(8 * 36, 4),
    )
    convert(model, [torch.randn(32, 3, 6, 6)], MaddConfig(min_rows=16))
    text = summary(model, print_fn=None)
    assert "kept dense (2 modules" in text
    assert "1 (Conv2d, 80 weights): grouped/depthwise conv (groups=8)" in text
    assert "2 (Conv2d, 584 weights): MaddConv2d supports padding_mode='zeros' only" in text
    # attention projections are weights nn.MultiheadAttention uses directly: listed, not hidden
    block = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1)
    convert(block, [torch.randn(32, 8, 16)], MaddConfig(min_rows=16))
    rows = kept_dense(block)
    assert [r["name"] for r in rows] == ["layers.0.self_attn"] and "in_proj_weight" in rows[0]["reason"]
    assert "layers.0.self_attn (MultiheadAttention, 1088 weights)" in summary(block, print_fn=None)


def test_skipped_and_summary_give_the_same_reason_for_attention_projections():
    block = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1)
    skipped = MaddConfig().skipped(block)
    assert skipped == {
        "layers.0.self_attn.out_proj": "part of nn.MultiheadAttention 'layers.0.self_attn', "
        "which uses its weights directly"
    }


def test_errors_name_the_layer_in_its_model(tmp_path):
    """Layers placed by conversion or by loading a plan know their name; errors give it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    convert(model, [torch.randn(64, 16)], MaddConfig(min_rows=16))
    x = torch.randn(2, 16)
    x[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"MaddLinear '0'\(D=16, M=8, C=2\): input row 1"):
        model(x)
    save_converted(model, tmp_path / "m.pt")
    fresh = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    load_converted(fresh, tmp_path / "m.pt")
    assert fresh[0].placed_as == "0" and fresh[2].placed_as == "2"
