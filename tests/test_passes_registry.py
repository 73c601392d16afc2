"""fuse and prune_unread on every registry model after conversion: outputs unchanged bit for
bit, the passes recorded, and the hardware export of the result checked bit for bit."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_hw_export import FAST, _small

from maddnet.hw.export import export_model
from maddnet.hw.hw_check import check_export
from maddnet.models import create_model, list_models
from maddnet.nn import LayerSpec, MaddConfig, conversion_plan, convert, fuse, prune_unread


def _converted(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """Registry model ``name`` (small input) with its first four convertible layers and its
    last converted (C = 4, 8-bit per-column LUTs, which pruning slices exactly)."""
    kwargs, shape = _small(name)
    torch.manual_seed(0)
    model = create_model(name, 10, shape[0], **kwargs).eval()
    names = list(MaddConfig().select(model))
    chosen = [*names[:4], names[-1]]
    x = torch.randn(16, *shape)
    config = MaddConfig(
        layers=chosen, ncodebooks=4, min_rows=16, max_rows=256, spec=LayerSpec(lut_granularity="column")
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        convert(model, [x], config, check_training=False)
    return model.eval(), x[:4]


@pytest.mark.parametrize(
    "name", [name if name in FAST else pytest.param(name, marks=pytest.mark.slow) for name in list_models()]
)
def test_fuse_and_prune_every_registry_model(name, tmp_path):
    model, x = _converted(name)
    with torch.no_grad():
        reference = model(x)
    fuse(model, x)
    prune_unread(model, x)
    with torch.no_grad():
        assert torch.equal(model(x), reference)
    assert [entry["pass"] for entry in conversion_plan(model)["passes"]][-2:] == ["fuse", "prune_unread"]
    if name in FAST:  # what the accelerator gets after the passes is still bit exact
        export_model(model, x[:2], tmp_path, golden_rows=3)
        assert check_export(tmp_path).ok
