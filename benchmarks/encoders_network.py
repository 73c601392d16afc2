"""Encoders and per-layer C at the network level (issue 11; docs/encoders.md, "Network level").

Reads finished retraining runs, trains nothing:

* DS-CNN-S / espeak-ng keywords at the rule's C (``experiments/madd_ds_cnn_kws.sh encoders``
  and ``budget``: ``results/ds_cnn_s_kws_espeak/encoders/<variant>_seed<s>``), evaluated on
  the speaker-disjoint validation split during the run (the split the variants are compared
  on) with the test split read once at the end (``test.json``);
* ResNet-9 / Fashion-MNIST at the rule's C with stem C = 9 (``experiments/
  madd_resnet9_fashion_mnist.sh rule_long``, ``encoder_output``, ``encoder_output_refine``
  and ``encoder_pq_l1``), test split; the tree at 2x the rule's C beside them
  (``wide_tree``, ``wide_output_refine`` with the output objective + 1 refine sweep, and the
  earlier ``retrain_wide_long``);
* ResNet-9 on the hold-out baseline (``per_layer_c``: the uniform rule and the per-layer
  allocations of its LUT bytes or energy), validated on the 5,000 held-out training images,
  the test split read once at the end (``test.json``), beside the dense control of the same
  steps (``per_layer_c/dense_seed0``).

For each run: validation and test top-1, and what one inference costs on the accelerator
model (``maddnet.hw``: the run's own converted layers): encoder compares, adds and
multiplies, LUT bytes and energy at 45 nm. Beside them the dense controls (the same loss,
optimiser and number of steps, nothing replaced).

    python benchmarks/encoders_network.py     # -> results/encoders/network.{json,md}
    python benchmarks/encoders_network.py --nets resnet9 resnet9_holdout   # refresh those parts

``--nets`` re-reads only the named parts and keeps the others from the existing JSON (the
DS-CNN part needs the espeak-ng keyword set, ``scripts/make_kws_espeak.py``, on disk).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from maddnet.data.registry import create_dataset
from maddnet.hw.costs import load_cost_model
from maddnet.hw.energy import estimate
from maddnet.hw.network import run_network
from maddnet.models.registry import create_model
from maddnet.train.cli import load_evaluated
from maddnet.train.loops import evaluate
from maddnet.train.runner import model_kwargs_for

ROOT = Path(__file__).resolve().parent.parent
NETS = {
    "ds_cnn_s": {
        "title": "DS-CNN-S / espeak-ng keywords, the rule's C (retrain_long: 300 + 1,000 steps of 100)",
        "runs": ["results/ds_cnn_s_kws_espeak/encoders"],
        "controls": [
            "results/ds_cnn_s_kws_espeak/steering/dense_control_seed0",
            "results/ds_cnn_s_kws_espeak/steering/dense_control_seed1",
        ],
        "baseline": "tree",
        "control_val": True,  # the controls have a validation split (speaker-disjoint)
        # the tree with more codebooks, same steps (test split; earlier code, sequential data order)
        "references": {
            "results/ds_cnn_s_kws_espeak/retrain_long": "tree, the rule (D/C = 8, stem C = 10), earlier code",
            "results/ds_cnn_s_kws_espeak/retrain_wide": "tree, 2x the rule's C (D/C = 4, stem C = 20)",
            "results/ds_cnn_s_kws_espeak/retrain_wider": "tree, 4x the rule's C (D/C = 2, stem C = 40)",
        },
    },
    "resnet9": {
        "title": "ResNet-9 (width 16) / Fashion-MNIST, the rule's C with stem C = 9 "
        "(400 + 2,000 steps of 128)",
        "runs": [
            "results/resnet9_fashion_mnist/rule_long",
            "results/resnet9_fashion_mnist/encoder_output",
            "results/resnet9_fashion_mnist/encoder_output_refine",
            "results/resnet9_fashion_mnist/encoder_pq_l1",
        ],
        "controls": ["results/resnet9_fashion_mnist/dense_control"],
        "baseline": "rule_long",
        "references": {
            "results/resnet9_fashion_mnist/retrain_long": "tree, the rule, earlier code (data in order)",
            "results/resnet9_fashion_mnist/retrain_wide_long": "tree, 2x the rule's C (D/C = 4.5), "
            "earlier code (data in order)",
            "results/resnet9_fashion_mnist/retrain_wide_long_seed1": "tree, 2x the rule's C, seed 1, "
            "earlier code (data in order)",
            "results/resnet9_fashion_mnist/wide_tree/seed0": "tree (MADDness), 2x the rule's C",
            "results/resnet9_fashion_mnist/wide_tree/seed1": "tree (MADDness), 2x the rule's C, seed 1",
            "results/resnet9_fashion_mnist/wide_output_refine/seed0": "tree, output objective + 1 refine "
            "sweep, 2x the rule's C",
            "results/resnet9_fashion_mnist/wide_output_refine/seed1": "tree, output objective + 1 refine "
            "sweep, 2x the rule's C, seed 1",
        },
    },
    "resnet9_holdout": {
        "title": "ResNet-9 (width 16) / Fashion-MNIST on the hold-out baseline, the rule's C and "
        "per-layer C (400 + 2,000 steps of 128; validation = 5,000 held-out training images)",
        "runs": ["results/resnet9_fashion_mnist/per_layer_c"],
        "controls": ["results/resnet9_fashion_mnist/per_layer_c/dense_seed0"],
        "baseline": "rule",
        "control_val": True,  # the 5,000 held-out training images
        "variants": {
            "rule": "tree (MADDness), the uniform rule (stem C = 1)",
            "budget": "tree (MADDness), per-layer C at the rule's LUT bytes",
            "energy": "tree (MADDness), per-layer C at the rule's energy",
            "energy_refine": "tree, output objective + 1 refine sweep, per-layer C at the rule's energy",
        },
    },
}
# what each variant name in a run folder means
VARIANTS = {
    "tree": "tree (MADDness), stem C = 10",
    "output": "tree, output objective, stem C = 10",
    "output-refine": "tree, output objective + 1 refine sweep (split columns and thresholds), stem C = 10",
    "refine": "tree, input objective + 1 refine sweep (split columns and thresholds), stem C = 10",
    "pq-l1": "pq-l1 (nearest centroid, L1), stem C = 10",
    "tree-global": "tree-global + 1 refine sweep, stem C = 10",
    "pq": "pq (nearest centroid, L2), stem C = 10",
    "rule": "tree, the uniform rule (stem C = 5)",
    "budget_lut": "tree, per-layer C at the rule's LUT bytes",
    "budget_lut_octaves0": "tree, per-layer C at the rule's LUT bytes, no C beyond the analysed",
    "rule_long": "tree (MADDness)",
    "encoder_output": "tree, output objective",
    "encoder_output_refine": "tree, output objective + 1 refine sweep",
    "encoder_pq_l1": "pq-l1 (nearest centroid, L1; reads every input, no multiply)",
}


def final_row(folder: Path) -> dict | None:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    finals = [r for r in rows if r.get("phase") == "final"]
    return finals[-1] if finals else None


def costs(folder: Path, cost_model) -> dict:
    """Encoder work, LUT bytes and energy of one inference of the run's final network."""
    result = estimate(run_network(folder), cost_model)
    madd = [layer.counts for layer in result.madd.layers if "lut_bytes" in layer.counts]

    def total(key: str) -> int:
        return sum(counts.get(key, 0) for counts in madd)

    return {
        "madd_layers": len(madd),
        "compares": total("compares"),
        "encoder_adds": total("encoder_adds"),
        "encoder_multiplies": total("encoder_multiplies"),
        "lut_bytes": total("lut_bytes"),
        "energy_uj": result.madd.energy_pj / 1e6,
    }


def control_top1(folder: Path, split: str) -> float | None:
    """Top-1 of a dense control's final weights on ``split`` (a dense model: quick); the
    run's own final row or ``test.json`` where it holds that split."""
    config = json.loads((folder / "config.json").read_text())
    if config.get("eval_split", "test") == split:
        row = final_row(folder)
        return None if row is None else row["top1"]
    saved = saved_test_top1(folder) if split == "test" else None
    if saved is not None:
        return saved
    data = create_dataset(
        config["dataset"], split, config.get("data_root"), **(config.get("dataset_kwargs") or {})
    )
    model = create_model(
        config["model"],
        num_classes=data.info.num_classes,
        in_chans=data.info.in_chans,
        **model_kwargs_for(config["model"], data.info, config.get("model_kwargs") or {}),
    )
    load_evaluated(model, folder / "checkpoint.pt")  # its final weights, as `maddnet eval` reads them
    with torch.inference_mode():
        return evaluate(model, DataLoader(data, batch_size=512))["top1"]


def saved_test_top1(folder: Path) -> float | None:
    """The test top-1 a run validated on another split wrote once at its end (``test.json``)."""
    test_file = folder / "test.json"
    if test_file.exists() and test_file.stat().st_size:
        return json.loads(test_file.read_text())["top1"]
    return None


def collect(net: dict, cost_model) -> dict:
    meanings = {**VARIANTS, **net.get("variants", {})}
    rows = []
    for parent in net["runs"]:
        parent = ROOT / parent
        # run folders are VARIANT_seedS or seedS; others (e.g. an energy/ report) are not runs
        folders = sorted(p for p in parent.glob("*") if p.is_dir()) if parent.exists() else []
        for folder in folders:
            match = re.fullmatch(r"(?:(.+)_)?seed(\d+)", folder.name)
            if match is None:
                continue
            variant, seed = match.group(1) or parent.name, int(match.group(2))
            config_file = folder / "config.json"  # written when a run starts
            config = json.loads(config_file.read_text()) if config_file.exists() else {}
            if config.get("dense_control"):  # a control beside the runs, listed under controls
                continue
            row = final_row(folder) if (folder / "metrics.jsonl").exists() else None
            if row is None:
                rows.append(
                    {
                        "variant": variant,
                        "seed": seed,
                        "status": "unfinished",
                        "run": str(folder.relative_to(ROOT)),
                    }
                )
                continue
            split = config.get("eval_split", "test")
            rows.append(
                {
                    "variant": variant,
                    "meaning": meanings.get(variant, variant),
                    "seed": seed,
                    "run": str(folder.relative_to(ROOT)),
                    "val_top1": row["top1"] if split == "val" else None,
                    "test_top1": row["top1"] if split == "test" else saved_test_top1(folder),
                    **costs(folder, cost_model),
                }
            )
    references = []
    for folder, meaning in net.get("references", {}).items():
        folder = ROOT / folder
        row = final_row(folder) if (folder / "metrics.jsonl").exists() else None
        if row is None:
            continue
        # a run whose checkpoint was not committed (size) keeps its accuracy, without costs
        has_network = (folder / "checkpoint.pt").exists()
        references.append(
            {
                "run": str(folder.relative_to(ROOT)),
                "meaning": meaning,
                "test_top1": row["top1"],
                **(costs(folder, cost_model) if has_network else {}),
            }
        )
    controls = []
    for folder in net["controls"]:
        folder = ROOT / folder
        if not (folder / "checkpoint.pt").exists() or final_row(folder) is None:
            continue
        controls.append(
            {
                "run": str(folder.relative_to(ROOT)),
                "val_top1": control_top1(folder, "val") if net.get("control_val") else None,
                "test_top1": control_top1(folder, "test"),
                "dense_energy_uj": estimate(run_network(folder), cost_model).dense.energy_pj / 1e6,
            }
        )
    return {
        "title": net["title"],
        "baseline": net["baseline"],
        "runs": rows,
        "references": references,
        "controls": controls,
    }


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f} %"


def markdown(results: dict) -> str:
    lines = [
        "# Encoders and per-layer C at the network level (issue 11)",
        "",
        "Written by `python benchmarks/encoders_network.py` from the finished runs. Costs per",
        "inference of each run's final network on the accelerator model (`maddnet.hw`, 45 nm",
        "defaults): encoder compares / adds / multiplies, LUT bytes, energy.",
    ]
    for part in results.values():
        lines += ["", f"## {part['title']}", ""]
        lines += [
            "| variant | seed | val top-1 | test top-1 | compares | encoder adds | multiplies "
            "| LUT bytes | µJ |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted(part["runs"], key=lambda r: (r["variant"], r["seed"])):
            if r.get("status") == "unfinished":
                lines.append(f"| {r['variant']} | {r['seed']} | unfinished | | | | | | |")
                continue
            lines.append(
                f"| {r['meaning']} | {r['seed']} | {pct(r['val_top1'])} | {pct(r['test_top1'])} | "
                f"{r['compares']:,} | {r['encoder_adds']:,} | {r['encoder_multiplies']:,} | "
                f"{r['lut_bytes']:,} | {r['energy_uj']:.2f} |"
            )
        lines.append("")
        by_variant: dict[str, list[dict]] = {}
        for r in part["runs"]:
            if r.get("status") != "unfinished":
                by_variant.setdefault(r["variant"], []).append(r)
        for _, runs in sorted(by_variant.items()):
            for key in ("val_top1", "test_top1"):
                values = [r[key] for r in runs if r[key] is not None]
                if values:
                    split = key.split("_")[0]
                    lines.append(
                        f"- {runs[0]['meaning']}, {split}: mean {pct(statistics.mean(values))} "
                        f"over {len(values)} seed(s) ({', '.join(pct(v) for v in values)})"
                    )
        if part["references"]:
            lines += [
                "",
                "References (the same steps with more codebooks; test split):",
                "",
                "| run | test top-1 | compares | LUT bytes | µJ |",
                "|---|---|---|---|---|",
            ]
            for r in part["references"]:
                lines.append(
                    f"| {r['meaning']} (`{r['run']}`) | {pct(r['test_top1'])} | "
                    + (
                        f"{r['compares']:,} | {r['lut_bytes']:,} | {r['energy_uj']:.2f} |"
                        if "compares" in r
                        else "checkpoint not committed | | |"
                    )
                )
            lines.append("")
        for c in part["controls"]:
            lines.append(
                f"- dense control `{c['run']}`: val {pct(c['val_top1'])}, test {pct(c['test_top1'])}; "
                f"the dense network {c['dense_energy_uj']:.2f} µJ per inference (baseline accelerator)"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=str(ROOT / "results/encoders/network"), help="output path without suffix"
    )
    parser.add_argument(
        "--nets",
        nargs="+",
        choices=sorted(NETS),
        help="re-read only these parts; the others are kept from the existing OUT.json (default: all)",
    )
    args = parser.parse_args()
    cost_model = load_cost_model()
    previous = Path(args.out + ".json")
    results = {}
    if args.nets:
        if not previous.exists():
            parser.error(
                f"--nets keeps the other parts of {previous}, which does not exist; run without --nets"
            )
        results = json.loads(previous.read_text())
    for name, net in NETS.items():
        if not args.nets or name in args.nets:
            results[name] = collect(net, cost_model)
    results = {name: results[name] for name in NETS if name in results}  # NETS's order
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(results, indent=1) + "\n")
    Path(args.out + ".md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
