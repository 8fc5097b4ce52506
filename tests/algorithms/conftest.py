"""Fixtures of the secure-round tests (test_secure*.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def world(tmp_path: Path, global_path: Path) -> dict:
    """Keys and trust for the coordinator and the sites, and a local state per site
    (test_secure.build_world)."""
    from .test_secure import build_world

    return build_world(tmp_path, global_path)
