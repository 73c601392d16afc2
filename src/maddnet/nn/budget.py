"""Per-layer C under a network budget: spend codebooks where a single-layer analysis says
they matter.

One rule (``MaddConfig``: D/C = 9 for 3x3 convs, ``D // codebook_width`` otherwise) gives
every layer the same D/C. Layers differ in how much one codebook more or less costs the
network (``maddnet analyze`` measures it: the accuracy drop or the output NMSE of each layer
replaced alone at several C). :func:`allocate_codebooks` picks C per layer minimising the
summed sensitivity under a total cost (LUT + threshold bytes, encoder compares per
inference, or the MADD layers' energy per inference under the cost model of
:mod:`maddnet.hw.energy`): a multiple-choice knapsack, solved exactly (dynamic programming over Pareto
fronts) or with the greedy marginal-gain rule of bit allocation.

Modelling assumptions (stated in the reports too):

* the sensitivity of the network to several replaced layers is the **sum** of the
  single-layer sensitivities (the classic additivity assumption of bit allocation);
* between measured C the sensitivity is **linear in log2 C**, and up to ``octaves`` factors
  of 2 beyond the measured range it is extrapolated along the nearest measured segment,
  clipped at 0 (a layer measured at one C only stays at that C). The uniform rule's own
  C is extrapolated the same way wherever it lies, since the rule's predicted sensitivity
  needs it, and it stays a choice, so the allocation is not predicted worse than the rule.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # hw imports nn: import it lazily at run time
    from ..hw.costs import CostModel
    from ..hw.counts import LayerShape
    from .spec import LayerSpec

UNITS = ("lut_bytes", "compares", "energy")
# what one unit of each budget is (reports)
UNIT_NAMES = {"lut_bytes": "bytes", "compares": "compares", "energy": "µJ per inference"}
METRICS = ("drop", "nmse")
METHODS = ("exact", "greedy")


# ---------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class CodebookBudget:
    """How C per layer is chosen from a single-layer analysis (``--ncodebooks-from`` /
    ``--budget``); saved whole in a run's config.json.

    Attributes:
        analysis: path of a ``maddnet analyze`` report (``single_layer.json``).
        unit: ``"lut_bytes"`` (LUT bytes ``ceil(C K M b / 8)`` plus encoder bytes: the
            thresholds and split indices at the accelerator's threshold bits, per layer) or
            ``"compares"`` (encoder compares of one inference: rows x the encoder's compares
            per row, ``N C log2 K`` for the tree) or ``"energy"`` (µJ of one inference of
            the MADD layers, :func:`maddnet.hw.energy.madd_layer_energy` under the cost
            model: compute, LUT and threshold reads, activations, parameter loading; see
            :func:`plan_codebooks` for the parameter memory).
        value: the total budget in ``unit``; ``None``: the cost of the uniform rule at
            ``width``.
        width: D/C target of linear and 1x1 layers of the uniform rule whose cost is the
            budget (``MaddConfig.codebook_width``; kxk convs keep D/C = 9); ``None`` with
            ``value=None``: the run's own ``codebook_width``.
        metric: the sensitivity: ``"drop"`` (top-1 points lost) or ``"nmse"`` (output NMSE).
        octaves: how many factors of 2 beyond the measured C range C may go (extrapolated).
            Default 0: only measured C. Extrapolating one octave lost 12-14 points of top-1
            on DS-CNN-S against the uniform rule, staying inside gained 6-11 (docs/encoders.md).
        method: ``"exact"`` (Pareto dynamic programming) or ``"greedy"``.
    """

    analysis: str
    unit: str = "lut_bytes"
    value: float | None = None
    width: int | None = None
    metric: str = "drop"
    octaves: int = 0
    method: str = "exact"

    def __post_init__(self) -> None:
        if not isinstance(self.analysis, str) or not self.analysis:
            raise ValueError(f"CodebookBudget.analysis must be a file path, got {self.analysis!r}")
        for name, allowed in (("unit", UNITS), ("metric", METRICS), ("method", METHODS)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"CodebookBudget.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        if self.value is not None and (
            isinstance(self.value, bool)
            or not isinstance(self.value, int | float)
            or not 0 < self.value < math.inf
        ):
            raise ValueError(f"CodebookBudget.value must be a positive number, got {self.value!r}")
        if self.value is not None and self.width is not None:
            raise ValueError("CodebookBudget: give the budget as value or as width, not both")
        for name in ("width", "octaves"):
            number = getattr(self, name)
            if number is not None and (isinstance(number, bool) or not isinstance(number, int) or number < 0):
                raise ValueError(f"CodebookBudget.{name} must be an int >= 0, got {number!r}")
        if self.width == 0:
            raise ValueError("CodebookBudget.width must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> CodebookBudget:
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"codebook budget: unknown settings {unknown}")
        return cls(**values)


def parse_budget(analysis: str, text: str, **options: Any) -> CodebookBudget:
    """``--budget`` text: ``UNIT`` (the uniform rule's cost at the run's width),
    ``UNIT:VALUE`` or ``UNIT:width=W``, with UNIT ``lut-bytes``, ``compares`` or ``energy``
    (VALUE in µJ per inference). Raises ``ValueError`` naming the bad part."""
    unit, _, rest = text.strip().partition(":")
    unit = unit.strip().replace("-", "_")
    if unit not in UNITS:
        raise ValueError(f"--budget: unit must be lut-bytes, compares or energy, got {text!r}")
    value = width = None
    rest = rest.strip()
    try:
        if rest.startswith("width="):
            width = int(rest.removeprefix("width="))
        elif rest:
            value = float(rest)
    except ValueError:
        raise ValueError(f"--budget takes UNIT, UNIT:VALUE or UNIT:width=W, got {text!r}") from None
    return CodebookBudget(analysis=analysis, unit=unit, value=value, width=width, **options)


# ---------------------------------------------------------------------------- sensitivity
def read_report_rows(path: str | Path) -> list[dict[str, Any]]:
    """The ``rows`` of a ``maddnet analyze`` report (one per layer and C with ``layer``,
    ``C``, ``D``, ``M``, ``drop`` in top-1 points, ``nmse``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, or not a single-layer report.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"single-layer analysis {str(path)!r} does not exist (run maddnet analyze)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path} is not a maddnet analyze report (no 'rows' of layer results)")
    return rows


def sensitivity_table(rows: list[Any], metric: str, source: str | Path) -> dict[str, dict[int, float]]:
    """``{layer: {C: sensitivity}}`` of report ``rows`` (:func:`read_report_rows` of
    ``source``); ValueError naming ``source`` for a row without layer, C and a finite metric."""
    table: dict[str, dict[int, float]] = {}
    for row in rows:
        value = row.get(metric) if isinstance(row, dict) else None
        if (
            not isinstance(value, int | float)
            or not math.isfinite(value)
            or "layer" not in row
            or "C" not in row
        ):
            raise ValueError(f"{source}: row {row!r} has no layer, C and finite {metric!r}")
        table.setdefault(str(row["layer"]), {})[int(row["C"])] = float(value)
    return table


def read_sensitivity(path: str | Path, metric: str = "drop") -> dict[str, dict[int, float]]:
    """``{layer: {C: sensitivity}}`` from a ``maddnet analyze`` report (errors as
    :func:`read_report_rows` and :func:`sensitivity_table`)."""
    return sensitivity_table(read_report_rows(path), metric, path)


def layer_dims(rows: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """``{layer: (D, M)}`` of the report rows that give them."""
    return {
        str(row["layer"]): (int(row["D"]), int(row["M"]))
        for row in rows
        if isinstance(row.get("D"), int) and isinstance(row.get("M"), int)
    }


def interpolate_log(measured: Mapping[int, float], ncodebooks: int) -> float:
    """The sensitivity at C = ``ncodebooks``: piecewise linear in log2 C through the
    ``measured`` ``{C: value}`` points; outside them, the nearest segment extended, clipped
    at 0 (no layer does better than exact). A modelling assumption, not a measurement.

    Raises ``ValueError`` for one measured point and another C (no slope to extend)."""
    points = sorted(measured.items())
    if ncodebooks in measured:
        return float(measured[ncodebooks])
    if len(points) < 2:
        raise ValueError(f"one measured C ({points[0][0]}) cannot be extended to C = {ncodebooks}")
    x = math.log2(ncodebooks)
    index = next((i for i, (c, _) in enumerate(points) if c > ncodebooks), len(points))
    index = min(max(index, 1), len(points) - 1)
    (c0, y0), (c1, y1) = points[index - 1], points[index]
    t = (x - math.log2(c0)) / (math.log2(c1) - math.log2(c0))
    value = y0 + t * (y1 - y0)
    return max(0.0, value) if not c0 <= ncodebooks <= c1 else value


def candidate_codebooks(
    measured: Sequence[int], ndims: int, octaves: int = 0, extra: Sequence[int] = ()
) -> list[int]:
    """C values a layer may take: the measured ones and every power of 2 within
    ``[min measured / 2**octaves, max measured * 2**octaves]`` and ``[1, D]``, plus
    ``extra`` (e.g. the rule's C) anywhere in ``[1, D]``, so that the allocation can keep
    the rule's C at the sensitivity the rule is predicted with; only the measured C when a
    single C was measured (nothing to extend or interpolate)."""
    if len(set(measured)) < 2:
        return sorted(set(measured))
    low = max(1, math.ceil(min(measured) / 2**octaves))
    high = min(ndims, max(measured) * 2**octaves)
    powers = (2**i for i in range(int(math.log2(high)) + 1))
    inside = {c for c in {*measured, *powers} if low <= c <= high}
    return sorted(inside | {c for c in extra if 1 <= c <= ndims})


# ---------------------------------------------------------------------------- allocation
def allocate_codebooks(
    costs: Mapping[str, Mapping[int, float]],
    sensitivity: Mapping[str, Mapping[int, float]],
    budget: float,
    method: str = "exact",
) -> dict[str, int]:
    """C per layer minimising ``sum sensitivity[layer][C]`` subject to
    ``sum costs[layer][C] <= budget`` (a multiple-choice knapsack).

    ``method="exact"``: dynamic programming over Pareto fronts of (cost, sensitivity),
    layer after layer (the exact multiple-choice knapsack; Sinha & Zoltners, Oper. Res.
    1979); ties go to the lower cost. ``method="greedy"``: start every layer at its cheapest
    C and repeatedly take the move to a costlier C with the largest sensitivity decrease per
    unit cost that still fits (the marginal-return rule of bit allocation; Fox, Manage. Sci.
    1966; Gersho & Gray, Vector Quantization and Signal Compression, 1992, sec. 8.4):
    optimal on convex (cost, sensitivity) curves, a heuristic otherwise.

    Args:
        costs: ``{layer: {C: cost}}`` in the budget's unit (>= 0).
        sensitivity: ``{layer: {C: value}}``, the same layers and C.
        budget: the total cost allowed.

    Raises:
        ValueError: layers or C differ between the two tables, no candidate for a layer,
            or the cheapest choice of every layer already exceeds ``budget``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if set(costs) != set(sensitivity):
        raise ValueError(
            f"costs and sensitivity name different layers: {sorted(set(costs) ^ set(sensitivity))}"
        )
    for name in costs:
        if not costs[name] or set(costs[name]) != set(sensitivity[name]):
            raise ValueError(f"layer {name!r}: costs and sensitivity need the same non-empty set of C")
    minimum = sum(min(c.values()) for c in costs.values())
    if minimum > budget:
        raise ValueError(
            f"budget {budget:g} is below the cheapest allocation ({minimum:g}: every layer at its smallest C)"
        )
    if method == "greedy":
        return _greedy(costs, sensitivity, budget)
    return _pareto(costs, sensitivity, budget)


def _pareto(costs, sensitivity, budget) -> dict[str, int]:
    # front: (cost, sensitivity, choices) with cost ascending and sensitivity strictly descending
    front: list[tuple[float, float, tuple[int, ...]]] = [(0.0, 0.0, ())]
    names = list(costs)
    for name in names:
        merged = sorted(
            (cost + costs[name][c], sens + sensitivity[name][c], (*picks, c))
            for (cost, sens, picks), c in itertools.product(front, sorted(costs[name]))
            if cost + costs[name][c] <= budget
        )
        front = []
        for entry in merged:
            if not front or entry[1] < front[-1][1]:
                front.append(entry)
    best = min(front, key=lambda entry: (entry[1], entry[0]))
    return dict(zip(names, best[2], strict=True))


def _greedy(costs, sensitivity, budget) -> dict[str, int]:
    chosen = {name: min(table, key=lambda c: (table[c], c)) for name, table in costs.items()}
    spent = sum(costs[name][c] for name, c in chosen.items())
    while True:
        best, best_gain = None, 0.0
        for name, current in chosen.items():
            for c, cost in costs[name].items():
                extra = cost - costs[name][current]
                gain = sensitivity[name][current] - sensitivity[name][c]
                if extra <= 0 or gain <= 0 or spent + extra > budget:
                    continue
                if gain / extra > best_gain:
                    best, best_gain = (name, c, extra), gain / extra
        if best is None:
            return chosen
        name, c, extra = best
        chosen[name], spent = c, spent + extra


# ---------------------------------------------------------------------------- networks
def layer_costs(
    shape: LayerShape,
    spec: LayerSpec,
    ncodebooks: Sequence[int],
    cost_model: CostModel | None = None,
) -> dict[int, dict[str, float]]:
    """``{C: {"lut_bytes": ..., "compares": ..., "parameter_bytes": ..., "energy_on_chip":
    ..., "energy_off_chip": ...}}`` of one layer at each C: the counts of
    :func:`maddnet.hw.counts.madd_counts` (``lut_bytes`` = LUT bytes + encoder bytes;
    ``parameter_bytes`` adds the per-column constants) and the layer's energy of one
    inference in µJ (:func:`maddnet.hw.energy.madd_layer_energy`) with the network's
    parameters loaded from the parameter memory (``on_chip``) or from DRAM (``off_chip``).
    The encoder's cost and parameters depend on D, C and ``spec`` only, so they are read
    from a MADD linear skeleton D -> M on the meta device (no memory)."""
    import torch

    from ..hw.costs import CostModel
    from ..hw.counts import MaddParams, madd_counts
    from ..hw.energy import madd_layer_energy, madd_parameter_bytes
    from .layers import MaddLinear

    cost_model = cost_model or CostModel()
    constants, accelerator = cost_model.constants, cost_model.accelerator
    sources = {
        "energy_on_chip": constants.sram_pj_per_byte(accelerator.parameter_memory_bytes),
        "energy_off_chip": constants.dram_pj_per_byte(),
    }
    result = {}
    for c in ncodebooks:
        dense = torch.nn.Linear(shape.in_dim, shape.out_dim, device="meta")
        params = MaddParams.of(MaddLinear._skeleton_of(dense, int(c), spec))
        with_c = shape.with_madd(params)
        counts = madd_counts(with_c, accelerator)
        result[int(c)] = {
            "lut_bytes": counts["lut_bytes"] + counts["encoder_bytes"],
            "compares": counts["compares"],
            "parameter_bytes": madd_parameter_bytes(with_c, cost_model),
            **{
                key: madd_layer_energy(with_c, cost_model, pj_per_byte).total_pj / 1e6
                for key, pj_per_byte in sources.items()
            },
        }
    return result


@dataclass
class Allocation:
    """Chosen C per layer beside the uniform rule's, with costs and predicted sensitivity.

    ``rows``: one dict per layer (``layer``, ``D``, ``M``, ``rows``, ``measured_C``,
    ``rule_C``, ``C``, ``rule_cost``, ``cost``, ``rule_sensitivity``, ``sensitivity``,
    ``candidates``); ``notes``: what the report should say besides (e.g. where an energy
    budget assumed the parameters to be)."""

    budget: CodebookBudget
    total_budget: float
    rows: list[dict[str, Any]]
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def ncodebooks(self) -> dict[str, int]:
        """``{layer: C}``, ready for ``MaddConfig.ncodebooks``."""
        return {row["layer"]: row["C"] for row in self.rows}

    def totals(self) -> dict[str, float]:
        return {
            key: float(sum(row[key] for row in self.rows))
            for key in ("rule_cost", "cost", "rule_sensitivity", "sensitivity")
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget.to_dict(),
            "total_budget": self.total_budget,
            "totals": self.totals(),
            "ncodebooks": self.ncodebooks,
            "assumptions": ASSUMPTIONS,
            "notes": self.notes,
            "rows": self.rows,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Allocation:
        """Inverse of :meth:`to_dict` (``budget.json``)."""
        return cls(
            CodebookBudget.from_dict(values["budget"]),
            float(values["total_budget"]),
            list(values["rows"]),
            list(values.get("notes", [])),
        )

    def markdown(self, title: str = "Per-layer C under a budget") -> str:
        b, t = self.budget, self.totals()
        unit = UNIT_NAMES[b.unit]

        def amount(value: float) -> str:
            return f"{value:.4g}" if b.unit == "energy" else f"{value:,.0f}"

        lines = [
            f"# {title}",
            "",
            f"Analysis: `{b.analysis}`; sensitivity: {b.metric}; budget: {amount(self.total_budget)} {unit}"
            f" ({'given' if b.value is not None else 'the uniform rule'}); method: {b.method}; "
            f"C up to {b.octaves} octave(s) beyond the measured range.",
            "",
            f"Total {unit}: rule {amount(t['rule_cost'])}, allocation {amount(t['cost'])}. Predicted summed "
            f"{b.metric}: rule {t['rule_sensitivity']:.4g}, allocation {t['sensitivity']:.4g}.",
            "",
            _row(
                ["layer", "D", "M", "measured C", "rule C", "C", f"rule {unit}", unit]
                + [f"rule {b.metric}", b.metric]
            ),
            _row(["---"] * 10),
        ]
        for r in self.rows:
            measured = ", ".join(map(str, r["measured_C"]))
            costs = [amount(r["rule_cost"]), amount(r["cost"])]
            values = [f"{r['rule_sensitivity']:.4g}", f"{r['sensitivity']:.4g}"]
            lines.append(_row([r["layer"], r["D"], r["M"], measured, r["rule_C"], r["C"], *costs, *values]))
        lines += ["", *(f"- {text}" for text in (*ASSUMPTIONS, *self.notes)), ""]
        return "\n".join(lines)


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


ASSUMPTIONS = (
    "Predicted sensitivity: the sum of single-layer measurements (each layer replaced alone); "
    "network-level accuracy of the allocation is not measured by this report.",
    "Between measured C the sensitivity is linear in log2 C; beyond them (up to the stated octaves, "
    "and at the rule's own C wherever it lies) the nearest measured segment is extended and clipped "
    "at 0: a modelling assumption.",
)


def plan_codebooks(
    shapes: Sequence[LayerShape],
    rule: Mapping[str, int],
    budget: CodebookBudget,
    spec: LayerSpec,
    cost_model: CostModel | None = None,
) -> Allocation:
    """C per layer for the layers in ``rule`` (``{name: the uniform rule's C}``, also the
    reference the budget defaults to) under ``budget``.

    ``shapes``: the network's :class:`~maddnet.hw.counts.LayerShape` of one inference
    (rows, D, M; from :func:`maddnet.hw.counts.record_shapes`); shapes not in ``rule``
    are layers that stay dense. ``cost_model``: the accelerator and constants the costs
    are counted with (default :class:`~maddnet.hw.costs.CostModel`).

    An ``energy`` budget prices each layer's parameters at the parameter memory's pJ per
    byte when the whole network's parameters fit in it, else at DRAM's
    (:mod:`maddnet.hw.energy`), so a layer's energy depends on the allocation as a whole.
    Both are tried: the allocation under on-chip prices is kept only if its parameters do
    fit; the one under DRAM prices always meets the budget (if its parameters fit after
    all, it costs less than counted); the feasible one of lower predicted sensitivity wins,
    and the report's costs are those of its own regime.

    Raises:
        FileNotFoundError: the analysis report does not exist.
        ValueError: the report misses a layer of ``rule`` or names a layer not in it (a
            report of another model), or the budget is below the cheapest allocation.
    """
    from ..hw.costs import CostModel

    cost_model = cost_model or CostModel()
    report_rows = read_report_rows(budget.analysis)
    table = sensitivity_table(report_rows, budget.metric, budget.analysis)
    by_name = {shape.name: shape for shape in shapes}
    missing, extra = sorted(set(rule) - set(table)), sorted(set(table) - set(rule))
    if missing or extra:
        raise ValueError(
            f"{budget.analysis} does not match the model's MADD layers: "
            f"not in the report {missing}, not in the model {extra}"
        )
    shapes_differ = [
        f"{name} (report D={d}, M={m}; model D={by_name[name].in_dim}, M={by_name[name].out_dim})"
        for name, (d, m) in layer_dims(report_rows).items()
        if name in by_name and (d, m) != (by_name[name].in_dim, by_name[name].out_dim)
    ]
    if shapes_differ:
        raise ValueError(
            f"{budget.analysis} was measured on another model (other layer shapes): "
            + "; ".join(shapes_differ[:4])
            + (f"; and {len(shapes_differ) - 4} more" if len(shapes_differ) > 4 else "")
        )
    costs, sens, rows = {}, {}, []
    for name, rule_c in rule.items():
        if name not in by_name:
            raise ValueError(f"layer {name!r} is not called by the model's forward pass")
        shape = by_name[name]
        measured = table[name]
        if max(measured) > shape.in_dim:
            raise ValueError(
                f"{budget.analysis}: layer {name!r} measured at C = {max(measured)} > D = {shape.in_dim}"
            )
        options = candidate_codebooks(list(measured), shape.in_dim, budget.octaves, extra=(rule_c,))
        # every candidate C and the rule's (outside the candidates where octaves forbid it)
        costs[name] = layer_costs(shape, spec, sorted({*options, rule_c}), cost_model)
        sens[name] = {c: interpolate_log(measured, c) for c in options}
        rows.append(
            {
                "layer": name,
                "D": shape.in_dim,
                "M": shape.out_dim,
                "rows": shape.rows,
                "measured_C": sorted(measured),
                "rule_C": rule_c,
                "candidates": options,
                "rule_sensitivity": _rule_sensitivity(measured, rule_c),
            }
        )
    regime = _parameter_regime(shapes, rule, costs, cost_model) if budget.unit == "energy" else None
    rule_key = budget.unit if regime is None else regime(rule)
    total = budget.value
    if total is None:
        total = float(sum(costs[name][c][rule_key] for name, c in rule.items()))
    if regime is None:
        chosen = allocate_codebooks(_unit_table(costs, sens, budget.unit), sens, total, budget.method)
        key, notes = budget.unit, []
    else:
        chosen, key, notes = _energy_allocation(costs, sens, total, budget.method, regime)
    for row in rows:
        name, c = row["layer"], chosen[row["layer"]]
        row.update(
            rule_cost=costs[name][row["rule_C"]][rule_key],
            C=c,
            cost=costs[name][c][key],
            sensitivity=sens[name][c],
        )
    return Allocation(budget, float(total), rows, notes)


def _unit_table(costs, sens, key: str) -> dict[str, dict[int, float]]:
    """``{layer: {C: cost}}`` in one unit, for the candidate C of ``sens``."""
    return {name: {c: costs[name][c][key] for c in sens[name]} for name in sens}


def _parameter_regime(shapes, rule, costs, cost_model: CostModel):
    """``regime(picks)``: the cost key (``energy_on_chip`` / ``energy_off_chip``) of where
    the parameters of the network with C = ``picks`` load from: the parameter memory when
    they fit in it with those of the layers that stay dense (shapes not in ``rule``)."""
    from ..hw.energy import dense_parameter_bytes

    dense_bytes = sum(dense_parameter_bytes(shape, cost_model) for shape in shapes if shape.name not in rule)
    capacity = cost_model.accelerator.parameter_memory_bytes

    def regime(picks: Mapping[str, int]) -> str:
        total_bytes = dense_bytes + sum(costs[name][c]["parameter_bytes"] for name, c in picks.items())
        return "energy_on_chip" if total_bytes <= capacity else "energy_off_chip"

    return regime


def _energy_allocation(
    costs, sens, total: float, method: str, regime
) -> tuple[dict[str, int], str, list[str]]:
    """The allocation under an energy budget (see :func:`plan_codebooks`): the chosen C, the
    cost key of the regime its parameters are in, and a note for the report."""
    feasible, errors = [], []
    for key in ("energy_on_chip", "energy_off_chip"):
        try:
            picks = allocate_codebooks(_unit_table(costs, sens, key), sens, total, method)
        except ValueError as error:
            errors.append(str(error))
            continue
        if key == "energy_off_chip" or regime(picks) == key:
            feasible.append((sum(sens[name][c] for name, c in picks.items()), key, picks))
    if not feasible:
        raise ValueError(f"energy budget {total:.4g} µJ: {errors[-1]}")
    _, _, picks = min(feasible, key=lambda entry: entry[0])
    where = regime(picks)
    place = "the parameter memory" if where == "energy_on_chip" else "DRAM (they do not fit on chip)"
    return picks, where, [f"Energy: the allocation's parameters load from {place}; costs are priced so."]


def _rule_sensitivity(measured: Mapping[int, float], ncodebooks: int) -> float:
    try:
        return interpolate_log(measured, ncodebooks)
    except ValueError:
        return math.nan


def write_allocation(
    allocation: Allocation, out: str | Path, title: str = "Per-layer C under a budget"
) -> dict[str, Path]:
    """``budget.json`` and ``budget.md`` in folder ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "budget.json", "md": out / "budget.md"}
    paths["json"].write_text(json.dumps(allocation.to_dict(), indent=2) + "\n")
    paths["md"].write_text(allocation.markdown(title))
    return paths


def allocate_for_model(
    model: Any,
    input_shape: Sequence[int],
    config: Any,
    budget: CodebookBudget,
    cost_model: CostModel | None = None,
) -> Allocation:
    """:func:`plan_codebooks` for the layers ``config`` (a :class:`~maddnet.nn.MaddConfig`)
    selects in ``model`` (an ``nn.Module``, any device; shapes are recorded on a meta-device
    copy), one input of ``input_shape`` (C, H, W) per inference. The uniform rule is
    ``config``'s with ``codebook_width = budget.width`` (when given) and no ``ncodebooks``."""
    import copy

    from ..hw.counts import record_shapes

    width = budget.width or config.codebook_width
    rule_config = dataclasses.replace(config, ncodebooks=None, codebook_width=width)
    rule = {name: rule_config.codebooks_for(name, module) for name, module in config.select(model).items()}
    shapes, _ = record_shapes(copy.deepcopy(model).to("meta"), tuple(input_shape), device="meta")
    return plan_codebooks(shapes, rule, budget, config.spec, cost_model)
