"""``pdm-agent run`` as a real process for integration tests: a folder from ``pdm-agent init`` with some
config keys changed, the broker from the ``mosquitto`` fixture, its log in a file."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.cli.init import init_folder
from tests.chaos_support import _merge as merge_config

TIMEOUT_S = 60.0


def closed_port() -> int:
    """A port nothing listens on (an InfluxDB that refuses: the writer process retries and logs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class AgentProcess:
    def __init__(self, process: subprocess.Popen[bytes], log: Path) -> None:
        self.process = process
        self.log = log

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_for(self, text: str) -> None:
        """Until ``text`` is in the log; fails with the log's tail if the agent exits or it never comes."""
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            if text in self.text():
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        pytest.fail(f"no {text!r} in the agent's log (exit code {self.process.poll()}):\n{self.text()[-4000:]}")

    def stop(self) -> int:
        """SIGTERM, and the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=TIMEOUT_S)


@contextmanager
def agent_process(
    tmp_path: Path, mosquitto: Any, config: dict[str, Any] | None = None, args: Sequence[str] = ()
) -> Iterator[AgentProcess]:
    """The agent running on ``tmp_path``'s init folder with ``config`` merged in; killed if still running."""
    site = tmp_path / "site"
    init_folder(site)
    config_file = site / "agent.yaml"
    data = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    merge_config(data, config or {})
    config_file.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    env = {
        **os.environ,
        "PDM_MQTT_HOST": mosquitto.host,
        "PDM_MQTT_PORT": str(mosquitto.port),
        "PDM_INFLUX_URL": f"http://127.0.0.1:{closed_port()}",
        "PDM_HEALTH_PORT": "0",
        "PDM_SPOOL": str(tmp_path / "state" / "spool.db"),
    }
    log = tmp_path / "agent.log"
    command = [sys.executable, "-m", "agent", "run", "-c", str(config_file), *args]
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield AgentProcess(process, log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
