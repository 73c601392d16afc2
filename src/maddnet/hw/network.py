"""The networks an estimate is made for: a registry model (with the default MADD
conversion rule, or any :class:`~maddnet.nn.MaddConfig`) or a run folder (its saved
conversion plan, or its config's conversion settings). No weights, no data needed.

:func:`load_network` returns a :class:`Network`: the layer shapes of one forward pass of
the dense model (after any structural passes a plan records) with each layer's MADD
parameters where the converted network has a MADD layer.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.registry import DatasetInfo
from ..models import create_model, list_models
from ..models.weights import read_checkpoint
from ..nn import MaddConfig, madd_layers, rebuild
from ..nn.mapping import madd_type_for
from .counts import LayerShape, MaddParams, record_shapes

# input (channels, height, width) and classes of a model when neither a run nor a flag says
DEFAULT_INPUTS: dict[str, tuple[tuple[int, int, int], int]] = {
    "ds_cnn": ((1, 49, 10), 12),  # 49 frames x 10 MFCC (the DS-CNN paper's features)
    "resnet9": ((3, 32, 32), 10),  # CIFAR-10
}
IMAGENET_INPUT = ((3, 224, 224), 1000)


@dataclass
class Network:
    """A network to estimate: its layer shapes (MADD parameters where converted) and the
    multiply-accumulates of its other matrix products (activation x activation)."""

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    layers: list[LayerShape]
    other_macs: int
    source: str
    notes: list[str] = field(default_factory=list)
    batch: int = 1
    variant: str = ""

    @property
    def label(self) -> str:
        """Name and where its MADD layers come from, e.g. ``resnet9 (width=16) [retrain_wide]``."""
        return f"{self.name} [{self.variant}]" if self.variant else self.name

    @property
    def madd_count(self) -> int:
        return sum(layer.madd is not None for layer in self.layers)


def parse_input_size(text: str | None) -> tuple[int, int] | None:
    """``"224"`` -> (224, 224); ``"49x10"`` (or ``49,10``) -> (49, 10); None stays None."""
    if text is None:
        return None
    parts = str(text).lower().replace(",", "x").split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) == 1:
        values = (values[0], values[0])
    if len(values) != 2 or min(values) < 1:
        raise ValueError(
            f"--input-size takes SIZE or HxW with positive integers (e.g. 224 or 49x10), got {text!r}"
        )
    return values  # type: ignore[return-value]


def default_input(model: str) -> tuple[tuple[int, int, int], int]:
    """The input shape and class count a registry model is counted with by default."""
    for prefix, value in DEFAULT_INPUTS.items():
        if model.startswith(prefix):
            return value
    return IMAGENET_INPUT


def dataset_info(name: str, kwargs: dict[str, Any] | None = None) -> DatasetInfo:
    """The input shape and classes of data set ``name`` (with its builder ``kwargs``)
    without loading any data. Raises ``ValueError`` when that needs the data."""
    kwargs = dict(kwargs or {})
    if name == "fashion_mnist":
        from ..data.fashion_mnist_dataset import INFO

        return INFO
    if name == "digits":
        from ..data.digits import INFO

        return INFO
    if name == "cifar10":
        from ..data.cifar10 import INFO

        return INFO
    if name == "synthetic":
        shape = tuple(kwargs.get("input_shape", (3, 32, 32)))
        classes = int(kwargs.get("num_classes", 10))
        return DatasetInfo("synthetic", tuple(str(i) for i in range(classes)), shape)  # type: ignore[arg-type]
    if name == "imagenet":
        size = int(kwargs.get("image_size", 224))
        return DatasetInfo("imagenet", tuple(str(i) for i in range(1000)), (3, size, size))
    if name == "speech_commands":
        from ..data.audio_features import FeatureConfig
        from ..data.speech_commands import KEYWORDS

        keywords = kwargs.get("keywords", KEYWORDS)
        if isinstance(keywords, str):
            keywords = ("all",) if keywords == "all" else tuple(k for k in keywords.split(",") if k)
        if tuple(keywords) == ("all",):
            raise ValueError(
                "speech_commands with keywords='all' has as many classes as word folders: pass --num-classes"
            )
        classes = (
            len(keywords)
            + (kwargs.get("unknown_fraction", 0.1) > 0)
            + (kwargs.get("silence_fraction", 0.1) > 0)
        )
        features = FeatureConfig(
            kind=kwargs.get("feature", "mfcc"),
            n_mfcc=kwargs.get("n_mfcc", 10),
            n_mels=kwargs.get("n_mels", 40),
        )
        shape = (1, features.num_frames, features.num_coefficients)
        return DatasetInfo("speech_commands", tuple(str(i) for i in range(classes)), shape)
    raise ValueError(
        f"cannot tell the input shape of data set {name!r} without loading it: pass --in-chans, "
        "--input-size and --num-classes"
    )


def _info(
    base: DatasetInfo, in_chans: int | None, input_size: tuple[int, int] | None, num_classes: int | None
) -> DatasetInfo:
    shape = (in_chans or base.input_shape[0], *(input_size or base.input_shape[1:]))
    classes = base.classes if num_classes is None else tuple(str(i) for i in range(num_classes))
    return DatasetInfo(base.name, classes, shape)  # type: ignore[arg-type]


def read_run_config(folder: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a run folder (``maddnet train`` / ``retrain``) as a dict.

    Raises:
        FileNotFoundError: the folder has no config.json; ValueError: it is not JSON, or not
        a run config (no 'model' and 'dataset'), naming the file.
    """
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"run folder {str(folder)!r} has no config.json")
    try:
        values = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from None
    if not isinstance(values, dict) or "model" not in values or "dataset" not in values:
        raise ValueError(f"{config_path} is not a maddnet run config (needs 'model' and 'dataset')")
    return values


def meta_model(model: str, info: DatasetInfo, model_kwargs: dict[str, Any]) -> nn.Module:
    """Registry ``model`` for data set ``info``, built on the meta device (shapes only).

    Raises:
        KeyError: an unknown model name; ValueError: arguments the model does not take.
    """
    from ..train.runner import model_kwargs_for

    if model not in list_models():
        raise KeyError(f"unknown model {model!r}; known models: {', '.join(list_models())}")
    kwargs = model_kwargs_for(model, info, model_kwargs)
    try:
        # on the meta device: shapes only, no memory, no initialisation time (ResNet-50: 0.1 s)
        with torch.device("meta"):
            return create_model(model, num_classes=info.num_classes, in_chans=info.in_chans, **kwargs)
    except TypeError as error:
        raise ValueError(f"model {model!r} does not take these arguments {kwargs}: {error}") from None


def madd_params_by_rule(model: nn.Module, config: MaddConfig) -> dict[str, MaddParams]:
    """``{name: MaddParams}`` of the layers ``config`` selects, with their C from its rule,
    read from zero-initialised MADD skeletons built on the meta device (no memory)."""
    params = {}
    for name, module in config.select(model).items():
        ncodebooks = config.codebooks_for(name, module)
        skeleton = madd_type_for(module)._skeleton_of(
            copy.deepcopy(module).to("meta"), ncodebooks, config.spec
        )
        params[name] = MaddParams.of(skeleton)
    return params


def _attach(shapes: list[LayerShape], params: dict[str, MaddParams]) -> list[LayerShape]:
    missing = sorted(set(params) - {s.name for s in shapes})
    if missing:
        raise ValueError(f"MADD layers {missing} are not called by the model's forward pass")
    return [s.with_madd(params.get(s.name)) for s in shapes]


def _forward_shapes(
    model: nn.Module, info: DatasetInfo, batch: int, device: str
) -> tuple[list[LayerShape], int]:
    """The shapes of one forward pass on the meta device; where a model's forward does not run
    there (an operation without a meta kernel), on ``device`` with uninitialised weights."""
    try:
        return record_shapes(model, info.input_shape, batch=batch, device="meta")
    except (RuntimeError, NotImplementedError):
        pass
    try:
        return record_shapes(model.to_empty(device=device), info.input_shape, batch=batch, device=device)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise ValueError(f"the model does not run on input {tuple(info.input_shape)}: {first}") from None


def registry_network(
    model: str,
    *,
    model_kwargs: dict[str, Any] | None = None,
    in_chans: int | None = None,
    input_size: tuple[int, int] | None = None,
    num_classes: int | None = None,
    config: MaddConfig | None = None,
    batch: int = 1,
    device: str = "cpu",
) -> Network:
    """A registry model, its MADD version by ``config`` (default ``MaddConfig()``: every
    convertible layer, the default C rule, ``LayerSpec()``)."""
    if model not in list_models():
        raise KeyError(
            f"{model!r} is neither a run folder nor a registered model; "
            f"known models: {', '.join(list_models())}"
        )
    shape, classes = default_input(model)
    base = DatasetInfo("input", tuple(str(i) for i in range(classes)), shape)
    info = _info(base, in_chans, input_size, num_classes)
    dense = meta_model(model, info, dict(model_kwargs or {})).eval()
    shapes, other = _forward_shapes(dense, info, batch, device)
    params = madd_params_by_rule(dense, config or MaddConfig())
    kwargs = "" if not model_kwargs else " (" + ", ".join(f"{k}={v}" for k, v in model_kwargs.items()) + ")"
    return Network(
        name=f"{model}{kwargs}",
        input_shape=tuple(info.input_shape),  # type: ignore[arg-type]
        num_classes=info.num_classes,
        layers=_attach(shapes, params),
        other_macs=other,
        source=f"registry model {model}, MADD layers by the conversion rule",
        variant="rule" if config is None or config == MaddConfig() else "conversion flags",
        batch=batch,
    )


def run_network(
    folder: str | Path,
    *,
    in_chans: int | None = None,
    input_size: tuple[int, int] | None = None,
    num_classes: int | None = None,
    config: MaddConfig | None = None,
    batch: int = 1,
    device: str = "cpu",
) -> Network:
    """A run folder (``config.json``, optionally ``checkpoint.pt``): a retraining run's
    checkpoint gives its conversion plan (MADD layers as saved, the passes replayed on the
    dense model); without a checkpoint its config's conversion settings (every layer it
    would replace); a dense training run's model gets ``config`` (default rule)."""
    folder = Path(folder)
    values = read_run_config(folder)
    model_name, model_kwargs = values["model"], dict(values.get("model_kwargs") or {})
    info = _info(
        dataset_info(values["dataset"], values.get("dataset_kwargs")), in_chans, input_size, num_classes
    )
    dense = meta_model(model_name, info, model_kwargs).eval()
    notes: list[str] = []
    checkpoint = folder / "checkpoint.pt"
    saved = read_checkpoint(checkpoint, map_location="cpu") if checkpoint.is_file() else None
    if isinstance(saved, dict) and "plan" in saved:
        plan = saved["plan"]
        plan = (
            plan
            if isinstance(plan, dict) and "format" in plan
            else {"format": 1, "passes": [], "layers": plan}
        )
        rebuild(dense, {"format": 2, "passes": plan.get("passes", []), "layers": {}})
        shapes, other = _forward_shapes(dense, info, batch, device)
        try:
            converted = copy.deepcopy(dense).to("meta")
            rebuild(converted, {"format": 2, "passes": [], "layers": plan["layers"]})
            with warnings.catch_warnings():  # loading into meta tensors checks keys and shapes only
                warnings.simplefilter("ignore", UserWarning)
                converted.load_state_dict(saved["state_dict"])
        except (RuntimeError, ValueError) as error:
            first = str(error).strip().splitlines()[0]
            raise ValueError(
                f"{checkpoint} does not fit the model built from {folder / 'config.json'} ({first}); "
                "pass --num-classes / --in-chans / --input-size if the data set's shape differs"
            ) from None
        params = {name: MaddParams.of(layer) for name, layer in madd_layers(converted).items()}
        source = f"run folder {folder}: conversion plan of checkpoint.pt (step {saved.get('next_step', '?')})"
    elif "steps_per_layer" in values:  # a retraining run without a checkpoint yet
        from ..retrain.config import RetrainConfig

        retrain = RetrainConfig.from_saved(values)
        shapes, other = _forward_shapes(dense, info, batch, device)
        params = {} if retrain.dense_control else madd_params_by_rule(dense, retrain.madd_config())
        source = f"run folder {folder}: conversion settings of config.json (no checkpoint.pt)"
        notes.append("no checkpoint.pt: MADD layers are the ones the run's settings replace at its end")
    else:
        shapes, other = _forward_shapes(dense, info, batch, device)
        params = madd_params_by_rule(dense, config or MaddConfig())
        source = f"run folder {folder}: dense run, MADD layers by the conversion rule"
    kwargs = "" if not model_kwargs else " (" + ", ".join(f"{k}={v}" for k, v in model_kwargs.items()) + ")"
    return Network(
        name=f"{model_name}{kwargs}",
        input_shape=tuple(info.input_shape),  # type: ignore[arg-type]
        num_classes=info.num_classes,
        layers=_attach(shapes, params),
        other_macs=other,
        source=source,
        variant=f"run {folder.name}",
        notes=notes,
        batch=batch,
    )


def load_network(target: str, **kwargs: Any) -> Network:
    """A run folder when ``target`` is a folder, else a registry model name
    (``model_kwargs`` only apply to registry models)."""
    path = Path(target)
    if path.is_dir():
        kwargs.pop("model_kwargs", None)
        return run_network(path, **kwargs)
    if path.suffix or "/" in target:
        raise FileNotFoundError(f"run folder {target!r} does not exist")
    return registry_network(target, **kwargs)
