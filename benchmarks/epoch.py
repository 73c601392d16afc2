"""A ResNet-9 retraining epoch with every conv/linear layer on MADDness against the same
epoch of the dense network (issue 16: target at most 1.5x), measured in one process.

    python benchmarks/epoch.py --threads 1 --out benchmarks/results/epoch.json

Both models train on the same Fashion-MNIST batches (the retraining pipeline's data loader,
batch 128, 468 steps = one epoch) with the pipeline's loss (cross-entropy + 0.5
distillation from the dense teacher) and optimiser groups of the final fine-tuning phase
(AdamW; every MADD layer's LUT and thresholds, BatchNorm, nothing frozen), exactly what
``maddnet retrain``'s final steps do. The MADD model is the dense baseline converted with
``retrain_wide_long``'s codebooks (``experiments/madd_resnet9_fashion_mnist.sh``; D/C = 4.5
for the 3x3 convs) or, with ``--codebooks rule``, at the default rule's C (D/C = 9), from 8
calibration batches. The epoch is cut into chunks that alternate between the two models
(MADD first in even chunks, dense first in odd ones), so both see the same machine load;
per chunk the wall time and the process CPU time are recorded. Data loading is inside the
timed loop, as in an epoch.

Needs the Fashion-MNIST files (``apt-get install dataset-fashion-mnist``) and the dense
baseline ``results/baselines/resnet9_fashion_mnist/checkpoint.pt``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch

from maddnet.nn import LayerSpec, MaddConfig, MaddLayer, convert, madd_layers
from maddnet.nn.spec import SURROGATES
from maddnet.retrain.config import RetrainConfig
from maddnet.retrain.pipeline import (
    RetrainLoss,
    build_data,
    build_dense_model,
    make_optimizer,
    parameter_groups,
)
from maddnet.threads import set_threads

WIDE_CODEBOOKS = {
    "prep.0": 9,
    "layer1.0.0": 32,
    "layer1.1.res1.0": 64,
    "layer1.1.res2.0": 64,
    "layer2.0": 64,
    "layer3.0.0": 128,
    "layer3.1.res1.0": 256,
    "layer3.1.res2.0": 256,
    "fc": 32,
}


def trainer(model: torch.nn.Module, teacher: torch.nn.Module, config: RetrainConfig):
    """One optimiser step of the final fine-tuning phase: ``step(inputs, labels)``."""
    kinds = (torch.nn.Conv2d, torch.nn.Linear, MaddLayer)
    order = [name for name, module in model.named_modules() if isinstance(module, kinds)]
    optimizer = make_optimizer(parameter_groups(model, order, len(order) - 1, config, final=True), config)
    loss_fn = RetrainLoss(config, teacher=teacher)
    model.train()

    def step(inputs: torch.Tensor, labels: torch.Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = loss_fn(model, inputs, labels)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=39, help="steps per timed chunk (468 = 12 x 39)")
    parser.add_argument(
        "--steps", type=int, default=468, help="steps per model (468: one epoch at batch 128)"
    )
    parser.add_argument(
        "--codebooks",
        choices=("wide", "rule"),
        default="wide",
        help="wide: retrain_wide_long's C (D/C = 4.5 for the 3x3 convs); rule: MaddConfig's rule (D/C = 9)",
    )
    parser.add_argument("--surrogate", choices=SURROGATES, default="soft", help="LayerSpec.surrogate")
    parser.add_argument("--checkpoint", default="results/baselines/resnet9_fashion_mnist/checkpoint.pt")
    parser.add_argument("--out", default="benchmarks/results/epoch.json")
    args = parser.parse_args()
    set_threads(args.threads)
    config = RetrainConfig(
        model="resnet9",
        dataset="fashion_mnist",
        model_kwargs={"width": 16},
        checkpoint=args.checkpoint,
        batch_size=128,
        distill=0.5,
        device="cpu",
        threads=args.threads,
    )
    train_loader, calib_loader, _, info = build_data(config)
    dense = build_dense_model(config, info)
    teacher = copy.deepcopy(dense).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    madd = copy.deepcopy(dense).eval()
    calibration = [batch[0] for _, batch in zip(range(8), calib_loader, strict=False)]
    start = time.perf_counter()
    codebooks = WIDE_CODEBOOKS if args.codebooks == "wide" else None
    convert(
        madd,
        [(x,) for x in calibration],
        MaddConfig(ncodebooks=codebooks, spec=LayerSpec(surrogate=args.surrogate)),
    )
    chosen = {name: layer.ncodebooks for name, layer in madd_layers(madd).items()}
    convert_s = time.perf_counter() - start
    steps = {"madd": trainer(madd, teacher, config), "dense": trainer(dense, teacher, config)}
    batches = iter(train_loader)
    records = []
    done = {"madd": 0, "dense": 0}
    chunk_index = 0
    while min(done.values()) < args.steps:
        count = min(args.chunk, args.steps - min(done.values()))
        order = ("madd", "dense") if chunk_index % 2 == 0 else ("dense", "madd")
        # the same batches for both models in this chunk
        chunk = []
        for _ in range(count):
            try:
                chunk.append(next(batches))
            except StopIteration:
                batches = iter(train_loader)
                chunk.append(next(batches))
        for who in order:
            wall, cpu = time.perf_counter(), time.process_time()
            for inputs, labels in chunk:
                steps[who](inputs, labels)
            records.append(
                {
                    "chunk": chunk_index,
                    "model": who,
                    "steps": count,
                    "wall_s": time.perf_counter() - wall,
                    "cpu_s": time.process_time() - cpu,
                    "load_avg_1min": os.getloadavg()[0],
                }
            )
            done[who] += count
            print(json.dumps(records[-1]), flush=True)
        chunk_index += 1
    totals = {
        who: {
            "wall_s": sum(r["wall_s"] for r in records if r["model"] == who),
            "cpu_s": sum(r["cpu_s"] for r in records if r["model"] == who),
        }
        for who in ("madd", "dense")
    }
    chunk_ratios = sorted(
        a["wall_s"] / b["wall_s"]
        for a in records
        if a["model"] == "madd"
        for b in records
        if b["model"] == "dense" and b["chunk"] == a["chunk"]
    )
    result = {
        "command": "python benchmarks/epoch.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "steps_per_model": args.steps,
        "batch_size": 128,
        "codebooks": chosen,
        "surrogate": args.surrogate,
        "convert_s": convert_s,
        "totals": totals,
        "epoch_wall_ratio": totals["madd"]["wall_s"] / totals["dense"]["wall_s"],
        "epoch_cpu_ratio": totals["madd"]["cpu_s"] / totals["dense"]["cpu_s"],
        "chunk_wall_ratio_median": chunk_ratios[len(chunk_ratios) // 2],
        "chunk_wall_ratio_range": [chunk_ratios[0], chunk_ratios[-1]],
        "chunks": records,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "chunks"}, indent=2))


if __name__ == "__main__":
    main()
