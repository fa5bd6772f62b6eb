"""The wheel as a user gets it: built from this checkout, installed (not editable, runtime dependencies only)
into a fresh venv, and run from an empty folder against a real Mosquitto and InfluxDB 1.6.7.

``pdm-agent init`` writes the config, models and dashboards the wheel carries; the broker and database are
given through the config's environment references (``PDM_MQTT_HOST``, ``PDM_INFLUX_URL``, ``PDM_SPOOL``);
readings published in the README's payload format must be in InfluxDB, and SIGTERM must end the agent
with exit code 0. The runtime venv must not contain the tools' dependencies, and ``pip check`` must pass.

``PDM_TEST_WHEEL=path/to.whl`` tests that wheel instead of building one (e.g. a release artifact).
Skipped, with the reason, only when no venv can be made or pip cannot reach a package index; pip's cache
(``~/.cache/pip`` or ``PIP_CACHE_DIR``) makes every run after the first one fast.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import tomllib
import urllib.parse
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests import wheel_support
from tests.integration.mqtt_helpers import publish

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]

VERSION = tomllib.loads((wheel_support.REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
MODELS = ("defect_classifier", "process_anomaly", "vibration_anomaly")
TOOLS_ONLY_MODULES = ("scipy", "pandas", "sklearn")


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    python: Path
    cwd: Path  # empty folder every command runs in
    env: dict[str, str]

    def run(self, *argv: str, timeout_s: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(argv),
            cwd=self.cwd,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def pdm_agent(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
        return self.run(str(self.venv / "bin" / "pdm-agent"), *args, timeout_s=timeout_s)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    work = tmp_path_factory.mktemp("wheel-install")
    try:
        given = os.environ.get("PDM_TEST_WHEEL")  # e.g. the release artifact CI built; default: build it now
        wheel = Path(given).resolve() if given else wheel_support.build_wheel(work / "wheels", work / "build")
        python = wheel_support.create_venv(work / "venv")
        wheel_support.pip_install(python, [str(wheel)])
    except wheel_support.InstallUnavailable as exc:
        pytest.skip(f"cannot build or install the wheel here: {exc}")
    cwd = work / "empty"
    cwd.mkdir()
    return Installed(wheel, work / "venv", python, cwd, wheel_support.venv_env(work / "venv"))


@pytest.fixture
def no_files_in_cwd(installed: Installed):
    """Commands write where they are told (DIR, the spool), never into the folder they run in."""
    yield
    assert sorted(p.name for p in installed.cwd.iterdir()) == []


def test_the_wheel_carries_the_assets_as_files_and_no_training_data(installed: Installed) -> None:
    assert installed.wheel.name == f"pdm_agent-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(installed.wheel) as zf:
        names = set(zf.namelist())
        for model in MODELS:
            manifest = json.loads(zf.read(f"agent/assets/models/{model}/manifest.json"))
            assert f"agent/assets/models/{model}/{manifest['file']}" in names
            assert f"agent/assets/models/{model}/MODEL_CARD.md" in names
            assert f"agent/assets/models/{model}/figures/int8_vs_fp32.png" in names  # the card's pictures
        assert b"${PDM_MQTT_HOST" in zf.read("agent/assets/agent.yaml")
        assert {"fleet_overview.json", "machine_detail.json"} <= {
            Path(n).name for n in names if n.startswith("agent/assets/dashboards/json/")
        }
    assert not [n for n in names if n.endswith(".npz") or "/candidates/" in n or n.startswith(("tests/", "scripts/"))]


def test_version_matches_the_package(installed: Installed, no_files_in_cwd) -> None:
    result = installed.pdm_agent("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"pdm-agent {VERSION}"
    assert "ignoring commands" not in result.stderr  # the tools' entry point loads without the tools' deps


def test_the_runtime_venv_has_no_tools_dependencies_and_pip_check_passes(installed: Installed, no_files_in_cwd) -> None:
    where = installed.run(
        str(installed.python),
        "-c",
        "import agent, importlib.metadata as m; print(agent.__file__); "
        "print(m.distribution('pdm-agent').read_text('direct_url.json'))",
    )
    assert where.returncode == 0, where.stderr
    agent_file, direct_url = where.stdout.splitlines()
    assert Path(agent_file).is_relative_to(installed.venv / "lib")  # the installed copy, not this checkout
    assert direct_url == "None" or not json.loads(direct_url).get("dir_info", {}).get("editable", False)
    for module in TOOLS_ONLY_MODULES:
        result = installed.run(str(installed.python), "-c", f"import {module}")
        assert result.returncode != 0, f"{module} is importable in the runtime venv"
        assert "ModuleNotFoundError" in result.stderr
    check = installed.run(str(installed.python), "-m", "pip", "check")
    assert check.returncode == 0, check.stdout + check.stderr
    tools = installed.pdm_agent("train")
    assert tools.returncode == 2
    assert "pip install 'pdm-agent[tools]'" in tools.stderr


def test_init_writes_config_models_and_dashboards_that_validate(
    installed: Installed, tmp_path: Path, no_files_in_cwd
) -> None:
    site = tmp_path / "site"
    result = installed.pdm_agent("init", str(site))
    assert result.returncode == 0, result.stderr
    config = (site / "agent.yaml").read_text(encoding="utf-8")
    assert "path: models/vibration_anomaly" in config and "../models" not in config
    for model in MODELS:
        manifest = json.loads((site / "models" / model / "manifest.json").read_text(encoding="utf-8"))
        assert (site / "models" / model / manifest["file"]).stat().st_size > 0
        assert (site / "models" / model / "MODEL_CARD.md").exists()
        assert (site / "models" / model / "figures" / "int8_vs_fp32.png").exists()
    assert (site / "dashboards" / "json" / "fleet_overview.json").exists()
    assert (site / "dashboards" / "provisioning" / "datasources" / "influxdb.yaml").exists()

    validated = installed.pdm_agent("config", "validate", "--models", str(site / "agent.yaml"))
    assert validated.returncode == 0, validated.stdout + validated.stderr
    assert validated.stdout.count(": ok") >= len(MODELS) + 1, validated.stdout  # each model, then the file


def test_run_stores_published_readings_and_exits_0_on_sigterm(
    installed: Installed, mosquitto, influxdb_v1, tmp_path: Path, no_files_in_cwd
) -> None:
    site = tmp_path / "site"
    assert installed.pdm_agent("init", str(site)).returncode == 0
    config_path = site / "agent.yaml"  # as init wrote it: the addresses come from its environment references
    spool = tmp_path / "spool" / "spool.db"
    env = {
        "PDM_MQTT_HOST": mosquitto.host,
        "PDM_MQTT_PORT": str(mosquitto.port),
        "PDM_HEALTH_PORT": "0",
        "PDM_INFLUX_URL": influxdb_v1.url,
        "PDM_SPOOL": str(spool),
    }
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        agent = subprocess.Popen(
            [str(installed.venv / "bin" / "pdm-agent"), "run", "-c", str(config_path)],
            cwd=installed.cwd,
            env={**installed.env, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for_log(agent, log, "subscribed to ", timeout_s=90)

        machine = f"wheel-{uuid.uuid4().hex[:8]}"
        now = time.time()
        rfc3339 = datetime.fromtimestamp(now - 2, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        fields = [
            {"v": 1, "ts": round(now - 5 + i, 3), "fields": {"temperature": 60.0 + i, "current": 12.0, "pressure": 3.1}}
            for i in range(3)
        ] + [{"v": 1, "ts": rfc3339, "fields": {"temperature": 63.5, "current": 12.2, "pressure": 3.0}}]
        scalars = [{"v": 1, "ts": now - 1, "value": 61.2, "seq": 7}, 61.4]  # a bare number: stamped on arrival
        publish(
            mosquitto,
            [(f"factory/s1/l1/{machine}/process", json.dumps(p).encode()) for p in fields]
            + [(f"factory/s1/l1/{machine}/temperature", json.dumps(p).encode()) for p in scalars],
        )

        where = f"WHERE \"machine\" = '{machine}'"
        expected = {
            f'SELECT count("temperature") FROM "reading" {where}': 4,
            f'SELECT count("value") FROM "reading" {where}': 2,
        }
        deadline = time.monotonic() + 30
        counts = {}
        while time.monotonic() < deadline:
            counts = {q: _influx_count(influxdb_v1.url, "pdm", q) for q in expected}
            if counts == expected or agent.poll() is not None:
                break
            time.sleep(0.25)
        assert counts == expected, _log_tail(log)

        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=60) == 0, _log_tail(log)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert spool.exists()  # PDM_SPOOL was honoured
    assert "Traceback" not in log.read_text(encoding="utf-8", errors="replace"), _log_tail(log)


def _wait_for_log(process: subprocess.Popen, log: Path, text: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in log.read_text(encoding="utf-8", errors="replace"):
            return
        if process.poll() is not None:
            pytest.fail(f"the agent exited with {process.returncode} before {text!r}:\n{_log_tail(log)}")
        time.sleep(0.1)
    pytest.fail(f"no {text!r} in the agent's log after {timeout_s} s:\n{_log_tail(log)}")


def _influx_count(url: str, database: str, query: str) -> int:
    """The count of an InfluxQL ``SELECT count(...)``; 0 while the database or series does not exist."""
    params = urllib.parse.urlencode({"db": database, "q": query})
    with urllib.request.urlopen(f"{url}/query?{params}", timeout=10) as response:
        body = json.load(response)
    series = body["results"][0].get("series") or [{"values": [[0, 0]]}]
    return int(series[0]["values"][0][1])


def _log_tail(log: Path, lines: int = 60) -> str:
    return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
