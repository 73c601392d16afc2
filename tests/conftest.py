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
