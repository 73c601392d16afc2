#!/usr/bin/env python
"""Accuracy of retrained MADD networks in hardware-exact mode (FP16 encoder compares, integer
LUT accumulator; docs/hardware.md, "Hardware-exact inference") against the float mode, and the
fraction of codes that change.

    python benchmarks/hw_exact.py results/resnet9_fashion_mnist/retrain_wide_long \\
        results/ds_cnn_s_kws_espeak/retrain_wider --out results/hardware/hw_exact

Per run: test accuracy in float mode and in hardware-exact mode, and over all MADD layers and
test inputs the fraction of codes that differ

* ``same input``: each layer's codes of the input it gets in the float network, encoded by the
  FP16 encoder vs the float32 one (the rounding alone), and
* ``end to end``: the codes each layer computes in the hardware-exact network vs the float
  network (rounding plus what earlier layers' changes propagate).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from maddnet.data.registry import create_dataset
from maddnet.hw import set_hw_exact
from maddnet.models.registry import create_model
from maddnet.nn import madd_layers, rebuild
from maddnet.train import load_checkpoint
from maddnet.train.runner import model_kwargs_for


def load_run(run: Path) -> tuple[torch.nn.Module, DataLoader, dict]:
    config = json.loads((run / "config.json").read_text())
    kwargs = config.get("dataset_kwargs", {})
    test = create_dataset(
        config["dataset"], config.get("eval_split", "test"), config.get("data_root"), **kwargs
    )
    info = test.info
    model = create_model(
        config["model"],
        num_classes=info.num_classes,
        in_chans=info.in_chans,
        **model_kwargs_for(config["model"], info, config.get("model_kwargs", {})),
    )
    saved = load_checkpoint(run / "checkpoint.pt", map_location="cpu")
    rebuild(model, saved["plan"])
    model.load_state_dict(saved["state_dict"])
    return model.eval(), DataLoader(test, batch_size=256), config


@torch.no_grad()
def measure(model: torch.nn.Module, loader: DataLoader, limit: int | None) -> dict:
    layers = madd_layers(model)
    seen: dict[str, list[torch.Tensor]] = {}

    def hook(name):
        def record(module, args, output):
            seen.setdefault(name, []).append(args[0].detach())

        return record

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    totals = {"images": 0, "float_correct": 0, "hw_correct": 0, "agree": 0}
    per_layer = {name: {"codes": 0, "same_input": 0, "end_to_end": 0} for name in layers}
    try:
        for images, labels in loader:
            if limit is not None and totals["images"] >= limit:
                break
            seen.clear()
            set_hw_exact(model, False)
            float_logits = model(images)
            float_inputs = {name: inputs[0] for name, inputs in seen.items()}
            seen.clear()
            set_hw_exact(model, True)
            hw_logits = model(images)
            hw_inputs = {name: inputs[0] for name, inputs in seen.items()}
            for name, layer in layers.items():
                hw_codes_float_input = layer.codes(float_inputs[name])
                hw_codes = layer.codes(hw_inputs[name])
                layer.hw_exact = False
                float_codes = layer.codes(float_inputs[name])
                layer.hw_exact = True
                stats = per_layer[name]
                stats["codes"] += float_codes.numel()
                stats["same_input"] += int((hw_codes_float_input != float_codes).sum())
                stats["end_to_end"] += int((hw_codes != float_codes).sum())
            totals["images"] += labels.shape[0]
            totals["float_correct"] += int((float_logits.argmax(1) == labels).sum())
            totals["hw_correct"] += int((hw_logits.argmax(1) == labels).sum())
            totals["agree"] += int((float_logits.argmax(1) == hw_logits.argmax(1)).sum())
    finally:
        set_hw_exact(model, False)
        for handle in handles:
            handle.remove()
    codes = sum(s["codes"] for s in per_layer.values())
    return {
        "images": totals["images"],
        "float_top1": totals["float_correct"] / totals["images"],
        "hw_exact_top1": totals["hw_correct"] / totals["images"],
        "prediction_agreement": totals["agree"] / totals["images"],
        "codes": codes,
        "changed_same_input": sum(s["same_input"] for s in per_layer.values()) / codes,
        "changed_end_to_end": sum(s["end_to_end"] for s in per_layer.values()) / codes,
        "layers": {
            name: {
                "codes": s["codes"],
                "changed_same_input": s["same_input"] / s["codes"],
                "changed_end_to_end": s["end_to_end"] / s["codes"],
            }
            for name, s in per_layer.items()
        },
    }


def markdown(results: dict) -> str:
    lines = [
        "# Hardware-exact inference vs float mode",
        "",
        "FP16 input values and thresholds in the encoder, 8-bit unsigned LUT entries summed in an",
        "INT32 accumulator, de-quantised in float32 (docs/hardware.md). Codes changed: share of all",
        "(row, codebook) codes of every MADD layer on the test set.",
        "",
        "| run | test images | float top-1 | hw-exact top-1 | difference (points) | same predictions "
        "| codes changed, same input | codes changed, end to end |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run, r in results["runs"].items():
        diff = 100 * (r["hw_exact_top1"] - r["float_top1"])
        lines.append(
            f"| `{run}` | {r['images']:,} | {100 * r['float_top1']:.2f} % | {100 * r['hw_exact_top1']:.2f} % "
            f"| {diff:+.2f} | {100 * r['prediction_agreement']:.2f} % "
            f"| {100 * r['changed_same_input']:.4f} % | {100 * r['changed_end_to_end']:.4f} % |"
        )
    for run, r in results["runs"].items():
        lines += [
            "",
            f"## `{run}` per layer",
            "",
            "| layer | codes | changed, same input | changed, end to end |",
        ]
        lines.append("|---|---|---|---|")
        for name, s in r["layers"].items():
            lines.append(
                f"| {name} | {s['codes']:,} | {100 * s['changed_same_input']:.4f} % "
                f"| {100 * s['changed_end_to_end']:.4f} % |"
            )
    lines += ["", f"Command: `{results['command']}`", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (config.json + checkpoint.pt)")
    parser.add_argument(
        "--out", type=Path, default=Path("results/hardware/hw_exact"), help="writes OUT.json/.md"
    )
    parser.add_argument("--limit", type=int, default=None, help="at most this many test inputs")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        from maddnet.threads import set_threads

        set_threads(args.threads)
    results = {"command": "python benchmarks/hw_exact.py " + " ".join(str(r) for r in args.runs), "runs": {}}
    if args.limit is not None:
        results["command"] += f" --limit {args.limit}"
    for run in args.runs:
        start = time.time()
        model, loader, _ = load_run(run)
        r = measure(model, loader, args.limit)
        r["seconds"] = round(time.time() - start, 1)
        results["runs"][str(run)] = r
        print(
            f"{run}: float {100 * r['float_top1']:.2f} %, hw-exact {100 * r['hw_exact_top1']:.2f} %, "
            f"codes changed {100 * r['changed_same_input']:.4f} % (same input) / "
            f"{100 * r['changed_end_to_end']:.4f} % "
            f"(end to end), {r['seconds']} s",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results))


if __name__ == "__main__":
    main()
