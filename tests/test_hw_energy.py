"""The energy model (maddnet.hw, `maddnet energy`): counts checked by hand, energy = counts x
constants, technology scaling, run folders and registry models through the CLI, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import maddnet.models  # noqa: F401  (registry imports, timm included, outside the timed tests)
from maddnet.cli import main
from maddnet.hw import CostModel, estimate, load_cost_model, load_network, record_shapes
from maddnet.hw.costs import KIB, MIB, EnergyConstants
from maddnet.hw.counts import LayerShape, MaddParams, dense_counts, madd_counts
from maddnet.hw.energy import dense_layer_energy, headline, madd_layer_energy
from maddnet.hw.network import Network, madd_params_by_rule, parse_input_size
from maddnet.models import create_model
from maddnet.nn import MaddConfig, MaddConv2d, MaddLinear, conversion_plan, rebuild


class Tiny(nn.Module):
    """conv 2->4 3x3 (pad 1) on 2x5x5, then a linear 100 -> 3."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(100, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def tiny_network() -> Network:
    model = Tiny()
    shapes, other = record_shapes(model, (2, 5, 5))
    params = madd_params_by_rule(model, MaddConfig())
    layers = [s.with_madd(params.get(s.name)) for s in shapes]
    return Network("tiny", (2, 5, 5), 3, layers, other, "test")


# ---------------------------------------------------------------------------- counts
def test_shapes_of_one_forward_pass():
    net = tiny_network()
    conv, fc = net.layers
    assert (conv.name, conv.kind, conv.rows, conv.in_dim, conv.out_dim) == ("conv", "conv2d", 25, 18, 4)
    assert (fc.name, fc.kind, fc.rows, fc.in_dim, fc.out_dim) == ("fc", "linear", 1, 100, 3)
    assert (conv.input_values, conv.output_values, fc.input_values, fc.output_values) == (50, 100, 100, 3)
    assert net.other_macs == 0
    # the rule: a 3x3 conv gets C = Cin, a linear layer D // 8
    assert (conv.madd.ncodebooks, fc.madd.ncodebooks) == (2, 12)
    assert conv.madd.compares == conv.madd.reads == 4 * 2  # tree, K = 16: 4 C per row
    assert conv.madd.encoder_values == 2 * 15 + 2 * 4  # thresholds C (K - 1) + split indices C log2 K


def test_madd_counts_by_hand():
    conv = tiny_network().layers[0]  # N = 25, D = 18, M = 4, C = 2, K = 16, 8-bit LUT
    counts = madd_counts(conv, CostModel().accelerator)  # 32 decoder units: one pass
    assert counts == {
        "macs": 25 * 18 * 4,
        "compares": 4 * 2 * 25,  # 4 C per row
        "encoder_adds": 0,
        "encoder_multiplies": 0,
        "input_reads": 4 * 2 * 25,  # only the split columns
        "threshold_reads": 4 * 2 * 25,
        "code_writes": 25 * 2,
        "code_reads": 25 * 2,
        "lut_reads": 25 * 2 * 4,  # C per row per output
        "lut_adds": 25 * 2 * 4,
        "dequant_multiplies": 25 * 4,
        "partial_sums": 0,
        "output_writes": 25 * 4,
        "lut_bytes": 2 * 16 * 4,  # C K M bytes
        "encoder_bytes": (2 * 15 + 2 * 4) * 2,  # FP16 thresholds, 16-bit indices
        "constant_bytes": 4 * (4 + 2),  # accumulator init + scale per output
        "lut_chunks": 1,
    }
    # 3 decoder units: ceil(4 / 3) = 2 passes re-read the codes; a 16-byte bank splits a
    # 32-byte LUT column in 2 chunks (one round of partial sums)
    small = CostModel().replace(decoder_units=3, lut_memory_bytes=48)
    counts = madd_counts(conv, small.accelerator)
    assert counts["code_reads"] == 25 * 2 * 2
    assert (counts["lut_chunks"], counts["partial_sums"]) == (2, 2 * 25 * 4)


def test_dense_counts_and_conv_macs_against_the_formula():
    conv = tiny_network().layers[0]
    acc = CostModel().replace(dense_array_rows=8, dense_array_cols=3).accelerator
    counts = dense_counts(conv, acc)
    assert counts["macs"] == 25 * 18 * 4
    assert counts["input_reads"] == 25 * 18 * math.ceil(4 / 3)  # once per group of 3 outputs
    assert counts["weight_reads"] == 18 * 4 * math.ceil(25 / 8)  # once per group of 8 rows
    assert counts["output_writes"] == 25 * 4
    assert (counts["weight_bytes"], counts["constant_bytes"]) == (18 * 4 * 2, 4 * 4)
    # MACs = Hout Wout Cout Cin/groups kh kw, for strides, dilation and groups
    for conv, size in [
        (nn.Conv2d(3, 8, 3, stride=2, padding=1), 9),
        (nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4), 7),
        (nn.Conv2d(6, 10, (5, 3), stride=(1, 2), groups=2), 11),
    ]:
        shape = record_shapes(nn.Sequential(conv), (conv.in_channels, size, size))[0][0]
        out = conv(torch.zeros(1, conv.in_channels, size, size))
        kh, kw = conv.kernel_size
        expected = (
            out.shape[2] * out.shape[3] * conv.out_channels * (conv.in_channels // conv.groups) * kh * kw
        )
        assert shape.macs == expected
        assert shape.groups == conv.groups


def test_other_matrix_products_are_counted():
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            return (q @ k.transpose(1, 2)).softmax(-1) @ v  # 2 x (tokens x tokens x 8) MACs

    shapes, other = record_shapes(Attention(), (6, 8))
    assert shapes[0].rows == 6 and shapes[0].macs == 6 * 8 * 24
    assert other == 2 * 6 * 6 * 8


# ---------------------------------------------------------------------------- energy = counts x constants
FLAT = {"sram_8kib_pj": 8.0, "sram_32kib_pj": 8.0, "sram_1mib_pj": 8.0, "sram_small_exponent": 0.0}


def test_madd_energy_is_counts_times_constants():
    conv = tiny_network().layers[0]
    model = CostModel().replace(**FLAT)  # every SRAM / bank: 1 pJ per byte; 45 nm: scale 1
    c = model.constants
    counts = madd_counts(conv, model.accelerator)
    layer = madd_layer_energy(conv, model, parameter_pj_per_byte=3.0)
    accumulator = c.int16_add_pj  # 8-bit entries + ceil(log2 2) = 9 bits -> 16-bit adder
    expected = {
        "compares": counts["compares"] * c.fp16_compare_pj,
        "encoder_arith": 0.0,
        "threshold_reads": counts["threshold_reads"] * 2 * 1.0,
        "lut_reads": counts["lut_reads"] * 1 * 1.0,
        "accumulate": counts["lut_adds"] * accumulator,
        "dequantize": counts["dequant_multiplies"] * c.fp16_mult_pj,
        "input_reads": counts["input_reads"] * 2 * 1.0,
        "output_writes": counts["output_writes"] * 2 * 1.0,
        "codes": (counts["code_writes"] + counts["code_reads"]) * 0.5 * 1.0,
        "partial_sums": 0.0,
        "dram_activations": 0.0,
        "parameter_load": (counts["lut_bytes"] + counts["encoder_bytes"] + counts["constant_bytes"])
        * (3.0 + 1.0),
        "static": 0.0,
    }
    assert layer.energy_pj == pytest.approx(expected)
    assert layer.total_pj == pytest.approx(sum(expected.values()))


def test_dense_energy_is_counts_times_constants_and_int8_changes_bytes_and_macs():
    conv = tiny_network().layers[0]
    for precision, mac, value_bytes in (("fp16", 1.5, 2), ("int8", 0.3, 1)):
        model = CostModel().replace(**FLAT, dense_precision=precision)
        counts = dense_counts(conv, model.accelerator)
        layer = dense_layer_energy(conv, model, parameter_pj_per_byte=3.0)
        expected = (
            counts["macs"] * mac
            + (counts["weight_reads"] + counts["input_reads"] + counts["output_writes"]) * value_bytes
            + (counts["weight_bytes"] + counts["constant_bytes"]) * 4.0
        )
        assert counts["weight_bytes"] == 18 * 4 * value_bytes
        assert layer.total_pj == pytest.approx(expected)


def test_network_totals_are_sums_of_layers_and_dram_is_used_when_parameters_do_not_fit():
    net = tiny_network()
    model = CostModel()
    result = estimate(net, model)
    assert result.madd.energy_pj == pytest.approx(sum(layer.total_pj for layer in result.madd.layers))
    assert result.madd.macs == result.dense.macs == sum(s.macs for s in net.layers)
    summary = result.madd.summary(batch=1)
    assert summary["tmacs_per_w"] == pytest.approx(result.madd.macs / result.madd.energy_pj)
    assert summary["parameters_on_chip"]
    tight = estimate(net, model.replace(parameter_memory_bytes=100))
    assert not tight.madd.parameters_on_chip
    dram = model.constants.dram_pj_per_byte()
    extra = (dram - model.constants.sram_pj_per_byte(model.accelerator.parameter_memory_bytes)) * (
        result.madd.parameter_bytes
    )
    assert tight.madd.energy_pj - result.madd.energy_pj == pytest.approx(extra)
    resident = estimate(net, model.replace(resident_parameters=True))
    assert sum(layer.energy_pj["parameter_load"] for layer in resident.madd.layers) == 0


def test_technology_scaling_rule():
    c45 = EnergyConstants()
    c22 = EnergyConstants(technology_nm=22)
    assert c22.scale() == pytest.approx(22 / 45)
    assert c22.op_pj("fp16_mac") == pytest.approx(1.5 * 22 / 45)
    assert c22.sram_pj_per_byte(4096) == pytest.approx(c45.sram_pj_per_byte(4096) * 22 / 45)
    assert c22.dram_pj_per_byte() == c45.dram_pj_per_byte() == 1950 / 8  # not scaled
    assert EnergyConstants(technology_nm=22, scaling_exponent=2, voltage_scale=0.5).scale() == pytest.approx(
        (22 / 45) ** 2 * 0.25
    )
    # Horowitz's cache points per byte, sqrt below 8 KiB, monotone
    assert [c45.sram_pj_per_byte(s) for s in (8 * KIB, 32 * KIB, MIB)] == pytest.approx([1.25, 2.5, 12.5])
    assert c45.sram_pj_per_byte(2 * KIB) == pytest.approx(1.25 / 2)
    sizes = [64, 512, 8 * KIB, 20 * KIB, 32 * KIB, 300 * KIB, MIB, 8 * MIB]
    energies = [c45.sram_pj_per_byte(s) for s in sizes]
    assert energies == sorted(energies)


def test_headline_basis_and_figures():
    data = headline()
    assert data["technology_nm"] == 22
    by_ratio = {row["D_per_C"]: row for row in data["madd"]}
    # the authors' GF22 figure: 32 decoders x 32 MAC-equivalents per cycle at 1/1.842 ns, 17 mW
    assert by_ratio[32]["authors_gf22_32_decoders"] == pytest.approx(32 * 32 / 1.842e-9 / 0.017 / 1e12)
    assert 30 < by_ratio[32]["authors_gf22_32_decoders"] < 34
    for row in data["madd"]:  # one LUT read-and-add counts D/C MACs: efficiency ~ D/C
        assert row["datapath_tmacs_per_w"] == pytest.approx(row["D_per_C"] / row["datapath_pj_per_lut_op"])
        assert row["datapath_tmacs_per_w"] > row["all_counted_tmacs_per_w"] > row["dense_fp16_tmacs_per_w"]
    a100 = {a["board"]: a for a in data["a100"]}["SXM4 (40/80 GB)"]
    assert a100["dense_fp16_tmacs_per_w"] == pytest.approx(0.39)  # 312 TFLOPS = 156 T MAC/s at 400 W
    assert a100["flop_as_mac_tmacs_per_w"] == pytest.approx(0.78)


# ---------------------------------------------------------------------------- cost-model files
def test_cost_model_from_a_file_and_overrides(tmp_path):
    path = tmp_path / "costs.json"
    path.write_text(json.dumps({"constants": {"technology_nm": 22}, "decoder_units": 64}))
    model = load_cost_model(path, {"dense_precision": "int8"})
    assert model.constants.technology_nm == 22
    assert (model.accelerator.decoder_units, model.accelerator.dense_precision) == (64, "int8")
    assert load_cost_model(None, model.to_dict()) == model
    with pytest.raises(ValueError, match="unknown cost-model keys \\['decoders'\\]"):
        load_cost_model(None, {"decoders": 3})
    with pytest.raises(ValueError, match="decoder_units must be a positive int"):
        load_cost_model(None, {"decoder_units": 0})
    with pytest.raises(ValueError, match="dense_precision must be one of"):
        load_cost_model(None, {"dense_precision": "fp8"})
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_cost_model(path)


def test_input_size_parsing():
    assert parse_input_size("224") == (224, 224)
    assert parse_input_size("49x10") == parse_input_size("49,10") == (49, 10)
    for bad in ("0", "a", "1x2x3"):
        with pytest.raises(ValueError, match="--input-size takes"):
            parse_input_size(bad)


# ---------------------------------------------------------------------------- networks and the CLI
def test_registry_model_through_the_cli(tmp_path, capsys):
    out = tmp_path / "ds"
    argv = ["energy", "ds_cnn_s", "--technology-nm", "22", "--set", "decoder_units=16", "--out", str(out)]
    assert main(argv) == 0
    assert "6 of 10 conv/linear layers on MADDness, 22 nm" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= {"energy.json", "energy.csv", "energy.md"}
    data = json.loads((out / "energy.json").read_text())
    assert data["input_shape"] == [1, 49, 10] and data["num_classes"] == 12
    assert data["cost_model"]["decoder_units"] == 16 and data["cost_model"]["technology_nm"] == 22
    layers = {row["layer"]: row for row in data["layers"]}
    assert layers["blocks.0.depthwise"]["engine"] == "dense"  # groups > 1 stay dense
    stem = layers["stem.0"]  # 10x4 kernel on one channel: C = ceil(40 / 9) = 5; 24 x 5 positions
    assert (stem["C"], stem["rows"], stem["compares"]) == (5, 24 * 5, 4 * 5 * 24 * 5)
    assert (
        data["summary"]["madd"]["energy_uj_per_inference"]
        < data["summary"]["dense"]["energy_uj_per_inference"]
    )


def _run_folder(tmp_path, plan_layers=None):
    """A retraining run folder of resnet9 (width 4) on digits, its checkpoint holding a plan."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {"model": "resnet9", "model_kwargs": {"width": 4}, "dataset": "digits", "steps_per_layer": 1}
        )
    )
    model = create_model("resnet9", num_classes=10, in_chans=1, width=4)
    config = MaddConfig(ncodebooks={"layer1.0.0": 2}, layers=plan_layers)
    selected = config.select(model)
    skeletons = {}
    for name, module in selected.items():
        c = config.codebooks_for(name, module)
        if isinstance(module, nn.Linear):
            skeletons[name] = MaddLinear(module.in_features, module.out_features, c)
        else:
            skeletons[name] = MaddConv2d(module.in_channels, module.out_channels, module.kernel_size, c,
                                         module.stride, module.padding)  # fmt: skip
    plan = {
        "format": 2,
        "passes": [],
        "layers": {n: {"kind": s.kind, "config": s.get_config()} for n, s in skeletons.items()},
    }
    rebuild(model, plan)
    torch.save(
        {"plan": conversion_plan(model), "state_dict": model.state_dict(), "next_step": 2},
        folder / "checkpoint.pt",
    )
    return folder


def test_run_folder_through_the_cli(tmp_path, capsys):
    folder = _run_folder(tmp_path, plan_layers=["layer1.0.0", "layer1.1.res1.0", "layer1.1.res2.0", "fc"])
    out = tmp_path / "out"
    assert main(["energy", str(folder), "--out", str(out)]) == 0
    data = json.loads((out / "energy.json").read_text())
    assert data["input_shape"] == [1, 8, 8] and data["num_classes"] == 10  # digits, without loading it
    assert "conversion plan of checkpoint.pt" in data["source"]
    engines = {row["layer"]: (row["engine"], row["C"]) for row in data["layers"]}
    assert engines["prep.0"] == ("dense", None)  # not in the plan
    assert engines["layer1.0.0"] == ("madd", 2)  # the plan's C, not the rule's
    assert engines["fc"][0] == "madd"
    assert data["madd_layers"] == 4


def test_a_checkpoint_that_does_not_fit_its_config_is_reported(tmp_path, capsys):
    folder = _run_folder(tmp_path)
    assert main(["energy", str(folder), "--num-classes", "7", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("maddnet energy: error: ") and "does not fit the model built from" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["energy", "no_such_model"], "'no_such_model' is neither a run folder nor a registered model"),
        (["energy", "runs/does/not/exist"], "run folder 'runs/does/not/exist' does not exist"),
        (["energy", "resnet9", "--set", "decoders=3"], "unknown cost-model keys ['decoders']"),
        (["energy", "resnet9", "--set", "clock_hz=0"], "clock_hz must be a number > 0"),
        (["energy", "resnet9", "--input-size", "0x3"], "--input-size takes SIZE or HxW"),
        (
            ["energy", "resnet9", "--config", "missing.json"],
            "cost-model config 'missing.json' does not exist",
        ),
        (["energy"], "give MODEL_OR_RUN"),
        (["energy", "resnet9", "--ncodebooks", "fc"], "--ncodebooks takes LAYER=C pairs"),
    ],
)
def test_bad_input_ends_in_one_error_line(argv, message, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("maddnet energy: error: ") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "flag, value", [("--technology-nm", "-5"), ("--batch-size", "0"), ("--nprototypes/-K", "5")]
)
def test_bad_numbers_are_rejected_by_argparse(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["energy", "resnet9", flag.split("/")[-1], value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"maddnet energy: error: argument {flag}" in err and "Traceback" not in err


def test_every_energy_option_has_help():
    from maddnet.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if hasattr(a, "choices") and a.choices and "energy" in a.choices)
    energy = sub.choices["energy"]
    missing = [a.dest for a in energy._actions if not (a.help and a.help.strip())]
    assert not missing
    energy.format_help()


def test_headline_combine_and_constants_commands(tmp_path, capsys):
    assert main(["energy", "--headline", "--out", str(tmp_path / "h")]) == 0
    text = capsys.readouterr().out
    assert "Headline reproduction (22 nm" in text and "SXM4 (40/80 GB)" in text
    assert json.loads((tmp_path / "h" / "headline.json").read_text())["technology_nm"] == 22
    assert main(["energy", "--list-constants"]) == 0
    table = capsys.readouterr().out
    assert "| int8_add_pj | 0.03 | pJ |" in table and "Horowitz" in table and "assumption" in table
    for name in ("a", "b"):
        assert main(["energy", "ds_cnn_s", "--out", str(tmp_path / name)]) == 0
    assert (
        main(["energy", "--combine", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c")])
        == 0
    )
    rows = json.loads((tmp_path / "c" / "energy_networks.json").read_text())
    assert [r["network"] for r in rows] == ["ds_cnn_s [rule]", "ds_cnn_s [rule]"]
    capsys.readouterr()
    assert main(["energy", "--combine", str(tmp_path / "h"), "--out", str(tmp_path / "c")]) == 2
    assert "has no energy.json" in capsys.readouterr().err


def test_registry_resnet50_shape_counts_without_weights():
    net = load_network("resnet50")  # 3x224x224, ImageNet: ~4.1 G MACs
    assert net.input_shape == (3, 224, 224) and net.num_classes == 1000
    total = sum(s.macs for s in net.layers)
    assert 4.0e9 < total < 4.2e9
    assert net.madd_count == len(net.layers) == 54
    stem = net.layers[0]  # 7x7 on 3 channels: C = max(3, ceil(147 / 9)) = 17
    assert (stem.name, stem.madd.ncodebooks, stem.rows) == ("conv1", 17, 112 * 112)


def test_madd_params_of_a_layer_with_float_luts():
    layer = MaddLinear(64, 10, 8, lut_bits=None)
    p = MaddParams.of(layer)
    assert (p.entry_bits, p.accumulator_bits, p.lut_bits) == (16, 32, None)
    shape = LayerShape("l", "linear", 5, 64, 10, madd=p)
    counts = madd_counts(shape, CostModel().accelerator)
    assert counts["dequant_multiplies"] == 0 and counts["lut_bytes"] == 8 * 16 * 10 * 2


def test_demo_prints_the_energy_summary_of_its_network(tmp_path, capsys):
    from maddnet.retrain.cli import print_energy_summary

    folder = _run_folder(tmp_path)
    print_energy_summary(str(folder))
    text = capsys.readouterr().out
    assert "energy per inference" in text
    madd = next(line for line in text.splitlines() if line.startswith("| MADD"))
    dense = next(line for line in text.splitlines() if line.startswith("| dense"))
    assert float(madd.split("|")[2].replace(",", "")) > 0 and float(dense.split("|")[2].replace(",", "")) > 0


def test_the_encoder_flag_prices_the_encoder_of_every_layer(tmp_path):
    base = ["energy", "resnet9", "--model-kw", "width=4", "--in-chans", "1", "--input-size", "8"]
    base += ["--num-classes", "10"]
    data = {}
    for encoder in ("tree", "pq-l1", "pq"):
        assert main([*base, "--encoder", encoder, "--out", str(tmp_path / encoder)]) == 0
        data[encoder] = json.loads((tmp_path / encoder / "energy.json").read_text())
    rows = {e: {r["layer"]: r for r in d["layers"]} for e, d in data.items()}
    fc = rows["pq-l1"]["fc"]  # D = 32 (width 4 x 8), C = 4, K = 16, w = 8; one row
    assert (fc["encoder"], fc["rows"], fc["D"], fc["C"]) == ("pq-l1", 1, 32, 4)
    # C (K - 1) compares, C K (2 w - 1) adds (docs/encoders.md's table)
    assert (fc["compares"], fc["encoder_adds"], fc["encoder_multiplies"]) == (4 * 15, 4 * 16 * 15, 0)
    assert rows["pq"]["fc"]["encoder_multiplies"] == 4 * 16 * 8
    tree = rows["tree"]["fc"]
    assert (tree["encoder"], tree["compares"], tree["encoder_adds"]) == ("tree", 4 * 4, 0)
    energy = {e: d["summary"]["madd"]["energy_uj_per_inference"] for e, d in data.items()}
    assert energy["tree"] < energy["pq-l1"] < energy["pq"]
    assert "| pq-l1 |" in (tmp_path / "pq-l1" / "energy.md").read_text()
