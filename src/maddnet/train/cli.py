"""``maddnet train`` and ``maddnet eval``."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from maddnet.cli_args import (
    DEFAULT_DEVICE,
    DEVICE_HELP,
    add_execution_arguments,
    device_type,
    fraction_below_one,
    load_config_file,
    non_negative_float,
    non_negative_int,
    parse_key_values,
    positive_float,
    positive_int,
    run_parsed,
    set_threads_from,
)
from maddnet.data.registry import SPLITS
from maddnet.train.config import TrainConfig, make_config

__all__ = ["add_parser", "config_from_args", "main", "parse_key_values"]

# CLI flag -> TrainConfig field, for the flags that map one to one: (type, help, extra options)
_FLAGS: dict[str, tuple[Any, str, dict[str, Any]]] = {
    "epochs": (positive_float, "training epochs (fractions allowed)", {}),
    "batch_size": (positive_int, "batch size per process", {}),
    "eval_batch_size": (positive_int, "evaluation batch size", {}),
    "optimizer": (str, "optimiser", {"choices": ["sgd", "adamw"]}),
    "lr": (non_negative_float, "peak learning rate", {}),
    "weight_decay": (non_negative_float, "weight decay (not on biases and norms)", {}),
    "label_smoothing": (fraction_below_one, "label smoothing in [0, 1)", {}),
    "warmup_epochs": (non_negative_float, "linear warm-up epochs before the cosine decay", {}),
    "grad_clip": (positive_float, "clip the gradient norm to this value", {}),
    "eval_split": (str, "split evaluated after each epoch", {"choices": list(SPLITS)}),
    "seed": (non_negative_int, "seed of initialisation, data order and augmentation", {}),
    "num_workers": (non_negative_int, "data loader worker processes", {}),
    "checkpoint_every": (positive_int, "write checkpoint.pt every N steps (and at each epoch end)", {}),
    "log_every": (positive_int, "log training metrics every N steps", {}),
    "max_steps": (positive_int, "stop this invocation after N steps in total (resume later)", {}),
}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < recipe < --config file (JSON or YAML) < explicit flags."""
    overrides: dict[str, Any] = {}
    if args.config:
        overrides.update(load_config_file(args.config))
    overrides = {k: v for k, v in overrides.items() if k not in ("model", "dataset")}
    for name in (*_FLAGS, "data_root", "out_dir", "init_checkpoint", "device", "threads"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    model_kwargs = {**overrides.get("model_kwargs", {}), **parse_key_values(args.model_kw, "--model-kw")}
    dataset_kwargs = {**overrides.get("dataset_kwargs", {}), **parse_key_values(args.data_kw, "--data-kw")}
    overrides.update(model_kwargs=model_kwargs, dataset_kwargs=dataset_kwargs)
    if args.no_augment:
        overrides["augment"] = False
    if not args.progress:
        overrides["progress"] = False
    if "out_dir" not in overrides:
        overrides["out_dir"] = f"runs/{args.model}-{args.data}"
    return make_config(args.model, args.data, **overrides)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="registered model name (resnet9, ...)")
    parser.add_argument("--data", required=True, help="registered data set name")
    parser.add_argument("--data-root", dest="data_root", metavar="DIR", help="folder of the data set")
    parser.add_argument(
        "--model-kw",
        "--model-arg",
        dest="model_kw",
        nargs="+",
        action="extend",
        metavar="KEY=VALUE",
        help="model builder arguments, JSON values, e.g. width=16",
    )
    parser.add_argument(
        "--data-kw",
        "--data-arg",
        dest="data_kw",
        nargs="+",
        action="extend",
        metavar="KEY=VALUE",
        help="data set builder arguments, JSON values, e.g. subset=1000",
    )


def run_train(args: argparse.Namespace) -> int:
    from maddnet.train.distributed import leaving_process_group
    from maddnet.train.runner import run_training

    config = config_from_args(args)
    with leaving_process_group():  # under torchrun
        results = run_training(config)
    print(json.dumps(results, indent=2, sort_keys=True))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import torch
    from torch.utils.data import DataLoader

    from maddnet.data import create_dataset
    from maddnet.models import create_model
    from maddnet.train.distributed import pick_device
    from maddnet.train.loops import evaluate
    from maddnet.train.runner import model_kwargs_for

    set_threads_from(args.threads)
    device = pick_device(args.device)
    data_kwargs = parse_key_values(args.data_kw, "--data-kw")
    dataset = create_dataset(args.data, args.split, args.data_root, **data_kwargs)
    info = dataset.info
    kwargs = model_kwargs_for(args.model, info, parse_key_values(args.model_kw, "--model-kw"))
    model = create_model(args.model, info.num_classes, info.in_chans, **kwargs)
    evaluated = load_evaluated(model, args.checkpoint)
    model = model.to(device)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers)
    with torch.inference_mode():
        result = evaluate(model, loader, device=device, progress=args.progress)
    row = {"model": args.model, "data": args.data, "split": args.split, "evaluated": evaluated, **result}
    print(json.dumps(row, sort_keys=True))
    return 0


def load_evaluated(model, path: str | os.PathLike) -> str:
    """Load the weights ``maddnet eval`` evaluates from ``path`` into the fresh dense
    ``model``: a retrain run's checkpoint.pt or a ``save_converted`` file gives its converted
    (MADD) model (plan rebuilt, then its state), anything else dense weights. Returns
    ``"converted"`` or ``"dense"``; ValueError when a plan does not fit the model."""
    from maddnet.models.weights import dense_state_dict, is_converted, load_state, read_checkpoint
    from maddnet.nn import rebuild

    saved = read_checkpoint(path)
    if not is_converted(saved):
        load_state(model, dense_state_dict(saved, path), path)
        return "dense"
    try:
        rebuild(model, saved["plan"])
    except (KeyError, ValueError, TypeError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        raise ValueError(f"{path}: its conversion plan does not fit the model: {message}") from error
    load_state(model, saved["state_dict"], path)
    return "converted"


def _add_train_parser(subparsers) -> argparse.ArgumentParser:
    train = subparsers.add_parser(
        "train",
        help="train a model on a data set (resumes an interrupted run)",
        description="Train with the recipe for the model/data pair; a --config file and flags "
        "override it. Re-running the same command continues from OUT_DIR/checkpoint.pt. "
        "Under torchrun it uses DistributedDataParallel.",
    )
    _add_common(train)
    train.add_argument("--config", metavar="FILE", help="JSON or YAML file with TrainConfig fields")
    train.add_argument("--out", dest="out_dir", metavar="DIR", help="run folder (default runs/MODEL-DATA)")
    train.add_argument(
        "--init-checkpoint",
        dest="init_checkpoint",
        metavar="FILE",
        help="start from these weights (shape-mismatched tensors are skipped)",
    )
    for name, (kind, text, extra) in _FLAGS.items():
        train.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=kind,
            help=f"{text} (default: the recipe's, else TrainConfig's)",
            **extra,
        )
    train.add_argument("--no-augment", action="store_true", help="switch augmentation off")
    # None: the config file's or TrainConfig's device (auto)
    train.add_argument("--device", type=device_type, default=None, help=f"{DEVICE_HELP} (default: auto)")
    add_execution_arguments(train, device=False)
    train.set_defaults(func=run_train)
    return train


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``train`` and ``eval``; returns the ``train`` parser."""
    train = _add_train_parser(subparsers)
    ev = subparsers.add_parser(
        "eval",
        help="top-1/top-5 of a model checkpoint on a data set",
        description="Evaluate trained weights on a split and print the metrics as one JSON line.",
    )
    _add_common(ev)
    ev.add_argument("--checkpoint", required=True, metavar="FILE", help="weights (state dict or checkpoint)")
    ev.add_argument("--split", choices=list(SPLITS), default="test", help="split to evaluate (default: test)")
    ev.add_argument("--batch-size", type=positive_int, default=512, help="batch size (default: 512)")
    ev.add_argument(
        "--num-workers", type=non_negative_int, default=0, help="data loader worker processes (default: 0)"
    )
    ev.add_argument(
        "--device", type=device_type, default=DEFAULT_DEVICE, help=f"{DEVICE_HELP} (default: auto)"
    )
    add_execution_arguments(ev, device=False)
    ev.set_defaults(func=run_eval)
    return train


def main(argv: list[str] | None = None) -> int:
    """``python -m maddnet.train.cli train ...``: the same sub-commands without the rest of
    the ``maddnet`` command (bad input: one error line, exit code 2)."""
    parser = argparse.ArgumentParser(prog="python -m maddnet.train.cli")
    add_parser(
        parser.add_subparsers(
            dest="command",
            metavar="COMMAND",
            required=True,
            help="train or eval (COMMAND --help lists its options)",
        )
    )
    return run_parsed(parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
