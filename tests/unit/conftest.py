"""Fixtures shared by the unit tests of the spool's sinks (the writer as threads and as a process)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.metrics import Metrics
from agent.spool.sqlite import Spool


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def spool(tmp_path: Path, metrics: Metrics) -> Iterator[Spool]:
    """A spool with caps far beyond what a test appends, and the one sink ``local``."""
    s = Spool(tmp_path / "spool.db", max_bytes=10**12, max_points=10**9, metrics=metrics)
    yield s
    s.close()
