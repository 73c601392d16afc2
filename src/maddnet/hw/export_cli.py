"""``maddnet export MODEL_OR_RUN --out DIR`` and ``maddnet hw-check DIR``: the converted
network's tables, memory files and golden vectors for the accelerator, and their check
(format: docs/hardware.md, "Export format")."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

from ..cli_args import (
    add_execution_arguments,
    parse_key_values,
    positive_int,
    resolve_device,
    set_threads_from,
)
from . import hw_check
from .datapath import AccumulatorOverflowError

ACCUMULATOR_BITS_RANGE = (2, 63)


def _accumulator_bits(text: str) -> int:
    low, high = ACCUMULATOR_BITS_RANGE
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be an integer in [{low}, {high}], got {text!r}")
    return value


def _samples(dataset, count: int):
    """The first ``count`` inputs of ``dataset`` stacked into one batch (CPU)."""
    import torch

    if len(dataset) == 0:
        raise ValueError("the data set is empty")
    return torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])


def load_target(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """(converted model, network input batch, source record) of MODEL_OR_RUN.

    A run folder: its config's model and data set, ``checkpoint.pt``'s conversion plan and
    state; a converted checkpoint file: ``--model`` and ``--data``; a registry model name:
    ``--data`` (default digits), ``--checkpoint`` dense weights (default: seeded random
    initialisation), converted on ``--calibration-rows`` training inputs."""
    import torch

    from ..data import create_dataset
    from ..models import create_model, list_models
    from ..models.weights import is_converted, load_state, read_checkpoint, read_state_dict
    from ..nn import MaddConfig, convert, rebuild
    from ..train.runner import model_kwargs_for
    from .network import read_run_config

    target = Path(args.target)
    model_kwargs = parse_key_values(args.model_kw, "--model-kw")
    data_kwargs = parse_key_values(args.data_kw, "--data-kw")
    data_name, data_root, saved, checkpoint = args.data, args.data_root, None, None
    if target.is_dir():
        values = read_run_config(target)
        model_name = values["model"]
        model_kwargs = {**dict(values.get("model_kwargs") or {}), **model_kwargs}
        data_name = data_name or values["dataset"]
        data_kwargs = {**dict(values.get("dataset_kwargs") or {}), **data_kwargs}
        data_root = data_root or values.get("data_root")
        checkpoint = target / "checkpoint.pt"
        if not checkpoint.is_file():
            raise FileNotFoundError(f"run folder {target} has no checkpoint.pt (no converted model yet)")
    elif target.is_file():
        if not args.model or not args.data:
            raise ValueError(f"a checkpoint file ({target}) needs --model and --data")
        model_name, checkpoint = args.model, target
    elif target.suffix or "/" in args.target:
        raise FileNotFoundError(f"{args.target!r} does not exist (a run folder or checkpoint file)")
    else:
        model_name = args.target
        if model_name not in list_models():
            raise KeyError(f"unknown model {model_name!r}; known models: {', '.join(list_models())}")
        data_name = data_name or "digits"
    if checkpoint is not None:
        saved = read_checkpoint(checkpoint)
        if not is_converted(saved):
            raise ValueError(f"{checkpoint} holds no converted (MADD) model (no conversion plan)")
    dataset = create_dataset(data_name, args.split, data_root, **data_kwargs)
    info = dataset.info
    kwargs = model_kwargs_for(model_name, info, model_kwargs)
    torch.manual_seed(args.seed)
    model = create_model(model_name, info.num_classes, info.in_chans, **kwargs)
    if saved is not None:
        rebuild(model, saved["plan"])
        load_state(model, saved["state_dict"], checkpoint)
        what = f"converted checkpoint {checkpoint}"
    else:
        if args.checkpoint:
            load_state(model, read_state_dict(args.checkpoint), args.checkpoint)
        calibration = create_dataset(data_name, "train", data_root, **data_kwargs)
        rows = _samples(calibration, args.calibration_rows)
        config = MaddConfig(
            ncodebooks=args.all_ncodebooks, min_rows=min(256, len(rows)), exclude=tuple(args.exclude or ())
        )
        model.eval()
        with warnings.catch_warnings():  # no training follows: the BatchNorm advice does not apply
            warnings.simplefilter("ignore", UserWarning)
            convert(model, list(rows.split(args.batch_size)), config, check_training=False)
        weights = (
            f"dense weights {args.checkpoint}" if args.checkpoint else f"random weights (seed {args.seed})"
        )
        what = f"registry model {model_name}, {weights}, converted on {len(rows)} {data_name} training inputs"
    device = resolve_device(args.device)
    inputs = _samples(dataset, args.vectors).to(device)
    source = {
        "description": what,
        "model": model_name,
        "model_kwargs": kwargs,
        "num_classes": info.num_classes,
        "in_chans": info.in_chans,
        "dataset": data_name,
        "dataset_kwargs": data_kwargs,
        "split": args.split,
        "vectors": f"the first {len(inputs)} inputs of the {args.split} split",
    }
    return model.to(device), inputs, source


def run_export(args: argparse.Namespace) -> int:
    from .export import export_model

    set_threads_from(args.threads)
    model, inputs, source = load_target(args)
    try:
        path = export_model(
            model,
            inputs,
            args.out,
            source=source,
            golden_rows=args.golden_rows,
            accumulator_bits=args.accumulator_bits,
            overflow=args.overflow,
            include_model=args.model_state,
        )
    except AccumulatorOverflowError as error:
        raise ValueError(
            f"{error} (on the vectors' inputs; give more --accumulator-bits, or --overflow saturate "
            "to clamp as a saturating adder does)"
        ) from None
    manifest = json.loads(path.read_text())
    print(f"{source['description']}: {len(manifest['layers'])} MADD layers exported to {args.out}")
    if args.check:
        report = hw_check.check_export(args.out, end_to_end=args.model_state)
        print("\n".join(hw_check.report_lines(report)))
        return 0 if report.ok else 1
    return 0


def run_check(args: argparse.Namespace) -> int:
    set_threads_from(args.threads)
    return hw_check.run(args)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export",
        help="export a converted network for the accelerator (tables, $readmemh memories, golden vectors)",
        description="Write a versioned export a hardware team can read without PyTorch: manifest.json "
        "(layer order, D, M, C, K, conv geometry, the input tap of every split, LUT quantisation, "
        "accumulator width, conversion passes, sha256 of every file), tensors.safetensors (FP16 "
        "thresholds in heap order, uint8 LUTs in (M, C, K) order with offsets and scales, bias), "
        "$readmemh memory files, golden vectors per layer and network input/output vectors from real "
        "data (golden.safetensors), model.safetensors (PyTorch state, for the end-to-end check) and "
        "the torch-free checker (reference/hw_check.py). Then runs maddnet hw-check on it. "
        "Format: docs/hardware.md.",
    )
    parser.add_argument(
        "target",
        metavar="MODEL_OR_RUN",
        help="a retraining run folder (config.json + checkpoint.pt), a converted checkpoint file "
        "(with --model and --data), or a registered model name (converted here on --data)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="export folder")
    source = parser.add_argument_group("model and data (a run folder supplies them)")
    source.add_argument("--model", help="registry model of a checkpoint file")
    source.add_argument(
        "--model-kw", nargs="+", action="extend", metavar="KEY=VALUE", help="model builder arguments"
    )
    source.add_argument("--data", help="data set of the vectors (default: the run's; registry model: digits)")
    source.add_argument(
        "--data-kw", nargs="+", action="extend", metavar="KEY=VALUE", help="data set builder arguments"
    )
    source.add_argument("--data-root", help="data folder (default: the run's, else the data set's default)")
    source.add_argument("--split", default="test", help="split the vectors come from (default: test)")
    source.add_argument(
        "--checkpoint", metavar="FILE", help="registry model: dense weights (default: random, seeded)"
    )
    source.add_argument(
        "--calibration-rows",
        type=positive_int,
        default=256,
        help="registry model: training inputs the MADD layers are learned from (default: 256)",
    )
    source.add_argument(
        "--all-ncodebooks", type=positive_int, metavar="C", help="registry model: one C for every layer"
    )
    source.add_argument("--exclude", nargs="+", metavar="PATTERN", help="registry model: layers kept dense")
    source.add_argument(
        "--batch-size", type=positive_int, default=64, help="calibration batch size (default: 64)"
    )
    source.add_argument("--seed", type=int, default=0, help="seed of a random initialisation (default: 0)")
    vectors = parser.add_argument_group("vectors and datapath")
    vectors.add_argument(
        "--vectors", type=positive_int, default=4, help="network inputs in the golden vectors (default: 4)"
    )
    vectors.add_argument(
        "--golden-rows", type=positive_int, default=8, help="golden rows per layer (default: 8)"
    )
    vectors.add_argument(
        "--accumulator-bits",
        type=_accumulator_bits,
        default=32,
        help="accumulator width in bits (default: 32, the accelerator's INT32)",
    )
    vectors.add_argument(
        "--overflow",
        choices=("refuse", "saturate"),
        default="refuse",
        help="accumulator overflow: refuse (error) or saturate (default: refuse)",
    )
    vectors.add_argument(
        "--no-model-state",
        dest="model_state",
        action="store_false",
        help="leave out model.safetensors (then no end-to-end check)",
    )
    vectors.add_argument("--no-check", dest="check", action="store_false", help="do not run hw-check after")
    add_execution_arguments(parser)
    parser.set_defaults(func=run_export)

    check = subparsers.add_parser(
        "hw-check",
        help="verify an export and re-run its golden vectors through the numpy datapath (bit exact)",
        description="Verify a maddnet export (manifest, sha256 of every file, tensor dtypes and shapes, "
        "memory files) and re-run every golden vector through the numpy datapath reference; they must "
        "agree bit for bit. Exit 0: agree; 1: disagree; 2: unreadable export. The check itself needs "
        "no torch: python DIR/reference/hw_check.py DIR runs it with numpy and safetensors only.",
    )
    hw_check.add_arguments(check)
    # the golden vectors run through the numpy datapath; --end-to-end compares on the CPU
    add_execution_arguments(check, device=False)
    check.set_defaults(func=run_check)
    return parser
