"""``maddnet train`` and ``maddnet eval``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from maddnet.train.config import TrainConfig, make_config


def parse_key_values(pairs: list[str] | None) -> dict[str, Any]:
    """``["width=16", "small_input=true"]`` → {"width": 16, "small_input": True}; values are
    read as JSON where possible, else kept as strings."""
    result: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {pair!r}")
        try:
            result[key] = json.loads(value)
        except json.JSONDecodeError:
            result[key] = value
    return result


# CLI flag → TrainConfig field, for the flags that map one to one
_FLAGS = {
    "data_root": str, "out_dir": str, "init_checkpoint": str, "epochs": float,
    "batch_size": int, "eval_batch_size": int, "optimizer": str, "lr": float,
    "weight_decay": float, "label_smoothing": float, "warmup_epochs": float, "seed": int,
    "device": str, "num_workers": int, "threads": int, "checkpoint_every": int,
    "log_every": int, "max_steps": int, "eval_split": str, "grad_clip": float,
}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < recipe < --config file < explicit flags."""
    overrides: dict[str, Any] = {}
    if args.config:
        with open(args.config) as handle:
            overrides.update(json.load(handle))
    overrides = {k: v for k, v in overrides.items() if k not in ("model", "dataset")}
    for name in _FLAGS:
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    model_kwargs = {**overrides.get("model_kwargs", {}), **parse_key_values(args.model_arg)}
    dataset_kwargs = {**overrides.get("dataset_kwargs", {}), **parse_key_values(args.data_arg)}
    overrides.update(model_kwargs=model_kwargs, dataset_kwargs=dataset_kwargs)
    if args.no_augment:
        overrides["augment"] = False
    if args.no_progress:
        overrides["progress"] = False
    if "out_dir" not in overrides:
        overrides["out_dir"] = f"runs/{args.model}-{args.data}"
    return make_config(args.model, args.data, **overrides)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="registered model name (resnet9, ...)")
    parser.add_argument("--data", required=True, help="registered data set name")
    parser.add_argument("--data-root", dest="data_root", help="folder of the data set")
    parser.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                        help="extra model argument, e.g. width=16 (repeatable)")
    parser.add_argument("--data-arg", action="append", metavar="KEY=VALUE",
                        help="extra data set argument, e.g. subset=1000 (repeatable)")


def run_train(args: argparse.Namespace) -> int:
    from maddnet.train.runner import run_training

    config = config_from_args(args)
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

    device = pick_device(args.device or "auto")
    dataset = create_dataset(args.data, args.split, args.data_root,
                             **parse_key_values(args.data_arg))
    info = dataset.info
    kwargs = model_kwargs_for(args.model, info, parse_key_values(args.model_arg))
    model = create_model(args.model, info.num_classes, info.in_chans,
                         checkpoint=args.checkpoint, **kwargs).to(device)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers)
    with torch.inference_mode():
        result = evaluate(model, loader, device=device, progress=True)
    print(json.dumps({"model": args.model, "data": args.data, "split": args.split, **result},
                     sort_keys=True))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``train`` and ``eval``; returns the ``train`` parser."""
    train = subparsers.add_parser(
        "train", help="train a model on a data set (resumes an interrupted run)",
        description="Train with the recipe for the model/data pair; flags override it. "
                    "Re-running the same command continues from OUT_DIR/checkpoint.pt. "
                    "Under torchrun it uses DistributedDataParallel.")
    _add_common(train)
    train.add_argument("--config", help="JSON file with TrainConfig fields")
    train.add_argument("--out", dest="out_dir", help="run folder (default runs/MODEL-DATA)")
    train.add_argument("--init-checkpoint", dest="init_checkpoint",
                       help="start from these weights (shape-mismatched tensors are skipped)")
    for name, kind in _FLAGS.items():
        if name in ("data_root", "out_dir", "init_checkpoint"):
            continue
        train.add_argument("--" + name.replace("_", "-"), dest=name, type=kind)
    train.add_argument("--no-augment", action="store_true", help="switch augmentation off")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=run_train)

    ev = subparsers.add_parser("eval", help="top-1/top-5 of a model checkpoint on a data set")
    _add_common(ev)
    ev.add_argument("--checkpoint", required=True, help="weights (state dict or checkpoint)")
    ev.add_argument("--split", default="test")
    ev.add_argument("--batch-size", type=int, default=512)
    ev.add_argument("--num-workers", type=int, default=0)
    ev.add_argument("--device", default=None)
    ev.set_defaults(func=run_eval)
    return train


def main(argv: list[str] | None = None) -> int:
    """``python -m maddnet.train.cli train ...``: the same sub-commands without the rest of
    the ``maddnet`` command."""
    parser = argparse.ArgumentParser(prog="python -m maddnet.train.cli")
    add_parser(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
