"""``--log-format json``: every line the agent writes, the InfluxDB writer process's included, is one JSON
object, from start through a rejected message to a clean stop."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest

from tests.integration.agent_process import agent_process
from tests.integration.mqtt_helpers import publish

pytestmark = pytest.mark.integration


def test_run_with_log_format_json_after_the_subcommand_writes_only_json_lines(mosquitto, tmp_path: Path) -> None:
    # InfluxDB refuses (a closed port): the writer process retries and logs, in its own process
    with agent_process(tmp_path, mosquitto, args=["--log-format", "json"]) as agent:
        agent.wait_for("subscribed to ")
        publish(mosquitto, [(f"factory/s1/l1/logs-{uuid.uuid4().hex[:8]}/process", b"{garbage")])
        agent.wait_for("rejected message on ")
        assert agent.stop() == 0, agent.text()[-4000:]

    entries = []
    for line in agent.text().splitlines():
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
