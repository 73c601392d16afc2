"""Learning (fit) and conversion speed: maddnet against the original MADDness (issue 16).

Parts (``--parts``; all by default):
  compare   Fashion-MNIST pixels (60,000 x 784) x a logistic-regression classifier
            (M = 10), C = 16, K = 16, default settings: ``MaddnessMatmul.fit`` against the
            original MADDness learning code (Bolt's Python ``MithralMatmul``, Blalock &
            Guttag 2021) at each ``--threads``, ``--rounds`` interleaved rounds in this
            process, and the NMSE of both on the 10,000 test rows. The original runs only
            with ``--reference-dir`` (a local copy of Bolt's ``experiments/python``, e.g.
            ``git show``/``git archive`` of github.com/dblalock/bolt); nothing of it is part
            of maddnet, and the small shims it needs under current numpy (removed aliases
            such as ``np.int``; stand-ins for its plotting/seeding imports ``seaborn`` and
            ``kmc2``, which fitting does not call) are made here, not in its copy.
  scaling   maddnet fit time against N (10k-60k rows of Fashion-MNIST, C = 16), D (256 to
            4,608 columns of low-rank Gaussian rows, N = 10,000, C = 16) and C (8 to 256,
            Fashion-MNIST, N = 60,000), one thread.
  convert   ``convert_layer`` of a 3x3 conv (128 -> 128 channels, D = 1,152) on 16,384
            rows (``MaddConfig.max_rows``) for C = 16 to 1,024: seconds and peak resident
            memory of a fresh process each.
  models    time and peak memory to convert torchvision ResNet-50 and ViT-B/16 (random
            weights, 256 calibration inputs of 3x64x64), with the functions that dominate.
  trees     ``convert_layer`` of three layer shapes (a 3x3 conv, a 1x1 conv, a linear layer)
            on 16,384 rows with the layer default's trees (output objective, one refine
            sweep) against MADDness's (``MADDNESS_TREE``), one thread, ``--rounds``
            interleaved rounds in this process: seconds, CPU seconds and the output NMSE on
            4,096 held-out rows of each.

Writes ``<out>/fit.json`` (every measurement, the machine and its load average),
``fit.md`` (tables) and ``fit.png`` (the curves).

Usage:
  nice python benchmarks/fit.py --reference-dir /tmp/bolt/experiments/python \\
      [--threads 1 2] [--rounds 3] [--parts compare scaling convert models trees] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import importlib
import importlib.util
import io
import json
import os
import platform
import pstats
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

from maddnet import MaddnessMatmul
from maddnet.analysis.amm_cli import fashion_mnist_task
from maddnet.threads import set_threads

# Modules the original imports at load time but whose code fitting never runs.
REFERENCE_STUBS = ("seaborn", "kmc2")
# numpy aliases removed in numpy 1.24 that the original still uses.
NUMPY_ALIASES = {"int": int, "float": float, "bool": bool, "object": object}


def load_reference(path: Path) -> types.ModuleType:
    """Bolt's ``vq_amm`` module from its ``experiments/python`` folder, with shims."""
    if not (path / "vq_amm.py").exists():
        raise FileNotFoundError(f"--reference-dir {path} has no vq_amm.py (Bolt's experiments/python)")
    for alias, value in NUMPY_ALIASES.items():
        if alias not in np.__dict__:
            setattr(np, alias, value)
    for name in REFERENCE_STUBS:
        if importlib.util.find_spec(name) is None and name not in sys.modules:
            sys.modules[name] = types.ModuleType(name)
    spec = importlib.util.spec_from_file_location(
        "bolt_reference", path / "__init__.py", submodule_search_locations=[str(path)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules["bolt_reference"] = package
    spec.loader.exec_module(package)
    import joblib  # the original's dependency (with scikit-learn: pip install -e ".[data]")

    # Its modules memoise learning results on disk (``joblib.Memory('.')``): a repeated fit
    # on the same rows would be a cache read, not a fit. Load them with caching off.
    real_memory = joblib.Memory
    joblib.Memory = lambda *args, **kwargs: real_memory(location=None, verbose=0)
    try:
        return importlib.import_module("bolt_reference.vq_amm")
    finally:
        joblib.Memory = real_memory


def nmse(approx: np.ndarray, exact: np.ndarray) -> float:
    """``||approx - exact||^2 / ||exact||^2``."""
    return float(((approx - exact) ** 2).sum() / (exact**2).sum())


def limit_threads(threads: int) -> contextlib.AbstractContextManager:
    """torch + numba threads (maddnet) and the BLAS pools numpy/scikit-learn use (original)."""
    from threadpoolctl import threadpool_limits  # comes with scikit-learn (the "data" extra)

    set_threads(threads)
    return threadpool_limits(threads)


def timed(fn) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, result) of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def compare_part(args: argparse.Namespace, task) -> list[dict]:
    a_train, a_test, weight = task.A_train, task.A_test, task.B
    exact = (a_test @ weight).numpy()
    reference = load_reference(Path(args.reference_dir)) if args.reference_dir else None

    def fit_maddnet():
        return MaddnessMatmul(ncodebooks=args.ncodebooks).fit(a_train, weight)

    def fit_reference():
        amm = reference.MithralMatmul(args.ncodebooks)
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its losses
            amm.fit(a_train.numpy(), weight.numpy())
        return amm

    # Compile every numba kernel (both sides) before timing.
    MaddnessMatmul(ncodebooks=args.ncodebooks).fit(a_train[:2000], weight)
    if reference is not None:
        small = reference.MithralMatmul(args.ncodebooks)
        with contextlib.redirect_stdout(io.StringIO()):
            small.fit(a_train[:2000].numpy(), weight.numpy())
    rows = []
    for threads in args.threads:
        with limit_threads(threads):
            for rnd in range(args.rounds):
                # Alternate who goes first so a load change hits both alike.
                order = ["maddnet", "original"] if rnd % 2 == 0 else ["original", "maddnet"]
                for who in order:
                    if who == "original" and reference is None:
                        continue
                    wall, cpu, amm = timed(fit_maddnet if who == "maddnet" else fit_reference)
                    if who == "maddnet":
                        approx = amm(a_test).numpy()
                    else:
                        with contextlib.redirect_stdout(io.StringIO()):
                            approx = amm(a_test.numpy(), weight.numpy())
                    rows.append(
                        {
                            "impl": who,
                            "threads": threads,
                            "round": rnd,
                            "fit_s": wall,
                            "fit_cpu_s": cpu,
                            "nmse": nmse(approx, exact),
                            "load_avg_1min": os.getloadavg()[0],
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def low_rank_rows(nrows: int, ndims: int, seed: int = 0) -> torch.Tensor:
    """Gaussian rows from a 32-dim subspace plus 10 % noise (activation-like)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(32, ndims, generator=gen)
    return torch.randn(nrows, 32, generator=gen) @ mix + 0.1 * torch.randn(nrows, ndims, generator=gen)


def scaling_part(args: argparse.Namespace, task) -> list[dict]:
    quick = args.quick
    ns = (10_000, 30_000) if quick else (10_000, 20_000, 40_000, 60_000)
    ds = (256, 1024) if quick else (256, 512, 1024, 2304, 4608)
    cs = (8, 32) if quick else (8, 16, 32, 64, 128, 256)
    gen = torch.Generator().manual_seed(1)
    cases = [("N", n, task.A_train[:n], task.B, 16) for n in ns]
    cases += [("D", d, low_rank_rows(10_000, d), torch.randn(d, 10, generator=gen), 16) for d in ds]
    cases += [("C", c, task.A_train, task.B, c) for c in cs]
    rows = []
    with limit_threads(1):
        MaddnessMatmul(ncodebooks=16).fit(task.A_train[:2000], task.B)
        for axis, value, a_train, weight, ncodebooks in cases:
            wall, cpu, _ = timed(lambda: MaddnessMatmul(ncodebooks=ncodebooks).fit(a_train, weight))  # noqa: B023
            nrows, ndims = a_train.shape
            rows.append(
                {
                    "axis": axis,
                    "value": value,
                    "N": nrows,
                    "D": ndims,
                    "C": ncodebooks,
                    "fit_s": wall,
                    "fit_cpu_s": cpu,
                    "load_avg_1min": os.getloadavg()[0],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> int:
    """Reset this process's peak resident memory (Linux ``clear_refs`` 5) to the current
    resident size and return it in KB. ``getrusage``'s ``ru_maxrss`` cannot be reset and,
    after fork + exec, starts at the parent's size."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS")


def peak_rss_kb() -> int:
    """Peak resident memory since :func:`reset_peak_rss` (``VmHWM``), KB."""
    return _status_kb("VmHWM")


def convert_worker(ncodebooks: int, nrows: int, channels: int) -> dict:
    """Convert one 3x3 conv from ``nrows`` random patch rows (run in a fresh process)."""
    from maddnet.nn import MADDNESS_TREE, LayerSpec, MaddConfig, convert_layer

    set_threads(1)
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(channels, channels, 3))
    images = torch.relu(torch.randn(nrows // 64 + 1, channels, 10, 10, generator=gen))
    rows = torch.nn.functional.unfold(images, 3).transpose(1, 2).reshape(-1, channels * 9)[:nrows]
    rows = rows.contiguous()
    before_kb = reset_peak_rss()
    # MADDness's trees, as when the committed figures were measured (the layer default since
    # 2026-12-01 adds the output objective and a refine sweep, docs/encoders.md)
    config = MaddConfig(ncodebooks=ncodebooks, spec=LayerSpec(**MADDNESS_TREE))
    wall, cpu, _ = timed(lambda: convert_layer(model, "0", rows, config))
    peak_kb = peak_rss_kb()
    return {
        "C": ncodebooks,
        "N": nrows,
        "D": channels * 9,
        "convert_s": wall,
        "convert_cpu_s": cpu,
        "rss_before_mb": before_kb / 1024,
        "peak_rss_mb": peak_kb / 1024,
        "load_avg_1min": os.getloadavg()[0],
    }


def convert_part(args: argparse.Namespace) -> list[dict]:
    cs = (16, 64) if args.quick else tuple(c for c in (16, 32, 64, 128, 256, 512, 1024) if c <= args.max_c)
    rows = []
    for ncodebooks in cs:
        command = [sys.executable, __file__, "--convert-worker", str(ncodebooks), "16384", "128"]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


PARTS = ("compare", "scaling", "convert", "models", "trees")
# (name, layer, C by the rule): D/C = 9 for the 3x3 conv, 8 for the others
TREE_LAYERS = (
    ("3x3 conv 128->128 (D 1152, M 128)", lambda: torch.nn.Conv2d(128, 128, 3), 128),
    ("1x1 conv 256->1024 (D 256, M 1024)", lambda: torch.nn.Conv2d(256, 1024, 1), 32),
    ("linear 768->768 (D 768, M 768)", lambda: torch.nn.Linear(768, 768), 96),
)


def tree_inputs(layer: torch.nn.Module, ninputs: int, gen: torch.Generator) -> torch.Tensor:
    """Correlated post-ReLU inputs of ``layer``: ``ninputs`` images of 8x8 outputs for a conv
    (64 rows each), ``ninputs`` rows for a linear layer."""
    if isinstance(layer, torch.nn.Conv2d):
        side = 8 + layer.kernel_size[0] - 1
        images = torch.relu(torch.randn(ninputs, layer.in_channels, side, side, generator=gen))
        return torch.nn.functional.avg_pool2d(images, 3, 1, 1)  # neighbouring taps correlate
    mix = torch.randn(64, layer.in_features, generator=gen)
    return torch.relu(torch.randn(ninputs, 64, generator=gen) @ mix)


def layer_rows(layer: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The (N, D) rows a MADD layer multiplies: im2col rows of a conv, the rows of a linear layer."""
    if isinstance(layer, torch.nn.Conv2d):
        cols = torch.nn.functional.unfold(inputs, layer.kernel_size)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1]).contiguous()
    return inputs


def trees_part(args: argparse.Namespace) -> list[dict]:
    from maddnet.nn import MADDNESS_TREE, LayerSpec, MaddConfig, convert_layer

    set_threads(1)
    specs = {"maddness": LayerSpec(**MADDNESS_TREE), "default": LayerSpec()}
    results = []
    for name, build, ncodebooks in TREE_LAYERS:
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        dense = build().eval()
        per_input = 64 if isinstance(dense, torch.nn.Conv2d) else 1
        inputs = tree_inputs(dense, (16384 + 4096) // per_input, gen)
        train, test = inputs[: 16384 // per_input], inputs[16384 // per_input :]
        rows = layer_rows(dense, train)
        with torch.no_grad():
            exact = dense(test)
        for rnd in range(args.rounds):
            order = list(specs) if rnd % 2 == 0 else list(reversed(specs))  # alternate who goes first
            for label in order:
                model = torch.nn.Sequential(copy.deepcopy(dense))
                config = MaddConfig(ncodebooks=ncodebooks, spec=specs[label])
                wall, cpu, _ = timed(lambda m=model, c=config, r=rows: convert_layer(m, "0", r, c))
                with torch.no_grad():
                    approx = model[0].eval()(test)
                results.append(
                    {
                        "layer": name,
                        "C": ncodebooks,
                        "trees": label,
                        "round": rnd,
                        "convert_s": wall,
                        "convert_cpu_s": cpu,
                        "nmse": nmse(approx.numpy(), exact.numpy()),
                        "load_avg_1min": os.getloadavg()[0],
                    }
                )
                print(json.dumps(results[-1]), flush=True)
    return results


def model_worker(name: str, threads: int = 1, trees: str = "maddness") -> dict:
    """Convert a torchvision model (random weights) on 256 inputs of 3x64x64 with ``threads``
    torch/numba/BLAS threads and ``trees`` ("maddness": ``MADDNESS_TREE``, as the committed
    figures; "default": ``LayerSpec()``); fresh process."""
    import torchvision

    from maddnet.nn import MADDNESS_TREE, LayerSpec, MaddConfig, convert

    set_threads(threads)
    torch.manual_seed(0)
    builders = {
        "resnet50": lambda: torchvision.models.resnet50(),
        "vit_b_16": lambda: torchvision.models.vit_b_16(image_size=64),
    }
    model = builders[name]().eval()
    batches = [(torch.randn(32, 3, 64, 64),) for _ in range(8)]
    profile = cProfile.Profile()
    profile.enable()
    config = MaddConfig(spec=LayerSpec(**MADDNESS_TREE) if trees == "maddness" else LayerSpec())
    wall, cpu, _ = timed(lambda: convert(model, batches, config, check_training=False))
    profile.disable()
    peak_kb = peak_rss_kb()
    stats = pstats.Stats(profile)
    top = sorted(stats.stats.items(), key=lambda item: -item[1][2])[:8]  # by own time
    return {
        "model": name,
        "threads": threads,
        "trees": trees,
        "inputs": 256,
        "convert_s": wall,
        "convert_cpu_s": cpu,
        "peak_rss_mb": peak_kb / 1024,
        "top_own_time": [{"function": f"{Path(f).name}:{line}({fn})", "s": v[2]} for (f, line, fn), v in top],
        "load_avg_1min": os.getloadavg()[0],
    }


def models_part(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name in args.models:
        for threads in args.threads:
            for trees in args.model_trees:
                command = [sys.executable, __file__, "--model-worker", name, "--threads", str(threads)]
                command += ["--model-trees", trees]
                out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    return rows


def median(values: list[float]) -> float:
    return float(np.median(values)) if values else float("nan")


def summarise(compare_rows: list[dict]) -> list[dict]:
    """Median fit time, NMSE and the per-round time ratio maddnet / original per thread count."""
    out = []
    for threads in sorted({r["threads"] for r in compare_rows}):
        rows = [r for r in compare_rows if r["threads"] == threads]
        mine = [r for r in rows if r["impl"] == "maddnet"]
        ref = {r["round"]: r for r in rows if r["impl"] == "original"}
        ratios = [r["fit_s"] / ref[r["round"]]["fit_s"] for r in mine if r["round"] in ref]
        cpu_ratios = [r["fit_cpu_s"] / ref[r["round"]]["fit_cpu_s"] for r in mine if r["round"] in ref]
        out.append(
            {
                "threads": threads,
                "maddnet_fit_s": median([r["fit_s"] for r in mine]),
                "original_fit_s": median([r["fit_s"] for r in ref.values()]),
                "time_ratio": median(ratios),
                "cpu_time_ratio": median(cpu_ratios),
                "maddnet_nmse": median([r["nmse"] for r in mine]),
                "original_nmse": median([r["nmse"] for r in ref.values()]),
            }
        )
    return out


def growth(rows: list[dict], axis: str) -> float:
    """Exponent b of time ~ size^b fitted on the axis' points (1 = linear)."""
    points = [(r["value"], r["fit_s"]) for r in rows if r["axis"] == axis]
    if len(points) < 2:
        return float("nan")
    x, y = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    return float(np.polyfit(x, y, 1)[0])


def trees_summary(rows: list[dict]) -> list[dict]:
    """Per layer: median seconds / CPU seconds of each tree setting, the median of the per-round
    CPU-time ratio default / maddness, and each setting's NMSE (the same every round)."""
    summary = []
    for layer in dict.fromkeys(r["layer"] for r in rows):
        mine = [r for r in rows if r["layer"] == layer]
        by = {t: [r for r in mine if r["trees"] == t] for t in ("maddness", "default")}
        rounds = sorted({r["round"] for r in mine})
        cpu = {t: {r["round"]: r["convert_cpu_s"] for r in by[t]} for t in by}
        summary.append(
            {
                "layer": layer,
                "C": mine[0]["C"],
                **{f"{t}_s": median([r["convert_s"] for r in by[t]]) for t in by},
                **{f"{t}_cpu_s": median([r["convert_cpu_s"] for r in by[t]]) for t in by},
                "cpu_ratio": median([cpu["default"][k] / cpu["maddness"][k] for k in rounds]),
                **{f"{t}_nmse": by[t][0]["nmse"] for t in by},
            }
        )
    return summary


def write_markdown(path: Path, result: dict) -> None:
    lines = [f"# Fit and conversion speed (`benchmarks/fit.py`)\n\n{result['machine']}\n"]
    if result["summary"]:
        lines += [
            "\n## Fashion-MNIST 60,000 x 784, C = 16, K = 16: maddnet vs the original MADDness\n",
            "| threads | maddnet fit s | original fit s | time ratio | CPU-time ratio "
            "| NMSE maddnet | NMSE original |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {s['threads']} | {s['maddnet_fit_s']:.2f} | {s['original_fit_s']:.2f} "
            f"| {s['time_ratio']:.3f} | {s['cpu_time_ratio']:.3f} "
            f"| {s['maddnet_nmse']:.4f} | {s['original_nmse']:.4f} |"
            for s in result["summary"]
        ]
        lines.append("\nRatios: median over rounds of maddnet / original in the same round.")
    if result["scaling"]:
        lines += [
            "\n## maddnet fit time against N, D and C (one thread)\n",
            "| axis | N | D | C | fit s | fit CPU s |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['axis']} | {r['N']} | {r['D']} | {r['C']} | {r['fit_s']:.2f} | {r['fit_cpu_s']:.2f} |"
            for r in result["scaling"]
        ]
        exps = ", ".join(f"{axis}: {value:.2f}" for axis, value in result["growth_exponents"].items())
        lines.append(f"\nFitted growth exponents (time ~ size^b; 1 = linear): {exps}.")
    if result["convert"]:
        lines += [
            "\n## Converting a 3x3 conv (D = 1,152) on 16,384 rows against C (fresh process each)\n",
            "| C | seconds | CPU seconds | peak RSS MB (before conversion) |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['C']} | {r['convert_s']:.2f} | {r['convert_cpu_s']:.2f} "
            f"| {r['peak_rss_mb']:.0f} ({r['rss_before_mb']:.0f}) |"
            for r in result["convert"]
        ]
    if result["models"]:
        lines += ["\n## Converting whole models (256 inputs of 3x64x64, random weights)\n"]
        lines += [
            "| model | trees | threads | seconds | CPU seconds | peak RSS MB | load (1 min) "
            "| most own time (wall) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in result["models"]:
            top = "; ".join(f"{t['function']} {t['s']:.1f} s" for t in r["top_own_time"][:4])
            lines.append(
                f"| {r['model']} | {r.get('trees', 'maddness')} | {r.get('threads', 1)} "
                f"| {r['convert_s']:.1f} | {r['convert_cpu_s']:.1f} "
                f"| {r['peak_rss_mb']:.0f} | {r.get('load_avg_1min', float('nan')):.1f} | {top} |"
            )
    if result.get("trees"):
        lines += [
            "\n## convert_layer with the default trees against MADDness's (16,384 rows, one thread)\n",
            "| layer | C | MADDness s (CPU s) | default s (CPU s) | CPU-time ratio "
            "| NMSE MADDness | NMSE default |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['layer']} | {r['C']} | {r['maddness_s']:.2f} ({r['maddness_cpu_s']:.2f}) "
            f"| {r['default_s']:.2f} ({r['default_cpu_s']:.2f}) | {r['cpu_ratio']:.2f} "
            f"| {r['maddness_nmse']:.4f} | {r['default_nmse']:.4f} |"
            for r in trees_summary(result["trees"])
        ]
        lines.append(
            "\nMedians over interleaved rounds; ratio: median over rounds of default / MADDness "
            "CPU seconds in the same round. NMSE on 4,096 held-out rows."
        )
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(axis, [r for r in result["scaling"] if r["axis"] == axis]) for axis in ("N", "D", "C")]
    panels = [(axis, rows) for axis, rows in panels if rows]
    extra = 1 if result["convert"] else 0
    if not panels and not extra:
        return
    fig, axes = plt.subplots(1, len(panels) + extra, figsize=(4 * (len(panels) + extra), 3.4), squeeze=False)
    for ax, (axis, rows) in zip(axes[0], panels, strict=False):
        x = np.array([r["value"] for r in rows], float)
        for key, label in (("fit_s", "wall"), ("fit_cpu_s", "CPU")):
            y = np.array([r[key] for r in rows])
            ax.plot(x, y, "o-", label=f"maddnet fit, {label}")
            ax.plot(x, y[0] * x / x[0], "k--", lw=0.8)
        ax.set_xlabel(axis)
        ax.set_ylabel("fit seconds (1 thread; dashed: linear)")
        ax.legend(fontsize=7)
    if extra:
        ax = axes[0][-1]
        rows = result["convert"]
        c = np.array([r["C"] for r in rows], float)
        ax.plot(c, [r["convert_s"] for r in rows], "o-", label="seconds")
        ax.plot(c, [r["convert_cpu_s"] for r in rows], "o:", label="CPU seconds")
        ax.legend(fontsize=7, loc="upper left")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("C (3x3 conv, D=1152, 16384 rows)")
        ax.set_ylabel("convert seconds")
        twin = ax.twinx()
        twin.plot(
            c, [r["peak_rss_mb"] - r["rss_before_mb"] for r in rows], "s--", color="C2", label="peak MB"
        )
        twin.set_ylabel("extra peak RSS MB")
        twin.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reference-dir", help="Bolt's experiments/python folder (runs the original)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ncodebooks", type=int, default=16)
    parser.add_argument("--parts", nargs="+", default=list(PARTS))
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_b_16"])
    parser.add_argument(
        "--model-trees",
        nargs="+",
        choices=["maddness", "default"],
        default=["maddness"],
        help="models part: MADDness's trees (the committed figures) and/or LayerSpec()'s",
    )
    parser.add_argument("--max-c", type=int, default=1024, help="largest C of the convert part")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="fewer points (a smoke run)")
    parser.add_argument("--merge", action="store_true", help="keep skipped parts from <out>/fit.json")
    parser.add_argument("--convert-worker", nargs=3, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.convert_worker:
        print(json.dumps(convert_worker(*args.convert_worker)))
        return 0
    if args.model_worker:
        print(json.dumps(model_worker(args.model_worker, args.threads[0], args.model_trees[0])))
        return 0
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown --parts {unknown}; choose from {' '.join(PARTS)}")
    task = fashion_mnist_task() if {"compare", "scaling"} & set(args.parts) else None
    result: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average at start {os.getloadavg()[0]:.1f}; torch {torch.__version__}, numpy {np.__version__}",
        "command": " ".join(["python", "benchmarks/fit.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    result["compare"] = compare_part(args, task) if "compare" in args.parts else []
    result["summary"] = summarise(result["compare"])
    result["scaling"] = scaling_part(args, task) if "scaling" in args.parts else []
    result["growth_exponents"] = {
        axis: growth(result["scaling"], axis) for axis in ("N", "D", "C") if result["scaling"]
    }
    result["convert"] = convert_part(args) if "convert" in args.parts else []
    result["models"] = models_part(args) if "models" in args.parts else []
    result["trees"] = trees_part(args) if "trees" in args.parts else []
    result["load_avg_at_end"] = os.getloadavg()[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge and (out / "fit.json").exists():
        # Keep the parts this run skipped from the previous run (each part records its load).
        previous = json.loads((out / "fit.json").read_text())
        kept = {"compare": ("compare", "summary"), "scaling": ("scaling", "growth_exponents")}
        for part in set(PARTS) - set(args.parts):
            for key in kept.get(part, (part,)):
                result[key] = previous.get(key, result[key])
        if "models" in args.parts:  # a run of some models keeps the others' rows
            measured = {_model_key(r) for r in result["models"]}
            result["models"] += [r for r in previous.get("models", []) if _model_key(r) not in measured]
        result["command"] = f"{previous.get('command', '')}; {result['command']}"
    (out / "fit.json").write_text(json.dumps(result, indent=1))
    write_markdown(out / "fit.md", result)
    plot(out / "fit.png", result)
    print((out / "fit.md").read_text())
    return 0


def _model_key(row: dict) -> tuple:
    """What a whole-model row measured: rows of the same key replace each other on --merge."""
    return row["model"], row.get("trees", "maddness"), row.get("threads", 1)


if __name__ == "__main__":
    raise SystemExit(main())
