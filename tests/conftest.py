"""Shared test helpers (keep generic: fixtures any test module may use)."""

from __future__ import annotations

import os

import pytest

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
