"""Writing estimates: energy.json / .csv / .md / .png for one network, a comparison of
several (``--combine``), the headline reproduction and the parameter table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..analysis.output import pyplot_or_none, write_csv
from .costs import parameter_table
from .energy import GROUPS, NetworkEstimate

ENERGY_FILE = "energy.json"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if math.isinf(value):
            return "inf"
        magnitude = abs(value)
        if magnitude >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def summary_lines(data: dict[str, Any]) -> list[str]:
    """The MADD-vs-dense summary table of one ``energy.json`` mapping."""
    madd, dense = data["summary"]["madd"], data["summary"]["dense"]
    groups = list(madd["energy_uj_by_group"])
    header = [
        "network",
        "energy / inference (µJ)",
        "MAC/s/W (T)",
        *[f"{g} (µJ)" for g in groups],
        "parameters (bytes)",
        "latency (ms)",
        "MAC/s (G)",
    ]
    rows = []
    for name, v in (("MADD", madd), ("dense", dense)):
        rows.append(
            [
                name,
                v["energy_uj_per_inference"],
                v["tmacs_per_w"],
                *[v["energy_uj_by_group"][g] for g in groups],
                v["parameter_bytes"],
                v["latency_ms_per_batch"],
                v["gmacs_per_s"],
            ]
        )
    return _table(header, rows)


def markdown(data: dict[str, Any]) -> str:
    """energy.md of one network."""
    cm = data["cost_model"]
    lines = [
        f"# Energy per inference: {data.get('label', data['network'])}",
        "",
        f"Input {'×'.join(str(s) for s in data['input_shape'])}, {data['num_classes']} classes, batch "
        f"{data['batch']}; {data['madd_layers']} of {data['conv_linear_layers']} conv/linear layers are MADD "
        f"layers ({data['source']}).",
        "",
        f"Technology {cm['technology_nm']:g} nm (energies × {data['technology_scale']:.3g} of the "
        f"{cm['reference_nm']:g} nm figures), {cm['decoder_units']} decoder units, "
        f"{cm['encoder_units']} encoder units, {cm['lut_memory_bytes']:,} B LUT memory, "
        f"{cm['activation_memory_bytes']:,} B activation memory, {cm['parameter_memory_bytes']:,} B "
        f"parameter memory, clock {cm['clock_hz'] / 1e6:g} MHz; dense baseline "
        f"{cm['dense_precision'].upper()} on a {cm['dense_array_rows']}×{cm['dense_array_cols']} MAC array. "
        "MAC/s/W = the dense network's multiply-accumulates per joule of the network in question "
        "(throughput-equivalent for the MADD network).",
        "",
        *summary_lines(data),
        "",
    ]
    if data["other_macs"]:
        lines += [
            f"Other matrix products (activation × activation, e.g. attention scores): {data['other_macs']:,} "
            "MACs, counted at the dense MAC energy in both networks.",
            "",
        ]
    for note in data["notes"]:
        lines += [f"Note: {note}", ""]
    header = [
        "layer",
        "kind",
        "engine",
        "N",
        "D",
        "M",
        "C",
        "D/C",
        "encoder",
        "compares",
        "encoder adds",
        "encoder mults",
        "LUT reads",
        "input B",
        "LUT+thr. B",
        "output B",
        "MADD nJ",
        "dense nJ",
        "MADD MAC/s/W (T)",
        "dense MAC/s/W (T)",
    ]
    rows = [
        [
            r["layer"],
            r["kind"],
            r["engine"],
            r["rows"],
            r["D"],
            r["M"],
            r["C"],
            r["D_per_C"],
            r["encoder"],
            r["compares"],
            r["encoder_adds"],
            r["encoder_multiplies"],
            r["lut_reads"],
            r["input_bytes"],
            r["lut_threshold_bytes"],
            r["output_bytes"],
            r["madd_energy_nj"],
            r["dense_energy_nj"],
            r["madd_tmacs_per_w"],
            r["dense_tmacs_per_w"],
        ]
        for r in data["layers"]
    ]
    lines += ["## Layers", "", *_table(header, rows), ""]
    lines += [
        "N: rows per batch (output positions × batch, tokens); compares and LUT reads per batch; "
        "input B: bytes the encoder reads (dense layers: the dense read); LUT+thr. B: LUT and threshold "
        "bytes loaded; output B: bytes written. Counts and energies: docs/hardware.md.",
        "",
    ]
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> Path | None:
    """Per-layer energy (MADD vs dense) and the network's energy by group."""
    plt = pyplot_or_none()
    if plt is None:
        return None
    layers = data["layers"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    x = range(len(layers))
    width = 0.4
    left.bar([i - width / 2 for i in x], [r["madd_energy_nj"] for r in layers], width, label="MADD network")
    left.bar([i + width / 2 for i in x], [r["dense_energy_nj"] for r in layers], width, label="dense network")
    left.set_yscale("log")
    left.set_xticks(list(x))
    left.set_xticklabels([r["layer"] for r in layers], rotation=60, ha="right", fontsize=7)
    left.set_ylabel("energy per batch (nJ)")
    left.set_title(f"{data['network']}: per layer")
    left.legend(fontsize=8)
    bottoms = [0.0, 0.0]
    for group in GROUPS:
        values = [data["summary"][v]["energy_uj_by_group"].get(group, 0.0) for v in ("madd", "dense")]
        right.bar(["MADD", "dense"], values, bottom=bottoms, label=group)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    right.set_ylabel("energy per inference (µJ)")
    right.set_title("whole network")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(estimate: NetworkEstimate, out: str | Path) -> dict[str, Path]:
    """energy.json, energy.csv (one row per layer), energy.md, energy.png (with matplotlib)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = estimate.to_dict()
    paths = {"json": out / ENERGY_FILE, "csv": out / "energy.csv", "md": out / "energy.md"}
    paths["json"].write_text(json.dumps(data, indent=2) + "\n")
    write_csv(data["layers"], paths["csv"])
    paths["md"].write_text(markdown(data))
    png = plot(data, out / "energy.png")
    if png is not None:
        paths["png"] = png
    return paths


# ---------------------------------------------------------------------------- several networks
def combine(folders: list[str | Path], out: str | Path) -> dict[str, Path]:
    """Compare the ``energy.json`` of several estimates: energy_networks.{json,csv,md,png} in ``out``."""
    entries = []
    for folder in folders:
        path = Path(folder) / ENERGY_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{str(folder)!r} has no {ENERGY_FILE} (write one with maddnet energy ... --out)"
            )
        entries.append(json.loads(path.read_text()))
    rows = []
    for data in entries:
        madd, dense = data["summary"]["madd"], data["summary"]["dense"]
        rows.append(
            {
                "network": data.get("label", data["network"]),
                "input": "×".join(str(s) for s in data["input_shape"]),
                "madd_layers": f"{data['madd_layers']}/{data['conv_linear_layers']}",
                "macs": madd["macs_per_inference"],
                "technology_nm": data["cost_model"]["technology_nm"],
                "madd_uj": madd["energy_uj_per_inference"],
                "dense_uj": dense["energy_uj_per_inference"],
                "dense_over_madd": dense["energy_uj_per_inference"] / madd["energy_uj_per_inference"],
                "madd_tmacs_per_w": madd["tmacs_per_w"],
                "dense_tmacs_per_w": dense["tmacs_per_w"],
                **{f"madd_{g}_uj": v for g, v in madd["energy_uj_by_group"].items()},
                **{f"dense_{g}_uj": v for g, v in dense["energy_uj_by_group"].items()},
            }
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "energy_networks.json",
        "csv": out / "energy_networks.csv",
        "md": out / "energy_networks.md",
    }
    paths["json"].write_text(json.dumps(rows, indent=2) + "\n")
    write_csv(rows, paths["csv"])
    header = [
        "network",
        "input",
        "MADD layers",
        "MACs",
        "MADD µJ",
        "dense µJ",
        "dense / MADD",
        "MADD MAC/s/W (T)",
        "dense MAC/s/W (T)",
    ]
    table = [
        [
            r["network"],
            r["input"],
            r["madd_layers"],
            r["macs"],
            r["madd_uj"],
            r["dense_uj"],
            r["dense_over_madd"],
            r["madd_tmacs_per_w"],
            r["dense_tmacs_per_w"],
        ]
        for r in rows
    ]
    paths["md"].write_text(
        "\n".join(["# Energy per inference, MADD vs dense", "", *_table(header, table), ""])
    )
    png = _plot_networks(rows, out / "energy_networks.png")
    if png is not None:
        paths["png"] = png
    return paths


def _plot_networks(rows: list[dict[str, Any]], path: Path) -> Path | None:
    plt = pyplot_or_none()
    if plt is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["network"] for r in rows]
    x = list(range(len(rows)))
    width = 0.4
    left.bar([i - width / 2 for i in x], [r["madd_tmacs_per_w"] for r in rows], width, label="MADD network")
    left.bar([i + width / 2 for i in x], [r["dense_tmacs_per_w"] for r in rows], width, label="dense network")
    left.set_yscale("log")
    left.set_xticks(x)
    left.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    left.set_ylabel("MAC/s/W (T), throughput-equivalent")
    left.set_title("efficiency per network")
    left.legend(fontsize=8)
    # energy by group, normalised to the dense network's total (bars above 2 are cut, value written)
    limit = 2.0
    bottoms = {"madd": [0.0] * len(rows), "dense": [0.0] * len(rows)}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, group in enumerate(GROUPS):
        for variant, offset in (("madd", -width / 2), ("dense", width / 2)):
            values = [r.get(f"{variant}_{group}_uj", 0.0) / r["dense_uj"] for r in rows]
            right.bar(
                [i + offset for i in x],
                values,
                width * 0.95,
                bottom=bottoms[variant],
                color=colors[k % len(colors)],
                alpha=1.0 if variant == "madd" else 0.55,
                label=group if variant == "madd" else None,
            )
            bottoms[variant] = [b + v for b, v in zip(bottoms[variant], values, strict=True)]
    for i, total in enumerate(bottoms["madd"]):
        if total > limit:
            right.text(
                i - width / 2, limit * 0.97, f"{total:.0f}×", ha="center", va="top", fontsize=7, rotation=90
            )
    right.set_ylim(0, limit)
    right.axhline(1.0, color="grey", linewidth=0.5)
    right.set_xticks(x)
    right.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    right.set_ylabel("energy / dense network's energy")
    right.set_title("energy by group (left bar MADD, pale bar dense)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- headline, constants
def headline_markdown(data: dict[str, Any]) -> str:
    """The headline reproduction as Markdown."""
    lines = [
        f"# Headline reproduction ({data['technology_nm']:g} nm, energies × {data['technology_scale']:.3g})",
        "",
        f"Basis: {data['basis']}.",
        "",
    ]
    header = [
        "D/C",
        "D",
        "model, datapath (T MAC/s/W)",
        "model, all counted",
        "pJ / LUT op (datapath)",
        "pJ / LUT op (all)",
        "authors GF22, 8 dec.",
        "authors GF22, 32 dec.",
        "model dense FP16",
    ]
    rows = [
        [
            r["D_per_C"],
            r["D"],
            r["datapath_tmacs_per_w"],
            r["all_counted_tmacs_per_w"],
            r["datapath_pj_per_lut_op"],
            r["all_counted_pj_per_lut_op"],
            r["authors_gf22_8_decoders"],
            r["authors_gf22_32_decoders"],
            r["dense_fp16_tmacs_per_w"],
        ]
        for r in data["madd"]
    ]
    lines += _table(header, rows)
    lines += [
        "",
        "Authors' GF22FDX figures (0.65 V) in pJ per decoder cycle: "
        + ", ".join(f"{k}: {v:.3g}" for k, v in data["authors_gf22_pj_per_decoder_cycle"].items())
        + f". Model dense INT8 at D/C = 9: {data['dense_int8_tmacs_per_w_at_d_per_c_9']:.3g} T MAC/s/W.",
        "",
        f"A100 ({data['a100_source']}), FP16 tensor peak per board power:",
        "",
    ]
    lines += _table(
        [
            "board",
            "power (W)",
            "dense FP16, MAC = 2 FLOP",
            "FLOP counted as a MAC",
            "2:4 sparse, MAC = 2 FLOP",
        ],
        [
            [
                a["board"],
                a["power_w"],
                a["dense_fp16_tmacs_per_w"],
                a["flop_as_mac_tmacs_per_w"],
                a["sparse_fp16_tmacs_per_w"],
            ]
            for a in data["a100"]
        ],
    )
    return "\n".join(lines) + "\n"


def parameters_markdown() -> str:
    """Every cost-model parameter with its default, unit and source."""
    rows = [[r["name"], r["default"], r["unit"], r["help"], r["source"]] for r in parameter_table()]
    return "\n".join(_table(["parameter", "default", "unit", "what", "source"], rows)) + "\n"
