"""What the inter-layer passes save on real converted networks (docs/passes.md).

For ResNet-9 and DS-CNN-S (retrained checkpoints of docs/results.md) and LeViT-tiny (its
dense checkpoint converted at the retrained run's C, without fine-tuning: no retrained
LeViT checkpoint is kept), apply ``maddnet.nn.fuse`` then ``maddnet.nn.prune_unread`` and
report per layer and per network: channels computed, MACs (dense layers), LUT reads / adds
and compares (MADD layers), compares removed by folding, weight / LUT bytes and activation
bytes (float32 outputs of the layers; BatchNorm / activation outputs that folding removed),
and whether the passed model predicts the same classes on the test set.

    python benchmarks/passes.py                     # all three, ~4 min on 2 shared cores (load 5)
    python benchmarks/passes.py --nets resnet9 --eval-samples 1000

Writes results/passes/{passes.json, passes.md, passes.png}.
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
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset, Subset  # noqa: E402

from maddnet.data.registry import create_dataset  # noqa: E402
from maddnet.models.registry import create_model  # noqa: E402
from maddnet.nn import MaddConfig, MaddConv2d, MaddLayer, convert, rebuild  # noqa: E402
from maddnet.nn.graph import ACTIVATIONS, BATCHNORMS  # noqa: E402
from maddnet.nn.passes import apply_passes  # noqa: E402
from maddnet.nn.spec import MADDNESS_TREE, LayerSpec  # noqa: E402
from maddnet.train.runner import model_kwargs_for  # noqa: E402

NETS = {
    "resnet9": {
        "run": "results/resnet9_fashion_mnist/retrain_wide_long",
        "checkpoint": "checkpoint.pt",
        "data_root": None,
    },
    "ds_cnn_s": {
        "run": "results/ds_cnn_s_kws_espeak/retrain_wider",
        "checkpoint": "checkpoint.pt",
        "data_root": "data/kws_espeak",
    },
    "levit_tiny": {
        "run": "results/levit_tiny_fashion_mnist/retrain_wide",
        "checkpoint": None,  # converted from the dense baseline (no retrained checkpoint kept)
        "data_root": None,
    },
}


def run_net(name: str, eval_samples: int) -> tuple[nn.Module, Dataset, DataLoader, dict]:
    """(the run's dense model, initial weights, torch seed 0; training set; loader of the
    first ``eval_samples`` test samples; the run's config.json)."""
    setup = NETS[name]
    config = json.loads((Path(setup["run"]) / "config.json").read_text())
    root = setup["data_root"] or config.get("data_root")
    data_kwargs = config.get("dataset_kwargs", {})
    train = create_dataset(config["dataset"], "train", root, augment=False, **data_kwargs)
    test = create_dataset(config["dataset"], "test", root, augment=False, **data_kwargs)
    info = train.info
    kwargs = model_kwargs_for(config["model"], info, config.get("model_kwargs", {}))
    torch.manual_seed(0)
    model = create_model(config["model"], num_classes=info.num_classes, in_chans=info.in_chans, **kwargs)
    loader = DataLoader(Subset(test, range(min(eval_samples, len(test)))), batch_size=256)
    return model, train, loader, config


def load_net(name: str, eval_samples: int) -> tuple[nn.Module, DataLoader, str]:
    """(converted model in eval mode, test loader, how it was obtained)."""
    setup = NETS[name]
    model, train, loader, config = run_net(name, eval_samples)
    if setup["checkpoint"]:
        saved = torch.load(Path(setup["run"]) / setup["checkpoint"], map_location="cpu", weights_only=False)
        rebuild(model, saved["plan"])
        model.load_state_dict(saved["state_dict"])
        how = f"retrained checkpoint {setup['run']}/{setup['checkpoint']}"
    else:
        if Path(config["checkpoint"]).exists():
            dense = torch.load(config["checkpoint"], map_location="cpu", weights_only=False)
            model.load_state_dict(dense.get("model", dense.get("state_dict", dense)))
            weights = f"dense baseline {config['checkpoint']}"
        else:  # the baseline's weights are not kept in the repository
            weights = "random initial weights (torch seed 0; the dense checkpoint is not kept)"
        # MADDness's trees, as when the committed figures were made (today's default refines them)
        spec = LayerSpec(lut_bits=config.get("lut_bits", 8), **MADDNESS_TREE)
        calib = [b[0] for b in DataLoader(Subset(train, range(256)), batch_size=128)]
        convert(
            model.eval(),
            calib,
            MaddConfig(
                ncodebooks=config["ncodebooks"],
                codebook_width=config["codebook_width"],
                spec=spec,
                max_rows=2048,  # rows per layer: keeps the 34 fits to minutes on a loaded CPU
            ),
            check_training=False,
        )
        how = f"{weights}, converted at the run's C (256 training images, 2048 rows a layer, no fine-tuning)"
    return model.eval(), loader, how


def layer_costs(model: nn.Module, example: torch.Tensor) -> dict[str, dict]:
    """Per compute layer (conv / linear / MADD) and per BatchNorm / activation module: its
    output size and the operations of one inference (batch 1)."""
    costs: dict[str, dict] = {}
    hooks = []

    def hook(name):
        def record(module, args, out):
            positions = out[0].numel() // out.shape[1] if out.dim() == 4 else out[0].numel() // out.shape[-1]
            entry = {"type": type(module).__name__, "out_elems": out[0].numel()}
            if isinstance(module, MaddLayer):
                channels = module.out_channels if isinstance(module, MaddConv2d) else module.out_features
                constant = int((~torch.isfinite(module.thresholds)).sum())
                entry.update(
                    channels=channels,
                    lut_adds=positions * module.ncodebooks * channels,
                    compares=positions * module.ncodebooks * module.depth,
                    constant_nodes=constant,
                    nodes=module.thresholds.numel(),
                    bytes=module.lut_bytes + 4 * (channels if module.bias is not None else 0),
                )
            elif isinstance(module, nn.Conv2d | nn.Linear):
                channels = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
                entry.update(
                    channels=channels,
                    macs=positions * module.weight[0].numel() * channels,
                    bytes=4 * sum(p.numel() for p in module.parameters()),
                )
            costs[name] = entry

        return record

    for name, module in model.named_modules():
        if isinstance(module, (MaddLayer, nn.Conv2d, nn.Linear, *ACTIVATIONS, *BATCHNORMS)):
            hooks.append(module.register_forward_hook(hook(name)))
    with torch.no_grad():
        model(example[:1])
    for handle in hooks:
        handle.remove()
    return costs


def totals(costs: dict[str, dict]) -> dict[str, int]:
    keys = ("channels", "macs", "lut_adds", "compares", "constant_nodes", "nodes", "bytes")
    out = {k: sum(c.get(k, 0) for c in costs.values()) for k in keys}
    out["activation_bytes"] = 4 * sum(c["out_elems"] for c in costs.values())
    return out


def predictions(model: nn.Module, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits, labels = [], []
    with torch.no_grad():
        for x, y in loader:
            logits.append(model(x))
            labels.append(y)
    logits = torch.cat(logits)
    return logits, logits.argmax(1), torch.cat(labels)


def measure(name: str, eval_samples: int) -> dict:
    t0 = time.time()
    model, loader, how = load_net(name, eval_samples)
    example = next(iter(loader))[0][:8]
    before = layer_costs(model, example)
    ref_logits, ref_pred, labels = predictions(model, loader)
    result = {
        "net": name,
        "model": how,
        "eval_samples": len(labels),
        "accuracy_before": float((ref_pred == labels).float().mean()),
        "totals_before": totals(before),
        "variants": {},
        "seconds": 0.0,
        "machine_load": f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
    }
    # "exact": every fold exact (default); "bn_after": BatchNorms after MADD layers folded too;
    # "approximate": GELU / Hardswish folded with single compares where two are needed
    variants = {"exact": {}, "bn_after": {"bn_after": True}, "approximate": {"approximate": True}}
    for variant, options in variants.items():
        passed = copy.deepcopy(model)
        reports = apply_passes(passed, example, **options)
        after = layer_costs(passed, example)
        logits, pred, _ = predictions(passed, loader)
        result["variants"][variant] = {
            "accuracy_after": float((pred == labels).float().mean()),
            "same_predictions": int((pred == ref_pred).sum()),
            "max_logit_diff": float((logits - ref_logits).abs().max()),
            "totals_after": totals(after),
            "layers": {k: {"before": c, "after": after.get(k, {"out_elems": 0})} for k, c in before.items()},
            "approximate_nodes": sum(
                e["approximate_nodes"] for e in reports.get("fuse", {}).get("layers", {}).values()
            ),
            "reports": reports,
        }
    result["seconds"] = time.time() - t0
    return result


def fraction(after: float, before: float) -> str:
    return "–" if before == 0 else f"{after / before:.3f}"


def write_markdown(results: list[dict], path: Path, load: str) -> None:
    lines = [
        "# Inter-layer passes: fuse + prune_unread",
        "",
        f"`python benchmarks/passes.py` ({load}). After/before ratios; activation bytes are the",
        "float32 outputs of conv/linear/MADD/BatchNorm/activation modules at batch 1.",
        "",
        "| network (passes) | channels computed | dense MACs | LUT adds | constant nodes "
        "(compares removed) | approximate nodes | weight/LUT bytes | activation bytes "
        "| same test predictions | max logit diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for variant, v in r["variants"].items():
            b, a = r["totals_before"], v["totals_after"]
            lines.append(
                f"| {r['net']} ({variant}) | {fraction(a['channels'], b['channels'])} | "
                f"{fraction(a['macs'], b['macs'])} | {fraction(a['lut_adds'], b['lut_adds'])} | "
                f"{a['constant_nodes'] - b['constant_nodes']} of {b['nodes']} | "
                f"{v.get('approximate_nodes', '–')} | "
                f"{fraction(a['bytes'], b['bytes'])} | "
                f"{fraction(a['activation_bytes'], b['activation_bytes'])} | "
                f"{v['same_predictions']}/{r['eval_samples']} | {v['max_logit_diff']:.2e} |"
            )
    for r in results:
        v = r["variants"]["exact"]
        lines += [
            "",
            f"## {r['net']} (exact passes)",
            "",
            f"Model: {r['model']}. Accuracy {r['accuracy_before']:.4f} → "
            f"{v['accuracy_after']:.4f} on {r['eval_samples']} test samples.",
            "",
        ]
        lines += [
            "| layer | type | channels | MACs | LUT adds | constant nodes | bytes |",
            "|---|---|---|---|---|---|---|",
        ]
        for layer, entry in v["layers"].items():
            b, a = entry["before"], entry["after"]
            if "channels" not in b:
                if not a.get("out_elems"):
                    lines.append(f"| {layer} | {b['type']} | folded away | | | | |")
                continue
            lines.append(
                f"| {layer} | {b['type']} | {a.get('channels', 0)}/{b['channels']} | "
                f"{a.get('macs', 0)}/{b.get('macs', 0)} | {a.get('lut_adds', 0)}/{b.get('lut_adds', 0)} | "
                f"{a.get('constant_nodes', 0)}/{b.get('nodes', 0)} | "
                f"{a.get('bytes', 0)}/{b.get('bytes', 0)} |"
            )
        fuse_left = v["reports"].get("fuse", {}).get("left_alone", {})
        prune_left = v["reports"].get("prune_unread", {}).get("left_alone", {})
        chain_stops = {k: e["left_alone"] for k, e in v["reports"].get("fuse", {}).get("layers", {}).items()}
        lines += ["", "Left alone:", ""]
        lines += [f"- fuse, `{k}`: {e}" for k, e in fuse_left.items()]
        lines += [f"- fuse, chain before `{k}` ends: {e}" for k, e in chain_stops.items() if e]
        lines += [f"- prune_unread, `{k}`: {e}" for k, e in prune_left.items()]
    path.write_text("\n".join(lines) + "\n")


def plot(results: list[dict], path: Path) -> None:
    keys = [
        ("channels", "channels"),
        ("macs", "dense MACs"),
        ("lut_adds", "LUT adds"),
        ("bytes", "weight/LUT bytes"),
        ("activation_bytes", "activation bytes"),
    ]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(results)
    for i, r in enumerate(results):
        after = r["variants"]["exact"]["totals_after"]
        ratios = [after[k] / r["totals_before"][k] if r["totals_before"][k] else 1.0 for k, _ in keys]
        ax.bar([j + i * width for j in range(len(keys))], ratios, width, label=r["net"])
    ax.set_xticks(
        [j + width * (len(results) - 1) / 2 for j in range(len(keys))], [label for _, label in keys]
    )
    ax.set_ylabel("after passes / before")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower left")
    ax.set_title("fuse + prune_unread (exact): what is still computed / stored")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nets", nargs="+", choices=list(NETS), default=list(NETS))
    parser.add_argument("--eval-samples", type=int, default=2000, help="test samples compared")
    parser.add_argument("--out", default="results/passes")
    args = parser.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load = f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at start"
    results = []
    for name in args.nets:
        results.append(measure(name, args.eval_samples))
        summary = {
            k: {x: y for x, y in v.items() if x not in ("layers", "reports")}
            for k, v in results[-1]["variants"].items()
        }
        print(name, results[-1]["accuracy_before"], json.dumps(summary))
    previous = out / "passes.json"
    if previous.exists():  # keep the networks not measured this time
        kept = [r for r in json.loads(previous.read_text())["results"] if r["net"] not in args.nets]
        results = [r for name in NETS for r in kept + results if r["net"] == name]
    (out / "passes.json").write_text(json.dumps({"machine_load": load, "results": results}, indent=1))
    write_markdown(results, out / "passes.md", load)
    plot(results, out / "passes.png")


if __name__ == "__main__":
    main()
