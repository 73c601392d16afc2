"""``maddnet energy MODEL_OR_RUN``: energy per inference of a MADD network and its dense
original under a documented cost model (docs/hardware.md)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ..amm.encoders import ENCODERS
from ..cli_args import (
    add_budget_arguments,
    add_execution_arguments,
    budget_from_args,
    lut_bits_type,
    nprototypes_type,
    parse_key_values,
    parse_layer_codebooks,
    positive_float,
    positive_int,
    resolve_device,
    set_threads_from,
)
from ..nn import LayerSpec, MaddConfig
from .costs import load_cost_model
from .energy import estimate, headline
from .network import load_network, parse_input_size
from .report import combine, headline_markdown, parameters_markdown, summary_lines, write_report


def _conversion(args: argparse.Namespace) -> MaddConfig:
    ncodebooks = parse_layer_codebooks(args.ncodebooks_pairs) or None
    if args.all_ncodebooks is not None:
        ncodebooks = args.all_ncodebooks
    spec = LayerSpec(nprototypes=args.nprototypes, lut_bits=args.lut_bits, encoder=args.encoder)
    return MaddConfig(
        exclude=tuple(args.exclude or ()),
        ncodebooks=ncodebooks,
        codebook_width=args.codebook_width,
        spec=spec,
    )


def _network_under_budget(args: argparse.Namespace, network, budget, out: str, cost_model):
    """``--ncodebooks-from``: the network again with C per layer chosen under the budget (the
    rule's network gives the shapes), costs counted with ``cost_model`` (the one the
    report prices with); budget.json/.md written to ``out``."""
    from ..nn.budget import plan_codebooks, write_allocation

    if Path(args.target).is_dir() and (Path(args.target) / "checkpoint.pt").is_file():
        raise ValueError(
            f"--ncodebooks-from: run folder {args.target!r} has a saved conversion plan; its C are fixed"
        )
    if args.ncodebooks_pairs or args.all_ncodebooks is not None:
        raise ValueError("give --ncodebooks-from or --ncodebooks / --all-ncodebooks, not both")
    if budget.width is not None and budget.width != args.codebook_width:
        args = argparse.Namespace(**{**vars(args), "codebook_width": budget.width})
        network = _load(args, _conversion(args))
    rule = {layer.name: layer.madd.ncodebooks for layer in network.layers if layer.madd is not None}
    allocation = plan_codebooks(network.layers, rule, budget, _conversion(args).spec, cost_model)
    paths = write_allocation(allocation, out, f"Per-layer C under a budget: {network.name}")
    print("per-layer C:", ", ".join(f"{k}={v}" for k, v in allocation.ncodebooks.items()), "->", paths["md"])
    config = _conversion(args)
    return _load(args, dataclasses.replace(config, ncodebooks=allocation.ncodebooks))


def _load(args: argparse.Namespace, config: MaddConfig):
    return load_network(
        args.target,
        model_kwargs=parse_key_values(args.model_kw, "--model-kw"),
        in_chans=args.in_chans,
        input_size=parse_input_size(args.input_size),
        num_classes=args.num_classes,
        config=config,
        batch=args.batch_size or 1,
        device=resolve_device(args.device),
    )


def run(args: argparse.Namespace) -> int:
    if args.list_constants:
        print(parameters_markdown(), end="")
        return 0
    overrides = parse_key_values(args.set, "--set")
    if args.technology_nm is not None:
        overrides["technology_nm"] = args.technology_nm
    model = load_cost_model(args.config, overrides)
    if args.combine:
        paths = combine(args.combine, args.out or str(Path("runs") / "energy"))
        print(paths["md"].read_text())
        print("written:", ", ".join(str(p) for p in paths.values()))
        return 0
    if args.headline:
        data = headline(model, technology_nm=args.technology_nm or 22.0)
        text = headline_markdown(data)
        print(text, end="")
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "headline.json").write_text(json.dumps(data, indent=2) + "\n")
            (out / "headline.md").write_text(text)
            print("written:", out / "headline.json", out / "headline.md")
        return 0
    if not args.target:
        raise ValueError("give MODEL_OR_RUN (a registered model or a run folder), or --headline / --combine")
    set_threads_from(args.threads)
    network = _load(args, _conversion(args))
    out = args.out or str(Path("runs") / "energy" / Path(args.target).name)
    budget = budget_from_args(args)
    if budget is not None:
        network = _network_under_budget(args, network, budget, out, model)
    result = estimate(network, model)
    paths = write_report(result, out)
    data = json.loads(paths["json"].read_text())
    print(
        f"{data['network']}: {data['madd_layers']} of {data['conv_linear_layers']} conv/linear layers "
        f"on MADDness, {model.constants.technology_nm:g} nm"
    )
    print("\n".join(summary_lines(data)))
    print("written:", ", ".join(str(p) for p in paths.values()))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "energy",
        help="energy per inference of a MADD network vs its dense original (cost model)",
        description="Count the operations and bytes moved of one inference (encoder compares, LUT reads "
        "and adds, inputs read, LUT/threshold/weight loading, outputs written) per layer, for the MADD "
        "network and for the dense network, and price them with per-operation and per-byte constants "
        "(Horowitz, ISSCC 2014, 45 nm, scaled to --technology-nm) on a configurable accelerator. Writes "
        "energy.json/.csv/.md/.png to --out. No weights or data are needed: a registry model is counted "
        "with the default conversion rule (or the flags below), a run folder with its saved conversion plan. "
        "The model, its constants and their sources: docs/hardware.md.",
    )
    parser.add_argument(
        "target",
        nargs="?",
        metavar="MODEL_OR_RUN",
        help="a registered model name (e.g. resnet9, ds_cnn_s, levit_tiny, resnet50) or a run folder "
        "(config.json, and checkpoint.pt with the conversion plan of a retraining run)",
    )
    shape = parser.add_argument_group("network input (default: the run's data set, or per model)")
    shape.add_argument(
        "--model-kw",
        nargs="+",
        action="extend",
        metavar="KEY=VALUE",
        help="builder arguments of a registry model (values are JSON or strings), e.g. width=16",
    )
    shape.add_argument("--in-chans", type=positive_int, help="input channels (default: 3; DS-CNN 1)")
    shape.add_argument(
        "--input-size",
        metavar="SIZE|HxW",
        help="input height and width (default: 224; ResNet-9 32; DS-CNN 49x10 frames x MFCC)",
    )
    shape.add_argument(
        "--num-classes", type=positive_int, help="classes (default: 1000; ResNet-9 10; DS-CNN 12)"
    )
    shape.add_argument(
        "--batch-size",
        type=positive_int,
        help="inputs per batch; parameters are loaded once per batch (default: 1)",
    )
    conv = parser.add_argument_group(
        "MADD layers of a registry model or a dense run (default: the conversion rule)"
    )
    conv.add_argument(
        "--ncodebooks",
        dest="ncodebooks_pairs",
        nargs="+",
        action="extend",
        metavar="LAYER=C",
        help="C for named layers (others follow the rule)",
    )
    conv.add_argument("--all-ncodebooks", type=positive_int, metavar="C", help="one C for every layer")
    conv.add_argument(
        "--codebook-width",
        type=positive_int,
        default=8,
        help="target D/C of linear and 1x1 layers (default: 8)",
    )
    conv.add_argument(
        "--exclude", nargs="+", metavar="PATTERN", help="name patterns kept dense (default: none)"
    )
    add_budget_arguments(conv)
    conv.add_argument(
        "--nprototypes",
        "-K",
        type=nprototypes_type,
        default=16,
        metavar="K",
        help="codes per codebook (default: 16)",
    )
    conv.add_argument(
        "--encoder",
        choices=sorted(ENCODERS),
        default="tree",
        help="encoder of the MADD layers, priced per row by its cost (the tree: 4 compares and 4 "
        "reads per codebook; the nearest-prototype encoders read every input and add or multiply, "
        "docs/encoders.md) (default: tree)",
    )
    conv.add_argument(
        "--lut-bits",
        type=lut_bits_type,
        default=8,
        metavar="BITS",
        help="bits per LUT entry (1..8); 0 or none: float LUTs, priced as FP16 entries (default: 8)",
    )
    cost = parser.add_argument_group("cost model (maddnet energy --list-constants shows every parameter)")
    cost.add_argument(
        "--technology-nm",
        type=positive_float,
        help="technology node the 45 nm energies are scaled to (default: 45; --headline: 22)",
    )
    cost.add_argument("--config", metavar="FILE", help="JSON object of cost-model parameters (name: value)")
    cost.add_argument(
        "--set",
        nargs="+",
        action="extend",
        metavar="KEY=VALUE",
        help="cost-model parameters, applied after --config (e.g. decoder_units=64 dense_precision=int8)",
    )
    what = parser.add_argument_group("other outputs")
    what.add_argument(
        "--headline",
        action="store_true",
        help="reproduce the motivation's ~32 TMAC/s/W (22 nm) vs ~0.7 TMAC/s/W (A100) comparison "
        "with its basis",
    )
    what.add_argument(
        "--combine",
        nargs="+",
        metavar="DIR",
        help="compare the energy.json of earlier runs: energy_networks.{json,csv,md,png} in --out "
        "(default: runs/energy)",
    )
    what.add_argument(
        "--list-constants", action="store_true", help="print every cost-model parameter and its source"
    )
    parser.add_argument(
        "--out",
        help="output folder (default: runs/energy/<MODEL_OR_RUN>; --headline writes files only with --out)",
    )
    add_execution_arguments(parser)
    parser.set_defaults(func=run)
    return parser
