"""ResNet-9 training step and eval forward on a GPU: all conv/linear layers on MADDness
against the dense network, same shapes, one process, interleaved rounds, medians.

    python benchmarks/gpu_step.py --out benchmarks/results/gpu_step.json
    python benchmarks/gpu_step.py --surrogate soft-bf16 --out benchmarks/results/gpu_step_bf16.json

Needs CUDA. Converts a randomly initialised ResNet-9 (calibration on random images), so
the figures are speed only; also counts host synchronisations per MADD training step
(``torch.cuda.set_sync_debug_mode("warn")``).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from maddnet.models import create_model
from maddnet.nn import LayerSpec, MaddConfig, convert, madd_layers
from maddnet.nn.spec import SURROGATES


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(1000 * (time.perf_counter() - start))
    times.sort()
    return times[len(times) // 2]


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def eval_fn(model: nn.Module, x: torch.Tensor):
    def forward():
        with torch.no_grad():
            model(x)

    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=64, help="ResNet-9 width (64: the original)")
    parser.add_argument("--batch", type=int, default=128, help="images per step")
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--in-chans", type=int, default=3, help="image channels")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per round")
    parser.add_argument("--out", default="benchmarks/results/gpu_step.json", help="JSON result file")
    parser.add_argument("--device", default="cuda", help="cuda (cpu only to check the script)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of a MADD step")
    parser.add_argument("--surrogate", choices=SURROGATES, default="soft", help="LayerSpec.surrogate")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    dense = create_model("resnet9", num_classes=10, in_chans=args.in_chans, width=args.width).to(device)
    madd = create_model("resnet9", num_classes=10, in_chans=args.in_chans, width=args.width).to(device)
    madd.load_state_dict(dense.state_dict())
    shape = (args.batch, args.in_chans, args.size, args.size)
    calib = [(torch.randn(shape, device=device), None) for _ in range(4)]
    start = time.perf_counter()
    config = MaddConfig(
        max_rows=8192, min_rows=min(256, 4 * args.batch), spec=LayerSpec(surrogate=args.surrogate)
    )
    convert(madd, calib, config)
    convert_s = time.perf_counter() - start
    x, y = torch.randn(shape, device=device), torch.randint(0, 10, (args.batch,), device=device)
    dense.train(), madd.train()
    fns = {
        "train_dense": step_fn(dense, x, y),
        "train_madd": step_fn(madd, x, y),
        "eval_dense": eval_fn(dense, x),
        "eval_madd": eval_fn(madd, x),
    }
    for fn in fns.values():  # warm-up
        fn(), fn()
    rounds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            if name.startswith("eval"):
                dense.eval(), madd.eval()
            else:
                dense.train(), madd.train()
            rounds[name].append(median_ms(fn, args.repeats, device))
    result = {name: sorted(v)[len(v) // 2] for name, v in rounds.items()}
    madd.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        fns["train_madd"]()
        sync(device)
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    # the debug mode's own notice ("prototype feature") is not a synchronisation
    syncs = [
        str(w.message).splitlines()[0]
        for w in caught
        if "synchroniz" in str(w.message).lower() and "prototype feature" not in str(w.message)
    ]
    summary = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "settings": vars(args),
        "madd_layers": len(madd_layers(madd)),
        "convert_s": convert_s,
        "ms": result,
        "train_ratio": result["train_madd"] / result["train_dense"],
        "eval_ratio": result["eval_madd"] / result["eval_dense"],
        "host_syncs_per_madd_train_step": len(syncs),
        "sync_messages": syncs[:10],
    }
    if args.profile:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(3):
                fns["train_madd"]()
            sync(device)
        print(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60)
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
