"""``maddnet analyze``: single-layer analysis of a trained model."""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils.data import DataLoader, Subset

from ..data.registry import create_dataset
from ..models.registry import create_model
from ..nn import MaddConfig
from ..threads import set_threads
from ..train.runner import model_kwargs_for
from .single_layer import analyze_layers, write_analysis


def run(args: argparse.Namespace) -> int:
    if args.threads:
        set_threads(args.threads)
    model_kwargs = {k: json.loads(v) for k, _, v in (kv.partition("=") for kv in args.model_kw or [])}
    train = create_dataset(args.data, "train", args.data_root)
    evaluation = create_dataset(args.data, args.eval_split, args.data_root)
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
    eval_loader = DataLoader(evaluation, batch_size=512)
    config = MaddConfig(
        nprototypes=args.nprototypes, lut_bits=None if args.lut_bits == 0 else args.lut_bits, seed=args.seed
    )
    result = analyze_layers(
        model,
        calib_loader,
        eval_loader,
        widths=args.widths,
        config=config,
        layers=args.layers,
        calib_batches=args.calib_batches,
        device=args.device,
        progress=not args.no_progress,
    )
    result["settings"] = vars(args) | {"func": None}
    paths = write_analysis(result, args.out, f"{args.model} on {args.data} ({args.eval_split} split)")
    print(paths["md"].read_text())
    print("written:", ", ".join(str(p) for p in paths.values()))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "analyze",
        help="single-layer analysis: replace one layer at a time, for several C",
        description="For every conv/linear layer of a trained model and each D/C in --widths, replace only "
        "that layer with a MADD layer learned from calibration activations and measure top-1/top-5 and "
        "the layer's output NMSE. Writes single_layer.{json,csv,md,png} to --out.",
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--checkpoint", required=True, help="trained dense weights")
    parser.add_argument("--model-kw", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--eval-split", default="test")
    parser.add_argument("--eval-samples", type=int, default=None, help="evaluate on the first N samples only")
    parser.add_argument(
        "--widths",
        type=float,
        nargs="+",
        default=[4, 9, 16],
        help="D/C values; C = round(D / width) per layer (9 = one codebook per 3x3 channel)",
    )
    parser.add_argument("--layers", nargs="*", default=None, help="only these layer names")
    parser.add_argument("--nprototypes", "-K", type=int, default=16)
    parser.add_argument("--lut-bits", type=int, default=8, help="0: float LUTs")
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", default="runs/analyze")
    parser.set_defaults(func=run)
    return parser
