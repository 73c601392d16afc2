"""Bad input to ``maddnet retrain`` (and the APIs behind it) gives one clear error line."""

from __future__ import annotations

import pytest
import torch

from maddnet.cli import main
from maddnet.cli_args import resolve_device
from maddnet.data import create_dataset
from maddnet.models import create_model
from maddnet.nn import MaddConfig
from maddnet.nn.spec import LayerSpec

BASE = ["retrain", "--model", "resnet9", "--data", "digits", "--model-kw", "width=4"]
RUN = ["--threads", "1", "--no-progress", "--device", "cpu"]


def error_line(argv: list[str], capsys) -> str:
    """The one stderr line of a command that must fail with exit code 2."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("maddnet retrain: error: ")
    return lines[0]


# ---------------------------------------------------------------------------- 1: no checkpoint
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["retrain", "--model", "resnet99", "--data", "digits"], "unknown model 'resnet99'"),
        (["retrain", "--model", "resnet9", "--data", "digitz"], "unknown data set 'digitz'"),
        (
            ["retrain", "--model", "resnet9", "--data", "digits", "--model-kw", "widht=4"],
            "no argument 'widht'",
        ),
        (BASE + ["--data-kw", "foo=1"], "data set 'digits' takes no argument 'foo'; its arguments: seed"),
        (BASE + ["--ncodebooks", "nolayer=4"], "ncodebooks names ['nolayer']"),
        (BASE + ["--encoder-option", "foo=1"], "takes no option 'foo'; its options:"),
        (BASE + ["--layers", "nomatch*"], "nomatch*"),
    ],
)
def test_without_checkpoint_the_specific_problem_comes_first(argv, expected, capsys):
    line = error_line(argv + ["--device", "cpu"], capsys)
    assert expected in line
    assert "checkpoint" not in line


def test_without_checkpoint_a_good_config_asks_for_the_checkpoint(capsys):
    assert "give the trained dense model as checkpoint" in error_line(BASE + ["--device", "cpu"], capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    line = error_line(BASE + ["--device", "cuda"], capsys)
    assert "device 'cuda' is not available: torch sees no GPU" in line
    with pytest.raises(ValueError, match="torch sees no GPU"):
        resolve_device("cuda")


# ---------------------------------------------------------------------------- 2: building
@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--model-kw", "widht=4"], "model 'resnet9' takes no argument 'widht'"),
        (["--model-kw", "width=-4"], "model 'resnet9' cannot be built with {'width': -4}"),
        (["--model-kw", "width=0"], "model 'resnet9' with {'width': 0} cannot run a batch"),
        (["--data-kw", "foo=1"], "data set 'digits' takes no argument 'foo'"),
        (["--encoder-option", "foo=1"], "encoder 'tree' takes no option 'foo'"),
    ],
)
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_bad_builder_arguments_with_baseline_steps(extra, expected, tmp_path, capsys):
    argv = BASE + extra + ["--baseline-steps", "1", "--out", str(tmp_path)] + RUN
    assert expected in error_line(argv, capsys)


def test_builders_turn_type_and_runtime_errors_into_value_errors():
    with pytest.raises(ValueError, match=r"'widht'.*its arguments: width, \*\*kwargs") as info:
        create_model("resnet9", widht=4)
    assert isinstance(info.value.__cause__, TypeError)
    with pytest.raises(ValueError, match="negative dimension") as info:
        create_model("resnet9", width=-4)
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(ValueError, match="data set 'digits' takes no argument 'foo'; its arguments: seed"):
        create_dataset("digits", foo=1)
    with pytest.raises(KeyError, match="unknown data set"):
        create_dataset("digitz")


def test_layer_spec_checks_encoder_options():
    with pytest.raises(ValueError, match="no option 'foo'; its options: .*ncandidates"):
        LayerSpec(encoder_options={"foo": 1})
    # an argument a field sets is the field's (given twice, learning failed with a TypeError)
    with pytest.raises(ValueError, match="ncandidates of encoder 'tree' is set by the LayerSpec field"):
        LayerSpec(encoder_options={"ncandidates": 2})
    with pytest.raises(ValueError, match="ntargets"):
        LayerSpec(encoder="tree-global", encoder_options={"ntargets": 0})
    assert (
        LayerSpec(encoder="tree-global", encoder_options={"ntargets": 2}).encoder_config(3)["ntargets"] == 2
    )


# ---------------------------------------------------------------------------- 3: ncodebooks
def test_ncodebooks_must_name_selected_layers_and_be_positive_ints():
    model = create_model("resnet9", width=4)
    with pytest.raises(ValueError, match=r"ncodebooks names \['zzz'\]"):
        MaddConfig(ncodebooks={"zzz": 4}).select(model)
    with pytest.raises(ValueError, match=r"ncodebooks names \['fc'\]"):
        MaddConfig(ncodebooks={"fc": 4}, exclude=["fc"]).select(model)
    assert "fc" in MaddConfig(ncodebooks={"fc": 4}).select(model)
    for bad in (2.5, 0, -2, True, {"fc": 0}, "4"):
        with pytest.raises(ValueError, match="ncodebooks"):
            MaddConfig(ncodebooks=bad)
    MaddConfig(ncodebooks=lambda name, module: 1)


# ---------------------------------------------------------------------------- 4: calibration rows
def test_too_few_calibration_rows_fail_before_step_one(tmp_path, capsys):
    # fc gets one row per sample: 2 batches of 8 give 16 rows, fewer than min_rows = 256
    argv = BASE + ["--layers", "fc", "--calib-batches", "2", "--batch-size", "8", "--baseline-steps", "1"]
    line = error_line(argv + ["--out", str(tmp_path)] + RUN, capsys)
    assert "layer 'fc' gets 1 rows per sample" in line
    assert "--calib-batches 32 or --batch-size 128" in line
    assert not (tmp_path / "checkpoint.pt").exists()
    # the corrected config is accepted in the same folder
    argv = BASE + ["--layers", "fc", "--calib-batches", "32", "--batch-size", "8", "--baseline-steps", "1"]
    argv += ["--steps-per-layer", "0", "--final-steps", "0", "--out", str(tmp_path)] + RUN
    assert main(argv) == 0
