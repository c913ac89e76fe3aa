"""Shared fixtures. Test data is generated here, never copied from ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def shared_dataset(name: str) -> Path:
    """Path to a real dataset in ../shared/datasets, or skip the test cleanly."""
    p = SHARED / name
    if not p.exists():
        pytest.skip(f"{p} is absent (real-data test)")
    return p
