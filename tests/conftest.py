"""Fixtures shared by several test files."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def netns_ok() -> None:
    """Skip (with the reason) where network namespaces cannot be made: not root, no iproute2, no CAP_SYS_ADMIN."""
    sys.path.insert(0, str(BENCH))
    from netns import NetnsUnavailable, check_netns_support

    try:
        check_netns_support()
    except NetnsUnavailable as e:
        pytest.skip(f"network namespaces unavailable: {e}")
