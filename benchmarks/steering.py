"""Channel steering trade-off right after conversion (docs/passes.md, "Steering").

For ResNet-9 and DS-CNN-S, the dense baseline checkpoints (``results/baselines``) are
converted at the C of the retrained runs of docs/results.md (8-bit codebook LUTs, K = 16)
with ``LayerSpec.channel_budget`` = 1.0 (the default trees, bit for bit), 0.75 and 0.5,
then ``maddnet.nn.prune_unread`` makes every producer compute only the channels its MADD
readers split on. Reported per budget: test accuracy right after conversion (NO fine-tuning:
retraining would recover part of the loss) and after pruning, channels computed, dense MACs,
LUT adds, activation bytes (counted as in benchmarks/passes.py), and the dense control.

    python benchmarks/steering.py                      # both nets, ~6 min on 2 shared cores
    python benchmarks/steering.py --nets ds_cnn_s --budgets 1.0 0.5

Writes results/passes/steering.{json,md,png}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from passes import layer_costs, predictions, run_net, totals  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

from maddnet.nn import MaddConfig, conversion_plan, convert  # noqa: E402
from maddnet.nn.prune import needed_inputs, prune_unread  # noqa: E402
from maddnet.nn.spec import MADDNESS_TREE, LayerSpec  # noqa: E402

NETS = ("resnet9", "ds_cnn_s")
# Converted all at once without fine-tuning, the stems alone cost up to 73 points
# (docs/results.md, section 1) and would hide the budget's effect; their producer is the
# network input, which cannot be pruned anyway. They stay dense unless --no-keep-stems.
STEMS = {"resnet9": "prep.0", "ds_cnn_s": "stem.0"}


def accuracy(model: nn.Module, loader: DataLoader) -> tuple[float, torch.Tensor]:
    """(top-1 accuracy, predicted classes) on ``loader``."""
    _, pred, labels = predictions(model.eval(), loader)
    return float((pred == labels).float().mean()), pred


def convert_and_prune(
    dense: nn.Module, calib: list[torch.Tensor], loader: DataLoader, example: torch.Tensor, madd: MaddConfig
) -> dict:
    """Convert a copy of ``dense`` with ``madd``, then ``prune_unread`` it: accuracies, costs
    (unpruned / pruned totals of benchmarks/passes.py), channels each MADD layer reads."""
    model = copy.deepcopy(dense)
    convert(model, calib, madd, check_training=False)
    converted_accuracy, converted_pred = accuracy(model, loader)
    before = totals(layer_costs(model, example))
    reads = needed_inputs(model, example)["layers"]
    prune_unread(model, example)
    pruned_accuracy, pruned_pred = accuracy(model, loader)
    return {
        "accuracy_converted": converted_accuracy,
        "accuracy_pruned": pruned_accuracy,
        "same_predictions_after_prune": int((pruned_pred == converted_pred).sum()),
        "totals_unpruned": before,
        "totals_pruned": totals(layer_costs(model, example)),
        "channels_read": {
            layer: [len(read.get("channels", set(read.get("features", [])))), read["in_channels"]]
            for layer, read in reads.items()
        },
        "prune_report": conversion_plan(model)["passes"][-1]["report"],
    }


def measure(
    name: str,
    budgets: list[float],
    eval_samples: int,
    calib_images: int,
    max_rows: int,
    keep_stem: bool,
    single_layer: bool,
) -> dict:
    """Dense control and, per budget, the converted then pruned network's costs and accuracy."""
    t0 = time.time()
    dense, train, loader, config = run_net(name, eval_samples)
    saved = torch.load(config["checkpoint"], map_location="cpu", weights_only=False)
    dense.load_state_dict(saved["model"])
    dense.eval()
    example = next(iter(loader))[0][:8]
    calib = [b[0] for b in DataLoader(Subset(train, range(calib_images)), batch_size=128)]
    dense_accuracy, _ = accuracy(dense, loader)
    result = {
        "net": name,
        "dense_checkpoint": config["checkpoint"],
        "ncodebooks": config["ncodebooks"],
        "codebook_width": config["codebook_width"],
        "dense_layers": [STEMS[name]] if keep_stem else [],
        "calibration": f"{calib_images} training images, at most {max_rows} rows a layer",
        "eval_samples": len(loader.dataset),
        "dense_accuracy": dense_accuracy,
        "dense_totals": totals(layer_costs(dense, example)),
        "budgets": {},
    }
    ncodebooks = {k: v for k, v in config["ncodebooks"].items() if k not in result["dense_layers"]}
    settings = {"codebook_width": config["codebook_width"], "max_rows": max_rows}
    for budget in budgets:
        # MADDness's trees, as when the committed figures were made (today's default refines them)
        spec = LayerSpec(lut_bits=config.get("lut_bits", 8), channel_budget=budget, **MADDNESS_TREE)
        madd = MaddConfig(ncodebooks=ncodebooks, spec=spec, exclude=result["dense_layers"], **settings)
        entry = convert_and_prune(dense, calib, loader, example, madd)
        result["budgets"][str(budget)] = entry
        print(name, budget, {k: v for k, v in entry.items() if k.startswith("acc")}, flush=True)
    if single_layer:
        result["single_layer"] = {}
        layers = MaddConfig(exclude=result["dense_layers"]).select(dense)
        for layer in layers:
            result["single_layer"][layer] = {}
            for budget in budgets:
                spec = LayerSpec(lut_bits=config.get("lut_bits", 8), channel_budget=budget, **MADDNESS_TREE)
                chosen = {layer: ncodebooks[layer]} if layer in ncodebooks else {}
                madd = MaddConfig(layers=[layer], ncodebooks=chosen, spec=spec, **settings)
                entry = convert_and_prune(dense, calib, loader, example, madd)
                result["single_layer"][layer][str(budget)] = entry
                print(name, layer, budget, entry["accuracy_pruned"], flush=True)
    result["seconds"] = time.time() - t0
    return result


def ratio(after: float, before: float) -> str:
    return "–" if before == 0 else f"{after / before:.3f}"


def cost_cells(entry: dict, base: dict) -> str:
    """Markdown cells: channels computed, MAC / LUT add / activation byte ratios against ``base``."""
    after = entry["totals_pruned"]
    return (
        f"{after['channels']}/{base['channels']} | {ratio(after['macs'], base['macs'])} | "
        f"{ratio(after['lut_adds'], base['lut_adds'])} | "
        f"{ratio(after['activation_bytes'], base['activation_bytes'])} |"
    )


def write_markdown(results: list[dict], path: Path, load: str, command: str) -> None:
    lines = [
        "# Channel steering right after conversion (no fine-tuning)",
        "",
        f"`{command}` ({load}). Dense baselines converted at the retrained runs' C "
        "(docs/results.md), 8-bit codebook LUTs, K = 16, then `prune_unread`. Accuracy is "
        "measured right after conversion, without any retraining. Cost ratios: pruned / "
        "unpruned at budget 1.0 (the default trees); activation bytes are the float32 outputs of "
        "conv / linear / MADD / BatchNorm / activation modules at batch 1.",
        "",
        "| network | budget | accuracy converted | accuracy pruned | channels computed | dense MACs "
        "| LUT adds | activation bytes | dense control accuracy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        base = result["budgets"][next(iter(result["budgets"]))]["totals_unpruned"]
        for budget, entry in result["budgets"].items():
            lines.append(
                f"| {result['net']} | {budget} | {entry['accuracy_converted']:.4f} | "
                f"{entry['accuracy_pruned']:.4f} | {cost_cells(entry, base)} {result['dense_accuracy']:.4f} |"
            )
    for result in results:
        lines += [
            "",
            f"## {result['net']}",
            "",
            f"Dense checkpoint `{result['dense_checkpoint']}`; calibration: {result['calibration']}; "
            f"{result['eval_samples']} test samples; {result['seconds']:.0f} s.",
            "",
            "Input channels read per MADD layer (read / in):",
            "",
            "| layer | " + " | ".join(f"budget {b}" for b in result["budgets"]) + " |",
            "|---|" + "---|" * len(result["budgets"]),
        ]
        entries = list(result["budgets"].values())
        for layer in entries[0]["channels_read"]:
            cells = [f"{e['channels_read'][layer][0]}/{e['channels_read'][layer][1]}" for e in entries]
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        if "single_layer" in result:
            lines += [
                "",
                "One layer converted at a time (the rest dense), then pruned; ratios against the same "
                "layer converted at the first budget, unpruned:",
                "",
                "| layer | budget | accuracy | channels computed | dense MACs | LUT adds "
                "| activation bytes |",
                "|---|---|---|---|---|---|---|",
            ]
            for layer, by_budget in result["single_layer"].items():
                base = next(iter(by_budget.values()))["totals_unpruned"]
                for budget, entry in by_budget.items():
                    lines.append(
                        f"| {layer} | {budget} | {entry['accuracy_pruned']:.4f} | " + cost_cells(entry, base)
                    )
        lines += ["", "Producers pruned (kept / of):", ""]
        for budget, entry in result["budgets"].items():
            pruned = ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in entry["prune_report"]["pruned"].items())
            lines.append(f"- budget {budget}: {pruned or 'none'}")
    path.write_text("\n".join(lines) + "\n")


def plot(results: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        base = result["budgets"][next(iter(result["budgets"]))]["totals_unpruned"]
        for key, label in (
            ("lut_adds", "LUT adds"),
            ("macs", "dense MACs"),
            ("activation_bytes", "activation bytes"),
        ):
            if base[key] == 0:
                continue
            xs = [e["totals_pruned"][key] / base[key] for e in result["budgets"].values()]
            ys = [e["accuracy_pruned"] for e in result["budgets"].values()]
            ax.plot(xs, ys, "o-", label=label)
            for x, y, budget in zip(xs, ys, result["budgets"], strict=True):
                ax.annotate(budget, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.axhline(result["dense_accuracy"], color="gray", linestyle="--", label="dense control")
        ax.set_xlabel("cost after pruning / unsteered conversion")
        ax.set_ylabel("test accuracy (no fine-tuning)")
        ax.set_title(f"{result['net']}: channel budget")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nets", nargs="+", choices=NETS, default=list(NETS))
    parser.add_argument("--budgets", nargs="+", type=float, default=[1.0, 0.75, 0.5])
    parser.add_argument("--eval-samples", type=int, default=2000, help="test samples")
    parser.add_argument("--calib-images", type=int, default=1024, help="training images recorded")
    parser.add_argument("--max-rows", type=int, default=8192, help="calibration rows kept per layer")
    parser.add_argument(
        "--keep-stems", action=argparse.BooleanOptionalAction, default=True, help="stems stay dense"
    )
    parser.add_argument(
        "--single-layer",
        nargs="*",
        choices=NETS,
        default=["ds_cnn_s"],
        help="nets also converted one layer at a time",
    )
    parser.add_argument("--out", default="results/passes")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load = f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at start"
    results = [
        measure(
            n,
            args.budgets,
            args.eval_samples,
            args.calib_images,
            args.max_rows,
            args.keep_stems,
            n in args.single_layer,
        )
        for n in args.nets
    ]
    words = []
    for key, value in vars(args).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        else:
            words.append(f"{flag} {' '.join(map(str, value)) if isinstance(value, list) else value}")
    command = "python benchmarks/steering.py " + " ".join(words)
    (out / "steering.json").write_text(
        json.dumps({"command": command, "machine_load": load, "results": results}, indent=1)
    )
    write_markdown(results, out / "steering.md", load, command)
    plot(results, out / "steering.png")


if __name__ == "__main__":
    main()
