"""``--log-format json``: every line the agent writes, the InfluxDB writer process's included, is one JSON
object, from start through a rejected message to a clean stop."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from agent.cli.init import init_folder
from tests.integration.mqtt_helpers import publish

pytestmark = pytest.mark.integration

TIMEOUT_S = 60.0


def _closed_port() -> int:
    """A port nothing listens on: the writer's connection is refused, so the writer process logs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(process: subprocess.Popen, log: Path, text: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if text in log.read_text(encoding="utf-8", errors="replace"):
            return
        if process.poll() is not None:
            break
        time.sleep(0.1)
    pytest.fail(f"no {text!r} in the agent's log (exit code {process.poll()}):\n{log.read_text()[-4000:]}")


def test_run_with_log_format_json_after_the_subcommand_writes_only_json_lines(mosquitto, tmp_path: Path) -> None:
    init_folder(tmp_path / "site")
    env = {
        "PDM_MQTT_HOST": mosquitto.host,
        "PDM_MQTT_PORT": str(mosquitto.port),
        "PDM_INFLUX_URL": f"http://127.0.0.1:{_closed_port()}",
        "PDM_HEALTH_PORT": "0",
        "PDM_SPOOL": str(tmp_path / "state" / "spool.db"),
    }
    log = tmp_path / "agent.log"
    command = [
        sys.executable,
        "-m",
        "agent",
        "run",
        "-c",
        str(tmp_path / "site" / "agent.yaml"),
        "--log-format",
        "json",
    ]
    with log.open("wb") as out:
        agent = subprocess.Popen(command, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for(agent, log, "subscribed to ")
        publish(mosquitto, [(f"factory/s1/l1/logs-{uuid.uuid4().hex[:8]}/process", b"{garbage")])
        _wait_for(agent, log, "rejected message on ")
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=TIMEOUT_S) == 0, log.read_text()[-4000:]
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()

    lines = log.read_text(encoding="utf-8").splitlines()
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r}")
    assert all({"time", "level", "logger", "thread", "msg"} <= entry.keys() for entry in entries)
    assert all(entry["time"].endswith("Z") for entry in entries)
    rejected = [e for e in entries if e["msg"].startswith("rejected message on ")]
    assert len(rejected) == 1 and rejected[0]["level"] == "WARNING" and rejected[0]["thread"] == "ingest"
    assert any(entry.get("process", "").startswith("writer ") for entry in entries), "no line of the writer process"
    (stopped,) = [e["msg"] for e in entries if e["logger"] == "agent.runtime.agent" and " stopped: " in e["msg"]]
    assert re.search(r" decode\.errors\{reason=json\}=\d+ ", stopped) and "{'" not in stopped, stopped  # no dict repr
