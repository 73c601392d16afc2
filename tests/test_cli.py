"""The ``maddnet`` command line: shared flags, LayerSpec flags, config files, validation, help."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maddnet.cli import build_parser, main
from maddnet.cli_args import (
    add_spec_arguments,
    load_config_file,
    parse_key_values,
    parse_layer_codebooks,
    resolve_device,
    spec_dest,
    spec_from_args,
)
from maddnet.nn.spec import LayerSpec
from maddnet.retrain.cli import config_from_args
from maddnet.retrain.config import RetrainConfig, migrate_flat_spec

ROOT = Path(__file__).resolve().parents[1]
RETRAIN = ["retrain", "--model", "resnet9", "--data", "digits", "--baseline-steps", "5"]
ANALYZE = ["analyze", "--model", "resnet9", "--data", "digits", "--checkpoint", "w.pt"]


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def retrain_config(argv: list[str]) -> RetrainConfig:
    return config_from_args(parse(argv))


# ---------------------------------------------------------------------------- KEY=VALUE
def test_key_values_are_json_with_string_fallback():
    pairs = ["a=1", "b=x", "c=[1,2]", "d=true", "e=null", "f=a=b", "g=", "a=2.5"]
    assert parse_key_values(pairs, "--model-kw") == {
        "a": 2.5,
        "b": "x",
        "c": [1, 2],
        "d": True,
        "e": None,
        "f": "a=b",
        "g": "",
    }
    assert parse_key_values(None) == {}
    for bad in ("width", "=3", " =3"):
        with pytest.raises(ValueError, match=f"--model-kw takes KEY=VALUE pairs, got '{bad}'"):
            parse_key_values([bad], "--model-kw")
    assert parse_layer_codebooks(["fc=32", "prep.0=9"]) == {"fc": 32, "prep.0": 9}
    for bad in ("fc=0", "fc=x", "fc=2.5", "fc=true"):
        with pytest.raises(ValueError, match="--ncodebooks takes LAYER=C with C a positive integer"):
            parse_layer_codebooks([bad])
    with pytest.raises(ValueError, match="--ncodebooks takes LAYER=C pairs, got 'fc'"):
        parse_layer_codebooks(["fc"])


@pytest.mark.parametrize(
    "argv, option",
    [
        (RETRAIN + ["--model-kw", "width"], "--model-kw"),
        (RETRAIN + ["--data-kw", "subset"], "--data-kw"),
        (RETRAIN + ["--ncodebooks", "fc"], "--ncodebooks"),
        (RETRAIN + ["--encoder-option", "depth"], "--encoder-option"),
        (ANALYZE + ["--model-kw", "width"], "--model-kw"),
        (ANALYZE + ["--encoder-option", "x"], "--encoder-option"),
        (["train", "--model", "resnet9", "--data", "digits", "--model-kw", "width"], "--model-kw"),
        (
            ["eval", "--model", "resnet9", "--data", "digits", "--checkpoint", "w.pt", "--data-arg", "x"],
            "--data-kw",
        ),
    ],
)
def test_malformed_pairs_end_in_one_error_line(argv, option, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    command = argv[0]
    assert err.startswith(f"maddnet {command}: error: {option} takes ") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------- help texts
def test_every_option_of_every_sub_command_has_help():
    parser = build_parser()
    commands = subparsers(parser)
    assert set(commands) == {
        "demo",
        "retrain",
        "analyze",
        "amm",
        "train",
        "eval",
        "energy",
        "export",
        "hw-check",
    }
    missing = []
    for name, sub in [("maddnet", parser), *commands.items()]:
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not (action.help and action.help.strip()) or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"options without help: {missing}"
    for sub in commands.values():
        sub.format_help()  # every help string formats (no stray % signs)


# ---------------------------------------------------------------------------- LayerSpec flags
NON_DEFAULT_SPEC = {
    "nprototypes": (["-K", "32"], 32),
    "encoder": (["--encoder", "tree"], "tree"),
    # tree-global's own options (the tree has none beyond its fields): tested on their own below
    "encoder_options": (
        ["--encoder-option", "ntargets=8", "hash_objective=input", "--encoder-option", "refine_sweeps=1"],
        {"ntargets": 8, "hash_objective": "input", "refine_sweeps": 1},
    ),
    "ridge": (["--ridge", "none"], None),
    "ncandidates": (["--ncandidates", "6"], 6),
    "hash_objective": (["--hash-objective", "input"], "input"),
    "refine_sweeps": (["--refine-sweeps", "0"], 0),
    "channel_budget": (["--channel-budget", "0.5"], 0.5),
    "lut_bits": (["--lut-bits", "0"], None),
    "lut_granularity": (["--lut-granularity", "column"], "column"),
    "qat": (["--no-qat"], False),
    "surrogate": (["--surrogate", "path"], "path"),
    "temperature": (["--temperature", "0.25"], 0.25),
}


def test_the_flag_table_covers_every_layerspec_field():
    assert set(NON_DEFAULT_SPEC) == {f.name for f in dataclasses.fields(LayerSpec)}


@pytest.mark.parametrize("command", ["retrain", "analyze"])
def test_every_layerspec_field_is_a_flag_with_its_help(command):
    sub = subparsers(build_parser())[command]
    by_dest = {a.dest: a for a in sub._actions}
    for name, text in LayerSpec.field_help().items():
        action = by_dest[spec_dest(name)]
        assert text.replace("%", "%%") in action.help
        assert action.default is argparse.SUPPRESS  # not given: LayerSpec's (or the file's) value


def test_spec_flags_set_every_field_in_retrain_and_analyze():
    tree = {name: entry for name, entry in NON_DEFAULT_SPEC.items() if name != "encoder_options"}
    flags = [flag for values, _ in tree.values() for flag in values]
    expected = LayerSpec(**{name: value for name, (_, value) in tree.items()})
    assert retrain_config(RETRAIN + flags).spec == expected
    assert retrain_config(RETRAIN + flags).madd_config().spec == expected
    assert spec_from_args(parse(ANALYZE + flags)) == expected
    # with nothing given both are LayerSpec's defaults, so a plain command behaves as before
    assert retrain_config(RETRAIN).spec == LayerSpec()
    assert spec_from_args(parse(ANALYZE)) == LayerSpec()
    assert retrain_config(RETRAIN + ["--lut-bits", "none", "--ridge", "0.5"]).spec == LayerSpec(
        lut_bits=None, ridge=0.5
    )


def test_encoder_option_flags_reach_the_spec():
    flags, options = NON_DEFAULT_SPEC["encoder_options"]
    expected = LayerSpec(encoder="tree-global", encoder_options=options)
    assert retrain_config(RETRAIN + ["--encoder", "tree-global", *flags]).spec == expected
    assert spec_from_args(parse(ANALYZE + ["--encoder", "tree-global", *flags])) == expected


def test_spec_values_argparse_cannot_check_are_checked_by_layerspec(capsys):
    with pytest.raises(ValueError, match="ncandidates"):
        spec_from_args(argparse.Namespace(**{spec_dest("ncandidates"): 0}))
    parser = argparse.ArgumentParser()
    add_spec_arguments(parser)
    assert spec_from_args(parser.parse_args([])) == LayerSpec()
    assert spec_from_args(parser.parse_args(["--qat"]), LayerSpec(qat=False)).qat is True


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "argv, flag",
    [
        (ANALYZE + ["--widths", "0"], "--widths"),
        (ANALYZE + ["--widths", "-9"], "--widths"),
        (ANALYZE + ["--widths", "nan"], "--widths"),
        (ANALYZE + ["--calib-batches", "0"], "--calib-batches"),
        (ANALYZE + ["--batch-size", "0"], "--batch-size"),
        (ANALYZE + ["--eval-samples", "0"], "--eval-samples"),
        (ANALYZE + ["--max-rows", "0"], "--max-rows"),
        (ANALYZE + ["-K", "12"], "--nprototypes/-K"),
        (ANALYZE + ["--lut-bits", "9"], "--lut-bits"),
        (ANALYZE + ["--temperature", "0"], "--temperature"),
        (ANALYZE + ["--threads", "0"], "--threads"),
        (ANALYZE + ["--device", "gpu7"], "--device"),
        (RETRAIN + ["--calib-batches", "0"], "--calib-batches"),
        (RETRAIN + ["--steps-per-layer", "-1"], "--steps-per-layer"),
        (RETRAIN + ["--lr-lut", "-0.1"], "--lr-lut"),
        (RETRAIN + ["--distill", "1.5"], "--distill"),
        (RETRAIN + ["--label-smoothing", "1"], "--label-smoothing"),
        (RETRAIN + ["--batch-size", "0"], "--batch-size"),
        (RETRAIN + ["--all-ncodebooks", "0"], "--all-ncodebooks"),
        (RETRAIN + ["--ridge", "-1"], "--ridge"),
        (RETRAIN + ["--ncandidates", "0"], "--ncandidates"),
        (RETRAIN + ["--surrogate", "hard"], "--surrogate"),
        (["demo", "--threads", "0"], "--threads"),
        (["amm", "-C", "0"], "--ncodebooks/-C"),
        (["amm", "-K", "5"], "--nprototypes/-K"),
        (["train", "--model", "resnet9", "--data", "digits", "--lr", "-1"], "--lr"),
        (["train", "--model", "resnet9", "--data", "digits", "--epochs", "0"], "--epochs"),
        (
            ["eval", "--model", "resnet9", "--data", "digits", "--checkpoint", "w", "--batch-size", "0"],
            "--batch-size",
        ),
    ],
)
def test_bad_numbers_are_rejected_with_the_error_line(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"maddnet {argv[0]}: error: argument {flag}" in err and "Traceback" not in err


def test_config_level_checks_catch_what_a_config_file_gives(tmp_path, capsys):
    for bad in (
        {"lr_lut": -1.0},
        {"calib_batches": 0},
        {"eval_samples": 0},
        {"seed": -1},
        {"ncodebooks": {"fc": 0}},
        {"momentum": float("inf")},
        {"eval_split": "dev"},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            RetrainConfig(model="m", dataset="d", baseline_steps=1, **bad)
    path = tmp_path / "bad.yaml"
    path.write_text("model: resnet9\ndataset: digits\nbaseline_steps: 1\nbatch_size: 0\n")
    assert main(["retrain", "--config", str(path)]) == 2
    assert capsys.readouterr().err.strip() == "maddnet retrain: error: batch_size must be an int >= 1, got 0"


# ---------------------------------------------------------------------------- config files
YAML_CONFIG = """\
model: resnet9
dataset: digits
model_kwargs: {width: 4}
baseline_steps: 40
steps_per_layer: 3
distill: 0.25
ncodebooks: {fc: 8}
device: cpu
spec:
  nprototypes: 8
  lut_bits: null
  temperature: 0.3
  encoder: tree-global
  encoder_options: {ntargets: 4}
"""


def test_config_file_yaml_and_json_with_flags_that_override(tmp_path):
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text(YAML_CONFIG)
    json_path = tmp_path / "run.json"
    values = load_config_file(yaml_path)
    json_path.write_text(json.dumps(values))
    assert load_config_file(json_path) == values
    for path in (yaml_path, json_path):
        config = retrain_config(["retrain", "--config", str(path)])
        assert (config.model, config.dataset, config.model_kwargs) == ("resnet9", "digits", {"width": 4})
        assert config.steps_per_layer == 3 and config.distill == 0.25 and config.device == "cpu"
        assert config.final_steps == 500  # neither file nor flag: RetrainConfig's default
        assert config.spec == LayerSpec(
            nprototypes=8,
            lut_bits=None,
            temperature=0.3,
            encoder="tree-global",
            encoder_options={"ntargets": 4},
        )
    config = retrain_config(
        [
            "retrain",
            "--config",
            str(yaml_path),
            "--steps-per-layer",
            "7",
            "--model-kw",
            "depth=2",
            "--lut-bits",
            "4",
            "--encoder-option",
            "refine_sweeps=1",
            "--ncodebooks",
            "layer2.0=4",
            "--out",
            "x",
        ]
    )
    assert config.steps_per_layer == 7 and config.distill == 0.25 and config.out_dir == "x"
    assert config.model_kwargs == {"width": 4, "depth": 2}  # merged key by key
    assert config.ncodebooks == {"fc": 8, "layer2.0": 4}
    assert config.spec == LayerSpec(
        nprototypes=8,
        lut_bits=4,
        temperature=0.3,
        encoder="tree-global",
        encoder_options={"ntargets": 4, "refine_sweeps": 1},
    )
    assert retrain_config(["retrain", "--config", str(yaml_path), "--all-ncodebooks", "3"]).ncodebooks == 3
    flip = retrain_config(["retrain", "--config", str(yaml_path), "--freeze-replaced", "--no-progress"])
    assert flip.train_replaced is False and flip.progress is False


def test_config_file_errors(tmp_path, capsys):
    (tmp_path / "no_model.yaml").write_text("dataset: digits\nbaseline_steps: 1\n")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "typo.yaml").write_text("model: resnet9\ndataset: digits\nbaseline_step: 1\n")
    (tmp_path / "both.yaml").write_text(
        "model: m\ndataset: d\nbaseline_steps: 1\nqat: false\nspec: {qat: true}\n"
    )
    expected = {
        "no_model.yaml": "give --model (or 'model' in the --config file)",
        "list.json": "must hold a mapping of settings",
        "broken.json": "is not valid JSON",
        "typo.yaml": "unknown RetrainConfig keys ['baseline_step']",
        "both.yaml": "given both at the top level and in the spec section",
        "missing.json": "does not exist",
    }
    for name, message in expected.items():
        assert main(["retrain", "--config", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("maddnet retrain: error: ") and message in err, err
    # the file may leave --model to the command line
    config = retrain_config(["retrain", "--config", str(tmp_path / "no_model.yaml"), "--model", "resnet9"])
    assert config.model == "resnet9"


# ---------------------------------------------------------------------------- old config.json files
OLD_RUNS = sorted(ROOT.glob("results/**/config.json"))
OLD_RETRAIN_RUNS = [p for p in OLD_RUNS if "steps_per_layer" in json.loads(p.read_text())]


def test_old_flat_config_is_migrated_into_the_spec_section():
    old = {
        "model": "m",
        "dataset": "d",
        "baseline_steps": 1,
        "nprototypes": 32,
        "lut_bits": None,
        "lut_granularity": "column",
        "ridge": None,
        "qat": False,
        "temperature": None,
    }
    config = RetrainConfig.from_dict(old)
    assert config.spec == LayerSpec(
        nprototypes=32, lut_bits=None, lut_granularity="column", ridge=None, qat=False
    )  # temperature None: the default, 0.5
    assert config.spec.temperature == 0.5
    assert "nprototypes" not in config.to_dict() and config.to_dict()["spec"]["nprototypes"] == 32
    assert RetrainConfig.from_dict(config.to_dict()) == config
    assert migrate_flat_spec({"a": 1}) == {"a": 1}
    assert RetrainConfig.from_dict({**old, "temperature": 0.2}).spec.temperature == 0.2


@pytest.mark.parametrize("path", OLD_RETRAIN_RUNS, ids=lambda p: str(p.parent.relative_to(ROOT / "results")))
def test_committed_run_configs_load_round_trip_and_compare(path, tmp_path):
    saved = json.loads(path.read_text())
    config = RetrainConfig.load(path)
    if "spec" in saved:  # a run since the spec section
        assert config.spec == LayerSpec.from_saved(saved["spec"])
        if "refine_sweeps" not in saved["spec"] and config.spec.encoder == "tree":  # saved before it
            options = saved["spec"].get("encoder_options") or {}
            assert config.spec.hash_objective == saved["spec"].get("hash_objective", "input")
            assert config.spec.refine_sweeps == options.get("refine_sweeps", 0)
    else:  # the flat fields of older runs, the rest of the spec at its defaults then
        fields = ("nprototypes", "lut_bits", "lut_granularity", "ridge", "qat")
        then = {"hash_objective": "input", "refine_sweeps": 0}
        assert config.spec == LayerSpec(**{f: saved[f] for f in fields}, **then)
    config.save(tmp_path / "config.json")
    assert RetrainConfig.load(tmp_path / "config.json") == config
    assert config.differences(RetrainConfig.load(tmp_path / "config.json")) == {}
    # the same file as a --config, with the tree settings a field it lacks now defaults to
    # given as flags: the same run
    spec = config.spec
    trees = ["--hash-objective", spec.hash_objective, "--refine-sweeps", str(spec.refine_sweeps)]
    trees = trees if spec.encoder == "tree" else []
    if spec.encoder == "tree-global" and saved["spec"].get("hash_objective") == "input":
        # its file says hash_objective "input" (the tree's default then) beside tree-global's
        # own option of that name: refused as a config file, not silently read as "output"
        with pytest.raises(ValueError, match="configure the tree encoder"):
            retrain_config(["retrain", "--config", str(path)])
        return
    assert retrain_config(["retrain", "--config", str(path), *trees]).differences(config) == {}


def test_the_experiment_command_still_matches_its_committed_run():
    """An old run folder compares equal to the command that made it (so it resumes)."""
    path = ROOT / "results/resnet9_fashion_mnist/retrain_wide_long/config.json"
    if not path.exists():
        pytest.skip("results not checked out")
    wide = [
        "prep.0=9",
        "layer1.0.0=32",
        "layer1.1.res1.0=64",
        "layer1.1.res2.0=64",
        "layer2.0=64",
        "layer3.0.0=128",
        "layer3.1.res1.0=256",
        "layer3.1.res2.0=256",
        "fc=32",
    ]
    argv = [
        "retrain",
        "--model",
        "resnet9",
        "--model-kw",
        "width=16",
        "--data",
        "fashion_mnist",
        "--checkpoint",
        "results/baselines/resnet9_fashion_mnist/checkpoint.pt",
        "--threads",
        "1",
        "--no-progress",
        "--steps-per-layer",
        "400",
        "--final-steps",
        "2000",
        "--batch-size",
        "128",
        "--eval-samples",
        "2000",
        "--distill",
        "0.5",
        "--ncodebooks",
        *wide,
        "--out",
        "results/resnet9_fashion_mnist/retrain_wide_long",
    ]
    # the experiment script pins MADDness's trees, the default when the run was made
    saved = RetrainConfig.load(path)
    assert retrain_config(argv).differences(saved) == {
        "spec.hash_objective": ("output", "input"),
        "spec.refine_sweeps": (1, 0),
    }
    argv += ["--hash-objective", "input", "--refine-sweeps", "0"]
    assert retrain_config(argv).differences(saved) == {}
    other = retrain_config(argv + ["--temperature", "0.3", "--seed", "1"])
    assert other.differences(RetrainConfig.load(path)) == {"seed": (1, 0), "spec.temperature": (0.3, 0.5)}


# ---------------------------------------------------------------------------- device, threads, progress
def test_one_device_default_everywhere():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").split(":")[0] == expected == resolve_device(None).split(":")[0]
    assert resolve_device("cpu") == "cpu"
    commands = subparsers(build_parser())
    for name, sub in commands.items():
        by_option = {o: a for a in sub._actions for o in a.option_strings}
        if name not in ("amm", "hw-check"):  # amm times CPU kernels; hw-check runs numpy
            assert "auto" in by_option["--device"].help, name
        assert "--threads" in by_option and "--no-progress" in by_option, name
        assert by_option["--no-progress"].dest == "progress", name
    assert parse(ANALYZE).device == "auto" and parse(["demo"]).device == "auto"
    assert retrain_config(RETRAIN).device.split(":")[0] == expected
    assert retrain_config(RETRAIN + ["--device", "cpu"]).device == "cpu"
    auto = RetrainConfig(model="m", dataset="d", baseline_steps=1, device="auto")
    assert auto.device.split(":")[0] == expected


def test_train_cli_shares_the_pair_parser_and_config_files(tmp_path):
    from maddnet.train.cli import config_from_args as train_config

    path = tmp_path / "train.yaml"
    path.write_text("epochs: 2\nlr: 0.01\nmodel_kwargs: {width: 8}\n")
    args = parse(
        [
            "train",
            "--model",
            "resnet9",
            "--data",
            "digits",
            "--config",
            str(path),
            "--model-kw",
            "width=4",
            "--data-arg",
            "subset=10",
            "--lr",
            "0.02",
            "--no-progress",
            "--threads",
            "2",
        ]
    )
    config = train_config(args)
    assert (config.epochs, config.lr, config.threads, config.progress) == (2, 0.02, 2, False)
    assert config.model_kwargs == {"width": 4} and config.dataset_kwargs == {"subset": 10}
    assert config.device == "auto"


def test_train_module_entry_point_reports_bad_input_in_one_line(capsys):
    from maddnet.train.cli import main as train_main

    assert train_main(["train", "--model", "resnet9", "--data", "digits", "--model-arg", "w"]) == 2
    assert capsys.readouterr().err.startswith("python -m maddnet.train.cli train: error: --model-kw takes")


# ---------------------------------------------------------------------------- end to end
# These run the real pipeline (maddnet.nn, maddnet.amm); the parsing tests above do not.
@pytest.fixture
def tiny_checkpoint(tmp_path):
    pytest.importorskip("sklearn")
    from maddnet.models import create_model

    torch.manual_seed(0)
    path = tmp_path / "r9.pt"
    torch.save(create_model("resnet9", num_classes=10, in_chans=1, width=4).state_dict(), path)
    return path


def test_analyze_end_to_end_with_spec_flags(tiny_checkpoint, tmp_path, capsys, one_torch_thread):
    argv = [
        "analyze",
        "--model",
        "resnet9",
        "--model-kw",
        "width=4",
        "--data",
        "digits",
        "--checkpoint",
        str(tiny_checkpoint),
        "--layers",
        "fc",
        "layer2*",
        "--exclude",
        "layer2.1*",
        "--widths",
        "4",
        "8",
        "--calib-batches",
        "2",
        "--lut-bits",
        "0",
        "--surrogate",
        "path",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--no-progress",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 0
    result = json.loads((tmp_path / "out" / "single_layer.json").read_text())
    assert {r["layer"] for r in result["rows"]} == {"fc", "layer2.0"}
    assert result["settings"]["spec"] == LayerSpec(lut_bits=None, surrogate="path").to_dict()
    assert main(argv[:-2] + ["--layers", "nothing*", "--out", str(tmp_path / "x")]) == 2
    assert "--layers pattern 'nothing*' matches no conv/linear layer" in capsys.readouterr().err


def test_analyze_resumes_and_refuses_other_weights(tiny_checkpoint, tmp_path, capsys, one_torch_thread):
    """Finished cells are kept in --out: a rerun with another width computes only the new
    cells; the same --out with other weights at the same path is refused."""
    out = tmp_path / "out"
    argv = ["analyze", "--model", "resnet9", "--model-kw", "width=4", "--data", "digits"]
    argv += [
        "--checkpoint",
        str(tiny_checkpoint),
        "--layers",
        "fc",
        "--calib-batches",
        "2",
        "--device",
        "cpu",
    ]
    argv += ["--threads", "1", "--no-progress", "--out", str(out)]
    assert main(argv + ["--widths", "4"]) == 0
    lines = (out / "cells.rank0.jsonl").read_text().splitlines()
    assert [json.loads(line)["C"] for line in lines] == [8]  # fc: D = 32
    assert main(argv + ["--widths", "4", "8"]) == 0
    lines = (out / "cells.rank0.jsonl").read_text().splitlines()
    assert [json.loads(line)["C"] for line in lines] == [8, 4]  # only C = 4 was computed
    result = json.loads((out / "single_layer.json").read_text())
    assert [(r["layer"], r["C"]) for r in result["rows"]] == [("fc", 8), ("fc", 4)]
    state = torch.load(tiny_checkpoint)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, tiny_checkpoint)
    capsys.readouterr()
    assert main(argv + ["--widths", "4"]) == 2
    err = capsys.readouterr().err
    assert (
        "finished single-layer cells were computed with other settings (differing: checkpoint_sha256)" in err
    )


@pytest.mark.slow
def test_analyze_zero_arguments_in_a_subprocess(tiny_checkpoint, tmp_path):
    """The field case: bad numbers end with the error line and exit code 2, no traceback."""
    base = [
        sys.executable,
        "-m",
        "maddnet.cli",
        "analyze",
        "--model",
        "resnet9",
        "--model-kw",
        "width=4",
        "--data",
        "digits",
        "--checkpoint",
        str(tiny_checkpoint),
        "--threads",
        "1",
        "--no-progress",
        "--layers",
        "fc",
        "--out",
        str(tmp_path / "out"),
    ]
    # one process (the field case's numbers); the other bad numbers are checked in-process
    # by test_bad_numbers_are_rejected_with_the_error_line's table above
    proc = subprocess.run(base + ["--widths", "0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("maddnet analyze: error: argument")


def test_retrain_end_to_end_from_a_config_file_with_flag_overrides(tmp_path, one_torch_thread):
    pytest.importorskip("sklearn")
    config_path = tmp_path / "run.yaml"
    config_path.write_text(
        "model: resnet9\nmodel_kwargs: {width: 4}\ndataset: digits\nbaseline_steps: 20\n"
        "layers: [fc]\nsteps_per_layer: 1\nfinal_steps: 1\nbatch_size: 32\ncalib_batches: 10\n"
        "device: cpu\nthreads: 1\nprogress: false\nspec: {lut_bits: 4, temperature: 0.3}\n"
    )
    out = tmp_path / "run"
    argv = ["retrain", "--config", str(config_path), "--surrogate", "path", "--out", str(out)]
    assert main(argv) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["spec"] == LayerSpec(lut_bits=4, temperature=0.3, surrogate="path").to_dict()
    assert saved["layers"] == ["fc"] and "lut_bits" not in saved
    assert main(argv) == 0  # the same command again: the finished run resumes, nothing differs


def test_amm_sweep_end_to_end(tmp_path, capsys):
    pytest.importorskip("sklearn")
    assert (
        main(
            [
                "amm",
                "-C",
                "4",
                "999",
                "-K",
                "16",
                "--lut-bits",
                "0",
                "--ridge",
                "none",
                "--no-speed",
                "--threads",
                "1",
                "--no-progress",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "amm_digits.json").read_text())["results"]
    assert [r["C"] for r in rows] == [4] and rows[0]["lut_bits"] is None and rows[0]["ridge"] is None
    assert "skipping C = [999]" in capsys.readouterr().out
    assert main(["amm", "-C", "999", "--no-speed", "--out", str(tmp_path)]) == 2


def test_the_config_file_examples_in_the_docs_are_valid(tmp_path):
    import re

    text = (ROOT / "docs" / "retrain.md").read_text()
    blocks = re.findall(r"```(json|yaml)\n(.*?)```", text, flags=re.S)
    assert {kind for kind, _ in blocks} == {"json", "yaml"}
    for index, (kind, body) in enumerate(blocks):
        path = tmp_path / f"example{index}.{kind}"
        path.write_text(body)
        config = retrain_config(["retrain", "--config", str(path)])
        assert config.model == "resnet9" and config.spec != LayerSpec()
