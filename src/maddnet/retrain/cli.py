"""``maddnet retrain`` and ``maddnet demo``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from ..cli_args import (
    add_budget_arguments,
    add_execution_arguments,
    add_spec_arguments,
    budget_from_args,
    fraction,
    fraction_below_one,
    load_config_file,
    non_negative_float,
    non_negative_int,
    parse_key_values,
    parse_layer_codebooks,
    positive_float,
    positive_int,
    resolve_device,
    spec_from_args,
)
from ..data.registry import SPLITS
from ..nn.spec import LayerSpec
from .config import RetrainConfig, migrate_flat_spec


def execute(config: RetrainConfig) -> int:
    from ..nn import summary
    from ..train.distributed import leaving_process_group
    from .pipeline import run_retrain
    from .report import markdown_report, write_report

    start = time.time()
    with leaving_process_group():
        result = run_retrain(config)
    if result["rank"] != 0:
        return 0  # rank 0 writes the report and prints the summary
    saved = json.loads(Path(config.out_dir, "config.json").read_text())
    paths = write_report(config.out_dir, result["rows"], saved)
    if config.codebook_budget is not None:  # the plan the pipeline wrote before learning
        paths.update({f"budget_{k}": Path(config.out_dir, f"budget.{k}") for k in ("json", "md")})
    print()
    summary(result["model"])
    print()
    print(markdown_report(result["rows"], saved))
    print(f"report: {', '.join(str(p) for p in paths.values())}  ({time.time() - start:.0f} s)")
    return 0


# ---------------------------------------------------------------------------- flags -> config
_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(RetrainConfig))


def _merge_mapping(values: dict[str, Any], key: str, pairs: list[str] | None, option: str) -> None:
    """``values[key]`` (a mapping from the file) updated key by key with the flag's pairs."""
    if pairs is not None:
        values[key] = {**(values.get(key) or {}), **parse_key_values(pairs, option)}


def config_values_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The RetrainConfig values of a ``maddnet retrain`` command line: the ``--config`` file
    (flat files of older runs migrated), overridden by the flags that were given."""
    values = migrate_flat_spec(load_config_file(args.config)) if getattr(args, "config", None) else {}
    given = vars(args)
    values.update({key: value for key, value in given.items() if key in _CONFIG_FIELDS})
    _merge_mapping(values, "model_kwargs", given.get("model_kw"), "--model-kw")
    _merge_mapping(values, "dataset_kwargs", given.get("data_kw"), "--data-kw")
    if "ncodebooks_pairs" in given:
        previous = values.get("ncodebooks")
        previous = previous if isinstance(previous, dict) else {}
        values["ncodebooks"] = {**previous, **parse_layer_codebooks(given["ncodebooks_pairs"])}
    if "all_ncodebooks" in given:
        values["ncodebooks"] = given["all_ncodebooks"]
    budget = budget_from_args(args, values.get("codebook_budget"))
    values["codebook_budget"] = None if budget is None else budget.to_dict()
    if "freeze_replaced" in given:
        values["train_replaced"] = not given["freeze_replaced"]
    spec = values.get("spec") or {}
    values["spec"] = spec_from_args(args, spec if isinstance(spec, LayerSpec) else LayerSpec.from_dict(spec))
    values["device"] = resolve_device(values.get("device"))
    for key, flag in (("model", "--model"), ("dataset", "--data")):
        if not values.get(key):
            raise ValueError(f"give {flag} (or {key!r} in the --config file)")
    return values


def config_from_args(args: argparse.Namespace) -> RetrainConfig:
    """RetrainConfig defaults < ``--config`` file < flags given on the command line."""
    return RetrainConfig.from_dict(config_values_from_args(args))


def run_retrain_command(args: argparse.Namespace) -> int:
    return execute(config_from_args(args))


def demo_config(
    out_dir: str = "runs/demo", progress: bool = True, device: str = "auto", threads: int | None = None
) -> RetrainConfig:
    """The README's main job: a ResNet-9 (width 16) on scikit-learn digits, every layer replaced."""
    return RetrainConfig(
        model="resnet9",
        model_kwargs={"width": 16},
        dataset="digits",
        out_dir=out_dir,
        baseline_steps=300,
        steps_per_layer=40,
        final_steps=150,
        batch_size=64,
        calib_batches=16,
        lr_dense=2e-3,
        lr_norm=2e-3,
        lr_lut=2e-3,
        lr_threshold=2e-3,
        distill=0.5,
        device=resolve_device(device),
        threads=threads,
        progress=progress,
    )


def run_demo(args: argparse.Namespace) -> int:
    config = demo_config(args.out, progress=args.progress, device=args.device, threads=args.threads)
    code = execute(config)
    print_energy_summary(config.out_dir)
    return code


def print_energy_summary(run_dir: str) -> None:
    """The energy estimate of a run's network per inference, MADD against dense, at the cost
    model's defaults (45 nm, docs/hardware.md; ``maddnet energy RUN`` for the full report)."""
    from ..hw.energy import estimate
    from ..hw.network import load_network
    from ..hw.report import summary_lines

    data = estimate(load_network(run_dir)).to_dict()
    print()
    print(
        f"energy per inference at {data['cost_model']['technology_nm']:g} nm (estimate, "
        f"docs/hardware.md; full report: maddnet energy {run_dir}):"
    )
    print("\n".join(summary_lines(data)))


# ---------------------------------------------------------------------------- parser
def _default(name: str) -> Any:
    """RetrainConfig's default of field ``name`` (what a flag not given leaves)."""
    spec_field = next(f for f in dataclasses.fields(RetrainConfig) if f.name == name)
    if spec_field.default_factory is not dataclasses.MISSING:
        return spec_field.default_factory()
    return spec_field.default


def _option(group, *flags: str, help: str, field: str | None = None, **kwargs: Any) -> None:
    """A flag whose value is left out of the namespace when not given (so a --config file
    keeps its value); ``field``: show that RetrainConfig field's default in the help."""
    if field is not None:
        default = _default(field)
        help += f" (default: {'none' if default is None else default})"
    group.add_argument(*flags, default=argparse.SUPPRESS, help=help.replace("%", "%%"), **kwargs)


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run")
    _option(
        group,
        "--config",
        metavar="FILE",
        help="JSON or YAML file with a whole run config (RetrainConfig keys, as in a run's config.json); "
        "flags given here override it",
    )
    _option(
        group, "--model", help="model registry name (e.g. resnet9, ds_cnn_s); required unless in --config"
    )
    _option(
        group,
        "--model-kw",
        nargs="+",
        action="extend",
        metavar="KEY=VALUE",
        help="model builder arguments, JSON values (e.g. width=16)",
    )
    _option(
        group,
        "--data",
        dest="dataset",
        metavar="DATA",
        help="data registry name (e.g. fashion_mnist, digits); required unless in --config",
    )
    _option(
        group,
        "--data-kw",
        nargs="+",
        action="extend",
        metavar="KEY=VALUE",
        help="data set builder arguments, JSON values (e.g. subset=1000)",
    )
    _option(group, "--data-root", field="data_root", metavar="DIR", help="folder of the data set")
    _option(
        group,
        "--checkpoint",
        field="checkpoint",
        metavar="FILE",
        help="trained dense weights (maddnet train output or a state dict)",
    )
    _option(
        group,
        "--baseline-steps",
        type=non_negative_int,
        field="baseline_steps",
        help="train the dense model this many steps when no --checkpoint is given",
    )
    _option(
        group,
        "--out",
        dest="out_dir",
        field="out_dir",
        metavar="DIR",
        help="run folder (checkpoint, metrics, report); rerunning the command resumes it",
    )


def _add_layer_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("layers")
    _option(
        group,
        "--layers",
        nargs="+",
        metavar="PATTERN",
        help="fnmatch name patterns of the layers to replace "
        "(default: every Linear and Conv2d with groups=1)",
    )
    _option(group, "--exclude", nargs="+", metavar="PATTERN", help="name patterns kept dense (default: none)")
    _option(
        group,
        "--ncodebooks",
        dest="ncodebooks_pairs",
        nargs="+",
        action="extend",
        metavar="LAYER=C",
        help="C for named layers (others follow the rule; merged into a --config file's mapping)",
    )
    _option(group, "--all-ncodebooks", type=positive_int, metavar="C", help="one C for every layer")
    add_budget_arguments(group, suppress=True)
    _option(
        group,
        "--codebook-width",
        type=positive_int,
        field="codebook_width",
        help="target D/C of linear and 1x1 layers",
    )
    _option(
        group,
        "--fuse",
        action=argparse.BooleanOptionalAction,
        field="fuse",
        help="fold BatchNorm/activations into the MADD layers of the final model (docs/passes.md)",
    )
    _option(
        group,
        "--prune-unread",
        action=argparse.BooleanOptionalAction,
        field="prune_unread",
        help="make producers compute only the channels the MADD layers read (docs/passes.md)",
    )
    _option(
        group,
        "--calib-batches",
        type=positive_int,
        field="calib_batches",
        help="training batches whose activations a layer is learned from",
    )
    _option(
        group, "--max-rows", type=positive_int, field="max_rows", help="rows kept per layer while recording"
    )


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("fine-tuning (a learning rate of 0 freezes its group)")
    _option(
        group,
        "--steps-per-layer",
        type=non_negative_int,
        field="steps_per_layer",
        help="fine-tuning steps after each replacement",
    )
    _option(
        group,
        "--final-steps",
        type=non_negative_int,
        field="final_steps",
        help="fine-tuning steps of everything still trainable at the end",
    )
    _option(
        group,
        "--checkpoint-every",
        type=non_negative_int,
        field="checkpoint_every",
        help="save the final fine-tune's progress every N steps; a rerun continues there (0: off)",
    )
    _option(group, "--optimizer", choices=["adamw", "sgd"], field="optimizer", help="optimiser")
    for name, what in (
        ("dense", "dense conv/linear layers not replaced yet"),
        ("norm", "norm layers and other parameters"),
        ("lut", "LUTs of MADD layers"),
        ("threshold", "thresholds of MADD layers"),
    ):
        _option(
            group,
            f"--lr-{name}",
            type=non_negative_float,
            field=f"lr_{name}",
            help=f"learning rate of the {what}",
        )
    _option(
        group,
        "--weight-decay",
        type=non_negative_float,
        field="weight_decay",
        help="weight decay of the dense weights",
    )
    _option(group, "--momentum", type=fraction, field="momentum", help="SGD momentum")
    _option(
        group,
        "--freeze-replaced",
        action=argparse.BooleanOptionalAction,
        help="freeze the LUT/thresholds of a replaced layer once its step ends (default: keep training)",
    )


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("batches, evaluation and seed")
    _option(group, "--batch-size", type=positive_int, field="batch_size", help="training batch size")
    _option(
        group, "--eval-batch-size", type=positive_int, field="eval_batch_size", help="evaluation batch size"
    )
    _option(
        group,
        "--augment",
        action=argparse.BooleanOptionalAction,
        field="augment",
        help="augment training batches",
    )
    _option(group, "--eval-split", choices=list(SPLITS), field="eval_split", help="split to evaluate on")
    _option(
        group,
        "--eval-samples",
        type=positive_int,
        field="eval_samples",
        help="evaluate intermediate steps on the first N eval samples (dense/final: all)",
    )
    _option(group, "--seed", type=non_negative_int, field="seed", help="seed of data order and recording")


def _add_loss_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("loss and control")
    _option(
        group,
        "--distill",
        type=fraction,
        field="distill",
        help="knowledge-distillation weight in [0, 1] against the dense model's logits",
    )
    _option(
        group,
        "--distill-temperature",
        type=positive_float,
        field="distill_temperature",
        help="distillation temperature T",
    )
    _option(
        group,
        "--label-smoothing",
        type=fraction_below_one,
        field="label_smoothing",
        help="label smoothing of the cross-entropy, in [0, 1)",
    )
    _option(
        group,
        "--recon",
        type=non_negative_float,
        field="recon",
        help="weight of the per-layer reconstruction loss ||madd(x) - dense(x)||^2 / ||dense(x)||^2",
    )
    _option(
        group,
        "--dense-control",
        action=argparse.BooleanOptionalAction,
        field="dense_control",
        help="replace nothing: fine-tune the dense model for the same total number of steps "
        "(layers x steps-per-layer + final-steps) with the same loss, as a control",
    )


def _add_demo_parser(subparsers) -> argparse.ArgumentParser:
    demo = subparsers.add_parser(
        "demo",
        help="retrain a small ResNet-9 on scikit-learn digits with every layer on MADDness",
        description="Train a dense ResNet-9 (width 16) on the built-in 8x8 digits, then replace every "
        "conv and linear layer (stem and classifier too) one by one with MADD layers, fine-tuning after "
        "each, and print the report. Resumes if interrupted (same --out).",
    )
    demo.add_argument("--out", default="runs/demo", help="run folder (checkpoint, metrics, report)")
    add_execution_arguments(demo)
    demo.set_defaults(func=run_demo)
    return demo


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``demo`` and ``retrain``; returns the ``retrain`` parser."""
    _add_demo_parser(subparsers)
    parser = subparsers.add_parser(
        "retrain",
        help="layer-by-layer retraining: replace layers with MADD layers one at a time",
        description="Replace the layers of a trained model with MADD layers in forward order, each "
        "learned on the activations of the current network and followed by fine-tuning; then "
        "fine-tune everything. Writes checkpoint.pt, metrics.jsonl, report.md/json and accuracy.png "
        "to --out; rerunning the same command resumes an interrupted run. Settings: RetrainConfig "
        "defaults < --config file < the flags given.",
    )
    _add_run_arguments(parser)
    _add_layer_arguments(parser)
    add_spec_arguments(parser)
    _add_training_arguments(parser)
    _add_data_arguments(parser)
    _add_loss_arguments(parser)
    execution = parser.add_argument_group("execution (may change when a run resumes)")
    add_execution_arguments(execution, suppress=True)
    _option(
        execution,
        "--dist-timeout",
        type=positive_float,
        field="dist_timeout",
        metavar="SECONDS",
        help="under torchrun: seconds a rank waits for the others in a collective before the job "
        "stops with an error",
    )
    parser.set_defaults(func=run_retrain_command)
    return parser
