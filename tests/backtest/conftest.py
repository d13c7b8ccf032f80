"""The backtest reads files and computes: no database, no Redis.

The suite-wide autouse fixture empties Postgres and Redis before every test; overriding it here
keeps these tests fast and runnable on a machine without either service."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _clean_state() -> None:
    """Nothing to clean: the backtest keeps no state."""
