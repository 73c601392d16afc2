"""Per-layer C under a network budget (maddnet.nn.budget)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from maddnet.cli import build_parser, main
from maddnet.hw.costs import CostModel
from maddnet.hw.counts import LayerShape
from maddnet.nn import LayerSpec, MaddConfig
from maddnet.nn.budget import (
    CodebookBudget,
    allocate_codebooks,
    allocate_for_model,
    candidate_codebooks,
    interpolate_log,
    layer_costs,
    parse_budget,
    read_sensitivity,
    write_allocation,
)
from maddnet.retrain.cli import config_from_args
from maddnet.retrain.config import RetrainConfig

RESNET9_REPORT = (
    Path(__file__).resolve().parents[1] / "results/resnet9_fashion_mnist/single_layer" / "single_layer.json"
)
ENERGY = "energy resnet9 --model-kw width=16 --in-chans 1 --input-size 28".split()


def brute_force(costs, sens, budget):
    names = list(costs)
    best = None
    for picks in itertools.product(*(sorted(costs[n]) for n in names)):
        cost = sum(costs[n][c] for n, c in zip(names, picks, strict=True))
        value = sum(sens[n][c] for n, c in zip(names, picks, strict=True))
        if cost <= budget and (best is None or value < best[0] - 1e-12):
            best = (value, cost)
    return best


def random_case(rng, nlayers=4, nchoices=4):
    costs, sens = {}, {}
    for i in range(nlayers):
        cs = sorted(rng.choice(np.arange(1, 65), size=nchoices, replace=False).tolist())
        costs[f"l{i}"] = {c: int(c * rng.integers(1, 20)) for c in cs}
        sens[f"l{i}"] = {c: float(rng.random()) for c in cs}
    return costs, sens


def totals(costs, sens, chosen):
    return sum(costs[n][c] for n, c in chosen.items()), sum(sens[n][c] for n, c in chosen.items())


# ---------------------------------------------------------------------------- allocation
@pytest.mark.parametrize("seed", range(30))
def test_exact_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    costs, sens = random_case(rng)
    minimum = sum(min(t.values()) for t in costs.values())
    maximum = sum(max(t.values()) for t in costs.values())
    budget = float(rng.uniform(minimum, maximum))
    chosen = allocate_codebooks(costs, sens, budget)
    cost, value = totals(costs, sens, chosen)
    best_value, _ = brute_force(costs, sens, budget)
    assert cost <= budget
    assert value == pytest.approx(best_value, abs=1e-12)


@pytest.mark.parametrize("seed", range(10))
def test_greedy_feasible_and_optimal_on_convex_curves(seed):
    rng = np.random.default_rng(seed)
    # convex decreasing sensitivity in cost: greedy marginal gain is optimal at the hull's
    # breakpoints, and always within the budget
    costs, sens = {}, {}
    for i in range(4):
        cs = [1, 2, 4, 8, 16]
        scale = float(rng.uniform(0.5, 5))
        costs[f"l{i}"] = {c: c * (i + 1) for c in cs}
        sens[f"l{i}"] = {c: scale / c for c in cs}
    budget = float(rng.integers(10, 150))
    chosen = allocate_codebooks(costs, sens, budget, method="greedy")
    cost, value = totals(costs, sens, chosen)
    assert cost <= budget
    best_value, _ = brute_force(costs, sens, budget)
    exact = totals(costs, sens, allocate_codebooks(costs, sens, budget))[1]
    assert exact == pytest.approx(best_value)
    assert value >= best_value - 1e-12


def test_budget_exact_fit_and_monotone():
    rng = np.random.default_rng(7)
    costs, sens = random_case(rng, nlayers=5, nchoices=3)
    minimum = sum(min(t.values()) for t in costs.values())
    maximum = sum(max(t.values()) for t in costs.values())
    # a budget equal to the cheapest total is allowed and forces every cheapest C
    chosen = allocate_codebooks(costs, sens, minimum)
    assert totals(costs, sens, chosen)[0] == minimum
    previous = math.inf
    for budget in np.linspace(minimum, maximum, 25):
        value = totals(costs, sens, allocate_codebooks(costs, sens, float(budget)))[1]
        assert value <= previous + 1e-12  # more budget never predicts worse
        previous = value
    assert previous == pytest.approx(sum(min(t.values()) for t in sens.values()))


def test_allocation_errors():
    costs = {"a": {1: 10, 2: 20}, "b": {1: 5}}
    sens = {"a": {1: 1.0, 2: 0.5}, "b": {1: 2.0}}
    with pytest.raises(ValueError, match="below the cheapest allocation"):
        allocate_codebooks(costs, sens, 14)
    with pytest.raises(ValueError, match="different layers"):
        allocate_codebooks(costs, {"a": sens["a"]}, 100)
    with pytest.raises(ValueError, match="layer 'b'"):
        allocate_codebooks(costs, {"a": sens["a"], "b": {2: 1.0}}, 100)
    with pytest.raises(ValueError, match="method"):
        allocate_codebooks(costs, sens, 100, method="fast")


# ---------------------------------------------------------------------------- interpolation
def test_interpolation_linear_in_log_c():
    # y = 4 - 0.5 log2 C is reproduced exactly between and beyond the points
    measured = {c: 4 - 0.5 * math.log2(c) for c in (4, 16, 64)}
    for c in (4, 8, 16, 32, 64, 128, 256, 2, 1):
        assert interpolate_log(measured, c) == pytest.approx(4 - 0.5 * math.log2(c), abs=1e-12)
    # beyond the range the extension is clipped at 0; inside, values are kept as measured
    assert interpolate_log(measured, 4096) == 0.0
    assert interpolate_log({8: -0.2, 16: -0.1}, 8) == -0.2
    assert interpolate_log({8: 1.0, 16: 0.5}, 11) == pytest.approx(1.0 - 0.5 * math.log2(11 / 8))
    with pytest.raises(ValueError, match="one measured C"):
        interpolate_log({8: 1.0}, 4)


def test_candidates():
    assert candidate_codebooks([16, 32], 288, octaves=1, extra=[24]) == [8, 16, 24, 32, 64]
    assert candidate_codebooks([16, 32], 40, octaves=2) == [4, 8, 16, 32]
    assert candidate_codebooks([1], 9, octaves=3) == [1]
    # the rule's C stays a choice outside the range (the default octaves=0: measured C only)
    assert candidate_codebooks([7, 14], 128, extra=[16]) == [7, 8, 14, 16]
    assert candidate_codebooks([7, 14], 12, extra=[16]) == [7, 8]
    assert max(candidate_codebooks([64, 128], 144, octaves=1)) == 128


# ---------------------------------------------------------------------------- costs
def test_layer_costs_formulae():
    shape = LayerShape("conv", "conv2d", rows=100, in_dim=288, out_dim=64)
    costs = layer_costs(shape, LayerSpec(), [16, 32], CostModel())
    for c in (16, 32):
        # K = 16 tree: 4 compares per codebook and row; LUT C K M bytes at 8 bits;
        # C (K - 1) thresholds + C log2 K split indices at 16 bits
        assert costs[c]["compares"] == 100 * c * 4
        assert costs[c]["lut_bytes"] == c * 16 * 64 + (c * 15 + c * 4) * 2
    # energy: the layer's energy model at either parameter source, in µJ
    from maddnet.hw.counts import MaddParams
    from maddnet.hw.energy import madd_layer_energy
    from maddnet.nn.layers import MaddLinear

    model = CostModel()
    dense = torch.nn.Linear(288, 64, device="meta")
    with_c = shape.with_madd(MaddParams.of(MaddLinear._skeleton_of(dense, 16, LayerSpec())))
    on_chip = model.constants.sram_pj_per_byte(model.accelerator.parameter_memory_bytes)
    expected = madd_layer_energy(with_c, model, on_chip).total_pj / 1e6
    assert costs[16]["energy_on_chip"] == pytest.approx(expected, rel=1e-12)
    assert costs[16]["energy_on_chip"] < costs[16]["energy_off_chip"]  # DRAM costs more per byte
    assert costs[16]["energy_on_chip"] < costs[32]["energy_on_chip"]


def test_energy_budget_matches_the_energy_report(tmp_path, capsys):
    """maddnet energy with --budget energy: the allocation's cost is what the report then
    prices the network at, and no more than the uniform rule's."""

    out = tmp_path / "energy"
    argv = ["energy", "resnet9", "--model-kw", "width=16", "--in-chans", "1", "--input-size", "28"]
    argv += ["--ncodebooks-from", str(RESNET9_REPORT), "--budget", "energy", "--out", str(out)]
    assert main(argv) == 0
    allocation = json.loads((out / "budget.json").read_text())
    report = json.loads((out / "energy.json").read_text())
    madd_uj = sum(layer["madd_energy_nj"] for layer in report["layers"] if layer["engine"] == "madd") / 1e3
    assert allocation["totals"]["cost"] == pytest.approx(madd_uj, rel=1e-9)
    assert allocation["totals"]["cost"] <= allocation["total_budget"] == allocation["totals"]["rule_cost"]
    assert allocation["totals"]["sensitivity"] <= allocation["totals"]["rule_sensitivity"]
    assert {layer["layer"]: layer["C"] for layer in report["layers"]} == allocation["ncodebooks"]
    assert "parameter memory" in (out / "budget.md").read_text()


def test_energy_budget_prices_parameters_where_they_fit(tmp_path):
    rows = [
        {"layer": "0", "C": 8, "drop": 4.0},
        {"layer": "0", "C": 4, "drop": 8.0},
        {"layer": "2", "C": 4, "drop": 0.1},
        {"layer": "2", "C": 2, "drop": 0.2},
    ]
    report = write_report(tmp_path / "a.json", rows)
    budget = CodebookBudget(report, unit="energy")
    results = {}
    for memory in (1 << 30, 64):  # everything fits / nothing fits
        model = CostModel().replace(parameter_memory_bytes=memory)
        allocation = allocate_for_model(toy_model(), (64,), MaddConfig(), budget, model)
        costs = {
            row["layer"]: layer_costs(
                LayerShape(row["layer"], "linear", rows=1, in_dim=row["D"], out_dim=row["M"]),
                LayerSpec(),
                [row["C"]],
                model,
            )[row["C"]]
            for row in allocation.rows
        }
        key = "energy_on_chip" if memory > 64 else "energy_off_chip"
        assert allocation.totals()["cost"] == pytest.approx(
            sum(costs[r["layer"]][key] for r in allocation.rows)
        )
        assert allocation.totals()["cost"] <= allocation.total_budget * (1 + 1e-12)
        results[memory] = allocation
    assert "parameter memory" in results[1 << 30].notes[0] and "DRAM" in results[64].notes[0]
    # a budget below every allocation names the energy
    with pytest.raises(ValueError, match="energy budget"):
        allocate_for_model(
            toy_model(), (64,), MaddConfig(), CodebookBudget(report, unit="energy", value=1e-9)
        )


# ---------------------------------------------------------------------------- reports
def write_report(path, rows):
    path.write_text(json.dumps({"baseline": {"top1": 0.9}, "rows": rows}))
    return str(path)


def toy_model():
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 256))


def test_plan_on_a_toy_model(tmp_path):
    rows = [
        {"layer": "0", "C": 8, "drop": 4.0, "nmse": 0.2},
        {"layer": "0", "C": 4, "drop": 8.0, "nmse": 0.3},
        {"layer": "2", "C": 4, "drop": 0.1, "nmse": 0.05},
        {"layer": "2", "C": 2, "drop": 0.2, "nmse": 0.07},
    ]
    report = write_report(tmp_path / "a.json", rows)
    # measured C only (the default): the first layer takes the second's codebooks as far as
    # the measured range allows
    inside = allocate_for_model(toy_model(), (64,), MaddConfig(), CodebookBudget(report, unit="lut_bytes"))
    assert inside.ncodebooks == {"0": 8, "2": 4} and inside.totals()["sensitivity"] <= 4.1 + 1e-9
    budget = CodebookBudget(report, unit="lut_bytes", octaves=1)
    allocation = allocate_for_model(toy_model(), (64,), MaddConfig(), budget)
    got = allocation.to_dict()
    # rule (width 8): C = 8 and 4; the budget is their cost, which the allocation respects
    assert [r["rule_C"] for r in got["rows"]] == [8, 4]
    assert got["totals"]["cost"] <= got["total_budget"] == got["totals"]["rule_cost"]
    assert got["totals"]["sensitivity"] <= got["totals"]["rule_sensitivity"]
    # the first layer is 40x more sensitive per octave, the second's LUT 8x larger per
    # codebook: the first takes codebooks from the second
    assert allocation.ncodebooks["0"] > 8 and allocation.ncodebooks["2"] < 4
    assert "| 0 | 64 | 32 |" in allocation.markdown()


def test_plan_errors(tmp_path):
    rows = [{"layer": "0", "C": 8, "drop": 4.0}, {"layer": "0", "C": 4, "drop": 8.0}]
    budget = CodebookBudget(write_report(tmp_path / "a.json", rows))
    with pytest.raises(
        ValueError, match=r"does not match the model's MADD layers: not in the report \['2'\]"
    ):
        allocate_for_model(toy_model(), (64,), MaddConfig(), budget)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_sensitivity(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"rows": [{"layer": "0", "C": 8}]}))
    with pytest.raises(ValueError, match="finite 'drop'"):
        read_sensitivity(tmp_path / "bad.json")
    rows += [{"layer": "2", "C": 4, "drop": 0.1}, {"layer": "2", "C": 2, "drop": 0.2}]
    small = CodebookBudget(write_report(tmp_path / "b.json", rows), value=10.0)
    with pytest.raises(ValueError, match="below the cheapest allocation"):
        allocate_for_model(toy_model(), (64,), MaddConfig(), small)


def test_budget_settings():
    assert parse_budget("a.json", "compares:width=16") == CodebookBudget("a.json", unit="compares", width=16)
    assert parse_budget("a.json", "lut-bytes:5000").value == 5000.0
    assert parse_budget("a.json", "energy:20.5") == CodebookBudget("a.json", unit="energy", value=20.5)
    for bad in ("bytes", "compares:x", "lut-bytes:-3", "compares:width=0"):
        with pytest.raises(ValueError):
            parse_budget("a.json", bad)
    budget = CodebookBudget("a.json", metric="nmse", octaves=2)
    assert CodebookBudget.from_dict(budget.to_dict()) == budget
    with pytest.raises(ValueError, match="unknown settings"):
        CodebookBudget.from_dict({"analysis": "a.json", "units": "x"})


def test_resnet9_report_same_budget_as_rule():
    from maddnet.models import create_model

    with torch.device("meta"):
        model = create_model("resnet9", num_classes=10, in_chans=1, width=16)
    for unit in ("lut_bytes", "compares"):
        allocation = allocate_for_model(
            model, (1, 28, 28), MaddConfig(), CodebookBudget(str(RESNET9_REPORT), unit)
        )
        totals_ = allocation.totals()
        assert totals_["cost"] <= allocation.total_budget == totals_["rule_cost"]
        assert totals_["sensitivity"] <= totals_["rule_sensitivity"]
        assert all(1 <= row["C"] <= row["D"] for row in allocation.rows)


# ---------------------------------------------------------------------------- entry points
def test_retrain_flags_reach_the_config(tmp_path):
    argv = "retrain --model resnet9 --model-kw width=16 --data fashion_mnist --checkpoint x.pt".split()
    argv += ["--ncodebooks-from", str(RESNET9_REPORT), "--budget", "compares", "--budget-metric", "nmse"]
    argv += ["--device", "cpu", "--out", str(tmp_path)]
    config = config_from_args(build_parser().parse_args(argv))
    assert config.codebook_budget == CodebookBudget(str(RESNET9_REPORT), unit="compares", metric="nmse")
    ncodebooks = config.madd_config().ncodebooks
    assert set(ncodebooks) == {row["layer"] for row in json.loads(RESNET9_REPORT.read_text())["rows"]}
    # saved and read back (resume): the same settings, the same C
    again = RetrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again.differences(config) == {} and again.madd_config().ncodebooks == ncodebooks
    with pytest.raises(ValueError, match="not both"):
        RetrainConfig.from_dict({**config.to_dict(), "ncodebooks": 8})


def test_a_started_run_keeps_its_plan(tmp_path):
    """A resumed run reads its budget.json, not the analysis report again (which may have
    changed or gone since: newcomer review)."""
    import shutil

    report = tmp_path / "single_layer.json"
    shutil.copy(RESNET9_REPORT, report)
    values = {
        "model": "resnet9",
        "model_kwargs": {"width": 16},
        "dataset": "fashion_mnist",
        "checkpoint": "x.pt",
    }
    budget = CodebookBudget(str(report), unit="compares")
    config = RetrainConfig(**values, out_dir=str(tmp_path / "run"), codebook_budget=budget)
    planned = config.codebook_allocation()
    write_allocation(planned, config.out_dir)  # what the pipeline does before learning
    (tmp_path / "run" / "checkpoint.pt").touch()  # the run has started
    report.unlink()
    assert config.codebook_allocation().ncodebooks == planned.ncodebooks
    assert config.madd_config().ncodebooks == planned.ncodebooks
    other = RetrainConfig(
        **values, out_dir=config.out_dir, codebook_budget=CodebookBudget(str(report), unit="lut_bytes")
    )
    with pytest.raises(ValueError, match="was planned under the budget"):
        other.codebook_allocation()
    # a folder without a checkpoint (a run that died before its first step) plans afresh
    (tmp_path / "run" / "checkpoint.pt").unlink()
    shutil.copy(RESNET9_REPORT, report)
    assert other.codebook_allocation().budget == other.codebook_budget


def test_cli_errors(tmp_path, capsys):
    base = [*ENERGY, "--out", str(tmp_path)]
    assert main([*base, "--ncodebooks-from", str(tmp_path / "none.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    for flags in (["--budget", "compares"], ["--budget", "lut-bytes"], ["--budget-metric", "nmse"]):
        assert main([*base, *flags]) == 2  # was silently ignored for lut-bytes (newcomer review)
        assert "need --ncodebooks-from" in capsys.readouterr().err
    assert main([*base, "--ncodebooks-from", str(RESNET9_REPORT), "--budget", "compares:10"]) == 2
    assert "below the cheapest" in capsys.readouterr().err
    # the same layer names on another width: measured on another model (newcomer review)
    other = [*ENERGY[:3], "width=8", *ENERGY[4:], "--out", str(tmp_path)]
    assert main([*other, "--ncodebooks-from", str(RESNET9_REPORT)]) == 2
    err = capsys.readouterr().err
    assert "was measured on another model" in err
    assert "layer1.0.0 (report D=144, M=32; model D=72, M=16)" in err


def test_energy_writes_the_allocation(tmp_path, capsys):
    argv = [*ENERGY, "--ncodebooks-from", str(RESNET9_REPORT), "--out", str(tmp_path)]
    assert main(argv) == 0
    budget = json.loads((tmp_path / "budget.json").read_text())
    energy = json.loads((tmp_path / "energy.json").read_text())
    assert budget["totals"]["cost"] <= budget["total_budget"]
    assert energy["madd_layers"] == 9
