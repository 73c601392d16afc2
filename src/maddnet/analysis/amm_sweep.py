"""Sweep MaddnessMatmul over C on a matrix-product task: error, accuracy, fit time, speed.

A task is ``A_test @ B (+ bias)`` with ``B`` fixed (e.g. a trained linear classifier)
and ``A_train`` rows to learn the hash from. Results are rows of plain numbers, written
as JSON, CSV, Markdown and a PNG plot by :func:`write_report`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..amm import MaddnessMatmul
from .output import pyplot_or_none, write_csv
from .timing import compare


@dataclass
class MatmulTask:
    """``A_test @ B + bias``, with rows ``A_train`` to learn from and optional labels."""

    name: str
    A_train: torch.Tensor  # (N_train, D)
    A_test: torch.Tensor  # (N_test, D)
    B: torch.Tensor  # (D, M)
    bias: torch.Tensor | None = None  # (M,)
    y_test: torch.Tensor | None = None  # (N_test,) class labels: accuracy of argmax
    description: str = ""
    # maps the (N, M) product + bias to class logits when more layers follow (e.g. an MLP)
    head: Callable[[torch.Tensor], torch.Tensor] | None = None

    def logits(self, product: torch.Tensor) -> torch.Tensor:
        out = product if self.bias is None else product + self.bias
        return out if self.head is None else self.head(out)


def train_linear_classifier(
    rows: torch.Tensor, labels: torch.Tensor, nclasses: int, l2: float = 1e-4, iters: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by full-batch L-BFGS: weight (D, M), bias (M,)."""
    gen = torch.Generator(device=rows.device).manual_seed(0)
    weight = (0.01 * torch.randn(rows.shape[1], nclasses, generator=gen, device=rows.device)).requires_grad_()
    bias = torch.zeros(nclasses, device=rows.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(rows @ weight + bias, labels) + l2 * (weight**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def nmse(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``||approx - exact||^2 / ||exact||^2``."""
    return float(((approx - exact) ** 2).sum() / (exact**2).sum())


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


def sweep(
    task: MatmulTask,
    ncodebooks: list[int],
    *,
    nprototypes: int = 16,
    lut_bits: int | None = 8,
    ridge: float | None = 1.0,
    measure_speed: bool = True,
    progress: bool = True,
) -> list[dict]:
    """Fit and evaluate MaddnessMatmul for each C; one result row per C."""
    exact = task.A_test @ task.B
    exact_accuracy = None if task.y_test is None else accuracy(task.logits(exact), task.y_test)
    rows = []
    for ncb in tqdm(ncodebooks, desc=f"{task.name}: C sweep", disable=not progress):
        amm = MaddnessMatmul(ncodebooks=ncb, nprototypes=nprototypes, lut_bits=lut_bits, ridge=ridge)
        start = time.perf_counter()
        amm.fit(task.A_train, task.B)
        fit_s = time.perf_counter() - start
        approx = amm(task.A_test)
        row = {
            "task": task.name,
            "N_train": task.A_train.shape[0],
            "N": task.A_test.shape[0],
            "D": task.B.shape[0],
            "M": task.B.shape[1],
            "C": ncb,
            "K": nprototypes,
            "lut_bits": lut_bits,
            "ridge": ridge,
            "nmse": nmse(approx, exact),
            "accuracy": None if task.y_test is None else accuracy(task.logits(approx), task.y_test),
            "exact_accuracy": exact_accuracy,
            "fit_s": fit_s,
            "threads": torch.get_num_threads(),
        }
        if measure_speed:
            timing = compare(lambda a=amm: a(task.A_test), lambda: task.A_test @ task.B)
            row.update(
                approx_s=timing["candidate_s"], matmul_s=timing["baseline_s"], speedup=timing["speedup"]
            )
        rows.append(row)
    return rows


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(col)) for col in columns) + " |" for row in rows]
    return "\n".join(lines)


TABLE_COLUMNS = [
    "task",
    "layout",
    "N_train",
    "N",
    "D",
    "M",
    "C",
    "lut_bits",
    "threads",
    "nmse",
    "accuracy",
    "exact_accuracy",
    "fit_s",
    "encode_s",
    "decode_s",
    "approx_s",
    "matmul_s",
    "speedup",
]


def write_report(
    rows: list[dict], out_dir: str | Path, name: str, references: list[dict] | None = None, notes: str = ""
) -> dict[str, Path]:
    """Write ``name``.json/.csv/.md (and .png when matplotlib is installed) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "csv": out / f"{name}.csv", "md": out / f"{name}.md"}
    paths["json"].write_text(json.dumps({"results": rows, "references": references or []}, indent=2))
    write_csv(rows, paths["csv"])
    keys = list(dict.fromkeys(k for row in rows for k in row))
    text = [f"# {name}", "", notes, "", markdown_table(rows, [c for c in TABLE_COLUMNS if c in keys])]
    if references:
        text += [
            "",
            "Reference figures (not measured here):",
            "",
            markdown_table(references, list(dict.fromkeys(k for r in references for k in r))),
        ]
    paths["md"].write_text("\n".join(text) + "\n")
    plt = pyplot_or_none()
    if plt is None:
        return paths
    tasks = list(dict.fromkeys(row["task"] for row in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for task in tasks:
        sub = [r for r in rows if r["task"] == task and "nmse" in r]
        if not sub:
            continue
        axes[0].plot([r["C"] for r in sub], [r["nmse"] for r in sub], "o-", label=f"maddnet: {task}")
        if sub[0]["accuracy"] is not None:
            axes[1].plot(
                [r["C"] for r in sub], [100 * r["accuracy"] for r in sub], "o-", label=f"maddnet: {task}"
            )
            axes[1].axhline(100 * sub[0]["exact_accuracy"], ls=":", color="gray")
    for ref in references or []:
        axes[0].plot(ref["C"], ref["nmse"], "x", color="red")
        axes[1].plot(ref["C"], 100 * ref["accuracy"], "x", color="red")
    if references:
        axes[1].plot([], [], "x", color="red", label=references[0]["source"])
    for ax, label in zip(axes, ["NMSE", "accuracy (%)"], strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("codebooks C")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    paths["png"] = out / f"{name}.png"
    fig.savefig(paths["png"], dpi=120)
    plt.close(fig)
    return paths
