"""Encoder study at the AMM level: every encoder and learning variant beside MADDness.

For each task and C, each variant is fitted on training rows, its NMSE is measured on a
validation split held out of the training rows (what any choice between variants may
read), and on the test split once. Reported: NMSE (val, test), accuracy where the task
has labels, fit time, and the encoder's cost per row (compares, adds, multiplies, input
values read, and bytes read at float32 inputs).

Tasks: the two of benchmarks/amm.py (Fashion-MNIST pixels x logistic regression;
MLP hidden features x the MLP's second layer; their builders are imported, not copied)
and ``resnet9-conv``: im2col rows of ``layer2``'s 3x3 convolution (D = 288, M = 64) of
the ResNet-9 baseline in results/baselines/resnet9_fashion_mnist/model.pt on
Fashion-MNIST (NMSE only: its accuracy would need the rest of the network).

Usage:  nice python benchmarks/encoders.py [--quick] [--tasks fashion-mnist resnet9-conv]
        [--ncodebooks 8 16 32 64] [--out results/encoders] [--append | --resume]
Writes encoders.json, encoders.csv, encoders.md, encoders.png under --out.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import torch

from maddnet import MaddnessMatmul
from maddnet.amm.lut_fit import product_lut
from maddnet.analysis.amm_cli import fashion_mnist_task
from maddnet.analysis.amm_sweep import MatmulTask, accuracy, markdown_table, nmse
from maddnet.data.fashion_mnist import load_arrays

ROOT = Path(__file__).resolve().parents[1]
RESNET9 = ROOT / "results/baselines/resnet9_fashion_mnist/model.pt"
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530  # maddnet.data.fashion_mnist_dataset.INFO

# name -> (encoder, encoder_options, MaddnessMatmul options, LUT fit): the variants compared
VARIANTS = {
    "tree (MADDness)": ("tree", {}, {}, None),
    "tree, output objective": ("tree", {}, {"hash_objective": "output"}, None),
    "tree, output objective + refine": ("tree", {"refine_sweeps": 1}, {"hash_objective": "output"}, None),
    "tree, output objective + 3 refine sweeps": (
        "tree",
        {"refine_sweeps": 3},
        {"hash_objective": "output"},
        None,
    ),
    "tree, LUT ridge to 0": ("tree", {}, {}, "zero"),
    "tree-global": ("tree-global", {}, {}, None),
    "tree-global + refine": ("tree-global", {"refine_sweeps": 1}, {}, None),
    "tree K=32": ("tree", {}, {"nprototypes": 32}, None),
    "pq (L2)": ("pq", {}, {}, None),
    "pq-l1": ("pq-l1", {}, {}, None),
    "pq-linf": ("pq-linf", {}, {}, None),
}


def _amm_module():
    """benchmarks/amm.py as a module (its task builders are reused, not copied)."""
    spec = importlib.util.spec_from_file_location("bench_amm", Path(__file__).with_name("amm.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def resnet9_conv_task(nimages: int = 600, seed: int = 0) -> MatmulTask:
    """im2col rows of ResNet-9 ``layer2[0]``'s conv (inputs of that conv on Fashion-MNIST
    images, the trained baseline's weights): train rows from training images, test rows
    from test images."""
    from maddnet.models import create_model, load_weights

    model = create_model("resnet9", num_classes=10, in_chans=1, width=16).eval()
    load_weights(model, RESNET9)
    conv = model.layer2[0]
    captured: list[torch.Tensor] = []
    hook = conv.register_forward_hook(lambda m, inputs, out: captured.append(inputs[0].detach()))
    gen = torch.Generator().manual_seed(seed)

    def rows(split: str) -> torch.Tensor:
        images, _ = load_arrays(split)
        pick = torch.randperm(len(images), generator=gen)[:nimages].numpy()
        x = torch.from_numpy(images[pick].astype(np.float32) / 255.0)[:, None]
        captured.clear()
        with torch.no_grad():
            model((x - FASHION_MEAN) / FASHION_STD)
        patches = torch.nn.functional.unfold(captured[0], conv.kernel_size, padding=conv.padding)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1]).contiguous()

    train, test = rows("train"), rows("test")
    hook.remove()
    weight = conv.weight.detach().reshape(conv.out_channels, -1).T.contiguous()
    return MatmulTask(
        "resnet9-conv",
        train,
        test,
        weight,
        description="im2col rows (D=288) of ResNet-9 layer2's 3x3 conv on Fashion-MNIST (M=64)",
    )


def build_tasks(names: list[str]) -> list[MatmulTask]:
    builders = {
        "fashion-mnist": fashion_mnist_task,
        "mlp-hidden": lambda: _amm_module().mlp_hidden_task(),
        "resnet9-conv": resnet9_conv_task,
    }
    return [builders[name]() for name in names]


def split_rows(task: MatmulTask, ntrain: int, nval: int, ntest: int, seed: int = 0):
    """Train / validation rows drawn without overlap from the task's training rows; the first
    ``ntest`` test rows (labels kept aligned)."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(task.A_train.shape[0], generator=gen)
    train = task.A_train[order[:ntrain]].float()
    val = task.A_train[order[ntrain : ntrain + nval]].float()
    return train, val, task.A_test[:ntest].float()


def fit_variant(name: str, ncodebooks: int, train: torch.Tensor, weight: torch.Tensor) -> MaddnessMatmul:
    encoder, options, amm_options, lut_fit = VARIANTS[name]
    amm = MaddnessMatmul(
        ncodebooks=ncodebooks, lut_bits=None, encoder=encoder, encoder_options=options, **amm_options
    ).fit(train, weight)
    if lut_fit == "zero":  # the product-fitted LUT with the ridge pulling towards 0, not P0 B
        codes = amm.encoder_.encode(train)
        amm.lut_ = product_lut(codes, train @ weight, amm.nprototypes, amm.ridge or 1.0)
    return amm


def run(args: argparse.Namespace) -> list[dict]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    done: set[tuple[str, int, str]] = set()
    if (args.append or args.resume) and (out / "encoders.json").exists():
        old = json.loads((out / "encoders.json").read_text())
        # keep the rows this run does not redo
        results = [r for r in old if r["task"] not in args.tasks or r["C"] not in args.ncodebooks]
        if args.resume:  # and, in its scope, the finished rows measured on the same row counts
            sizes = {"N_train": args.ntrain, "N_val": args.nval, "N_test": args.ntest}
            finished = [
                r
                for r in old
                if r not in results
                and r["variant"] in args.variants
                and "nmse_test" in r
                and all(r.get(k) == v for k, v in sizes.items())
            ]
            results += finished
            done = {(r["task"], r["C"], r["variant"]) for r in finished}
    for task in build_tasks(args.tasks):
        train, val, test = split_rows(task, args.ntrain, args.nval, args.ntest)
        weight = task.B.float()
        exact_val, exact_test = val @ weight, test @ weight
        for ncodebooks in args.ncodebooks:
            for name in args.variants:
                if (task.name, ncodebooks, name) in done:
                    continue
                start = time.perf_counter()
                try:
                    amm = fit_variant(name, ncodebooks, train, weight)
                except ValueError as error:  # an encoder refusing these rows: reported, not hidden
                    results.append({"task": task.name, "C": ncodebooks, "variant": name, "error": str(error)})
                    continue
                fit_s = time.perf_counter() - start
                cost = amm.encoder_.cost()
                approx_test = amm(test)
                row = {
                    "task": task.name,
                    "C": ncodebooks,
                    "variant": name,
                    "encoder": amm.encoder,
                    "K": amm.nprototypes,
                    "nmse_val": nmse(amm(val), exact_val),
                    "nmse_test": nmse(approx_test, exact_test),
                    "accuracy": None,
                    "fit_s": fit_s,
                    **cost.as_dict(),
                    "bytes_read": 4 * cost.reads,
                    "N_train": train.shape[0],
                    "N_val": val.shape[0],
                    "N_test": test.shape[0],
                }
                if task.y_test is not None:
                    labels = task.y_test[: test.shape[0]]
                    row["accuracy"] = accuracy(task.logits(approx_test), labels)
                    row["accuracy_exact"] = accuracy(task.logits(exact_test), labels)
                results.append(row)
                print(json.dumps(row), flush=True)
                write_outputs(results, out)
    return results


def _add_ratios(results: list[dict]) -> None:
    """nmse_ratio: test NMSE over the MADDness tree's at the same task and C."""
    base = {(r["task"], r["C"]): r["nmse_test"] for r in results if r.get("variant") == "tree (MADDness)"}
    for r in results:
        if "nmse_test" in r and (r["task"], r["C"]) in base:
            r["nmse_ratio"] = r["nmse_test"] / base[(r["task"], r["C"])]


def write_outputs(results: list[dict], out: Path) -> None:
    order = list(VARIANTS)
    results.sort(
        key=lambda r: (r["task"], r["C"], order.index(r["variant"]) if r["variant"] in order else 99)
    )
    _add_ratios(results)
    (out / "encoders.json").write_text(json.dumps(results, indent=1))
    columns = [
        "task", "C", "variant", "K", "nmse_val", "nmse_test", "nmse_ratio", "accuracy", "accuracy_exact",
        "fit_s", "compares", "adds", "multiplies", "reads", "bytes_read", "N_train", "error",
    ]  # fmt: skip
    with open(out / "encoders.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    shown = [c for c in columns if c not in ("accuracy_exact", "N_train", "error")]
    text = "# Encoder study (AMM level)\n\n"
    text += "Produced by `nice python benchmarks/encoders.py` (see docs/encoders.md).\n\n"
    text += markdown_table([r for r in results if "nmse_test" in r], shown)
    errors = [r for r in results if "error" in r]
    if errors:
        text += "\n\nRefused:\n\n" + "\n".join(
            f"- {r['task']} C={r['C']} {r['variant']}: {r['error']}" for r in errors
        )
    (out / "encoders.md").write_text(text + "\n")
    plot(results, out / "encoders.png")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if "nmse_test" in r]
    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    colours = plt.get_cmap("tab20").colors  # more variants than the default cycle's 10 colours
    markers = "os^vDP"
    for ax, task in zip(axes[0], tasks, strict=True):
        for index, variant in enumerate(VARIANTS):
            points = sorted(
                (r["C"], r["nmse_test"]) for r in rows if r["task"] == task and r["variant"] == variant
            )
            if points:
                style = {"color": colours[index % len(colours)], "marker": markers[index % len(markers)]}
                ax.plot(*zip(*points, strict=True), label=variant, **style)
        ax.set(title=task, xlabel="C (codebooks)", ylabel="test NMSE", xscale="log", yscale="log")
        ticks = sorted({r["C"] for r in rows if r["task"] == task})
        ax.set_xticks(ticks, [str(c) for c in ticks], minor=False)
        ax.set_xticks([], minor=True)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="results/encoders")
    parser.add_argument("--quick", action="store_true", help="fewer rows and C = 8, 16 only")
    parser.add_argument("--tasks", nargs="+", default=["fashion-mnist", "mlp-hidden", "resnet9-conv"])
    parser.add_argument("--ncodebooks", nargs="+", type=int, default=None)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--ntrain", type=int, default=None, help="training rows (default 20000; quick 3000)")
    parser.add_argument("--nval", type=int, default=None, help="validation rows held out of training rows")
    parser.add_argument("--ntest", type=int, default=None, help="test rows")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--append", action="store_true", help="keep the rows of other tasks / C in --out")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="as --append, and skip the (task, C, variant) rows already in --out with the same "
        "row counts: an interrupted run continues (every row is written as soon as it is measured)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quick = args.quick
    args.ncodebooks = args.ncodebooks or ([8, 16] if quick else [8, 16, 32, 64])
    args.ntrain = args.ntrain or (3000 if quick else 20000)
    args.nval = args.nval or (1000 if quick else 5000)
    args.ntest = args.ntest or (2000 if quick else 10000)
    run(args)


if __name__ == "__main__":
    main()
