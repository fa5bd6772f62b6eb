"""What a running agent publishes on its topics matches the JSON Schemas in ``agent/schemas``: status (online
and offline), heartbeat, dead letter, command results (refused and accepted) and a machine's state."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.integration.agent_process import TIMEOUT_S, agent_process
from tests.integration.mqtt_helpers import Subscriber, publish

pytestmark = pytest.mark.integration

SCHEMAS = Path(__file__).resolve().parents[2] / "agent" / "schemas"


def _schema_of(base: str, topic: str) -> str | None:
    """The schema of what the agent publishes on ``topic``; None for the commands the test itself sends."""
    kind = topic.removeprefix(base + "/")
    if kind == "commands":
        return None
    if kind == "commands/result":
        return "command_result"
    first = kind.split("/")[0]  # status, heartbeat, deadletter, state/{machine}, alerts/{machine}/{sensor}
    return "alert" if first == "alerts" else first


def test_every_payload_of_a_running_agent_matches_its_schema(mosquitto, tmp_path: Path) -> None:
    agent_id = f"schema-{uuid.uuid4().hex[:8]}"
    base = f"pdm/{agent_id}"
    machine = f"m-{uuid.uuid4().hex[:6]}"
    subscriber = Subscriber(mosquitto.host, mosquitto.port, [f"{base}/#"])
    config = {"agent": {"id": agent_id, "heartbeat_s": 1}, "alerts": {"commands": {"auth": "none"}}}
    try:
        with agent_process(tmp_path, mosquitto, config) as agent:
            agent.wait_for("subscribed to ")
            now = time.time()
            readings = [
                {
                    "v": 1,
                    "ts": round(now - 40 + i, 3),
                    "fields": {"temperature": 60.0, "current": 12.0, "pressure": 3.0},
                }
                for i in range(40)
            ]  # more than one window of the process model (30 readings)
            publish(mosquitto, [(f"factory/s1/l1/{machine}/process", json.dumps(r).encode()) for r in readings])
            publish(mosquitto, [(f"factory/s1/l1/{machine}/process", b"{garbage")])
            publish(mosquitto, [(f"{base}/commands", b'{"command": "silense", "machine": "x", "by": "ana"}')])
            silence = json.dumps({"command": "silence", "machine": machine, "duration_s": 600, "by": "ana"}).encode()
            deadline = time.monotonic() + TIMEOUT_S
            while time.monotonic() < deadline:  # refused (unknown_machine) until a window of it was scored
                publish(mosquitto, [(f"{base}/commands", silence)])
                got = subscriber.wait_for(lambda ms: any(t == f"{base}/state/{machine}" for t, _ in ms), timeout_s=1.0)
                if any(t == f"{base}/state/{machine}" for t, _ in got):
                    break
            subscriber.wait_for(lambda ms: sum(t == f"{base}/heartbeat" for t, _ in ms) >= 2)
            assert agent.stop() == 0, agent.text()[-4000:]
        messages = subscriber.wait_for(lambda ms: any(m.get("state") == "offline" for _, m in ms))
    finally:
        subscriber.close()

    by_schema: dict[str, list[dict[str, Any]]] = {}
    for topic, body in messages:
        name = _schema_of(base, topic)
        if name is not None:
            by_schema.setdefault(name, []).append(body)
    assert {"status", "heartbeat", "deadletter", "command_result", "state"} <= by_schema.keys(), sorted(by_schema)
    for name, bodies in by_schema.items():
        validator = jsonschema.Draft202012Validator(json.loads((SCHEMAS / f"{name}.schema.json").read_text()))
        for body in bodies:
            errors = [e.message for e in validator.iter_errors(body)]
            assert not errors, (name, body, errors)
    results = by_schema["command_result"]
    assert any(r["accepted"] and r["command"] == "silence" for r in results)
    assert any(r["detail"].startswith("unknown_command") for r in results)  # the typo, named as such
    assert {b["state"] for b in by_schema["status"]} == {"online", "offline"}
    assert by_schema["state"][-1]["silences"][0]["by"] == "ana"
