"""``maddnet amm``: MaddnessMatmul on a classifier's product, swept over C."""

from __future__ import annotations

import argparse

import numpy as np
import torch

from ..cli_args import (
    add_execution_arguments,
    lut_bits_type,
    nprototypes_type,
    positive_int,
    ridge_type,
    set_threads_from,
)
from ..nn.spec import LayerSpec
from .amm_sweep import MatmulTask, sweep, train_linear_classifier, write_report


def digits_task(test_size: int = 500) -> MatmulTask:
    """scikit-learn's 8x8 digits (built in): pixels (D=64) times a logistic-regression classifier."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - optional dependency
        raise ImportError("the digits task needs scikit-learn: pip install 'maddnet[data]'") from err
    images, labels = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(labels))
    rows = torch.from_numpy(images[order].astype(np.float32) / 16.0)
    labels = torch.from_numpy(labels[order]).long()
    train, test = slice(test_size, None), slice(0, test_size)
    weight, bias = train_linear_classifier(rows[train], labels[train], 10)
    return MatmulTask(
        "digits",
        rows[train],
        rows[test],
        weight,
        bias,
        labels[test],
        "scikit-learn digits pixels (D=64) x logistic regression (M=10)",
    )


def fashion_mnist_task(root: str | None = None) -> MatmulTask:
    """Fashion-MNIST pixels (D=784) times a logistic-regression classifier (M=10)."""
    from ..data.fashion_mnist import load_arrays

    train_x, train_y = load_arrays("train", root)
    test_x, test_y = load_arrays("test", root)
    a_train = torch.from_numpy(train_x.reshape(len(train_x), -1).astype(np.float32) / 255.0)
    a_test = torch.from_numpy(test_x.reshape(len(test_x), -1).astype(np.float32) / 255.0)
    weight, bias = train_linear_classifier(a_train, torch.from_numpy(train_y), 10)
    return MatmulTask(
        "fashion-mnist",
        a_train,
        a_test,
        weight,
        bias,
        torch.from_numpy(test_y),
        "Fashion-MNIST pixels (D=784) x logistic regression (M=10)",
    )


TASKS = {"digits": digits_task, "fashion-mnist": fashion_mnist_task}


def run(args: argparse.Namespace) -> int:
    set_threads_from(args.threads)
    task = TASKS[args.data]()
    ndims = task.B.shape[0]
    valid = sorted({c for c in args.ncodebooks if c <= ndims})
    if not valid:
        raise ValueError(f"--ncodebooks: every C exceeds D = {ndims} of the {args.data} task")
    dropped = sorted({c for c in args.ncodebooks if c > ndims})
    if dropped:
        print(f"skipping C = {dropped}: above D = {ndims}")
    rows = sweep(
        task,
        valid,
        nprototypes=args.nprototypes,
        lut_bits=args.lut_bits,
        ridge=args.ridge,
        measure_speed=not args.no_speed,
        progress=args.progress,
    )
    paths = write_report(rows, args.out, f"amm_{args.data}", notes=task.description)
    print(paths["md"].read_text())
    print("written:", ", ".join(str(p) for p in paths.values()))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "amm",
        help="approximate a classifier's matrix product with MaddnessMatmul, sweeping C",
        description="Fit MaddnessMatmul to the rows of a data set times a trained logistic-regression "
        "classifier and report NMSE, accuracy, fit time and speed against torch.matmul for each C. "
        "Runs on the CPU (it times the CPU kernels), so it has no --device.",
    )
    parser.add_argument(
        "--data",
        choices=sorted(TASKS),
        default="digits",
        help="digits (built in) or fashion-mnist (apt-get install dataset-fashion-mnist)",
    )
    parser.add_argument(
        "--ncodebooks",
        "-C",
        type=positive_int,
        nargs="+",
        default=[4, 8, 16, 32],
        metavar="C",
        help="values of C to sweep; those above D are skipped (default: 4 8 16 32)",
    )
    spec_help = LayerSpec.field_help()
    parser.add_argument(
        "--nprototypes",
        "-K",
        type=nprototypes_type,
        default=16,
        metavar="K",
        help=f"{spec_help['nprototypes']} (default: 16)",
    )
    parser.add_argument(
        "--lut-bits",
        type=lut_bits_type,
        default=8,
        metavar="BITS",
        help="bits per integer LUT entry (1..8); 0 or none: float LUTs (default: 8)",
    )
    parser.add_argument(
        "--ridge",
        type=ridge_type,
        default=1.0,
        metavar="LAMBDA|none",
        help="lambda of the joint prototype ridge regression; none keeps the leaf means (default: 1.0)",
    )
    parser.add_argument("--no-speed", action="store_true", help="skip the timing against torch.matmul")
    parser.add_argument("--out", default="runs/amm", help="folder for the JSON/CSV/Markdown/PNG report")
    add_execution_arguments(parser, device=False)
    parser.set_defaults(func=run)
    return parser
