"""Export a converted network for the accelerator (``maddnet export``): a versioned manifest,
the tables in safetensors, ``$readmemh`` memory files and golden vectors from real data.

The format (every file, field, dtype and address order) is specified in docs/hardware.md,
"Export format"; :mod:`maddnet.hw.hw_check` reads and checks it without torch. The golden
vectors are computed by the PyTorch model in hardware-exact mode
(:func:`maddnet.hw.set_hw_exact`), the datapath of the Stella Nera accelerator
(github.com/joennlae/halutmatmul): FP16 thresholds in heap order, unsigned 8-bit LUT
entries addressed ``codebook * K + code``, an integer accumulator, de-quantisation.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save_file
from torch import nn

from .. import __version__
from ..nn import madd_layers
from ..nn.layers import MaddConv2d, _MaddLayer
from ..nn.plan import conversion_plan, module_names, replace_module
from . import datapath
from .exact import set_hw_exact
from .hw_check import (
    FORMAT_NAME,
    FORMAT_VERSION,
    GOLDEN_FILE,
    MANIFEST,
    MODEL_FILE,
    REFERENCE_DIR,
    TENSORS_FILE,
    Export,
    _same_bits,
    conv_output_size,
    conv_tap_values,
    format_memory,
    layer_arrays,
    linear_tap_values,
    sha256_of,
    split_taps,
)

_DTYPE_NAMES = {
    np.dtype(np.float16): "F16",
    np.dtype(np.float32): "F32",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
    np.dtype(np.int32): "I32",
    np.dtype(np.int64): "I64",
}


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    # files are written from host memory: the one place tensors leave their device
    return tensor.detach().to("cpu").contiguous().numpy()


def _spec(file: str, key: str, value: np.ndarray) -> dict[str, Any]:
    return {"file": file, "key": key, "dtype": _DTYPE_NAMES[value.dtype], "shape": list(value.shape)}


def _conv_geometry(layer: _MaddLayer) -> dict[str, Any] | None:
    if not isinstance(layer, MaddConv2d):
        return None
    config = layer.get_config()
    keys = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation")
    return {key: config[key] for key in keys} | {"groups": 1}


def _selected_rows(nrows: int, count: int) -> np.ndarray:
    """``count`` row indices spread evenly over ``nrows`` (first and last included)."""
    return np.unique(np.linspace(0, nrows - 1, num=min(count, nrows)).round().astype(np.int64))


class _Recorder:
    """Forward hooks keeping each MADD layer's first input and output, and the call order."""

    def __init__(self, layers: Mapping[str, _MaddLayer]) -> None:
        self.order: list[str] = []
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [layer.register_forward_hook(self._hook(name)) for name, layer in layers.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if name not in self.inputs:  # a layer called twice (shared) keeps its first call
                self.order.append(name)
                self.inputs[name] = args[0].detach()
                self.outputs[name] = output.detach()

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _golden(layer: _MaddLayer, x: torch.Tensor, out: torch.Tensor, count: int) -> dict[str, np.ndarray]:
    """Golden vectors of ``layer`` on its input ``x`` (its hardware-exact output ``out``):
    ``count`` rows spread over all rows, with their position, FP16 split values, codes (from
    the layer), integer accumulators (a torch sum of the integer LUT) and outputs."""
    conv = _conv_geometry(layer)
    taps = split_taps(_numpy(layer.split_dims), conv)
    host = _numpy(x.float())
    if conv is not None:
        images = host if host.ndim == 4 else host[None]
        values = conv_tap_values(images, taps, conv)
        out_h, out_w = out.shape[-2:]
        positions = np.stack(np.unravel_index(np.arange(values.shape[0]), (images.shape[0], out_h, out_w)), 1)
        outputs = (out if out.dim() == 4 else out[None]).permute(0, 2, 3, 1).reshape(-1, layer.out_dim)
    else:
        values = linear_tap_values(host, taps)
        lead = tuple(host.shape[:-1]) or (1,)
        positions = np.stack(np.unravel_index(np.arange(values.shape[0]), lead), 1)
        outputs = out.reshape(-1, layer.out_dim)
    rows = _selected_rows(values.shape[0], count)
    codes = layer.codes(x)[torch.from_numpy(rows).to(x.device)]
    q = layer.quantized_lut()
    entries = q.values.long()[torch.arange(layer.ncodebooks, device=codes.device), codes.long()]  # (R, C, M)
    acc = entries.sum(dim=1)
    if layer.hw_overflow == "saturate":  # unsigned entries: clamping the sum = clamping every add
        acc = acc.clamp(max=2 ** (layer.hw_accumulator_bits - 1) - 1)
    acc_dtype = np.int32 if layer.hw_accumulator_bits <= 32 else np.int64
    return {
        "rows": positions[rows].astype(np.int64),
        "input": datapath.to_fp16(values[rows]),
        "codes": _numpy(codes).astype(np.uint8),
        "acc": _numpy(acc).astype(acc_dtype),
        "output": _numpy(outputs[torch.from_numpy(rows).to(outputs.device)].float()),
    }


def _layer_tensors(layer: _MaddLayer) -> dict[str, np.ndarray]:
    q = layer.quantized_lut()
    offsets, scale = _numpy(q.offsets.float()), _numpy(q.scale.float())
    bias = None if layer.bias is None else _numpy(layer.bias.float())
    tensors = {
        "thresholds": datapath.to_fp16(_numpy(layer.thresholds)),
        "split_dims": _numpy(layer.split_dims).astype(np.int32),
        "lut": np.ascontiguousarray(np.transpose(_numpy(q.values), (2, 0, 1))),  # (C, K, M) -> (M, C, K)
        "lut_offsets": offsets,
        "lut_scale": scale,
        "accumulator_init": datapath.accumulator_init(offsets, bias),
    }
    if bias is not None:
        tensors["bias"] = bias
    return tensors


def _memory_name(index: int, name: str, role: str) -> str:
    return f"memories/{index:03d}_{name.replace('.', '_')}.{role}.hex"


def _layer_entry(
    index: int, name: str, aliases: list[str], layer: _MaddLayer, tensors: dict[str, np.ndarray]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The manifest entry of one layer and the text of its memory files."""
    conv = _conv_geometry(layer)
    C, K, M = layer.ncodebooks, layer.nprototypes, layer.out_dim
    thresholds, lut = tensors["thresholds"], tensors["lut"]
    memories = {
        _memory_name(index, name, "thresholds"): format_memory(
            thresholds,
            16,
            f"{name} thresholds: {C * (K - 1)} FP16 words, address c*{K - 1} + node (heap order)",
        ),
        _memory_name(index, name, "lut"): format_memory(
            lut, 8, f"{name} LUT: {M * C * K} unsigned 8-bit words, address (m*{C} + c)*{K} + code"
        ),
    }
    names = list(memories)
    entry = {
        "index": index,
        "name": name,
        "aliases": aliases,
        "type": "conv2d" if conv is not None else "linear",
        "D": layer.in_dim,
        "M": M,
        "C": C,
        "K": K,
        "depth": layer.depth,
        "conv": conv,
        "splits": split_taps(tensors["split_dims"], conv).tolist(),
        "split_kind": "(channel, ky, kx)" if conv is not None else "(column,)",
        "lut_quantization": {
            "bits": layer.lut_bits,
            "granularity": layer.lut_granularity,
            "encoding": "unsigned",
        },
        "accumulator_bits": layer.hw_accumulator_bits,
        "bias": layer.bias is not None,
        "tensors": {role: _spec(TENSORS_FILE, f"{name}/{role}", value) for role, value in tensors.items()},
        "memories": {
            "thresholds": {
                "file": names[0],
                "tensor": "thresholds",
                "word_bits": 16,
                "depth": C * (K - 1),
                "address": f"c * {K - 1} + node",
            },
            "lut": {
                "file": names[1],
                "tensor": "lut",
                "word_bits": 8,
                "depth": M * C * K,
                "address": f"(m * {C} + c) * {K} + code",
            },
        },
    }
    return entry, memories


def export_model(
    model: nn.Module,
    inputs: torch.Tensor,
    out_dir: str | Path,
    *,
    source: Mapping[str, Any] | None = None,
    golden_rows: int = 8,
    accumulator_bits: int = 32,
    overflow: str = "refuse",
    include_model: bool = True,
) -> Path:
    """Write the hardware export of converted ``model`` to ``out_dir``.

    Args:
        model: a converted model (every MADD layer with the tree encoder and an integer LUT;
            a ValueError names the first that is not). Its hardware-exact mode and train/eval
            state are restored afterwards.
        inputs: (B, ...) a batch of real network inputs (any device); they become the network
            vectors, and every MADD layer's golden vectors are rows of its input on them.
        out_dir: the export folder (created; files of an earlier export are replaced).
        source: how to rebuild the network for ``hw-check --end-to-end``: ``model`` (registry
            name), ``model_kwargs``, ``num_classes``, ``in_chans`` and a ``description``;
            None: no end-to-end check possible.
        golden_rows: golden rows per layer, spread evenly over all its rows on ``inputs``.
        accumulator_bits, overflow: the accumulator (:func:`maddnet.hw.set_hw_exact`).
        include_model: write ``model.safetensors`` (the full state dict, for the end-to-end check).

    Returns:
        The path of ``manifest.json``.
    """
    if golden_rows < 1:
        raise ValueError(f"golden_rows must be at least 1, got {golden_rows}")
    layers = madd_layers(model)
    if not layers:
        raise ValueError("the model has no MADD layer: convert it first (maddnet.nn.convert)")
    out = Path(out_dir)
    saved_modes = {name: (m.hw_exact, m.hw_accumulator_bits, m.hw_overflow) for name, m in layers.items()}
    was_training = model.training
    recorder = _Recorder(layers)
    try:
        set_hw_exact(model, True, accumulator_bits, overflow)
        model.eval()
        with torch.no_grad():
            output = model(inputs)
        if not isinstance(output, torch.Tensor):
            raise ValueError(
                f"the model returns a {type(output).__name__}, not one tensor: cannot store its output"
            )
        missing = [name for name in layers if name not in recorder.inputs]
        if missing:
            raise ValueError(
                f"MADD layers {missing} are not called by the model's forward pass on the inputs"
            )
        names = module_names(model)
        tensors: dict[str, np.ndarray] = {}
        golden: dict[str, np.ndarray] = {}
        entries, memories = [], {}
        with torch.no_grad():
            for index, name in enumerate(recorder.order):
                layer = layers[name]
                own = _layer_tensors(layer)
                entry, texts = _layer_entry(index, name, names[id(layer)][1:], layer, own)
                rows = _golden(layer, recorder.inputs[name], recorder.outputs[name], golden_rows)
                entry["golden"] = {role: _spec(GOLDEN_FILE, f"{name}/{role}", v) for role, v in rows.items()}
                entry["golden"]["rows"]["layout"] = (
                    "(image, output row, output column)"
                    if entry["conv"]
                    else "index in the input's leading dims"
                )
                tensors.update({f"{name}/{role}": v for role, v in own.items()})
                golden.update({f"{name}/{role}": v for role, v in rows.items()})
                entries.append(entry)
                memories.update(texts)
        network = {"input": _numpy(inputs.float()), "output": _numpy(output.float())}
        golden.update({f"network/{role}": v for role, v in network.items()})
        plan = conversion_plan(model)
    finally:
        recorder.remove()
        for name, (enabled, bits, policy) in saved_modes.items():
            layers[name].hw_exact, layers[name].hw_accumulator_bits, layers[name].hw_overflow = (
                enabled,
                bits,
                policy,
            )
        model.train(was_training)

    if out.exists():
        for stale in (MANIFEST, TENSORS_FILE, GOLDEN_FILE, MODEL_FILE, "memories", REFERENCE_DIR):
            path = out / stale
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    (out / "memories").mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / TENSORS_FILE), metadata={"format": FORMAT_NAME})
    save_file(golden, str(out / GOLDEN_FILE), metadata={"format": FORMAT_NAME})
    for name, text in memories.items():
        (out / name).write_text(text)
    files = [TENSORS_FILE, GOLDEN_FILE, *memories]
    if include_model:
        state = {key: _numpy(value).copy() for key, value in model.state_dict().items()}
        save_file(state, str(out / MODEL_FILE), metadata={"format": FORMAT_NAME})
        files.append(MODEL_FILE)
    (out / REFERENCE_DIR).mkdir()
    for module in ("hw_check.py", "datapath.py"):  # the torch-free checker travels with the export
        shutil.copyfile(Path(__file__).with_name(module), out / REFERENCE_DIR / module)
        files.append(f"{REFERENCE_DIR}/{module}")
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "maddnet_version": __version__,
        "source": dict(source) if source is not None else None,
        "datapath": {
            "input": "FP16 (float32 rounded to nearest even; >= 65520 in magnitude: +-inf)",
            "thresholds": "FP16, heap order, strictly greater goes right (node -> 2 node + 2)",
            "lut_encoding": "unsigned",
            "accumulator_bits": accumulator_bits,
            "overflow": overflow,
            "dequantize": "float32(acc) * float32(1 / lut_scale) + accumulator_init (float32)",
            "accumulator_init": "bias + lut_offsets[0] + lut_offsets[1] + ... (float32, in codebook order)",
        },
        "passes": plan.get("passes", []),
        "plan": plan,
        "layer_order": [entry["name"] for entry in entries],
        "layers": entries,
        "network_vectors": {
            role: _spec(GOLDEN_FILE, f"network/{role}", value) for role, value in network.items()
        },
        "model_state": None,
        "files": {
            name: {"sha256": sha256_of(out / name), "bytes": (out / name).stat().st_size} for name in files
        },
    }
    if include_model:
        manifest["model_state"] = {
            "file": MODEL_FILE,
            "what": "the PyTorch state dict (end-to-end check only)",
        }
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return path


# ---------------------------------------------------------------------------- end to end
class DatapathLayer(nn.Module):
    """A MADD layer computed by the numpy datapath from an export's tables and taps only:
    the input's split values gathered at the manifest's taps (conv geometry), then
    :func:`maddnet.hw.datapath.run_layer`."""

    def __init__(self, export: Export, entry: dict[str, Any]) -> None:
        super().__init__()
        self.entry = entry
        self.arrays = layer_arrays(export, entry)
        self.taps = np.asarray(entry["splits"], np.int64)
        self.accumulator_bits = int(entry["accumulator_bits"])
        self.overflow = export.manifest["datapath"]["overflow"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        host = _numpy(x.float())
        conv = self.entry["conv"]
        if conv is not None:
            images = host if host.ndim == 4 else host[None]
            values = conv_tap_values(images, self.taps, conv)
        else:
            values = linear_tap_values(host, self.taps)
        result = datapath.run_layer(
            values, **self.arrays, accumulator_bits=self.accumulator_bits, overflow=self.overflow
        )
        out = torch.from_numpy(result.out).to(x.device)
        if conv is None:
            return out.reshape(*x.shape[:-1], self.entry["M"])
        out_h, out_w = conv_output_size(images.shape[2], images.shape[3], conv)
        out = out.reshape(images.shape[0], out_h, out_w, -1).permute(0, 3, 1, 2).contiguous()
        return out if host.ndim == 4 else out[0]


def rebuild_exported(export: Export) -> nn.Module:
    """The PyTorch model of ``export``: built from its ``source`` (registry model), its
    conversion plan replayed, ``model.safetensors`` loaded. Raises ValueError when the export
    has no source or no model state."""
    from safetensors.torch import load_file

    from ..models import create_model
    from ..nn import rebuild

    source = export.manifest.get("source")
    if not source or not source.get("model"):
        raise ValueError(f"{export.root / MANIFEST}: no source model recorded: no end-to-end check possible")
    if MODEL_FILE not in export.manifest["files"]:
        raise ValueError(
            f"{export.root / MANIFEST}: exported without {MODEL_FILE}: no end-to-end check possible"
        )
    model = create_model(
        source["model"], source["num_classes"], source["in_chans"], **dict(source.get("model_kwargs") or {})
    )
    rebuild(model, export.manifest["plan"])
    model.load_state_dict(load_file(str(export.root / MODEL_FILE)))
    return model.eval()


def check_end_to_end(export: Export) -> tuple[bool, list[str]]:
    """Run the exported network on its input vectors twice: the PyTorch model in
    hardware-exact mode, and the same model with every MADD layer a :class:`DatapathLayer`
    (numpy, the export's tables only); both must equal the exported output bit for bit.

    Returns (ok, report lines)."""
    model = rebuild_exported(export)
    spec = export.manifest["datapath"]
    set_hw_exact(model, True, int(spec["accumulator_bits"]), spec["overflow"])
    vectors = export.manifest["network_vectors"]
    inputs = torch.from_numpy(export.golden[vectors["input"]["key"]])
    expected = export.golden[vectors["output"]["key"]]
    with torch.no_grad():
        torch_out = _numpy(model(inputs).float())
    names = module_names(model)
    for entry in export.layers:
        replace_module(model, entry["name"], DatapathLayer(export, entry), names)
    with torch.no_grad():
        numpy_out = _numpy(model(inputs).float())
    lines, ok = [], True
    for label, value in (("PyTorch hw-exact model", torch_out), ("numpy datapath network", numpy_out)):
        same = _same_bits(value, expected) if value.shape == expected.shape else np.zeros(1, bool)
        ok &= bool(same.all())
        lines.append(
            f"end to end, {label}: {int(same.sum())}/{expected.shape[0]} network outputs bit-exact"
            + ("" if same.all() else " MISMATCH")
        )
    return ok, lines


__all__ = ["DatapathLayer", "check_end_to_end", "export_model", "rebuild_exported"]
