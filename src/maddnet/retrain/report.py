"""The report of a retraining run: accuracy development (table, plot) and the final result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..analysis.amm_sweep import markdown_table
from ..analysis.output import pyplot_or_none
from ..nn.spec import LayerSpec
from .config import migrate_flat_spec


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def build_report(rows: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    """Summary numbers of a run from its metrics rows."""
    rows = sorted(rows, key=lambda r: r["step"])
    dense = next((r for r in rows if r["phase"] == "dense"), None)
    last = rows[-1] if rows else None
    replaced = [r for r in rows if r["phase"] == "replace"]
    return {
        "model": config.get("model"),
        "dataset": config.get("dataset"),
        "eval_split": config.get("eval_split"),
        "dense_top1": dense and dense["top1"],
        "final_top1": last and last["top1"],
        "final_top5": last and last.get("top5"),
        "drop_points": None if not (dense and last) else 100 * (dense["top1"] - last["top1"]),
        "replaced_layers": len(replaced),
        "finished": bool(last and last["phase"] == "final"),
        "layers": [{k: r.get(k) for k in ("layer", "kind", "D", "M", "C", "K")} for r in replaced],
    }


def markdown_report(rows: list[dict[str, Any]], config: dict[str, Any]) -> str:
    summary = build_report(rows, config)
    table_rows = []
    for r in sorted(rows, key=lambda r: r["step"]):
        table_rows.append(
            {
                "step": r["step"],
                "phase": r["phase"],
                "layer": r.get("layer") or "–",
                "kind": r.get("kind", "–"),
                "D": r.get("D"),
                "M": r.get("M"),
                "C": r.get("C"),
                "top-1 after replace (%)": _pct(r.get("replaced_top1")) if "replaced_top1" in r else "–",
                "top-1 after fine-tune (%)": _pct(r["top1"]),
                "eval samples": r.get("samples"),
                "top-5 (%)": _pct(r.get("top5")),
                "seconds": f"{r.get('seconds', 0):.0f}",
            }
        )
    lines = [
        f"# Layer-by-layer retraining: {summary['model']} on {summary['dataset']} "
        f"({summary['eval_split']} split)",
        "",
        f"- dense baseline top-1: {_pct(summary['dense_top1'])} %",
        (
            "- dense control (nothing replaced), fine-tuned for the run's whole budget"
            if config.get("dense_control")
            else f"- after replacing {summary['replaced_layers']} layers"
            + (" and the final fine-tune" if summary["finished"] else "")
        )
        + ("" if summary["finished"] else " (run not finished)")
        + f": top-1 {_pct(summary['final_top1'])} %, top-5 {_pct(summary['final_top5'])} %",
        "- drop against the dense baseline: "
        + ("–" if summary["drop_points"] is None else f"{summary['drop_points']:.2f} points"),
        "- settings: "
        + ", ".join(
            [
                f"{key}={config.get(key)}"
                for key in ("steps_per_layer", "final_steps", "distill", "recon", "train_replaced", "augment")
            ]
            + _layer_settings(config)
            + _run_options(config)
        ),
        "",
        markdown_table(table_rows, list(table_rows[0]) if table_rows else []),
    ]
    if config.get("eval_samples"):
        lines += [
            "",
            f"Evaluation: the dense model, the last replacement and the final step on the whole "
            f"{summary['eval_split']} split; the other replacements on its first "
            f"{config['eval_samples']} samples (`eval_samples`; the 'eval samples' column).",
        ]
    return "\n".join(lines) + "\n"


def plot_development(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Top-1 after each replacement and after its fine-tune, per step (PNG)."""
    plt = pyplot_or_none()
    if plt is None:
        return None
    rows = sorted(rows, key=lambda r: r["step"])
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rows) + 3), 4))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [100 * r["top1"] for r in rows], "o-", label="after fine-tune")
    rep = [r for r in rows if "replaced_top1" in r]
    ax.plot(
        [r["step"] for r in rep],
        [100 * r["replaced_top1"] for r in rep],
        "x",
        color="red",
        label="right after replacing (no fine-tune)",
    )
    dense = next((r for r in rows if r["phase"] == "dense"), None)
    if dense:
        ax.axhline(100 * dense["top1"], ls=":", color="gray", label="dense baseline")
    ax.set_xticks(steps)
    ax.set_xticklabels([r.get("layer") or r["phase"] for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(out_dir: str | Path, rows: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, Path]:
    """report.md, report.json and accuracy.png in ``out_dir``."""
    out = Path(out_dir)
    paths = {"md": out / "report.md", "json": out / "report.json"}
    paths["md"].write_text(markdown_report(rows, config))
    paths["json"].write_text(json.dumps({"summary": build_report(rows, config), "rows": rows}, indent=2))
    png = plot_development(rows, out / "accuracy.png", f"{config.get('model')} on {config.get('dataset')}")
    if png:
        paths["png"] = png
    return paths


def _run_options(config: dict[str, Any]) -> list[str]:
    """The run options that change which C or which model the report is about, where set:
    the codebook budget (C per layer from an analysis) and the inter-layer passes."""
    options = []
    budget = config.get("codebook_budget")
    if budget:
        amount = budget.get("value") or (f"width={budget['width']}" if budget.get("width") else "the rule's")
        options.append(f"codebook_budget={budget.get('unit')}:{amount} from {budget.get('analysis')}")
    options += [key for key in ("fuse", "prune_unread") if config.get(key)]
    return options


def _layer_settings(config: dict[str, Any]) -> list[str]:
    """``key=value`` of the layer settings: encoder, K and LUT bits always, every other
    LayerSpec field where it differs from today's default, as the run used it
    (:meth:`LayerSpec.from_saved`; flat in the configs of older runs)."""
    spec = LayerSpec.from_saved(migrate_flat_spec(config).get("spec") or {}).to_dict()
    defaults = LayerSpec().to_dict()
    shown = ["encoder", "nprototypes", "lut_bits"]
    shown += [key for key in defaults if key not in shown and spec[key] != defaults[key]]
    return [f"{key}={spec[key]}" for key in shown]
