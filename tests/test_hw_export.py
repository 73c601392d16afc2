"""maddnet export / hw-check (maddnet.hw.export, maddnet.hw.hw_check): the round trip for
every registry model, the torch-free check, corrupted exports, memory files against tensors."""

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from torch import nn

from maddnet.cli import main
from maddnet.hw import datapath as dp
from maddnet.hw.export import export_model
from maddnet.hw.hw_check import (
    ExportError,
    check_export,
    conv_tap_values,
    load_export,
    parse_memory,
    sha256_of,
    split_taps,
)
from maddnet.models import create_model, list_models
from maddnet.nn import MaddConfig, convert, madd_layers

# small builds of the registry models: (builder arguments, input shape)
SMALL = {
    "resnet9": ({"width": 8}, (1, 8, 8)),
    "resnet18": ({"small_input": True}, (3, 8, 8)),
    "resnet50": ({"small_input": True}, (3, 8, 8)),
    "ds_cnn": ({}, (1, 20, 10)),
    "levit": ({"img_size": 16, "small_input": True}, (3, 16, 16)),
}


def _small(name: str) -> tuple[dict, tuple[int, ...]]:
    return next(value for prefix, value in SMALL.items() if name.startswith(prefix))


def _converted(name: str, nlayers: int = 2, seed: int = 0):
    """Registry model ``name`` (small input) with its first and last convertible layers (and
    ``nlayers - 2`` more after the first) converted on 32 random inputs; (model, inputs, source)."""
    kwargs, shape = _small(name)
    torch.manual_seed(seed)
    model = create_model(name, 10, shape[0], **kwargs).eval()
    names = list(MaddConfig().select(model))
    chosen = [*names[: max(1, nlayers - 1)], names[-1]]
    x = torch.randn(16, *shape)
    config = MaddConfig(layers=chosen, ncodebooks=4, min_rows=16, max_rows=256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        convert(model, [x], config, check_training=False)
    source = {"model": name, "model_kwargs": kwargs, "num_classes": 10, "in_chans": shape[0]}
    return model, x[:2], source


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A ResNet-9 export (four layers converted) shared by the corruption tests (copied per test)."""
    model, x, source = _converted("resnet9", nlayers=4)
    out = tmp_path_factory.mktemp("export") / "r9"
    export_model(model, x, out, source=source, golden_rows=6)
    return out, model, x


@pytest.fixture
def copy_of(exported, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(exported[0], target)
    return target


# one model per family stays in the fast set; the larger ones take 10-40 s each on a loaded CPU
FAST = ("resnet9", "ds_cnn_s", "levit_128s")


@pytest.mark.parametrize(
    "name", [name if name in FAST else pytest.param(name, marks=pytest.mark.slow) for name in list_models()]
)
def test_round_trip_every_registry_model(name, tmp_path):
    model, x, source = _converted(name)
    export_model(model, x, tmp_path, source=source, golden_rows=3)
    report = check_export(tmp_path, end_to_end=True)
    assert report.ok, report.end_to_end
    assert [layer.name for layer in report.layers] == json.loads((tmp_path / "manifest.json").read_text())[
        "layer_order"
    ]
    assert len(report.layers) == 2 and all(
        layer.rows == min(3, rows) for layer, rows in zip(report.layers, (3, 2), strict=True)
    )


def test_manifest_describes_the_layers(exported):
    out, model, x = exported
    manifest = json.loads((out / "manifest.json").read_text())
    layers = madd_layers(model)
    assert manifest["format"] == "maddnet-hw-export" and manifest["format_version"] == 1
    assert manifest["passes"] == [] and manifest["plan"]["layers"].keys() == layers.keys()
    for entry in manifest["layers"]:
        layer = layers[entry["name"]]
        assert (entry["D"], entry["M"], entry["C"], entry["K"]) == (
            layer.in_dim,
            layer.out_dim,
            layer.ncodebooks,
            layer.nprototypes,
        )
        assert entry["lut_quantization"] == {"bits": 8, "granularity": "codebook", "encoding": "unsigned"}
        assert entry["accumulator_bits"] == 32
        splits = np.array(entry["splits"])
        dims = layer.split_dims.numpy()
        if entry["type"] == "conv2d":
            kh, kw = entry["conv"]["kernel_size"]
            assert entry["conv"]["stride"] == list(layer.stride)
            # (channel, ky, kx) -> the im2col column in F.unfold order
            assert np.array_equal(splits[..., 0] * kh * kw + splits[..., 1] * kw + splits[..., 2], dims)
        else:
            assert np.array_equal(splits[..., 0], dims)
    for name, entry in manifest["files"].items():
        assert sha256_of(out / name) == entry["sha256"]


def test_tensors_and_memory_files_hold_the_layer(exported):
    out, model, _ = exported
    export = load_export(out)
    for entry in export.layers:
        layer = madd_layers(model)[entry["name"]]
        q = layer.quantized_lut()
        t = {role: export.tensors[spec["key"]] for role, spec in entry["tensors"].items()}
        assert t["thresholds"].dtype == np.float16
        assert np.array_equal(t["thresholds"], layer.thresholds.detach().numpy().astype(np.float16))
        assert np.array_equal(t["lut"], q.values.permute(2, 0, 1).numpy())  # (M, C, K)
        assert np.array_equal(t["lut_scale"], q.scale.numpy())
        if layer.bias is None:
            assert "bias" not in t and np.array_equal(
                t["accumulator_init"], dp.accumulator_init(t["lut_offsets"])
            )
        else:
            assert np.array_equal(t["bias"], layer.bias.detach().numpy())
        thresholds = parse_memory((out / entry["memories"]["thresholds"]["file"]).read_text(), "t")
        lut = parse_memory((out / entry["memories"]["lut"]["file"]).read_text(), "l")
        C, K, M = layer.ncodebooks, layer.nprototypes, layer.out_dim
        # address c*(K-1) + node holds the FP16 bits of threshold (c, node)
        c, node = C - 1, 5
        assert int(thresholds[c * (K - 1) + node]) == int(t["thresholds"][c, node].view(np.uint16))
        # address (m*C + c)*K + code holds LUT entry (c, code, m)
        m, c, code = M - 1, C // 2, 7
        assert int(lut[(m * C + c) * K + code]) == int(q.values[c, code, m])
        assert thresholds.size == C * (K - 1) and lut.size == M * C * K


def test_golden_vectors_match_the_hw_exact_model(exported):
    """The golden rows are the layer's own hardware-exact outputs at those positions."""
    out, model, x = exported
    export = load_export(out)
    entry = export.layers[0]  # the stem conv: rows are (image, oy, ox)
    layer = madd_layers(model)[entry["name"]]
    golden = {role: export.golden[spec["key"]] for role, spec in entry["golden"].items()}
    from maddnet.hw import set_hw_exact

    set_hw_exact(model)
    try:
        with torch.no_grad():
            y = layer(x)
    finally:
        set_hw_exact(model, False)
    for (image, oy, ox), output in zip(golden["rows"], golden["output"], strict=True):
        assert np.array_equal(y[image, :, oy, ox].numpy(), output)
    # the split values are the input at the (channel, ky, kx) taps, padding included
    taps = split_taps(layer.split_dims.numpy(), entry["conv"])
    values = conv_tap_values(x.numpy(), taps, entry["conv"])
    h, w = y.shape[-2:]
    rows = golden["rows"] @ np.array([h * w, w, 1])
    assert np.array_equal(golden["input"], values[rows].astype(np.float16))


def test_check_runs_without_torch(exported):
    """The export's reference/hw_check.py checks it with numpy and safetensors only."""
    out = exported[0]
    script = (
        "import runpy, sys\n"
        f"sys.argv = ['hw_check.py', {str(out)!r}]\n"
        "try:\n"
        f"    runpy.run_path({str(out / 'reference' / 'hw_check.py')!r}, run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('TORCH-FREE OK')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "TORCH-FREE OK" in result.stdout and "agree bit for bit" in result.stdout


def test_check_finds_a_disagreeing_golden_vector(copy_of, capsys):
    """A golden accumulator off by one (manifest updated to match) is a mismatch, exit 1."""
    path = copy_of / "golden.safetensors"
    golden = load_file(str(path))
    key = next(k for k in golden if k.endswith("/acc"))
    golden[key][0, 0] += 1
    save_file(golden, str(path))
    manifest = json.loads((copy_of / "manifest.json").read_text())
    manifest["files"]["golden.safetensors"] = {"sha256": sha256_of(path), "bytes": path.stat().st_size}
    (copy_of / "manifest.json").write_text(json.dumps(manifest))
    report = check_export(copy_of)
    bad = [layer for layer in report.layers if not layer.ok]
    assert len(bad) == 1 and bad[0].acc_equal == bad[0].rows - 1 and bad[0].codes_equal == bad[0].rows
    assert main(["hw-check", str(copy_of)]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def _retag(root, name):
    """Update the manifest's size and sha256 of file ``name`` (a deliberate, consistent edit)."""
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": sha256_of(root / name), "bytes": (root / name).stat().st_size}
    (root / "manifest.json").write_text(json.dumps(manifest))


def _tamper_tensor(root, change, role="thresholds"):
    path = root / "tensors.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith(f"/{role}"))
    tensors[key] = change(tensors[key])
    save_file(tensors, str(path))
    _retag(root, "tensors.safetensors")


def _write(root, name, data):
    (root / name).write_bytes(data)


CORRUPTIONS = {
    "bad JSON": (lambda r: _write(r, "manifest.json", b'{"format": '), r"manifest.json is not valid JSON"),
    "missing manifest": (lambda r: (r / "manifest.json").unlink(), r"manifest.json is missing"),
    "missing file": (lambda r: (r / "golden.safetensors").unlink(), r"golden.safetensors is missing"),
    "truncated": (
        lambda r: _write(r, "tensors.safetensors", (r / "tensors.safetensors").read_bytes()[:-100]),
        r"tensors.safetensors is truncated: \d+ bytes, manifest.json lists \d+",
    ),
    "tampered": (
        lambda r: _write(r, "tensors.safetensors", b"\x01" + (r / "tensors.safetensors").read_bytes()[1:]),
        r"tensors.safetensors: sha256 .* does not match manifest.json",
    ),
    "truncated safetensors, sha updated": (
        lambda r: (
            _write(r, "tensors.safetensors", (r / "tensors.safetensors").read_bytes()[:-100]),
            _retag(r, "tensors.safetensors"),
        ),
        r"tensors.safetensors is not a readable safetensors file",
    ),
    "wrong dtype": (
        lambda r: _tamper_tensor(r, lambda t: t.astype(np.float32)),
        r"tensors.safetensors: tensor '.*/thresholds' is float32, the manifest says F16",
    ),
    "wrong shape": (
        lambda r: _tamper_tensor(r, lambda t: t[:, :-1].copy()),
        r"tensors.safetensors: tensor '.*/thresholds' has shape \[\d+, 14\], the manifest says \[\d+, 15\]",
    ),
    "memory word changed": (
        lambda r: (
            _write(
                r,
                "memories/000_prep_0.lut.hex",
                (r / "memories/000_prep_0.lut.hex").read_text().replace("\n", "\nzz\n", 1).encode(),
            ),
            _retag(r, "memories/000_prep_0.lut.hex"),
        ),
        r"000_prep_0.lut.hex:2: 'zz' is not a hex word",
    ),
    "split dims changed, sha updated": (
        lambda r: _tamper_tensor(r, lambda t: (t + 1) % (t.max() + 1), "split_dims"),
        r"tensors.safetensors: layer '.*': split_dims do not give the manifest's 'splits' taps",
    ),
    "accumulator init changed, sha updated": (
        lambda r: _tamper_tensor(r, lambda t: t + 1, "accumulator_init"),
        r"tensors.safetensors: layer '.*': accumulator_init is not bias \+ sum of lut_offsets",
    ),
    "newer version": (
        lambda r: _write(
            r,
            "manifest.json",
            (r / "manifest.json").read_text().replace('"format_version": 1', '"format_version": 2').encode(),
        ),
        r"format_version 2; this reader reads version 1 only",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupted_export_is_refused(case, copy_of, capsys):
    corrupt, message = CORRUPTIONS[case]
    corrupt(copy_of)
    with pytest.raises(ExportError, match=message):
        check_export(copy_of)
    assert main(["hw-check", str(copy_of)]) == 2
    assert "maddnet hw-check: error:" in capsys.readouterr().err


def test_refuses_float_lut_and_unconverted_models(tmp_path):
    with pytest.raises(ValueError, match="no MADD layer"):
        export_model(nn.Sequential(nn.Linear(4, 2)), torch.randn(2, 4), tmp_path)
    model = nn.Sequential(nn.Linear(16, 4))
    from maddnet.nn import LayerSpec

    convert(model, [torch.randn(64, 16)], MaddConfig(min_rows=16, spec=LayerSpec(lut_bits=None)))
    with pytest.raises(ValueError, match="integer LUT"):
        export_model(model, torch.randn(2, 16), tmp_path)


def test_narrow_accumulator_saturates_or_is_refused(tmp_path):
    """A 9-bit accumulator (at most 255) with C = 4 codebooks of entries up to 255: the export
    refuses it (overflow="refuse") or its golden sums saturate as the numpy datapath does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 4))
    convert(model, [torch.randn(64, 16)], MaddConfig(ncodebooks=4, min_rows=16))
    x = torch.randn(8, 16)
    with pytest.raises(dp.AccumulatorOverflowError, match="9-bit"):
        export_model(model, x, tmp_path, accumulator_bits=9)
    export_model(model, x, tmp_path, accumulator_bits=9, overflow="saturate", include_model=False)
    export = load_export(tmp_path)
    acc = export.golden["0/acc"]
    assert acc.max() == 255 and export.manifest["datapath"]["overflow"] == "saturate"
    assert check_export(tmp_path).ok
    assert not madd_layers(model)["0"].hw_exact  # the model's mode is restored


def test_conv_taps_agree_with_unfold():
    """conv_tap_values (numpy, what hardware reads) against F.unfold's im2col columns."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 7, 6, generator=g)
    conv = {"kernel_size": [3, 2], "stride": [2, 1], "padding": [1, 1], "dilation": [1, 2]}
    dims = torch.randint(0, 3 * 3 * 2, (5, 4), generator=g).numpy()
    values = conv_tap_values(x.numpy(), split_taps(dims, conv), conv)
    cols = torch.nn.functional.unfold(x, (3, 2), dilation=(1, 2), padding=(1, 1), stride=(2, 1))
    rows = cols.transpose(1, 2).reshape(-1, 18).numpy()
    assert np.array_equal(values, dp.gather_rows(rows, dims))


def test_cli_export_of_a_registry_model(tmp_path, capsys):
    out = tmp_path / "exp"
    code = main(
        [
            "export",
            "ds_cnn_s",
            "--data",
            "synthetic",
            "--data-kw",
            "input_shape=[1,20,10]",
            "num_samples=64",
            "--calibration-rows",
            "64",
            "--all-ncodebooks",
            "2",
            "--exclude",
            "blocks.*",
            "--out",
            str(out),
            "--vectors",
            "2",
            "--device",
            "cpu",
        ]
    )
    text = capsys.readouterr().out
    assert code == 0, text
    assert "agree bit for bit" in text and "numpy datapath network: 2/2" in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["dataset"] == "synthetic" and manifest["source"]["model"] == "ds_cnn_s"
    assert main(["hw-check", str(out), "--end-to-end"]) == 0
