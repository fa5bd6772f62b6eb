"""Shared fixtures: real local services, started once per test session on free ports.

Tests never depend on a service that happens to be running: each fixture starts its own process in a
temporary directory and stops it at the end of the session. A missing binary fails the test with the
Debian package to install (CI installs them; skipping would hide that the tier did not run).

Integration tests carry ``pytestmark = pytest.mark.integration``; ``pytest -m "not integration"`` runs
the fast tier alone. A test that stops or restarts a service starts its own instance
(``pdm_tools.dev.services.start_*``) instead of touching the shared ones.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pdm_tools.dev import services as devservices
from pdm_tools.dev.services import Service, ServiceError


def _service(factory: Callable[[Path], Service], workdir: Path) -> Iterator[Service]:
    try:
        service = factory(workdir)
    except ServiceError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A Mosquitto broker (anonymous, no persistence): ``.host``, ``.port``, ``.url`` (``mqtt://...``)."""
    yield from _service(devservices.start_mosquitto, tmp_path_factory.mktemp("mosquitto"))


@pytest.fixture(scope="session")
def influxdb_v1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """InfluxDB 1.x (v1 HTTP API, no auth): ``.url`` is ``http://127.0.0.1:PORT``."""
    yield from _service(devservices.start_influxdb_v1, tmp_path_factory.mktemp("influxdb"))


@pytest.fixture(scope="session")
def victoria_metrics(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """VictoriaMetrics (InfluxDB v2 write API at ``/api/v2/write``): ``.url`` is ``http://127.0.0.1:PORT``."""
    yield from _service(devservices.start_victoria_metrics, tmp_path_factory.mktemp("victoria-metrics"))


@pytest.fixture
def influx_db_name(request: pytest.FixtureRequest) -> str:
    """A database name no other test uses (from the test's name, plus a random suffix); not yet created."""
    stem = re.sub(r"[^A-Za-z0-9_]", "_", request.node.name)[:40]
    return f"t_{stem}_{uuid.uuid4().hex[:8]}"
