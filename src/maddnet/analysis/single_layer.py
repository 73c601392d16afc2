"""Single-layer analysis: replace ONE layer at a time and measure what it costs.

For every conv/linear layer of a trained model and each C, only that layer is replaced
(learned from the activations the dense network produces on calibration batches); the
model's top-1/top-5 and the layer's output NMSE (on the same inputs, so against the
dense layer exactly) are measured. Layers MADDness cannot serve are listed with the reason.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..nn import MaddConfig, convert_layer, mapping, record_inputs
from ..nn.config import named_leaf_layers
from ..nn.mapping import input_dim
from ..train import evaluate
from ..train.distributed import broadcast_object, fail_together, gather_objects, is_distributed
from .amm_sweep import markdown_table
from .cells import CellLog
from .output import pyplot_or_none, write_csv

MIN_INPUT_DIM = 4  # below this a 16-leaf tree per codebook has nothing to choose from


def unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module`` cannot become a MADD layer or is not worth analysing (None when it can)."""
    if isinstance(module, nn.Conv2d) and module.groups > 1:
        return (
            f"grouped/depthwise conv (groups={module.groups}): each output reads only D={input_dim(module)} "
            "inputs; MADD layers need groups=1"
        )
    reason = mapping.unsupported_reason(module)
    if reason is not None:
        return reason
    if input_dim(module) < MIN_INPUT_DIM:
        return f"input dimension D={input_dim(module)} < {MIN_INPUT_DIM}: nothing to hash"
    return None


def candidate_layers(model: nn.Module) -> tuple[list[str], list[dict[str, Any]]]:
    """Names of replaceable conv/linear layers, and rows for the ones that are not."""
    names, skipped = [], []
    for name, module in named_leaf_layers(model):
        if not isinstance(module, nn.Linear | nn.Conv2d):
            continue
        reason = unsupported_reason(module)
        if reason:
            skipped.append({"layer": name, "kind": type(module).__name__, "reason": reason})
        else:
            names.append(name)
    return names, skipped


def codebooks_for_width(ndims: int, width: float) -> int:
    """C giving D/C closest to ``width`` (at least 1, at most D)."""
    return int(min(ndims, max(1, round(ndims / width))))


def _layer_outputs(
    model: nn.Module, names: Sequence[str], batches: list[torch.Tensor]
) -> dict[str, torch.Tensor]:
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda _m, _a, out, name=name: outputs[name].append(out.detach())
        )
        for name in names
    ]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for batch in batches:
                model(batch)
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(out) for name, out in outputs.items()}


def analyze_layers(
    model: nn.Module,
    calib_loader,
    eval_loader,
    *,
    widths: Sequence[float] = (4, 9, 16),
    config: MaddConfig | None = None,
    layers: Sequence[str] | None = None,
    calib_batches: int = 8,
    nmse_batches: int = 2,
    device: torch.device | str = "cpu",
    progress: bool = True,
    cells: CellLog | None = None,
) -> dict[str, Any]:
    """Replace each layer alone for each D/C in ``widths``; returns rows and skipped layers.

    Each row: layer, kind, D, M, C, D/C, top1, top5 (fractions), drop (points against
    the dense model), nmse (layer output against the dense layer on the same inputs),
    fit_s (seconds to learn the layer).

    Under torch.distributed (torchrun) every rank records the same calibration rows (the
    loaders must give every rank the same batches), the (layer, C) cells are dealt out
    round-robin, each rank evaluates its cells on all of ``eval_loader``, and rank 0
    gathers the rows in the one-process order (the other ranks get ``rows=[]``). A cell
    that fails on any rank stops all ranks with one error naming the rank.

    With ``cells`` (a :class:`~maddnet.analysis.cells.CellLog`), every finished row is
    written to disk at once, and the rows already there (rank 0 reads them and tells the
    others) are not computed again: an interrupted analysis resumes where it stopped.
    Their ``drop`` is recomputed against this run's dense evaluation.
    """
    config = config or MaddConfig()
    device = torch.device(device)
    model = model.to(device).eval()
    names, skipped = candidate_layers(model)
    # a layer's row sample is seeded by its place among all candidates, not among the
    # selected or still unfinished ones: the same rows whatever --layers and resuming leave
    seed_index = {name: index for index, name in enumerate(names)}
    if layers is not None:
        unknown = sorted(set(layers) - set(names) - {s["layer"] for s in skipped})
        if unknown:
            raise ValueError(f"unknown or non-conv/linear layers {unknown}; candidates: {names}")
        names = [n for n in names if n in layers]
    jobs = {}  # (name, C) -> None: widths that round to the same C are run once
    for name in names:
        for width in widths:
            jobs[(name, codebooks_for_width(input_dim(model.get_submodule(name)), width))] = None
    rank, world = (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
    finished = fail_together(lambda: cells.load() if cells is not None and rank == 0 else {}, "reading cells")
    finished = broadcast_object(finished)
    finished = {job: row for job, row in finished.items() if job in jobs}
    todo = [job for job in jobs if job not in finished]
    mine = todo[rank::world]
    needed = list(dict.fromkeys(name for name, _ in todo))  # layers with a cell left, in order
    calib = [(b[0].to(device), b[1]) for _, b in zip(range(calib_batches), calib_loader, strict=False)]
    rows_by_layer = (
        record_inputs(model, needed, calib, config=config, seed_index=seed_index) if needed else {}
    )
    nmse_inputs = [b[0].to(device) for _, b in zip(range(nmse_batches), eval_loader, strict=False)]
    dense_outputs = _layer_outputs(model, needed, nmse_inputs) if needed else {}
    baseline = evaluate(model, eval_loader, device=device, reduce=False)

    def run_cells() -> list[dict[str, Any]]:
        rows = []
        bar = tqdm(
            mine,
            desc="single-layer analysis",
            disable=not progress or rank != 0,
            initial=len(finished),
            total=len(finished) + len(mine),
        )
        for name, c in bar:
            row = _analyze_cell(
                model,
                name,
                c,
                rows_by_layer[name],
                nmse_inputs,
                dense_outputs[name],
                eval_loader,
                config,
                device,
            )
            if cells is not None:
                cells.append(rank, {k: v for k, v in row.items() if k != "drop"})  # drop: set at the end
            rows.append(row)
        return rows

    results = fail_together(run_cells, "single-layer analysis")
    gathered = gather_objects(results)
    if gathered is None:
        return {"baseline": baseline, "rows": [], "skipped": skipped}
    # rank r holds the cells r, r + world, ... of `todo`: deal them back into the one-process order
    computed = {todo[i]: gathered[i % world][i // world] for i in range(len(todo))}
    ordered = _with_drop([computed[job] if job in computed else finished[job] for job in jobs], baseline)
    return {"baseline": baseline, "rows": ordered, "skipped": skipped}


def _with_drop(rows: list[dict[str, Any]], baseline: dict[str, float]) -> list[dict[str, Any]]:
    """``rows`` with ``drop``: points of top-1 lost against the dense ``baseline``."""
    return [{**row, "drop": 100 * (baseline["top1"] - row["top1"])} for row in rows]


def _analyze_cell(
    model: nn.Module,
    name: str,
    ncodebooks: int,
    rows: torch.Tensor,
    nmse_inputs: list[torch.Tensor],
    exact: torch.Tensor,
    eval_loader,
    config: MaddConfig,
    device: torch.device,
) -> dict[str, Any]:
    """One row of :func:`analyze_layers` (``drop`` is set by :func:`_with_drop`): a copy
    of ``model`` with layer ``name`` alone replaced at C = ``ncodebooks``, learned from
    ``rows`` (N, D); ``exact`` is the dense layer's output on ``nmse_inputs``."""
    trial = copy.deepcopy(model)
    start = time.perf_counter()
    layer_config = dataclasses.replace(config, layers=None, exclude=(), ncodebooks=ncodebooks)
    layer = convert_layer(trial, name, rows.to(device), layer_config)
    fit_s = time.perf_counter() - start
    approx = _layer_outputs(trial, [name], nmse_inputs)[name]
    metrics = evaluate(trial, eval_loader, device=device, reduce=False)
    return {
        "layer": name,
        "kind": layer.kind,
        "D": layer.in_dim,
        "M": layer.out_dim,
        "C": ncodebooks,
        "D_per_C": round(layer.in_dim / ncodebooks, 2),
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "drop": 0.0,
        "nmse": float(((approx - exact) ** 2).sum() / (exact**2).sum().clamp_min(1e-30)),
        "fit_s": fit_s,
        "calib_rows": int(rows.shape[0]),
    }


def _series_by_width(
    rows: list[dict[str, Any]], widths: Sequence[float] | None
) -> dict[float, dict[str, dict[str, Any]]]:
    """The plot's lines: ``{width: {layer: row}}``, one line per requested D/C (``widths``),
    holding each layer's row at the C that width gives it (so a 64-input layer, whose
    D/C = 18 rounds to C = 4, i.e. D/C = 16, stays on the D/C = 18 line). Without
    ``widths`` (a result from elsewhere) the rows are grouped by their rounded D/C."""
    if not widths:
        widths = sorted({round(r["D"] / r["C"]) for r in rows})
        return {w: {r["layer"]: r for r in rows if round(r["D"] / r["C"]) == w} for w in widths}
    return {
        w: {r["layer"]: r for r in rows if codebooks_for_width(r["D"], w) == r["C"]} for w in sorted(widths)
    }


def write_analysis(result: dict[str, Any], out_dir: str | Path, title: str) -> dict[str, Path]:
    """single_layer.json/.csv/.md and single_layer.png (accuracy drop per layer and C)."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "single_layer.json",
        "csv": out / "single_layer.csv",
        "md": out / "single_layer.md",
    }
    paths["json"].write_text(json.dumps(result, indent=2))
    rows = result["rows"]
    if rows:
        write_csv(rows, paths["csv"])
    base = result["baseline"]
    text = [
        f"# Single-layer analysis: {title}",
        "",
        f"Dense model: top-1 {100 * base['top1']:.2f} %, top-5 {100 * base['top5']:.2f} % "
        f"({base['samples']} samples). Each row replaces only that layer; top-1 is in %, drop in "
        "points of top-1 against the dense model.",
        "",
        markdown_table(
            [{**row, "top1_pct": 100 * row["top1"]} for row in rows],
            ["layer", "kind", "D", "M", "C", "D_per_C", "top1_pct", "drop", "nmse", "fit_s"],
        ),
    ]
    if result["skipped"]:
        text += [
            "",
            "Layers MADDness cannot serve:",
            "",
            markdown_table(result["skipped"], ["layer", "kind", "reason"]),
        ]
    paths["md"].write_text("\n".join(text) + "\n")
    plt = pyplot_or_none()
    if plt is None:
        return paths
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.7 * len(layers) + 4), 4))
    for width, sub in _series_by_width(rows, result.get("settings", {}).get("widths")).items():
        xs = [i for i, name in enumerate(layers) if name in sub]
        axes[0].plot(xs, [sub[layers[i]]["drop"] for i in xs], "o-", label=f"D/C ≈ {width:g}")
        axes[1].plot(xs, [sub[layers[i]]["nmse"] for i in xs], "o-", label=f"D/C ≈ {width:g}")
    for ax, label in zip(axes, ["top-1 drop (points)", "layer output NMSE"], strict=True):
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    paths["png"] = out / "single_layer.png"
    fig.savefig(paths["png"], dpi=120)
    plt.close(fig)
    return paths
