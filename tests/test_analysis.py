"""Single-layer analysis: one layer replaced at a time, unsupported layers reported."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from maddnet.analysis.single_layer import analyze_layers, codebooks_for_width, write_analysis
from maddnet.nn import MaddConfig


def small_model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.ReLU(),  # depthwise: D = 9 per output
        nn.Conv2d(8, 8, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()
    images = torch.randn(600, 3, 8, 8)
    with torch.no_grad():
        labels = model(images).argmax(1)  # the dense model is right on every sample
    data = TensorDataset(images, labels)
    return model, DataLoader(data, batch_size=100, shuffle=True), DataLoader(data, batch_size=200)


def test_each_layer_alone_for_each_width(tmp_path):
    model, calib, evaluation = small_model_and_data()
    config = MaddConfig(max_rows=2000)
    result = analyze_layers(
        model, calib, evaluation, widths=(4, 9), config=config, calib_batches=6, progress=False
    )
    assert result["baseline"]["top1"] == 1.0
    assert [s["layer"] for s in result["skipped"]] == ["2"]
    assert "groups=8" in result["skipped"][0]["reason"] and "D=9" in result["skipped"][0]["reason"]
    got = {(r["layer"], r["C"]) for r in result["rows"]}
    # D=27 -> C=7 (D/C~4) and 3 (D/C=9); D=8 -> C=2 and 1 (9 rounds to 1)
    assert got == {("0", 7), ("0", 3), ("4", 2), ("4", 1), ("8", 2), ("8", 1)}
    for row in result["rows"]:
        assert row["drop"] == 100 * (1.0 - row["top1"])
        assert 0.0 < row["nmse"] < 1.5
        assert row["calib_rows"] == (2000 if row["layer"] != "8" else 600)  # bounded reservoir
    first = {r["C"]: r["nmse"] for r in result["rows"] if r["layer"] == "0"}
    assert first[7] < first[3]  # more codebooks, smaller error
    # The model itself is untouched by the analysis.
    assert all(type(m) is not nn.Identity for m in model)
    assert isinstance(model[0], nn.Conv2d)
    paths = write_analysis(result, tmp_path, "test")
    assert "Layers MADDness cannot serve" in paths["md"].read_text()
    assert paths["csv"].read_text().count("\n") == 7


def test_plot_lines_follow_the_requested_widths():
    """One line per requested D/C: a 64-input layer at D/C = 18 (C = 4, i.e. D/C = 16) stays
    on the 18 line; two widths that give a layer the same C put that row on both."""
    from maddnet.analysis.single_layer import _series_by_width

    rows = [
        {"layer": "a", "D": 64, "C": 7},
        {"layer": "a", "D": 64, "C": 4},
        {"layer": "b", "D": 576, "C": 64},
        {"layer": "b", "D": 576, "C": 32},
        {"layer": "stem", "D": 9, "C": 1},
    ]
    lines = _series_by_width(rows, [9, 18])
    assert {w: {n: r["C"] for n, r in sub.items()} for w, sub in lines.items()} == {
        9: {"a": 7, "b": 64, "stem": 1},
        18: {"a": 4, "b": 32, "stem": 1},
    }
    assert set(_series_by_width(rows, None)) == {9, 16, 18}  # no settings: rounded D/C


def test_codebooks_for_width_is_clamped():
    assert codebooks_for_width(9, 9) == 1
    assert codebooks_for_width(9, 100) == 1
    assert codebooks_for_width(9, 0.5) == 9
    assert codebooks_for_width(1152, 9) == 128


def test_interrupted_analysis_resumes_from_its_cells(tmp_path, monkeypatch):
    """Rows reach disk cell by cell; a rerun computes only the missing cells and returns
    the finished ones as written; a cut-short last line is recomputed; other settings are
    refused."""
    import pytest

    from maddnet.analysis import single_layer
    from maddnet.analysis.cells import CellLog

    model, _, evaluation = small_model_and_data()
    config = MaddConfig(max_rows=2000, seed=0)
    kwargs = dict(widths=(4, 9), config=config, calib_batches=6, progress=False)
    settings = {"model": "small", "seed": 0}

    def calib():  # the same batches in each run, as the CLI's seeded loader in a fresh process
        return DataLoader(
            evaluation.dataset, batch_size=100, shuffle=True, generator=torch.Generator().manual_seed(0)
        )

    reference = analyze_layers(model, calib(), evaluation, **kwargs)
    calls = []
    real_cell = single_layer._analyze_cell

    def interrupted_after_three(model, name, c, *args):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append((name, c))
        return real_cell(model, name, c, *args)

    monkeypatch.setattr(single_layer, "_analyze_cell", interrupted_after_three)
    with pytest.raises(KeyboardInterrupt):
        analyze_layers(model, calib(), evaluation, cells=CellLog(tmp_path, settings), **kwargs)
    saved = CellLog(tmp_path, settings).load()
    assert list(saved) == [("0", 7), ("0", 3), ("4", 2)]
    with open(tmp_path / "cells.rank0.jsonl", "a") as handle:
        handle.write('{"layer": "8", "C"')  # a kill in the middle of a write
    calls.clear()

    def counted(model, name, c, *args):
        calls.append((name, c))
        return real_cell(model, name, c, *args)

    monkeypatch.setattr(single_layer, "_analyze_cell", counted)
    resumed = analyze_layers(model, calib(), evaluation, cells=CellLog(tmp_path, settings), **kwargs)
    assert calls == [("4", 1), ("8", 2), ("8", 1)]  # only the cells not finished before
    assert resumed["baseline"] == reference["baseline"] and resumed["skipped"] == reference["skipped"]
    assert [(r["layer"], r["C"]) for r in resumed["rows"]] == [
        (r["layer"], r["C"]) for r in reference["rows"]
    ]
    for row, want in zip(resumed["rows"], reference["rows"], strict=True):
        assert row["drop"] == 100 * (1.0 - row["top1"])
        if (row["layer"], row["C"]) in saved:
            assert row == {**saved[(row["layer"], row["C"])], "drop": row["drop"]}  # as written
        else:  # recomputed: oneDNN's dense convs differ in the last bits between runs, so
            # the recorded rows, and through near-tie splits the tree, may differ slightly
            assert row.keys() == want.keys() and row["nmse"] == pytest.approx(want["nmse"], rel=0.05)
    calls.clear()
    # everything finished: nothing recomputed, the same rows again
    again = analyze_layers(model, calib(), evaluation, cells=CellLog(tmp_path, settings), **kwargs)
    assert calls == [] and again["rows"] == resumed["rows"]
    with pytest.raises(ValueError, match=r"other settings \(differing: seed\).*cells_settings.json"):
        CellLog(tmp_path, {"model": "small", "seed": 1}).load()


def test_a_layer_gets_the_same_rows_whichever_layers_are_analysed(tmp_path, monkeypatch):
    """analyze seeds each layer's row sample by its place among all candidates
    (seed_index), so cells kept from a run over some layers (--layers, or resuming) equal
    those of a run over all of them."""
    from maddnet.analysis import single_layer
    from maddnet.analysis.cells import CellLog
    from maddnet.nn import record_inputs

    model, _, evaluation = small_model_and_data()
    config = MaddConfig(max_rows=2000, seed=0)
    kwargs = dict(widths=(4, 9), config=config, calib_batches=6, progress=False)

    def calib():
        return DataLoader(
            evaluation.dataset, batch_size=100, shuffle=True, generator=torch.Generator().manual_seed(0)
        )

    full = analyze_layers(model, calib(), evaluation, **kwargs)
    alone = analyze_layers(model, calib(), evaluation, layers=["4"], cells=CellLog(tmp_path, {}), **kwargs)
    resumed = analyze_layers(model, calib(), evaluation, cells=CellLog(tmp_path, {}), **kwargs)

    def layer4(result):
        return [(r["C"], r["nmse"], r["top1"], r["calib_rows"]) for r in result["rows"] if r["layer"] == "4"]

    assert layer4(alone) == layer4(full) == layer4(resumed)

    batches = list(zip(range(6), DataLoader(evaluation.dataset, batch_size=100), strict=False))
    batches = [batch for _, batch in batches]
    every = record_inputs(model, ["0", "4", "8"], batches, config=config)
    only = record_inputs(model, ["4"], batches, config=config, seed_index={"0": 0, "4": 1, "8": 2})
    torch.testing.assert_close(only["4"], every["4"], rtol=1e-5, atol=1e-6)
    other_sample = record_inputs(model, ["4"], batches, config=config)["4"]  # seeded as position 0
    assert not torch.allclose(other_sample, every["4"], rtol=1e-3, atol=1e-3)
    seen = []

    def recording(model, names, calib, config, seed_index):
        seen.append(seed_index)
        return record_inputs(model, names, calib, config=config, seed_index=seed_index)

    monkeypatch.setattr(single_layer, "record_inputs", recording)
    analyze_layers(model, batches, evaluation, widths=(9,), layers=["4"], config=config, progress=False)
    assert seen == [{"0": 0, "4": 1, "8": 2}]
