"""Shared test helpers (keep generic: fixtures any test module may use)."""

from __future__ import annotations

import os

import pytest
import torch

REQUIRE_DATA_VAR = "MADDNET_REQUIRE_DATA"


def data_required() -> bool:
    """True when ``$MADDNET_REQUIRE_DATA=1`` (CI): missing data then fails tests."""
    return os.environ.get(REQUIRE_DATA_VAR, "") == "1"


def skip_or_fail_without(available: bool, reason: str) -> None:
    """Skip the calling test with ``reason`` when data is missing — or fail it when
    ``$MADDNET_REQUIRE_DATA=1``, so CI cannot pass by skipping."""
    if available:
        return
    if data_required():
        pytest.fail(f"{reason} (and ${REQUIRE_DATA_VAR}=1 requires it)")
    pytest.skip(reason)


@pytest.fixture
def require_data():
    """``require_data(available, reason)``: see :func:`skip_or_fail_without`."""
    return skip_or_fail_without


@pytest.fixture
def one_torch_thread():
    """Run a test with one torch thread (restored after): small nets train several times
    faster that way, and far faster when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# the tree settings of a default MADD layer (LayerSpec(): 4 candidate columns per level, the
# output objective, one refine sweep), written out rather than read from LayerSpec so that
# the layers are checked against an independent statement of the default
DEFAULT_LAYER_TREE = {"ncandidates": 4, "hash_objective": "output", "encoder_options": {"refine_sweeps": 1}}
# MADDness's trees in a layer: LayerSpec(hash_objective="input", refine_sweeps=0)
MADDNESS_LAYER_TREE = {"ncandidates": 4, "hash_objective": "input"}


@pytest.fixture(scope="session")
def layer_amm():
    """``layer_amm(C, maddness=False, **kwargs)``: an unfitted ``MaddnessMatmul`` that a MADD
    layer of C codebooks must equal when fitted on the same rows and weight: the default
    layer's trees, or with ``maddness=True`` those of ``LayerSpec(hash_objective="input",
    refine_sweeps=0)``; ``kwargs`` (e.g. lut_bits) go to the estimator."""
    from maddnet import MaddnessMatmul

    def make(ncodebooks: int, maddness: bool = False, **kwargs):
        tree = MADDNESS_LAYER_TREE if maddness else DEFAULT_LAYER_TREE
        return MaddnessMatmul(ncodebooks=ncodebooks, **tree, **kwargs)

    return make
