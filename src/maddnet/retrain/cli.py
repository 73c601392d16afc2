"""``maddnet retrain`` and ``maddnet demo``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..nn import summary
from .config import RetrainConfig
from .pipeline import run_retrain
from .report import markdown_report, write_report


def _key_values(pairs: list[str] | None, what: str) -> dict:
    result = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"{what} takes KEY=VALUE, got {pair!r}")
        try:
            result[key] = json.loads(value)
        except json.JSONDecodeError:
            result[key] = value
    return result


def execute(config: RetrainConfig) -> int:
    start = time.time()
    result = run_retrain(config)
    saved = json.loads(Path(config.out_dir, "config.json").read_text())
    paths = write_report(config.out_dir, result["rows"], saved)
    print()
    summary(result["model"])
    print()
    print(markdown_report(result["rows"], saved))
    print(f"report: {', '.join(str(p) for p in paths.values())}  ({time.time() - start:.0f} s)")
    return 0


def run_retrain_command(args: argparse.Namespace) -> int:
    ncodebooks: dict | int | None = _key_values(args.ncodebooks, "--ncodebooks") or None
    if args.all_ncodebooks is not None:
        ncodebooks = args.all_ncodebooks
    config = RetrainConfig(
        model=args.model,
        dataset=args.data,
        out_dir=args.out,
        model_kwargs=_key_values(args.model_kw, "--model-kw"),
        data_root=args.data_root,
        checkpoint=args.checkpoint,
        baseline_steps=args.baseline_steps,
        layers=args.layers,
        exclude=args.exclude or [],
        ncodebooks=ncodebooks,
        codebook_width=args.codebook_width,
        nprototypes=args.nprototypes,
        lut_bits=None if args.lut_bits == 0 else args.lut_bits,
        calib_batches=args.calib_batches,
        steps_per_layer=args.steps_per_layer,
        final_steps=args.final_steps,
        optimizer=args.optimizer,
        lr_dense=args.lr_dense,
        lr_norm=args.lr_norm,
        lr_lut=args.lr_lut,
        lr_threshold=args.lr_threshold,
        train_replaced=not args.freeze_replaced,
        distill=args.distill,
        recon=args.recon,
        dense_control=args.dense_control,
        batch_size=args.batch_size,
        augment=args.augment,
        eval_samples=args.eval_samples,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
        progress=not args.no_progress,
    )
    return execute(config)


def demo_config(out_dir: str = "runs/demo", progress: bool = True) -> RetrainConfig:
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
        progress=progress,
    )


def run_demo(args: argparse.Namespace) -> int:
    return execute(demo_config(args.out, progress=not args.no_progress))


def add_parser(subparsers) -> argparse.ArgumentParser:
    demo = subparsers.add_parser(
        "demo",
        help="retrain a small ResNet-9 on scikit-learn digits with every layer on MADDness",
        description="Train a dense ResNet-9 (width 16) on the built-in 8x8 digits, then replace every "
        "conv and linear layer (stem and classifier too) one by one with MADD layers, fine-tuning after "
        "each, and print the report. Resumes if interrupted (same --out).",
    )
    demo.add_argument("--out", default="runs/demo", help="run folder (checkpoint, metrics, report)")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(func=run_demo)

    parser = subparsers.add_parser(
        "retrain",
        help="layer-by-layer retraining: replace layers with MADD layers one at a time",
        description="Replace the layers of a trained model with MADD layers in forward order, each "
        "learned on the activations of the current network and followed by fine-tuning; then "
        "fine-tune everything. Writes checkpoint.pt, metrics.jsonl, report.md/json and accuracy.png "
        "to --out; rerunning the same command resumes an interrupted run.",
    )
    parser.add_argument("--model", required=True, help="model registry name (e.g. resnet9, ds_cnn_s)")
    parser.add_argument("--data", required=True, help="data registry name (e.g. fashion_mnist, digits)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--checkpoint", default=None, help="trained dense weights (maddnet train output)")
    parser.add_argument(
        "--baseline-steps",
        type=int,
        default=0,
        help="train the dense model this many steps when no --checkpoint is given",
    )
    parser.add_argument("--model-kw", nargs="*", metavar="KEY=VALUE", help="model builder arguments")
    parser.add_argument("--out", default="runs/retrain")
    parser.add_argument("--layers", nargs="*", default=None, help="name patterns to replace (default: all)")
    parser.add_argument("--exclude", nargs="*", help="name patterns to keep dense")
    parser.add_argument("--ncodebooks", nargs="*", metavar="LAYER=C", help="C for named layers")
    parser.add_argument("--all-ncodebooks", type=int, default=None, help="one C for every layer")
    parser.add_argument("--codebook-width", type=int, default=8, help="D/C of linear and 1x1 layers")
    parser.add_argument("--nprototypes", "-K", type=int, default=16)
    parser.add_argument("--lut-bits", type=int, default=8, help="0: float LUTs")
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--steps-per-layer", type=int, default=200)
    parser.add_argument("--final-steps", type=int, default=500)
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    parser.add_argument("--lr-dense", type=float, default=1e-3)
    parser.add_argument("--lr-norm", type=float, default=1e-3)
    parser.add_argument("--lr-lut", type=float, default=1e-3)
    parser.add_argument("--lr-threshold", type=float, default=1e-3)
    parser.add_argument(
        "--freeze-replaced",
        action="store_true",
        help="freeze LUT/thresholds of a replaced layer once its step ends",
    )
    parser.add_argument("--distill", type=float, default=0.5, help="knowledge-distillation weight (0..1)")
    parser.add_argument("--recon", type=float, default=0.0, help="per-layer reconstruction loss weight")
    parser.add_argument(
        "--dense-control",
        action="store_true",
        help="replace nothing: fine-tune the dense model for the same total number of steps "
        "(layers x steps-per-layer + final-steps) with the same loss, as a control",
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--augment", action="store_true")
    parser.add_argument(
        "--eval-samples",
        type=int,
        default=None,
        help="evaluate intermediate steps on the first N eval samples (dense/final: all)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run_retrain_command)
    return parser
