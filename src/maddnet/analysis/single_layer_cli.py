"""``maddnet analyze``: single-layer analysis of a trained model."""

from __future__ import annotations

import argparse
import fnmatch
from typing import Any

from torch import nn

from ..cli_args import (
    add_execution_arguments,
    add_spec_arguments,
    non_negative_int,
    parse_key_values,
    positive_float,
    positive_int,
    resolve_device,
    set_threads_from,
    spec_from_args,
)
from ..data.registry import SPLITS
from ..train.distributed import DEFAULT_TIMEOUT_S


def select_layers(
    model: nn.Module, patterns: list[str] | None, exclude: list[str] | None
) -> list[str] | None:
    """The layer names ``--layers`` (fnmatch patterns; default: every candidate) and
    ``--exclude`` leave; None when neither is given. A pattern matching no conv/linear layer,
    or a selection without a layer MADDness can serve, is an error."""
    from .single_layer import candidate_layers

    if patterns is None and not exclude:
        return None
    names, skipped = candidate_layers(model)
    known = names + [s["layer"] for s in skipped]
    for pattern in patterns or []:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in known):
            raise ValueError(
                f"--layers pattern {pattern!r} matches no conv/linear layer; candidates: {names}"
            )
    chosen = [n for n in known if patterns is None or any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    chosen = [n for n in chosen if not any(fnmatch.fnmatchcase(n, p) for p in exclude or [])]
    if not any(name in names for name in chosen):
        raise ValueError(f"--layers/--exclude leave no layer to analyze; candidates: {names}")
    return chosen


def _model_and_data(args: argparse.Namespace):
    """(model, calibration loader, eval loader)."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from ..data.holdout import check_validation_unseen
    from ..data.registry import create_dataset
    from ..models.registry import create_model
    from ..train.runner import model_kwargs_for

    model_kwargs = parse_key_values(args.model_kw, "--model-kw")
    data_kwargs = parse_key_values(args.data_kw, "--data-kw")
    check_validation_unseen(args.checkpoint, args.data, data_kwargs, args.eval_split)
    train = create_dataset(args.data, "train", args.data_root, **data_kwargs)
    evaluation = create_dataset(args.data, args.eval_split, args.data_root, **data_kwargs)
    if args.eval_samples:
        evaluation = Subset(evaluation, range(min(args.eval_samples, len(evaluation))))
    info = train.info
    model = create_model(
        args.model,
        num_classes=info.num_classes,
        in_chans=info.in_chans,
        checkpoint=args.checkpoint,
        **model_kwargs_for(args.model, info, model_kwargs),
    )
    gen = torch.Generator().manual_seed(args.seed)
    calib_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=gen)
    eval_loader = DataLoader(evaluation, batch_size=args.eval_batch_size)
    return model, calib_loader, eval_loader


def settings(args: argparse.Namespace, spec, device: str) -> dict[str, Any]:
    """What ``single_layer.json`` records about the command (spec whole, device resolved)."""
    values = {k: v for k, v in vars(args).items() if k != "func" and not k.startswith("spec_")}
    return values | {"spec": spec.to_dict(), "device": device}


# what a finished (layer, C) row does not depend on: left out of the settings a resumed
# analysis must match (so a rerun may add layers or widths, or change threads); the
# weights are named by their SHA-256, not by the checkpoint's path
_NOT_IN_CELLS = ("out", "widths", "layers", "exclude", "threads", "progress", "dist_timeout", "checkpoint")


def cell_settings(args: argparse.Namespace, spec, device: str) -> dict[str, Any]:
    """The settings every finished cell in ``--out`` must share (:class:`CellLog`): the
    command's settings less :data:`_NOT_IN_CELLS`, the device type (not its index: rank r
    of a torchrun job runs on cuda:r), and the weights' SHA-256."""
    import torch

    from .cells import file_digest

    kept = {k: v for k, v in settings(args, spec, device).items() if k not in _NOT_IN_CELLS}
    return kept | {"device": torch.device(device).type, "checkpoint_sha256": file_digest(args.checkpoint)}


def run(args: argparse.Namespace) -> int:
    """Under torchrun the (layer, C) cells are split over the ranks and rank 0 writes."""
    from ..train.distributed import leaving_process_group

    with leaving_process_group():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from ..nn import MaddConfig
    from ..train.distributed import fail_together, init_distributed, process_device
    from .cells import CellLog
    from .single_layer import analyze_layers, write_analysis

    spec = spec_from_args(args)
    config = MaddConfig(spec=spec, max_rows=args.max_rows, min_rows=args.min_rows, seed=args.seed)
    device = resolve_device(args.device)
    dist_info = init_distributed(process_device(device), args.dist_timeout)
    if dist_info.enabled:
        device = str(process_device(device))
    set_threads_from(args.threads)
    model, calib_loader, eval_loader = fail_together(lambda: _model_and_data(args), "loading model and data")
    result = analyze_layers(
        model,
        calib_loader,
        eval_loader,
        widths=args.widths,
        config=config,
        layers=select_layers(model, args.layers, args.exclude),
        calib_batches=args.calib_batches,
        nmse_batches=args.nmse_batches,
        device=device,
        progress=args.progress,
        cells=CellLog(args.out, cell_settings(args, spec, device)),
    )
    if not dist_info.is_main:
        return 0
    result["settings"] = settings(args, spec, device) | {"world_size": dist_info.world_size}
    paths = write_analysis(result, args.out, f"{args.model} on {args.data} ({args.eval_split} split)")
    print(paths["md"].read_text())
    print("written:", ", ".join(str(p) for p in paths.values()))
    return 0


def _add_input_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and data")
    group.add_argument("--model", required=True, help="model registry name (e.g. resnet9, ds_cnn_s)")
    group.add_argument(
        "--model-kw",
        nargs="+",
        action="extend",
        metavar="KEY=VALUE",
        help="model builder arguments, JSON values (e.g. width=16)",
    )
    group.add_argument("--data", required=True, help="data registry name (e.g. fashion_mnist, digits)")
    group.add_argument(
        "--data-kw",
        nargs="+",
        action="extend",
        metavar="KEY=VALUE",
        help="data set builder arguments, JSON values (e.g. subset=1000)",
    )
    group.add_argument("--data-root", default=None, metavar="DIR", help="folder of the data set")
    group.add_argument(
        "--checkpoint",
        required=True,
        metavar="FILE",
        help="trained dense weights (maddnet train output or a state dict)",
    )
    group.add_argument(
        "--eval-split", choices=list(SPLITS), default="test", help="split to evaluate on (default: test)"
    )
    group.add_argument(
        "--eval-samples",
        type=positive_int,
        default=None,
        metavar="N",
        help="evaluate on the first N samples only (default: all)",
    )
    group.add_argument(
        "--batch-size", type=positive_int, default=128, help="calibration batch size (default: 128)"
    )
    group.add_argument(
        "--eval-batch-size", type=positive_int, default=512, help="evaluation batch size (default: 512)"
    )
    group.add_argument(
        "--out",
        default="runs/analyze",
        metavar="DIR",
        help="folder for single_layer.{json,csv,md,png} and the finished cells (cells.rank*.jsonl: "
        "a rerun with the same settings resumes from them) (default: runs/analyze)",
    )


def _add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("layers, C and recording")
    group.add_argument(
        "--widths",
        type=positive_float,
        nargs="+",
        default=[4, 9, 16],
        metavar="D/C",
        help="D/C values (> 0); C = round(D / width) per layer, clamped to 1..D "
        "(9 = one codebook per 3x3 channel; default: 4 9 16)",
    )
    group.add_argument(
        "--layers",
        nargs="+",
        default=None,
        metavar="PATTERN",
        help="fnmatch name patterns of the layers to analyze (default: every conv/linear layer)",
    )
    group.add_argument(
        "--exclude", nargs="+", default=None, metavar="PATTERN", help="name patterns left out (default: none)"
    )
    group.add_argument(
        "--calib-batches",
        type=positive_int,
        default=8,
        help="training batches whose activations each layer is learned from (default: 8)",
    )
    group.add_argument(
        "--nmse-batches",
        type=positive_int,
        default=2,
        help="eval batches the layer output NMSE is measured on (default: 2)",
    )
    group.add_argument(
        "--max-rows",
        type=positive_int,
        default=16384,
        help="rows kept per layer while recording (default: 16384)",
    )
    group.add_argument(
        "--min-rows",
        type=positive_int,
        default=256,
        help="a layer with fewer recorded rows is an error (default: 256)",
    )
    group.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="seed of the calibration order and row sampling (default: 0)",
    )


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "analyze",
        help="single-layer analysis: replace one layer at a time, for several C",
        description="For every conv/linear layer of a trained model and each D/C in --widths, replace only "
        "that layer with a MADD layer learned from calibration activations and measure top-1/top-5 and "
        "the layer's output NMSE. Writes single_layer.{json,csv,md,png} to --out.",
    )
    _add_input_arguments(parser)
    _add_selection_arguments(parser)
    add_spec_arguments(parser)
    execution = parser.add_argument_group("execution")
    add_execution_arguments(execution)
    execution.add_argument(
        "--dist-timeout",
        type=positive_float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help="under torchrun: seconds a rank waits for the others in a collective before the job "
        f"stops with an error (default: {DEFAULT_TIMEOUT_S:g})",
    )
    parser.set_defaults(func=run)
    return parser
