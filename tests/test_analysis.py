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


def test_codebooks_for_width_is_clamped():
    assert codebooks_for_width(9, 9) == 1
    assert codebooks_for_width(9, 100) == 1
    assert codebooks_for_width(9, 0.5) == 9
    assert codebooks_for_width(1152, 9) == 128
