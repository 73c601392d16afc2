"""MaddnessMatmul benchmark: accuracy, NMSE, fit time and speed against torch.matmul.

Tasks (real data, Fashion-MNIST: ``apt-get install dataset-fashion-mnist``):
  fashion-mnist  pixels (D=784) x a logistic-regression classifier (M=10), as in the
                 MADDness paper's softmax experiment; C in {8, 16, 32, 64}.
  mlp-hidden     the 512 ReLU activations of a trained 784-512-256-10 MLP times its
                 second layer's weight (D=512, M=256); accuracy with that layer replaced.
  speed          10,000 x 512 rows (mlp-hidden test rows) times a 512 x 100 weight, C=16:
                 the speed-ratio target, for row-major and column-major A.

Usage:  python benchmarks/amm.py [--out benchmarks/results] [--quick] [--tasks speed] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numba
import numpy as np
import torch

from maddnet import MaddnessMatmul
from maddnet.analysis.amm_cli import fashion_mnist_task
from maddnet.analysis.amm_sweep import MatmulTask, sweep, write_report
from maddnet.analysis.timing import compare, median_seconds
from maddnet.data.fashion_mnist import load_arrays

# The original MADDness implementation on this task, as reported in the issue (not measured here).
ORIGINAL_MADDNESS = [
    {"source": "original MADDness", "C": 16, "accuracy": 0.75, "nmse": 0.037, "fit_s": 14.0},
    {"source": "original MADDness", "C": 32, "accuracy": 0.79, "nmse": 0.027, "fit_s": None},
    {"source": "original MADDness", "C": 64, "accuracy": 0.81, "nmse": 0.015, "fit_s": None},
]


def mlp_hidden_task(epochs: int = 3, seed: int = 0) -> MatmulTask:
    """Second layer of a 784-512-256-10 ReLU MLP trained on Fashion-MNIST."""
    torch.manual_seed(seed)
    train_x, train_y = load_arrays("train")
    test_x, test_y = load_arrays("test")
    x_train = torch.from_numpy(train_x.reshape(-1, 784).astype(np.float32) / 255.0)
    x_test = torch.from_numpy(test_x.reshape(-1, 784).astype(np.float32) / 255.0)
    y_train = torch.from_numpy(train_y)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(784, 512),
        torch.nn.ReLU(),
        torch.nn.Linear(512, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )
    optimizer = torch.optim.Adam(mlp.parameters(), lr=1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x_train)).split(256):
            loss = torch.nn.functional.cross_entropy(mlp(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    mlp.eval()
    with torch.no_grad():
        hidden_train = mlp[1](mlp[0](x_train))
        hidden_test = mlp[1](mlp[0](x_test))
    layer2, tail = mlp[2], mlp[3:]
    return MatmulTask(
        "mlp-hidden",
        hidden_train,
        hidden_test,
        layer2.weight.detach().T.contiguous(),
        layer2.bias.detach(),
        torch.from_numpy(test_y),
        "ReLU activations (D=512) of a 784-512-256-10 MLP on Fashion-MNIST times its second layer (M=256)",
        head=lambda h: tail(h).detach(),
    )


def speed_rows(
    task: MatmulTask,
    fit_rows: torch.Tensor,
    nout: int = 100,
    ncodebooks: int = 16,
    thread_counts: list[int] | None = None,
) -> list[dict]:
    """The targets: fit time on ``fit_rows`` (60,000 x 784) and the speed of
    (10000, 512) x (512, nout) against torch.matmul, int8 and float LUTs, for row-major and
    column-major A (the same values; column-major: ``A.T`` contiguous, as the original
    MADDness assumes). The dense product runs on the very same tensor object as the
    estimator, interleaved with it, with torch and numba on the same number of threads."""
    weight = task.B[:, :nout].contiguous()
    layouts = {"row-major": task.A_test.contiguous(), "column-major": task.A_test.T.contiguous().T}
    assert layouts["column-major"].T.is_contiguous() and torch.equal(*layouts.values())
    rows = []
    fit_times = []
    for _ in range(3):
        start = time.perf_counter()
        MaddnessMatmul(ncodebooks=ncodebooks).fit_encoder(fit_rows)
        fit_times.append(time.perf_counter() - start)
    rows.append(
        {
            "task": "fit-time",
            "N_train": fit_rows.shape[0],
            "D": fit_rows.shape[1],
            "C": ncodebooks,
            "fit_s": sorted(fit_times)[1],
            "threads": torch.get_num_threads(),
        }
    )
    all_threads = torch.get_num_threads()
    models = {
        bits: MaddnessMatmul(ncodebooks=ncodebooks, lut_bits=bits).fit(task.A_train, weight)
        for bits in (8, None)
    }
    for threads in thread_counts or sorted({1, all_threads}):
        numba.set_num_threads(threads)  # numba first: its pool's start resets OpenMP's count
        torch.set_num_threads(threads)
        assert torch.get_num_threads() == numba.get_num_threads() == threads
        for layout, A in layouts.items():
            for bits, amm in models.items():
                assert torch.equal(amm(A), amm(layouts["row-major"]))
                timing = compare(lambda a=amm, x=A: a(x), lambda x=A: x @ weight, rounds=9, repeats=20)
                codes = amm.encode(A)
                rows.append(
                    {
                        "task": "speed",
                        "layout": layout,
                        "N": A.shape[0],
                        "D": weight.shape[0],
                        "M": nout,
                        "C": ncodebooks,
                        "lut_bits": bits,
                        "encode_s": median_seconds(lambda a=amm, x=A: a.encode(x), repeats=50),
                        "decode_s": median_seconds(lambda a=amm, c=codes: a.decode(c), repeats=50),
                        "approx_s": timing["candidate_s"],
                        "matmul_s": timing["baseline_s"],
                        "speedup": timing["speedup"],
                        "threads": threads,
                    }
                )
    torch.set_num_threads(all_threads)
    numba.set_num_threads(all_threads)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=["fashion-mnist", "mlp-hidden", "speed"],
        choices=["fashion-mnist", "mlp-hidden", "speed"],
    )
    parser.add_argument("--name", default="amm", help="report file name (without extension)")
    parser.add_argument("--quick", action="store_true", help="C in {16} only, 1 MLP epoch")
    parser.add_argument(
        "--threads", type=int, nargs="+", help="thread counts of the speed task (default: 1 and all)"
    )
    args = parser.parse_args()
    ncodebooks = [16] if args.quick else [8, 16, 32, 64]
    start = time.time()
    load_before = os.getloadavg()[0]
    rows, descriptions = [], []
    fmnist = fashion_mnist_task()
    if "fashion-mnist" in args.tasks:
        rows += sweep(fmnist, ncodebooks)
        descriptions.append(fmnist.description)
    if "mlp-hidden" in args.tasks or "speed" in args.tasks:
        mlp = mlp_hidden_task(epochs=1 if args.quick else 3)
    if "mlp-hidden" in args.tasks:
        rows += sweep(mlp, ncodebooks)
        descriptions.append(mlp.description)
    if "speed" in args.tasks:
        rows += speed_rows(mlp, fmnist.A_train, thread_counts=args.threads)
        descriptions.append(
            "fit-time: fit_encoder on the 60,000 Fashion-MNIST training rows (median of 3); "
            "speed: mlp-hidden test rows (10,000 x 512) times the first 100 columns of its weight"
        )
    notes = (
        f"{'; '.join(descriptions)}. Speed: median of interleaved rounds in one process, ratio = "
        f"torch.matmul time / MaddnessMatmul time (encode + LUT sum), torch and numba on the same "
        f"number of threads; encode_s and decode_s are the two halves timed alone. Total benchmark "
        f"time {time.time() - start:.0f} s; load average {load_before:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after ({os.cpu_count()} CPUs); numba threading layer "
        f"{numba.threading_layer() if 'speed' in args.tasks else '-'}."
    )
    paths = write_report(rows, args.out, args.name, references=ORIGINAL_MADDNESS, notes=notes)
    print(paths["md"].read_text())
    print(json.dumps({k: str(v) for k, v in paths.items()}))


if __name__ == "__main__":
    main()
