"""MaddConv2d against nn.Conv2d on ResNet-like shapes: eval forward and training step.

Shapes (batch 32, 3x3, stride 1, padding 1, C = Cin codebooks, i.e. D/C = 9, K = 16):
  64->64 at 56x56 and 256->256 at 14x14. Inputs are ReLU'd Gaussians (post-activation
  statistics); each MADD layer is learned from 4096 of its input patches.

Measured in one process, dense and MADD interleaved call by call, repeated; medians.
  eval forward:  ``torch.no_grad()``, layers in eval mode (MADD reads the int8 LUT; the
                 float-LUT variant is timed too).
  training step: forward + backward of ``sum(y * g)``; dense: input + weight (+ bias)
                 gradients; MADD: input + thresholds + LUT (+ bias) gradients, qat on,
                 with the soft-tree surrogate (default), the soft tree with its
                 leaf-score product in bfloat16 (``surrogate="soft-bf16"``; the relative
                 L2 error of its gradients against the soft ones is reported) and the
                 hard-path one; and the dense step under ``torch.autocast("cpu",
                 bfloat16)`` (its convolutions in bfloat16), for reference.

Usage:  python benchmarks/layers.py [--repeats 7] [--batch 32] [--out benchmarks/results]
                                   [--suffix ""] [--threads N] [--eval-only]
                                   [--baseline-src OLD/src/maddnet] [--profile]
``--profile`` adds, per shape, where the soft MADD training step's time goes: the self
time per step of its largest operations (torch.profiler over 3 steps; the numba kernels
show up as the self time of the autograd Function that calls them).
``--baseline-src DIR`` times an older maddnet (the package directory of another revision:
``git archive REV src/maddnet | tar -x -C /tmp/base`` then ``--baseline-src
/tmp/base/src/maddnet``), imported beside the current one as ``maddnet_baseline``, its
``MaddConv2d`` holding the same learned state, interleaved with the current code (int8
eval and soft training step), after checking that its eval outputs are bit-identical and
its gradients equal to 1e-5 of each gradient's largest entry
(``train_baseline_gradient_gap``; summation order may differ): a before/after ratio from
one process. Kernels and the Python around them come from the same revision.
Writes ``layers{suffix}.json`` and ``layers{suffix}.md`` under ``--out``. The OpenMP wait
policy matters on CPU (torch's and numba's thread pools hand over many times per
training step; spinning threads slow the other pool down), so the results note
``OMP_WAIT_POLICY``; e.g. ``OMP_WAIT_POLICY=PASSIVE python benchmarks/layers.py
--suffix _omp_passive``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from maddnet.nn import MaddConv2d
from maddnet.threads import set_threads

SHAPES = [("64->64 3x3 @56x56", 64, 56), ("256->256 3x3 @14x14", 256, 14)]


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, calling them in turn ``repeats`` times."""
    for fn in fns.values():  # warm-up (numba compilation, allocator)
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def load_baseline(path: str):
    """An older ``maddnet`` package directory imported as ``maddnet_baseline`` (its relative
    imports resolve inside it). Raises FileNotFoundError naming ``path``."""
    init = os.path.join(path, "__init__.py")
    if not os.path.isfile(init):
        raise FileNotFoundError(f"--baseline-src: no maddnet package at {path} (no __init__.py)")
    name = "maddnet_baseline"
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[path])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # numba's on-disk cache re-imports modules by name
    spec.loader.exec_module(module)
    return importlib.import_module(f"{name}.nn")


def baseline_layer(baseline_nn, layer: MaddConv2d) -> nn.Module:
    """The baseline revision's MaddConv2d holding ``layer``'s learned state (same mode)."""
    other = baseline_nn.MaddConv2d(
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        padding=layer.padding,
        ncodebooks=layer.ncodebooks,
        lut_bits=layer.spec.lut_bits,
        nprototypes=layer.spec.nprototypes,
    )
    other.load_state_dict(layer.state_dict())
    return other.train(layer.training)


def learn_layer(conv: nn.Conv2d, x: torch.Tensor, lut_bits: int | None, nrows: int = 4096) -> MaddConv2d:
    gen = torch.Generator().manual_seed(0)
    rows = F.unfold(x[:4], 3, padding=1).transpose(1, 2).reshape(-1, conv.in_channels * 9)
    rows = rows[torch.randperm(rows.shape[0], generator=gen)[:nrows]]
    return MaddConv2d.from_dense(conv, rows, ncodebooks=conv.in_channels, lut_bits=lut_bits)


def profile_step(run: Callable[[], object], steps: int = 3, top: int = 6) -> list[dict]:
    """Self CPU milliseconds per call of ``run`` of its ``top`` largest operations."""
    from torch.profiler import ProfilerActivity, profile

    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [
        {
            "op": e.key,
            "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
            "share": e.self_cpu_time_total / total,
            "calls_per_step": e.count / steps,
        }
        for e in events[:top]
    ]


def bench_shape(
    label: str,
    channels: int,
    size: int,
    batch: int,
    repeats: int,
    train: bool = True,
    baseline=None,
    profile: bool = False,
) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size).relu()
    conv = nn.Conv2d(channels, channels, 3, padding=1)
    start = time.perf_counter()
    madd = learn_layer(conv, x, lut_bits=8)
    learn_s = time.perf_counter() - start
    madd_float = learn_layer(conv, x, lut_bits=None)
    for layer in (conv, madd, madd_float):
        layer.eval()

    def forward(layer):
        def run():
            with torch.no_grad():
                return layer(x)

        return run

    eval_fns = {"dense": forward(conv), "madd_int8": forward(madd), "madd_float": forward(madd_float)}
    if baseline is not None:
        eval_fns["madd_int8_baseline"] = forward(baseline_layer(baseline, madd))
        if not torch.equal(eval_fns["madd_int8_baseline"](), forward(madd)()):
            raise AssertionError(f"{label}: the baseline's eval output differs")
    eval_s = interleaved_medians(eval_fns, repeats)

    result = {
        "shape": label,
        "batch": batch,
        "D": channels * 9,
        "C": channels,
        "rows": batch * size * size,
        "learn_s": learn_s,
        "eval_dense_s": eval_s["dense"],
        "eval_madd_int8_s": eval_s["madd_int8"],
        "eval_madd_float_s": eval_s["madd_float"],
        "eval_ratio_int8": eval_s["madd_int8"] / eval_s["dense"],
        "eval_ratio_float": eval_s["madd_float"] / eval_s["dense"],
    }
    if baseline is not None:
        result["eval_madd_int8_baseline_s"] = eval_s["madd_int8_baseline"]
        result["eval_ratio_int8_baseline"] = eval_s["madd_int8_baseline"] / eval_s["dense"]
    if not train:
        return result
    x_train = x.clone().requires_grad_()
    grad = torch.randn(batch, channels, size, size)

    def step(layer):
        def run():
            layer.zero_grad(set_to_none=True)
            x_train.grad = None
            (layer(x_train) * grad).sum().backward()
            return [x_train.grad, *(p.grad for p in layer.parameters() if p.grad is not None)]

        return run

    madd.train()
    conv.train()
    madd_path = learn_layer(conv, x, lut_bits=8)
    madd_path.surrogate = "path"
    madd_path.train()
    madd_bf16 = learn_layer(conv, x, lut_bits=8)
    madd_bf16.surrogate = "soft-bf16"
    madd_bf16.train()

    def autocast_bf16(run):
        def wrapped():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return run()

        return wrapped

    train_fns = {
        "dense": step(conv),
        "dense_bf16": autocast_bf16(step(conv)),
        "madd": step(madd),
        "madd_bf16": step(madd_bf16),
        "madd_path": step(madd_path),
    }
    # soft-bf16 against soft: relative L2 error of each gradient (the LUT's is exact)
    bf16_error = max(
        float((a - b).norm() / a.norm().clamp_min(1e-30))
        for a, b in zip(step(madd)(), step(madd_bf16)(), strict=True)
    )
    if baseline is not None:
        train_fns["madd_baseline"] = step(baseline_layer(baseline, madd))
        old = [g.clone() for g in train_fns["madd_baseline"]()]
        # relative to each gradient's largest entry: kernels may sum in another order
        gap = max(
            float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
            for a, b in zip(old, step(madd)(), strict=True)
        )
        if gap > 1e-5:
            raise AssertionError(f"{label}: the baseline's gradients differ (relative {gap:.2e})")
    train_s = interleaved_medians(train_fns, repeats)
    if profile:
        result["train_madd_profile"] = profile_step(train_fns["madd"])
    if baseline is not None:
        result["train_madd_baseline_s"] = train_s["madd_baseline"]
        result["train_ratio_baseline"] = train_s["madd_baseline"] / train_s["dense"]
        result["train_baseline_gradient_gap"] = gap
    return {
        **result,
        "train_dense_s": train_s["dense"],
        "train_madd_s": train_s["madd"],
        "train_ratio": train_s["madd"] / train_s["dense"],
        "train_dense_bf16_s": train_s["dense_bf16"],
        "train_madd_bf16_s": train_s["madd_bf16"],
        "train_ratio_bf16": train_s["madd_bf16"] / train_s["dense"],
        "train_bf16_gradient_error": bf16_error,
        "train_madd_path_s": train_s["madd_path"],
        "train_ratio_path": train_s["madd_path"] / train_s["dense"],
    }


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        "# MaddConv2d vs nn.Conv2d (CPU)",
        "",
        f"{meta['machine']}; torch {meta['torch']}, {meta['threads']} threads; "
        f"OMP_WAIT_POLICY={meta['omp_wait_policy']}; "
        f"load average {meta['load_average_before']:.1f} at start; "
        f"{meta['repeats']} interleaved repeats, medians. Ratio = MADD time / dense time "
        "(< 1: MADD faster). Targets (issue 16): eval int8 ratio <= 0.5 at D/C = 9, training "
        "ratio <= 1.25.",
        "",
        "| shape | batch | D | C | eval dense ms | eval MADD int8 ms | ratio | "
        "eval MADD float ms | ratio | train dense ms | train MADD (soft) ms | ratio | "
        "train MADD (soft-bf16) ms | ratio | soft-bf16 gradient error | "
        "train MADD (path) ms | ratio | train dense bf16 autocast ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        bf16 = (
            f"{1e3 * r['train_madd_bf16_s']:.1f} | {r['train_ratio_bf16']:.2f} | "
            f"{r['train_bf16_gradient_error']:.1e} | "
            if "train_madd_bf16_s" in r
            else "– | – | – | "
        )
        train = (
            f"{1e3 * r['train_dense_s']:.1f} | {1e3 * r['train_madd_s']:.1f} | {r['train_ratio']:.2f} | "
            + bf16
            + f"{1e3 * r['train_madd_path_s']:.1f} | {r['train_ratio_path']:.2f} | "
            + (f"{1e3 * r['train_dense_bf16_s']:.1f} |" if "train_dense_bf16_s" in r else "– |")
            if "train_dense_s" in r
            else "– | – | – | – | – | – | – | – | – |"
        )
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r['D']} | {r['C']} | {1e3 * r['eval_dense_s']:.1f} | "
            f"{1e3 * r['eval_madd_int8_s']:.1f} | {r['eval_ratio_int8']:.2f} | "
            f"{1e3 * r['eval_madd_float_s']:.1f} | {r['eval_ratio_float']:.2f} | " + train
        )
    if any("eval_ratio_int8_baseline" in r for r in results):
        lines += [
            "",
            f"Baseline `{meta['baseline_src']}` (checked: eval outputs bit-identical; "
            "gradients, where trained, within 1e-5 of each gradient's largest entry, the gap "
            "column), timed in the same interleaved rounds: ratio to dense, baseline -> current.",
            "",
            "| shape | eval int8 | training step (soft) | gradient gap |",
            "|---|---|---|---|",
        ]
        for r in results:
            train = (
                f"{r['train_ratio_baseline']:.2f} -> {r['train_ratio']:.2f}"
                if "train_ratio_baseline" in r
                else "–"
            )
            gap = f"{r['train_baseline_gradient_gap']:.1e}" if "train_baseline_gradient_gap" in r else "–"
            lines.append(
                f"| {r['shape']} | {r['eval_ratio_int8_baseline']:.2f} -> {r['eval_ratio_int8']:.2f} "
                f"| {train} | {gap} |"
            )
    profiled = [r for r in results if "train_madd_profile" in r]
    if profiled:
        lines += [
            "",
            "Where the soft MADD training step's time goes (torch.profiler, self time per step: "
            "the wall time spent in each operation less its child operations, on the calling "
            "thread; the numba kernels count as the self time of the autograd Function that "
            "calls them):",
            "",
            "| shape | operation | self ms / step | share | calls / step |",
            "|---|---|---|---|---|",
        ]
        for r in profiled:
            for e in r["train_madd_profile"]:
                lines.append(
                    f"| {r['shape']} | `{e['op']}` | {e['self_ms_per_step']:.1f} | "
                    f"{100 * e['share']:.0f} % | {e['calls_per_step']:g} |"
                )
    lines += ["", f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--suffix", default="", help="appended to the output file names")
    parser.add_argument("--threads", type=int, default=0, help="torch and numba threads (0: all cores)")
    parser.add_argument("--eval-only", action="store_true", help="skip the training steps")
    parser.add_argument(
        "--baseline-src",
        default=None,
        help="an older maddnet package directory (e.g. /tmp/base/src/maddnet) to time alongside",
    )
    parser.add_argument(
        "--profile", action="store_true", help="where the MADD training step's time goes, per shape"
    )
    args = parser.parse_args()
    if args.profile and args.eval_only:
        parser.error("--profile profiles the training step; it cannot go with --eval-only")
    baseline = None if args.baseline_src is None else load_baseline(args.baseline_src)
    load_before = os.getloadavg()[0]
    if args.threads:
        set_threads(args.threads)
    results = []
    for label, channels, size in SHAPES:
        result = bench_shape(
            label,
            channels,
            size,
            args.batch,
            args.repeats,
            train=not args.eval_only,
            baseline=baseline,
            profile=args.profile,
        )
        print(json.dumps(result))
        results.append(result)
    meta = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        "repeats": args.repeats,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "baseline_src": args.baseline_src,
        "command": " ".join(
            ([f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"] if "OMP_WAIT_POLICY" in os.environ else [])
            + ["python benchmarks/layers.py", f"--repeats {args.repeats}", f"--batch {args.batch}"]
            + ([f"--suffix {args.suffix}"] if args.suffix else [])
            + ([f"--threads {args.threads}"] if args.threads else [])
            + (["--eval-only"] if args.eval_only else [])
            + ([f"--baseline-src {args.baseline_src}"] if args.baseline_src else [])
            + (["--profile"] if args.profile else [])
        ),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"layers{args.suffix}.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    text = markdown(results, meta)
    with open(os.path.join(args.out, f"layers{args.suffix}.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
