"""Channel steering trade-off AFTER retraining (docs/passes.md, "Steering"; issue 12).

Reads the retraining runs with a channel budget (``experiments/madd_ds_cnn_kws.sh steering``,
``experiments/madd_resnet9_fashion_mnist.sh steering``: every converted layer's trees may
split on at most that fraction of its input channels, then ``--prune-unread``), and for each
run reports the test accuracy of the final retrained model and of the pruned model
(``passes.json``), and what pruning saves, counted on the pruned model (``passes.pt``)
against the unpruned final model (``checkpoint.pt``) as benchmarks/passes.py counts it:
channels computed, dense MACs, LUT adds, activation bytes. Beside them: the dense controls
(the same loss, optimiser and step budget, nothing replaced) and the dense baseline.

    python benchmarks/steering_retrained.py      # -> results/passes/steering_retrained.{json,md,png}

Nothing is trained here; it reads finished runs (a missing or unfinished run is listed as such).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from passes import layer_costs, totals  # noqa: E402

from maddnet.data.registry import create_dataset  # noqa: E402
from maddnet.models.registry import create_model  # noqa: E402
from maddnet.nn import load_converted, rebuild  # noqa: E402
from maddnet.train.runner import model_kwargs_for  # noqa: E402

NETS = {
    "ds_cnn_s": {
        "title": "DS-CNN-S / espeak-ng keywords (test split, 504 samples)",
        "runs": "results/ds_cnn_s_kws_espeak/steering",
        "controls": ["results/ds_cnn_s_kws_espeak/steering/dense_control_seed*"],
        "baseline": "results/baselines/ds_cnn_s_kws_espeak/results.json",
    },
    "resnet9": {
        "title": "ResNet-9 (width 16) / Fashion-MNIST (test split, 10,000 samples)",
        "runs": "results/resnet9_fashion_mnist/steering",
        # budget 1.0: the runs of docs/results.md with these settings (earlier code: sequential
        # data order instead of the seeded sampler)
        "references": [
            "results/resnet9_fashion_mnist/retrain_wide_long",
            "results/resnet9_fashion_mnist/retrain_wide_long_seed1",
        ],
        "controls": ["results/resnet9_fashion_mnist/dense_control"],
        "baseline": "results/baselines/resnet9_fashion_mnist/results.json",
    },
}
COST_KEYS = ("channels", "macs", "lut_adds", "activation_bytes")


def final_row(run: Path) -> dict | None:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    finals = [r for r in rows if r.get("phase") == "final"]
    return finals[-1] if finals else None


def skeletons(config: dict, count: int) -> tuple[list[torch.nn.Module], torch.Tensor]:
    """``count`` fresh dense models of the run's config and one test input (1, ...)."""
    data = create_dataset(
        config["dataset"], "test", config.get("data_root"), **config.get("dataset_kwargs", {})
    )
    info = data.info
    kwargs = model_kwargs_for(config["model"], info, config.get("model_kwargs", {}))
    models = [
        create_model(config["model"], num_classes=info.num_classes, in_chans=info.in_chans, **kwargs)
        for _ in range(count)
    ]
    return models, data[0][0][None]


def costs_of_run(run: Path, config: dict) -> dict:
    """Totals of benchmarks/passes.py for the final model and the pruned one."""
    (model, pruned_model), example = skeletons(config, 2)
    saved = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    rebuild(model, saved["plan"])
    model.load_state_dict(saved["state_dict"])
    final = totals(layer_costs(model.eval(), example))
    load_converted(pruned_model, run / "passes.pt")
    pruned = totals(layer_costs(pruned_model.eval(), example))
    return {"final": final, "pruned": pruned}


def collect(name: str) -> dict:
    setup = NETS[name]
    runs = []
    for run in sorted(Path(setup["runs"]).glob("budget*_seed*")):
        config = json.loads((run / "config.json").read_text())
        row = final_row(run)
        passes = run / "passes.json"
        if row is None or not passes.exists():
            runs.append({"run": str(run), "finished": False})
            continue
        summary = json.loads(passes.read_text())
        entry = {
            "run": str(run),
            "finished": True,
            "budget": config["spec"]["channel_budget"],
            "seed": config["seed"],
            "top1_final": row["top1"],
            "samples": row["samples"],
            "top1_pruned": summary["after"]["top1"],
            "pruned_samples": summary["after"]["samples"],
            "pruned_layers": summary["reports"]["prune_unread"]["pruned"],
            "left_alone": summary["reports"]["prune_unread"]["left_alone"],
        }
        entry.update(costs_of_run(run, config))
        runs.append(entry)
    references = []
    for path in setup.get("references", []):
        row = final_row(Path(path))
        config = json.loads((Path(path) / "config.json").read_text())
        references.append({"run": path, "seed": config.get("seed", 0), "top1_final": row["top1"]})
    controls = []
    for pattern in setup["controls"]:
        for path in sorted(Path(".").glob(pattern)):
            row = final_row(path)
            if row is not None:
                config = json.loads((path / "config.json").read_text())
                controls.append({"run": str(path), "seed": config.get("seed", 0), "top1": row["top1"]})
    baseline = json.loads(Path(setup["baseline"]).read_text())
    return {
        "net": name,
        "title": setup["title"],
        "runs": runs,
        "references": references,
        "dense_controls": controls,
        "dense_baseline_top1": baseline["top1"],
    }


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f} %"


def write_markdown(results: list[dict], path: Path) -> None:
    lines = [
        "# Channel steering after retraining (issue 12)",
        "",
        "Written by `python benchmarks/steering_retrained.py` from the finished runs; costs per",
        "inference (batch 1) of the pruned model as a fraction of the unpruned final model",
        "(benchmarks/passes.py's counts). Accuracy: test top-1 of the final retrained model and",
        "of the pruned one (`passes.json`).",
        "",
    ]
    for net in results:
        lines += [f"## {net['title']}", ""]
        lines.append(
            "| budget | seed | top-1 final | top-1 pruned | channels computed | dense MACs | LUT adds | "
            "activation bytes |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        for run in net["runs"]:
            if not run["finished"]:
                lines.append(f"| {run['run']} | | not finished | | | | | |")
                continue
            final, pruned = run["final"], run["pruned"]
            cells = [
                f"{pruned['channels']}/{final['channels']}",
                *(
                    f"{pruned[k] / final[k]:.3f}" if final[k] else "–"
                    for k in ("macs", "lut_adds", "activation_bytes")
                ),
            ]
            lines.append(
                f"| {run['budget']} | {run['seed']} | {pct(run['top1_final'])} | {pct(run['top1_pruned'])} | "
                + " | ".join(cells)
                + " |"
            )
        by_budget: dict = {}
        for run in net["runs"]:
            if run["finished"]:
                by_budget.setdefault(run["budget"], []).append(run["top1_pruned"])
        lines.append("")
        for budget, values in sorted(by_budget.items(), reverse=True):
            spread = f", seeds {min(values) * 100:.2f}–{max(values) * 100:.2f} %" if len(values) > 1 else ""
            lines.append(
                f"- budget {budget}: mean pruned top-1 {100 * statistics.mean(values):.2f} %{spread}"
            )
        for ref in net["references"]:
            lines.append(
                f"- budget 1.0 reference `{ref['run']}` (seed {ref['seed']}): {pct(ref['top1_final'])}"
            )
        for control in net["dense_controls"]:
            lines.append(
                f"- dense control `{control['run']}` (seed {control['seed']}): {pct(control['top1'])}"
            )
        lines.append(f"- dense baseline: {pct(net['dense_baseline_top1'])}")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def plot(results: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, net in zip(axes[0], results, strict=True):
        done = [r for r in net["runs"] if r["finished"]]
        x = [r["pruned"]["lut_adds"] / r["final"]["lut_adds"] for r in done]
        y = [100 * r["top1_pruned"] for r in done]
        ax.scatter(x, y, label="retrained, budget 1.0 / 0.75 / 0.5, pruned")
        for r, xi, yi in zip(done, x, y, strict=True):
            ax.annotate(f"{r['budget']} s{r['seed']}", (xi, yi), fontsize=7)
        for control in net["dense_controls"]:
            ax.axhline(100 * control["top1"], color="gray", ls="--", lw=0.8)
        ax.set_xlabel("LUT adds, pruned / unpruned")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(net["title"], fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    parser.add_argument("--out", default="results/passes")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = [collect(name) for name in args.nets]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "steering_retrained.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, out / "steering_retrained.md")
    plot(results, out / "steering_retrained.png")
    print((out / "steering_retrained.md").read_text())


if __name__ == "__main__":
    main()
