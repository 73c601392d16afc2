"""MaddLinear against nn.Linear (token rows of transformers), converted transformers against
their dense originals, saved-model sizes and the first call in a fresh process (CPU).

Sections (``--sections``, default all):
  layers   eval forward of MaddLinear (int8 LUT, K = 16, D/C = 8) against nn.Linear on 3-D
           inputs (batch, 256 tokens, D), D x M in {512 x 512, 512 x 2048, 2048 x 512},
           1,024 and 4,096 rows; also the general path (the layer's eval path before the
           packed kernel: gathered values, float table, embedding bag).
  scan     the LUT sum alone at C = 16 in dot products (rows x outputs) per second per
           thread (median, and the best of 20 calls), beside the original's ~6.1 G/s;
           also the same kernel writing the uint16 integer sums
           (``packed_lut_integer_sum``; the original's scan also outputs integers).
  models   eval forward of a converted timm LeViT-128S (random weights, batch 8 at 224x224)
           and an nn.TransformerEncoder (4 layers, d_model 512, FF 2048, batch 8 x 256
           tokens) against the dense models; every nn.Linear / nn.Conv2d the mapping
           converts is converted (MaddConfig defaults, 8-bit LUTs; LeViT's classifier
           heads stay dense: one row per image), learned from 16 random calibration
           inputs (``--models`` picks). Saved sizes: dense state_dict, save_converted,
           and save_converted(for_inference=True).
  train    one training step (forward + backward, input and parameter gradients) of
           MaddLinear, soft and soft-bf16 surrogates, against nn.Linear in float32 and
           under bfloat16 autocast (D x M x rows: 256 x 512 x 4,096, 512 x 128 x 8,192,
           128 x 256 x 16,384).
  first    time to the first MaddLinear eval output in a fresh Python process, with an
           empty numba cache (NUMBA_CACHE_DIR pointing at a new folder: every kernel
           compiles) and then with that cache filled (what every later process sees).

Every ratio is MADD time / dense time (< 1: MADD faster), measured in one process with the
two interleaved (maddnet.analysis.timing.compare: rounds x repeats, medians); torch and
numba run the same thread count. The load average at start is recorded: other jobs on the
machine slow both sides, and the 2-thread figures most.

Usage:  python benchmarks/linear.py [--threads 1 2] [--rounds 5] [--repeats 5]
                                    [--sections layers scan models first]
                                    [--models transformer levit] [--out benchmarks/results]
                                    [--suffix ""] [--markdown-from RESULT.json]
Writes ``linear{suffix}.json`` and ``linear{suffix}.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

from maddnet.amm import lut as lut_mod
from maddnet.analysis.timing import compare, median_seconds
from maddnet.nn import MaddConfig, MaddLinear, convert, save_converted
from maddnet.nn import layers as layers_mod
from maddnet.threads import set_threads

LAYER_SHAPES = [(512, 512), (512, 2048), (2048, 512)]  # (D, M): attention/MLP projections
ROWS = [1024, 4096]
SECTIONS = ["layers", "scan", "models", "first", "train"]
# (D, M, rows) of the training-step section: LeViT-like token projections and MLP layers
TRAIN_SHAPES = [(256, 512, 4096), (512, 128, 8192), (128, 256, 16384)]
TOKENS = 256
# what the original MADDness's paper reports for its LUT scan at C = 16 (AVX2, one thread)
ORIGINAL_SCAN_RATE = 6.1e9


@contextlib.contextmanager
def general_path(layer_type: type):
    """Unregister the fused fast paths of ``layer_type`` for the block: the layer runs its
    general (any encoder, any device) eval path, which is what MaddLinear eval was before the
    packed kernel path."""
    saved = {key: path for key, path in layers_mod._FAST_PATHS.items() if key[0] is layer_type}
    for key in saved:
        del layers_mod._FAST_PATHS[key]
    try:
        yield
    finally:
        layers_mod._FAST_PATHS.update(saved)


def learned_linear(in_dim: int, out_dim: int, seed: int = 0) -> tuple[nn.Linear, MaddLinear]:
    """A dense layer and its MADD layer (C = D/8, int8 LUT) learned from 4,096 ReLU'd rows
    of a 64-dimensional subspace (activation-like rows)."""
    gen = torch.Generator().manual_seed(seed)
    dense = nn.Linear(in_dim, out_dim)
    mix = torch.randn(64, in_dim, generator=gen)
    rows = (torch.randn(4096, 64, generator=gen) @ mix).relu()
    madd = MaddLinear.from_dense(dense, rows, in_dim // 8)
    return dense.eval(), madd.eval(), mix


def bench_layers(rounds: int, repeats: int) -> list[dict]:
    results = []
    for in_dim, out_dim in LAYER_SHAPES:
        dense, madd, mix = learned_linear(in_dim, out_dim)
        for nrows in ROWS:
            gen = torch.Generator().manual_seed(1)
            x = (torch.randn(nrows, 64, generator=gen) @ mix).relu().reshape(-1, TOKENS, in_dim)
            with torch.no_grad():
                fast = madd(x)
                with general_path(MaddLinear):
                    general = madd(x)
                assert torch.equal(fast, general), "fast path differs from the general path"
                r_fast = compare(lambda: madd(x), lambda: dense(x), rounds, repeats)  # noqa: B023
                with general_path(MaddLinear):
                    r_general = compare(lambda: madd(x), lambda: dense(x), rounds, repeats)  # noqa: B023
            result = {
                "D": in_dim,
                "M": out_dim,
                "C": madd.ncodebooks,
                "rows": nrows,
                "input": list(x.shape),
                "dense_s": r_fast["baseline_s"],
                "madd_s": r_fast["candidate_s"],
                "ratio": r_fast["candidate_s"] / r_fast["baseline_s"],
                "general_dense_s": r_general["baseline_s"],
                "general_madd_s": r_general["candidate_s"],
                "general_ratio": r_general["candidate_s"] / r_general["baseline_s"],
            }
            print(json.dumps(result), flush=True)
            results.append(result)
    return results


def _train_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, autocast: bool) -> None:
    """Forward + backward of ``sum(layer(x) * grad)`` (input and parameter gradients)."""
    layer.zero_grad(set_to_none=True)
    inputs = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(inputs)
    (out.float() * grad).sum().backward()


def bench_train(rounds: int, repeats: int) -> list[dict]:
    """One training step (forward + backward of ``sum(y * g)``, input and parameter
    gradients) of MaddLinear with the soft and the soft-bf16 surrogate against nn.Linear in
    float32 and under bfloat16 autocast, interleaved (maddnet.analysis.timing.compare against
    the float32 dense step)."""
    results = []
    for in_dim, out_dim, nrows in TRAIN_SHAPES:
        dense, madd, mix = learned_linear(in_dim, out_dim)
        madd_bf16 = copy.deepcopy(madd)
        madd_bf16.surrogate = "soft-bf16"
        gen = torch.Generator().manual_seed(3)
        x = (torch.randn(nrows, 64, generator=gen) @ mix).relu()
        grad = torch.randn(nrows, out_dim, generator=gen)

        def step(layer, autocast=False, x=x, grad=grad):
            return functools.partial(_train_step, layer, x, grad, autocast)

        for layer in (dense, madd, madd_bf16):
            layer.train()
        timed = {
            name: compare(run, step(dense), rounds, repeats)
            for name, run in (
                ("soft", step(madd)),
                ("soft_bf16", step(madd_bf16)),
                ("dense_bf16", step(dense, autocast=True)),
            )
        }
        result = {"D": in_dim, "M": out_dim, "C": madd.ncodebooks, "rows": nrows}
        for name, r in timed.items():
            result[f"{name}_s"] = r["candidate_s"]
            result[f"{name}_ratio"] = r["candidate_s"] / r["baseline_s"]
        result["dense_s"] = timed["soft"]["baseline_s"]
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def bench_scan_rate(rounds: int, repeats: int) -> list[dict]:
    """The packed LUT sum alone at C = 16, K = 16 (uint8 LUT) on given codes: dot products
    (rows x outputs) per second per thread."""
    results = []
    gen = torch.Generator().manual_seed(2)
    for nrows, nout in [(10_000, 100), (10_000, 512), (4096, 2048)]:
        qlut = lut_mod.quantize_lut(torch.randn(16, 16, nout, generator=gen))
        codes = torch.randint(0, 16, (nrows, 16), generator=gen, dtype=torch.uint8)
        packed = lut_mod.pack_lut(qlut)
        timed = compare(lambda: lut_mod.packed_lut_sum(codes, packed), lambda: None, rounds, repeats)  # noqa: B023
        # the fastest of 20 calls: what the kernel does when no other job takes its core
        best = min(median_seconds(lambda: lut_mod.packed_lut_sum(codes, packed), 1, 0) for _ in range(20))  # noqa: B023
        # the same kernel writing the uint16 sums (the original's scan also outputs integers)
        integer_sum = lambda: lut_mod.packed_lut_integer_sum(codes, packed)  # noqa: B023, E731
        integer = compare(integer_sum, lambda: None, rounds, repeats)
        threads = torch.get_num_threads()
        rate = nrows * nout / timed["candidate_s"] / threads
        best_rate = nrows * nout / best / threads
        integer_rate = nrows * nout / integer["candidate_s"] / threads
        result = {
            "C": 16,
            "rows": nrows,
            "M": nout,
            "pair_table": packed.pairs is not None,
            "seconds": timed["candidate_s"],
            "dot_products_per_s_per_thread": rate,
            "fraction_of_original": rate / ORIGINAL_SCAN_RATE,
            "best_seconds": best,
            "best_dot_products_per_s_per_thread": best_rate,
            "best_fraction_of_original": best_rate / ORIGINAL_SCAN_RATE,
            "integer_seconds": integer["candidate_s"],
            "integer_dot_products_per_s_per_thread": integer_rate,
            "integer_fraction_of_original": integer_rate / ORIGINAL_SCAN_RATE,
        }
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def transformer_encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(512, 8, 2048, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)


def levit() -> nn.Module:
    import timm

    return timm.create_model("levit_128s", pretrained=False, num_classes=1000)


def state_bytes(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


def saved_bytes(model: nn.Module, for_inference: bool) -> int:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.pt")
        save_converted(model, path, for_inference=for_inference)
        return os.path.getsize(path)


# name: (title, builder, input shape, layers kept dense: the classifier heads read one row
# per image, too few to learn from 16 calibration images)
MODELS = {
    "transformer": ("nn.TransformerEncoder (4 x d512, FF 2048)", transformer_encoder, (8, TOKENS, 512), ()),
    "levit": ("timm LeViT-128S (heads dense)", levit, (8, 3, 224, 224), ("head.*", "head_dist.*")),
}


def bench_models(rounds: int, repeats: int, models: list[str]) -> list[dict]:
    results = []
    for name, build, shape, exclude in (MODELS[key] for key in models):
        torch.manual_seed(0)
        dense = build().eval()
        madd = build().eval()
        madd.load_state_dict(dense.state_dict())
        # images are ReLU'd like post-activation inputs; token rows stay Gaussian
        calibration = [
            torch.randn(*shape).relu() if len(shape) == 4 else torch.randn(*shape) for _ in range(2)
        ]
        start = time.perf_counter()
        convert(
            madd,
            [(x,) for x in calibration],
            MaddConfig(exclude=exclude, max_rows=8192),
            forward_fn=lambda m, b: m(b[0]),
        )
        convert_s = time.perf_counter() - start
        nconverted = sum(isinstance(m, layers_mod.MaddLayer) for m in madd.modules())
        x = torch.randn(*shape)
        # what load_converted gives for a save_converted(..., for_inference=True) file
        inference = copy.deepcopy(madd)
        for layer in inference.modules():
            if isinstance(layer, layers_mod.MaddLayer) and layer.lut_bits is not None:
                layer.drop_float_lut()
        with torch.no_grad():
            assert torch.equal(inference(x), madd(x)), "inference-only layers changed the outputs"
            timed = compare(lambda: madd(x), lambda: dense(x), rounds, repeats)  # noqa: B023
            inference_only = compare(lambda: inference(x), lambda: dense(x), rounds, repeats)  # noqa: B023
            with general_path(MaddLinear):
                before = compare(lambda: madd(x), lambda: dense(x), rounds, repeats)  # noqa: B023
        result = {
            "model": name,
            "input": list(shape),
            "madd_layers": nconverted,
            "convert_s": convert_s,
            "dense_s": timed["baseline_s"],
            "madd_s": timed["candidate_s"],
            "ratio": timed["candidate_s"] / timed["baseline_s"],
            "inference_only_madd_s": inference_only["candidate_s"],
            "inference_only_ratio": inference_only["candidate_s"] / inference_only["baseline_s"],
            "general_linear_madd_s": before["candidate_s"],
            "general_linear_ratio": before["candidate_s"] / before["baseline_s"],
            "dense_state_bytes": state_bytes(dense.state_dict()),
            "converted_bytes": saved_bytes(madd, for_inference=False),
            "inference_bytes": saved_bytes(madd, for_inference=True),
        }
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


FIRST_CALL_SCRIPT = """
import time
start = time.perf_counter()
import torch
from maddnet.nn import MaddLinear
imported = time.perf_counter()
layer = MaddLinear(512, 512, 64).eval()
with torch.no_grad():
    layer.encoder.split_dims.copy_(torch.randint(0, 512, (64, 4)))
    layer.lut.copy_(torch.randn(64, 16, 512))
    layer(torch.randn(4, 256, 512))
done = time.perf_counter()
print(imported - start, done - imported)
"""


def bench_first_call() -> list[dict]:
    """Seconds to import maddnet.nn and to the first MaddLinear eval output in a fresh
    process: cold (empty numba cache) and warm (the cache the cold run wrote)."""
    results = []
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        for label in ("cold (empty numba cache)", "warm (cache from the cold run)"):
            out = subprocess.run(
                [sys.executable, "-c", FIRST_CALL_SCRIPT], env=env, capture_output=True, text=True, check=True
            )
            import_s, first_s = (float(v) for v in out.stdout.split())
            result = {"case": label, "import_s": import_s, "first_call_s": first_s}
            print(json.dumps(result), flush=True)
            results.append(result)
    return results


def _table(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown lines of a titled table (none without rows)."""
    if not rows:
        return []
    return [
        title,
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
    ]


def _layer_row(r: dict) -> list[str]:
    return [str(r["D"]), str(r["M"]), str(r["C"]), str(r["rows"]), f"{1e3 * r['dense_s']:.2f}"] + [
        f"{1e3 * r['madd_s']:.2f}",
        f"**{r['ratio']:.2f}**",
        f"{1e3 * r['general_madd_s']:.2f}",
        f"{r['general_ratio']:.2f}",
    ]


def _train_row(r: dict) -> list[str]:
    row = [str(r["D"]), str(r["M"]), str(r["C"]), str(r["rows"]), f"{1e3 * r['dense_s']:.1f}"]
    for name in ("soft", "soft_bf16", "dense_bf16"):
        row += [f"{1e3 * r[f'{name}_s']:.1f}", f"{r[f'{name}_ratio']:.2f}"]
    return row


def _scan_row(r: dict) -> list[str]:
    row = [str(r["rows"]), str(r["M"]), str(r["pair_table"]), f"{1e3 * r['seconds']:.2f}"]
    row += [f"{r['dot_products_per_s_per_thread'] / 1e9:.2f} G", f"{100 * r['fraction_of_original']:.0f} %"]
    if "best_seconds" in r:
        row += [
            f"{1e3 * r['best_seconds']:.2f}",
            f"{r['best_dot_products_per_s_per_thread'] / 1e9:.2f} G",
            f"{100 * r['best_fraction_of_original']:.0f} %",
        ]
    if "integer_seconds" in r:
        row += [
            f"{1e3 * r['integer_seconds']:.2f}",
            f"{r['integer_dot_products_per_s_per_thread'] / 1e9:.2f} G",
            f"{100 * r['integer_fraction_of_original']:.0f} %",
        ]
    return row


def _model_row(r: dict) -> list[str]:
    sizes = [
        f"{r[key] / 1e6:.1f} MB ({r[key] / r['dense_state_bytes']:.2f}x)"
        for key in ("converted_bytes", "inference_bytes")
    ]
    return [r["model"], str(tuple(r["input"])), str(r["madd_layers"]), f"{r['convert_s']:.0f}"] + [
        f"{1e3 * r['dense_s']:.1f}",
        f"{1e3 * r['madd_s']:.1f}",
        f"**{r['ratio']:.2f}**",
        f"{r['inference_only_ratio']:.2f}" if "inference_only_ratio" in r else "–",
        f"{r['general_linear_ratio']:.2f}",
        f"{r['dense_state_bytes'] / 1e6:.1f} MB",
        *sizes,
    ]


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [
        "# MaddLinear vs nn.Linear, converted transformers, saved sizes, first call (CPU)",
        "",
        f"{meta['machine']}; torch {meta['torch']}; load average {meta['load_average_before']:.1f} "
        f"at start, {meta['load_average_after']:.1f} at the end; {meta['rounds']} interleaved rounds "
        f"of {meta['repeats']}, medians. Ratio = MADD time / dense time (< 1: MADD faster; target "
        "<= 0.5 for the layers at >= 1,024 rows, < 1 for the models).",
        "",
    ]
    for threads, part in report["threads"].items():
        lines += _table(
            f"## MaddLinear eval, {threads} thread(s) (K = 16, D/C = 8, int8 LUT, input (rows/256, 256, D))",
            ["D", "M", "C", "rows", "nn.Linear ms", "MaddLinear ms", "ratio", "general path ms", "ratio"],
            [_layer_row(r) for r in part.get("layers", [])],
        )
        lines += _table(
            f"## LUT sum alone, C = 16, {threads} thread(s) (original MADDness: ~6.1 G/s/thread, AVX2)",
            ["rows", "M", "pair table", "median ms", "dot products / s / thread", "of the original's"]
            + (
                ["best ms", "best: dot products / s / thread", "of the original's"]
                if any("best_seconds" in r for r in part.get("scan", []))
                else []
            )
            + (
                ["uint16 sums ms", "uint16 sums: dot products / s / thread", "of the original's"]
                if any("integer_seconds" in r for r in part.get("scan", []))
                else []
            ),
            [_scan_row(r) for r in part.get("scan", [])],
        )
        lines += _table(
            f"## Training step, {threads} thread(s) (K = 16, D/C = 8, int8 LUT with QAT; "
            "ratio to the float32 nn.Linear step)",
            ["D", "M", "C", "rows", "nn.Linear ms", "soft ms", "ratio", "soft-bf16 ms", "ratio"]
            + ["nn.Linear bf16 autocast ms", "ratio"],
            [_train_row(r) for r in part.get("train", [])],
        )
        header = ["model", "input", "MADD layers", "convert s", "dense ms", "MADD ms", "ratio"]
        header += [
            "ratio, inference-only layers",
            "ratio before (general linear path)",
            "dense state",
            "saved converted",
            "saved for inference",
        ]
        lines += _table(
            f"## Converted models, eval, {threads} thread(s)",
            header,
            [_model_row(r) for r in part.get("models", [])],
        )
    lines += _table(
        "## First call in a fresh process",
        ["numba cache", "import maddnet.nn s", "first MaddLinear eval s"],
        [
            [r["case"], f"{r['import_s']:.2f}", f"{r['first_call_s']:.2f}"]
            for r in report.get("first_call", [])
        ],
    )
    lines += [f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch and numba threads")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians over rounds)")
    parser.add_argument("--repeats", type=int, default=5, help="calls per round (median)")
    parser.add_argument("--sections", nargs="+", default=SECTIONS, choices=SECTIONS)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--suffix", default="", help="appended to the output file names")
    parser.add_argument("--markdown-from", help="only rewrite the Markdown of this JSON result file")
    args = parser.parse_args()
    if args.markdown_from:
        with open(args.markdown_from) as f:
            text = markdown(json.load(f))
        with open(os.path.splitext(args.markdown_from)[0] + ".md", "w") as f:
            f.write(text)
        print(text)
        return
    if any(t < 1 for t in args.threads) or args.rounds < 1 or args.repeats < 1:
        parser.error("--threads, --rounds and --repeats must be positive")
    load_before = os.getloadavg()[0]
    report: dict = {"threads": {}}
    for threads in args.threads:
        set_threads(threads)
        part = {}
        if "layers" in args.sections:
            part["layers"] = bench_layers(args.rounds, args.repeats)
        if "scan" in args.sections:
            part["scan"] = bench_scan_rate(args.rounds, args.repeats)
        if "models" in args.sections:
            part["models"] = bench_models(args.rounds, args.repeats, args.models)
        if "train" in args.sections:
            part["train"] = bench_train(args.rounds, args.repeats)
        report["threads"][str(threads)] = part
    if "first" in args.sections:
        report["first_call"] = bench_first_call()
    report["meta"] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "numpy": np.__version__,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        "rounds": args.rounds,
        "repeats": args.repeats,
        "command": " ".join(
            ["python benchmarks/linear.py", "--threads", *map(str, args.threads)]
            + [f"--rounds {args.rounds}", f"--repeats {args.repeats}", "--sections", *args.sections]
            + (["--models", *args.models] if "models" in args.sections else [])
            + ([f"--suffix {args.suffix}"] if args.suffix else [])
        ),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"linear{args.suffix}.json"), "w") as f:
        json.dump(report, f, indent=2)
    text = markdown(report)
    with open(os.path.join(args.out, f"linear{args.suffix}.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
