"""Read and check a hardware export (``maddnet export``; format: docs/hardware.md, "Export
format") without torch.

This module imports only numpy, safetensors and :mod:`maddnet.hw.datapath` (itself numpy
only), so a hardware team can run it where torch is not installed. Importing it as
``maddnet.hw.hw_check`` loads the ``maddnet`` package, whose ``__init__`` imports torch; the
torch-free entry is the file itself, which every export carries a copy of::

    python DIR/reference/hw_check.py DIR        # numpy + safetensors only
    maddnet hw-check DIR [--end-to-end]         # the same check; --end-to-end needs torch

What it checks:

1. the manifest (``manifest.json``): valid JSON, this format and a version it reads, every
   field it needs; every file it lists exists with the listed size and sha256;
2. every tensor (safetensors) has the dtype and shape the manifest says; every ``$readmemh``
   memory file holds exactly the words of its tensor, in the documented address order;
3. every golden vector (per layer: FP16 input values, codes, integer accumulators, outputs)
   run through the numpy datapath (:func:`maddnet.hw.datapath.run_layer`) agrees bit for bit;
4. with ``end_to_end`` (needs torch and maddnet): the network rebuilt from the export's
   source and ``model.safetensors`` in hardware-exact mode reproduces the network output
   vectors bit for bit, and so does the same network with every MADD layer replaced by the
   numpy datapath reading only the export's tables and taps.

A problem raises :class:`ExportError` naming the file (and the layer / tensor) and what is
wrong; the command line exits with 1 on a disagreement and 2 on an unreadable export.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

if __package__:
    from . import datapath
else:  # run as a file (torch-free entry): load the sibling without the maddnet package
    _spec = importlib.util.spec_from_file_location(
        "_maddnet_hw_datapath", Path(__file__).with_name("datapath.py")
    )
    datapath = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
    _spec.loader.exec_module(datapath)  # type: ignore[union-attr]

FORMAT_NAME = "maddnet-hw-export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS_FILE = "tensors.safetensors"
GOLDEN_FILE = "golden.safetensors"
MODEL_FILE = "model.safetensors"
REFERENCE_DIR = "reference"
# the safetensors dtype names of the numpy dtypes the format uses
DTYPES = {
    "F16": np.float16,
    "F32": np.float32,
    "I8": np.int8,
    "U8": np.uint8,
    "I32": np.int32,
    "I64": np.int64,
}
# per-layer tensors in tensors.safetensors, and the golden vectors per layer
LAYER_TENSORS = ("thresholds", "split_dims", "lut", "lut_offsets", "lut_scale", "accumulator_init")
GOLDEN_TENSORS = ("rows", "input", "codes", "acc", "output")


class ExportError(ValueError):
    """An export that cannot be read (bad JSON, missing or changed file, wrong tensor)."""


# ---------------------------------------------------------------------------- geometry
def split_taps(split_dims: np.ndarray, conv: dict[str, Any] | None) -> np.ndarray:
    """The input value each split reads.

    Args:
        split_dims: (C, L) integer columns of the layer's rows (for a conv, the im2col
            patch in ``F.unfold`` order: channel-major, then kernel row, then kernel column).
        conv: the manifest's conv geometry (``kernel_size`` used) or None for a linear layer.

    Returns:
        (C, L, 3) int64 ``(channel, ky, kx)`` taps for a conv, (C, L, 1) columns for a linear.
    """
    dims = np.asarray(split_dims, np.int64)
    if conv is None:
        return dims[..., None]
    kh, kw = conv["kernel_size"]
    channel, rest = np.divmod(dims, kh * kw)
    ky, kx = np.divmod(rest, kw)
    return np.stack([channel, ky, kx], axis=-1)


def conv_output_size(height: int, width: int, conv: dict[str, Any]) -> tuple[int, int]:
    """Output (height, width) of a conv with the manifest's geometry on an (height, width) input."""
    sizes = []
    for size, k, s, p, d in zip(
        (height, width), conv["kernel_size"], conv["stride"], conv["padding"], conv["dilation"], strict=True
    ):
        sizes.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    return sizes[0], sizes[1]


def conv_tap_values(images: np.ndarray, taps: np.ndarray, conv: dict[str, Any]) -> np.ndarray:
    """The values a conv's encoder reads from ``images`` (B, Cin, H, W) at ``taps`` (C, L, 3):
    (B * Hout * Wout, C, L), rows in (image, output row, output column) order; taps outside
    the image read the zero padding."""
    images = np.asarray(images)
    batch, _, height, width = images.shape
    out_h, out_w = conv_output_size(height, width, conv)
    (ph, pw), (sh, sw), (dh, dw) = conv["padding"], conv["stride"], conv["dilation"]
    padded = np.pad(images, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    channel, ky, kx = taps[..., 0], taps[..., 1], taps[..., 2]
    oy = np.arange(out_h)[:, None, None, None] * sh + ky * dh  # (Hout, 1, C, L)
    ox = np.arange(out_w)[None, :, None, None] * sw + kx * dw  # (1, Wout, C, L)
    values = padded[:, channel, oy, ox]  # (B, Hout, Wout, C, L)
    return values.reshape(batch * out_h * out_w, *taps.shape[:2])


def linear_tap_values(inputs: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """The values a linear layer's encoder reads from ``inputs`` (..., D): (rows, C, L) with
    rows the flattened leading dimensions."""
    inputs = np.asarray(inputs)
    return inputs.reshape(-1, inputs.shape[-1])[:, taps[..., 0]]


# ---------------------------------------------------------------------------- $readmemh
def hex_words(values: np.ndarray, word_bits: int) -> np.ndarray:
    """The unsigned ``word_bits``-bit words of ``values`` (FP16 bit patterns, two's
    complement integers) as uint64."""
    values = np.ascontiguousarray(values)
    if values.dtype == np.float16:
        words = values.view(np.uint16).astype(np.uint64)
    else:
        words = values.astype(np.int64).astype(np.uint64)
    return words & np.uint64((1 << word_bits) - 1)


def format_memory(values: np.ndarray, word_bits: int, comment: str) -> str:
    """``$readmemh`` text: a ``//`` comment line, then one word per line (lower-case hex,
    zero-padded to ``ceil(word_bits / 4)`` digits), addresses 0, 1, ... in ``values``'
    row-major (C) order."""
    digits = (word_bits + 3) // 4
    words = hex_words(values.reshape(-1), word_bits)
    body = "\n".join(f"{int(w):0{digits}x}" for w in words)
    return f"// {comment}\n{body}\n"


def parse_memory(text: str, path: str) -> np.ndarray:
    """The words of a ``$readmemh`` file (``//`` comments and blank lines skipped; no ``@``
    address jumps: the format writes every address in order) as uint64."""
    words = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("//", 1)[0].strip()
        if not line:
            continue
        for token in line.split():
            if token.startswith("@"):
                raise ExportError(f"{path}:{number}: address jumps (@...) are not part of this format")
            try:
                words.append(int(token, 16))
            except ValueError:
                raise ExportError(f"{path}:{number}: {token!r} is not a hex word") from None
    return np.array(words, np.uint64)


# ---------------------------------------------------------------------------- reading
@dataclass
class Export:
    """A read and verified export: its folder, manifest and tensors (numpy, by key)."""

    root: Path
    manifest: dict[str, Any]
    tensors: dict[str, np.ndarray]
    golden: dict[str, np.ndarray]

    @property
    def layers(self) -> list[dict[str, Any]]:
        return self.manifest["layers"]


def sha256_of(path: Path) -> str:
    """Hex sha256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _field(mapping: Any, key: str, where: str) -> Any:
    if not isinstance(mapping, dict) or key not in mapping:
        raise ExportError(f"{where} has no field {key!r}")
    return mapping[key]


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of export folder ``root``, its format and version checked."""
    path = root / MANIFEST
    if not root.is_dir():
        raise ExportError(f"export folder {root} does not exist")
    if not path.is_file():
        raise ExportError(f"{path} is missing: {root} is not a maddnet export")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExportError(f"{path} is not valid JSON: {error}") from None
    where = str(path)
    if _field(manifest, "format", where) != FORMAT_NAME:
        raise ExportError(f"{path}: format is {manifest['format']!r}, not {FORMAT_NAME!r}")
    version = _field(manifest, "format_version", where)
    if version != FORMAT_VERSION:
        raise ExportError(
            f"{path}: format_version {version!r}; this reader reads version {FORMAT_VERSION} only"
        )
    for key in ("files", "layers", "datapath", "network_vectors"):
        _field(manifest, key, where)
    return manifest


def verify_files(root: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists exists with its listed size and sha256; a listed path
    must stay inside ``root``."""
    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        raise ExportError(f"{root / MANIFEST}: 'files' must be a non-empty object")
    for name, entry in files.items():
        path = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ExportError(f"{root / MANIFEST}: file {name!r} lies outside the export folder")
        if not path.is_file():
            raise ExportError(f"{path} is missing (listed in {MANIFEST})")
        size = path.stat().st_size
        expected = _field(entry, "bytes", f"{MANIFEST} entry {name!r}")
        if size != expected:
            state = "truncated" if size < expected else "longer than listed"
            raise ExportError(f"{path} is {state}: {size} bytes, {MANIFEST} lists {expected}")
        digest = sha256_of(path)
        if digest != _field(entry, "sha256", f"{MANIFEST} entry {name!r}"):
            raise ExportError(
                f"{path}: sha256 {digest} does not match {MANIFEST} ({entry['sha256']}): changed"
            )


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of safetensors file ``path`` as numpy arrays."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ExportError(f"{path} is not a readable safetensors file: {error}") from None


def check_tensor(tensors: dict[str, np.ndarray], key: str, spec: dict[str, Any], path: Path) -> np.ndarray:
    """Tensor ``key`` of file ``path`` with the manifest's dtype and shape ``spec``."""
    if key not in tensors:
        raise ExportError(f"{path} has no tensor {key!r}")
    value = tensors[key]
    dtype = DTYPES.get(spec.get("dtype"))
    if dtype is None:
        raise ExportError(f"{MANIFEST}: tensor {key!r} has unknown dtype {spec.get('dtype')!r}")
    if value.dtype != dtype:
        raise ExportError(
            f"{path}: tensor {key!r} is {value.dtype}, the manifest says {spec['dtype']} ({np.dtype(dtype)})"
        )
    if list(value.shape) != list(spec.get("shape", [])):
        raise ExportError(
            f"{path}: tensor {key!r} has shape {list(value.shape)}, the manifest says {spec.get('shape')}"
        )
    return value


def _check_derived(root: Path, layer: dict[str, Any], t: dict[str, np.ndarray]) -> None:
    """Tensors that restate others must agree with them: ``split_dims`` with the manifest's
    ``splits`` taps (what the datapath and a test bench read), ``accumulator_init`` with
    :func:`maddnet.hw.datapath.accumulator_init` of the offsets and bias, bit for bit."""
    name, path = layer["name"], root / TENSORS_FILE
    taps = split_taps(t["split_dims"], _field(layer, "conv", f"{root / MANIFEST} layer {name!r}"))
    splits = np.asarray(_field(layer, "splits", f"{root / MANIFEST} layer {name!r}"), np.int64)
    if taps.shape != splits.shape or not np.array_equal(taps, splits):
        raise ExportError(f"{path}: layer {name!r}: split_dims do not give the manifest's 'splits' taps")
    init = datapath.accumulator_init(t["lut_offsets"], t.get("bias"))
    if not _same_bits(init[None], np.asarray(t["accumulator_init"])[None]).all():
        raise ExportError(
            f"{path}: layer {name!r}: accumulator_init is not bias + sum of lut_offsets "
            "(float32, codebook order)"
        )


def load_export(root: str | Path) -> Export:
    """Read export folder ``root`` and verify it (manifest, files, sha256, tensor dtypes and
    shapes, memory files); raises :class:`ExportError` naming the file and the problem."""
    root = Path(root)
    manifest = read_manifest(root)
    verify_files(root, manifest)
    cache: dict[str, dict[str, np.ndarray]] = {}

    def file_tensors(name: str) -> dict[str, np.ndarray]:
        if name not in manifest["files"]:
            raise ExportError(f"{root / MANIFEST}: {name!r} is used but not listed under 'files'")
        if name not in cache:
            cache[name] = read_safetensors(root / name)
        return cache[name]

    tensors: dict[str, np.ndarray] = {}
    golden: dict[str, np.ndarray] = {}
    for index, layer in enumerate(manifest["layers"]):
        where = f"{root / MANIFEST} layer {index}"
        name = _field(layer, "name", where)
        for group, target in (("tensors", tensors), ("golden", golden)):
            for role, spec in _field(layer, group, f"{where} ({name})").items():
                key, file = _field(spec, "key", f"{where} {group}.{role}"), _field(spec, "file", where)
                target[key] = check_tensor(file_tensors(file), key, spec, root / file)
        _check_derived(root, layer, {role: tensors[spec["key"]] for role, spec in layer["tensors"].items()})
        for role, memory in _field(layer, "memories", where).items():
            path = root / _field(memory, "file", where)
            words = parse_memory(path.read_text(), str(path))
            source = tensors[layer["tensors"][memory["tensor"]]["key"]]
            expected = hex_words(source.reshape(-1), int(memory["word_bits"]))
            if words.shape != expected.shape:
                raise ExportError(
                    f"{path}: {words.size} words, layer {name!r} {role} memory has {expected.size}"
                )
            if not np.array_equal(words, expected):
                first = int(np.flatnonzero(words != expected)[0])
                raise ExportError(
                    f"{path}: word at address {first} is {int(words[first]):x}, "
                    f"tensor {memory['tensor']!r} says {int(expected[first]):x}"
                )
    vectors = manifest["network_vectors"]
    for role in ("input", "output"):
        spec = _field(vectors, role, f"{root / MANIFEST} network_vectors")
        golden[spec["key"]] = check_tensor(file_tensors(spec["file"]), spec["key"], spec, root / spec["file"])
    return Export(root, manifest, tensors, golden)


# ---------------------------------------------------------------------------- checking
@dataclass
class LayerCheck:
    """Agreement of one layer's golden vectors with the numpy datapath."""

    name: str
    rows: int
    codes_equal: int
    acc_equal: int
    output_equal: int

    @property
    def ok(self) -> bool:
        return self.codes_equal == self.acc_equal == self.output_equal == self.rows


@dataclass
class CheckReport:
    """What :func:`check_export` found: one :class:`LayerCheck` per layer, end-to-end notes."""

    root: Path
    layers: list[LayerCheck]
    end_to_end: list[str] = field(default_factory=list)
    end_to_end_ok: bool = True

    @property
    def ok(self) -> bool:
        return all(layer.ok for layer in self.layers) and self.end_to_end_ok


def layer_arrays(export: Export, layer: dict[str, Any]) -> dict[str, Any]:
    """The datapath operands of ``layer``: thresholds (C, K-1) FP16, LUT (C, K, M) in the
    datapath's order, offsets (C, M), scale (M,), bias (M,) or None."""
    t = {role: export.tensors[spec["key"]] for role, spec in layer["tensors"].items()}
    return {
        "thresholds": t["thresholds"],
        "lut_values": np.ascontiguousarray(np.transpose(t["lut"], (1, 2, 0))),  # (M, C, K) -> (C, K, M)
        "offsets": t["lut_offsets"],
        "scale": t["lut_scale"],
        "bias": t.get("bias"),
    }


def _same_bits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rows of ``a`` and ``b`` equal bit for bit (floats compared as their bit patterns)."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    if a.dtype.kind == "f":
        a, b = a.view(f"u{a.itemsize}"), b.astype(a.dtype).view(f"u{a.itemsize}")
    return (a.reshape(a.shape[0], -1) == b.reshape(b.shape[0], -1)).all(axis=1)


def check_layer(export: Export, layer: dict[str, Any]) -> LayerCheck:
    """Run ``layer``'s golden input values through the numpy datapath and count the rows
    whose codes, accumulators and outputs agree bit for bit."""
    golden = {role: export.golden[spec["key"]] for role, spec in layer["golden"].items()}
    datapath_config = export.manifest["datapath"]
    try:
        result = datapath.run_layer(
            golden["input"],
            **layer_arrays(export, layer),
            accumulator_bits=int(layer["accumulator_bits"]),
            overflow=datapath_config["overflow"],
        )
    except datapath.AccumulatorOverflowError as error:  # the export's own vectors never overflow
        raise ExportError(f"{export.root / GOLDEN_FILE}: layer {layer['name']!r}: {error}") from None
    return LayerCheck(
        layer["name"],
        golden["input"].shape[0],
        int(_same_bits(result.codes, golden["codes"]).sum()),
        int(_same_bits(result.acc, golden["acc"].astype(np.int64)).sum()),
        int(_same_bits(result.out, golden["output"]).sum()),
    )


def check_export(root: str | Path, end_to_end: bool = False) -> CheckReport:
    """Verify export ``root`` (:func:`load_export`) and re-run every golden vector through
    the numpy datapath; with ``end_to_end`` also the whole network (needs torch; see
    :func:`maddnet.hw.export.check_end_to_end`). Raises :class:`ExportError` on an
    unreadable export; disagreements are counted in the report."""
    export = load_export(root)
    report = CheckReport(export.root, [check_layer(export, layer) for layer in export.layers])
    if end_to_end:
        from maddnet.hw.export import check_end_to_end  # torch from here on

        report.end_to_end_ok, report.end_to_end = check_end_to_end(export)
    return report


def report_lines(report: CheckReport) -> list[str]:
    """Human-readable lines of ``report``, one per layer, then the verdict."""
    lines = []
    for layer in report.layers:
        verdict = "ok" if layer.ok else "MISMATCH"
        lines.append(
            f"{layer.name}: {layer.rows} golden rows, codes {layer.codes_equal}/{layer.rows}, "
            f"accumulators {layer.acc_equal}/{layer.rows}, outputs {layer.output_equal}/{layer.rows} "
            f"bit-exact: {verdict}"
        )
    lines.extend(report.end_to_end)
    total = sum(layer.rows for layer in report.layers)
    verdict = "agree bit for bit" if report.ok else "DISAGREE"
    lines.append(f"{report.root}: {len(report.layers)} layers, {total} golden rows: {verdict}")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of the check (shared by ``maddnet hw-check`` and this file's main)."""
    parser.add_argument("directory", metavar="DIR", help="an export folder written by maddnet export")
    parser.add_argument(
        "--end-to-end",
        action="store_true",
        help="also run the whole network (needs torch and maddnet): the PyTorch model in hardware-exact "
        "mode and the same network with the numpy datapath in every MADD layer, on the exported input "
        "vectors, against the exported outputs",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Check ``args.directory``; print one line per layer; 0 when everything agrees, else 1."""
    report = check_export(args.directory, end_to_end=args.end_to_end)
    print("\n".join(report_lines(report)))
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    """Torch-free command line: ``python hw_check.py DIR``. Exit 0: agrees; 1: disagrees;
    2: unreadable export (one ``hw-check: error: ...`` line)."""
    parser = add_arguments(
        argparse.ArgumentParser(
            prog="hw_check.py",
            description="Verify a maddnet hardware export and re-run its golden vectors through the "
            "numpy datapath reference (numpy + safetensors only; docs/hardware.md).",
        )
    )
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ExportError, ImportError) as error:
        print(f"hw-check: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
