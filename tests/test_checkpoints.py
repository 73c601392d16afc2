"""Reading checkpoints: retrain run checkpoints where a dense model is needed, converted
models in ``maddnet eval``, and one clear error for missing, corrupt or wrong files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from maddnet.amm import MaddnessMatmul
from maddnet.cli import main
from maddnet.models import create_model, load_weights
from maddnet.nn import MaddConfig, conversion_plan, convert, load_converted, save_converted
from maddnet.train import load_checkpoint, save_checkpoint

READABLE = "is not a readable checkpoint (truncated or not a torch.save file)"
EVAL = ["eval", "--model", "resnet9", "--data", "digits", "--model-kw", "width=4", "--checkpoint"]


def dense_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("resnet9", 10, 1, width=4).eval()


def converted_model() -> torch.nn.Module:
    """resnet9 width 4 with its head converted (a stand-in for a retrain step)."""
    model = dense_model()
    torch.manual_seed(1)
    convert(model, [torch.randn(64, 1, 8, 8)], MaddConfig(layers=["fc"], min_rows=16), check_training=False)
    return model.eval()


@pytest.fixture(scope="module")
def retrain_checkpoint(tmp_path_factory) -> Path:
    """A ``maddnet retrain`` run's checkpoint.pt: converted model + dense model of step 0."""
    path = tmp_path_factory.mktemp("run") / "checkpoint.pt"
    model = converted_model()
    save_checkpoint(
        path,
        {
            "next_step": 2,
            "order": ["fc"],
            "plan": conversion_plan(model),
            "state_dict": model.state_dict(),
            "dense_state": dense_model().state_dict(),
        },
    )
    return path


def test_fixture_holds_madd_keys(retrain_checkpoint):
    saved = torch.load(retrain_checkpoint, weights_only=False)
    assert any(k.endswith(".lut") for k in saved["state_dict"])
    assert saved["plan"]["layers"]


# ---------------------------------------------------------------- retrain checkpoints, dense
def test_retrain_checkpoint_gives_its_dense_model(retrain_checkpoint):
    model = create_model("resnet9", 10, 1, width=4, checkpoint=retrain_checkpoint)
    reference = dense_model().state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())


def test_madd_state_dict_where_dense_is_needed_is_a_clear_error(tmp_path, retrain_checkpoint):
    saved = torch.load(retrain_checkpoint, weights_only=False)
    bare = tmp_path / "converted_state.pt"
    torch.save(saved["state_dict"], bare)
    converted = tmp_path / "converted.pt"
    save_converted(converted_model(), converted)
    for path in (bare, converted):
        with pytest.raises(ValueError, match="holds a converted \\(MADD\\) model, not dense weights") as info:
            create_model("resnet9", 10, 1, width=4, checkpoint=path)
        assert str(path) in str(info.value)


def test_state_dict_of_another_model_names_the_file(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(create_model("resnet9", 10, 1, width=8).state_dict(), path)
    with pytest.raises(ValueError, match="other.pt"):
        create_model("resnet9", 10, 1, width=4, checkpoint=path)
    torch.save({"model": {"extra": torch.zeros(1), **dense_model().state_dict()}}, path)
    with pytest.raises(ValueError, match="other.pt does not fit the model: unexpected extra"):
        create_model("resnet9", 10, 1, width=4, checkpoint=path)


# ---------------------------------------------------------------- maddnet eval
def test_eval_of_retrain_checkpoint_evaluates_the_converted_model(retrain_checkpoint, tmp_path, capsys):
    assert main([*EVAL, str(retrain_checkpoint)]) == 0
    converted = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert converted["evaluated"] == "converted" and converted["samples"] == 359

    dense = tmp_path / "dense.pt"
    torch.save(dense_model().state_dict(), dense)
    assert main([*EVAL, str(dense)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["evaluated"] == "dense"


# ---------------------------------------------------------------- corrupt and missing files
def bad_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"model": dense_model().state_dict()})
    files = {
        "text": tmp_path / "notpt.pt",
        "truncated": tmp_path / "truncated.pt",
        "empty": tmp_path / "empty.pt",
    }
    files["text"].write_text("garbage\n")
    files["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    files["empty"].write_bytes(b"")
    return files


LOADERS = {
    "create_model": lambda path: create_model("resnet9", 10, 1, width=4, checkpoint=path),
    "load_weights": lambda path: load_weights(dense_model(), path),
    "load_checkpoint": load_checkpoint,
    "MaddnessMatmul.load": MaddnessMatmul.load,
    "load_converted": lambda path: load_converted(dense_model(), path),
}


@pytest.mark.parametrize("loader", list(LOADERS))
def test_corrupt_and_missing_files_raise_one_clear_error(loader, tmp_path):
    for kind, path in bad_files(tmp_path).items():
        with pytest.raises(ValueError) as info:
            LOADERS[loader](path)
        message = str(info.value)
        assert message.startswith(f"{path} {READABLE}: "), (kind, message)
        assert "weights_only" not in message and "\n" not in message
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        LOADERS[loader](tmp_path / "missing.pt")


@pytest.mark.parametrize("kind", ["text", "truncated", "empty", "missing"])
def test_eval_cli_on_a_bad_checkpoint_gives_one_error_line(kind, tmp_path, capsys):
    path = bad_files(tmp_path).get(kind, tmp_path / "missing.pt")
    assert main([*EVAL, str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("maddnet eval: error: ") and str(path) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_wrong_kind_of_file_for_estimator_and_converted_loaders(tmp_path):
    path = tmp_path / "dense.pt"
    torch.save(dense_model().state_dict(), path)
    with pytest.raises(ValueError, match="not an estimator saved by MaddnessMatmul.save"):
        MaddnessMatmul.load(path)
    with pytest.raises(ValueError, match="not a converted model"):
        load_converted(dense_model(), path)
