"""Home Assistant MQTT discovery through a real Mosquitto: with ``homeassistant.enabled`` a running agent
announces itself and a machine (retained, before the machine's first state), and the machine's entities
read the state topic the agent then publishes; each scored sensor's score entity reads the retained scores
the agent publishes for it (valid against their schema). Without it, nothing is published under the prefix
and no scores."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import jsonschema
import pytest

from tests.integration.agent_process import TIMEOUT_S, agent_process
from tests.integration.mqtt_helpers import Subscriber, publish

pytestmark = pytest.mark.integration

SCORES_SCHEMA = jsonschema.Draft202012Validator(
    json.loads((Path(__file__).resolve().parents[2] / "agent" / "schemas" / "scores.schema.json").read_text())
)


def _run(mosquitto, tmp_path: Path, enabled: bool) -> tuple[str, str, str]:
    """Run an agent until one machine has a state (a silence); returns (prefix, base topic, machine)."""
    agent_id = f"ha-{uuid.uuid4().hex[:8]}"
    prefix, base, machine = f"ha-test-{uuid.uuid4().hex[:8]}", f"pdm/{agent_id}", f"m-{uuid.uuid4().hex[:6]}"
    config = {
        "agent": {"id": agent_id},
        "alerts": {"commands": {"auth": "none"}},
        "homeassistant": {"enabled": enabled, "discovery_prefix": prefix},
    }
    state = Subscriber(mosquitto.host, mosquitto.port, [f"{base}/state/+"])
    try:
        with agent_process(tmp_path, mosquitto, config) as agent:
            agent.wait_for("subscribed to ")
            now = time.time()
            readings = [
                {"v": 1, "ts": now - 40 + i, "fields": {"temperature": 60.0, "current": 12.0, "pressure": 3.0}}
                for i in range(40)
            ]
            publish(mosquitto, [(f"factory/s1/l1/{machine}/process", json.dumps(r).encode()) for r in readings])
            silence = json.dumps({"command": "silence", "machine": machine, "duration_s": 600, "by": "ana"}).encode()
            deadline = time.monotonic() + TIMEOUT_S
            while not state.wait_for(lambda ms: bool(ms), timeout_s=1.0) and time.monotonic() < deadline:
                publish(mosquitto, [(f"{base}/commands", silence)])  # refused until the machine was scored
            assert state.messages, agent.text()[-3000:]
            assert agent.stop() == 0
    finally:
        state.close()
    return prefix, base, machine


def _retained(mosquitto, topic_filter: str, expected: int) -> list[tuple[str, dict]]:
    """What a client subscribing now gets: the retained messages (the agent has stopped). Waits for
    ``expected`` of them, or (expecting none) a few seconds for any that would come."""
    late = Subscriber(mosquitto.host, mosquitto.port, [topic_filter])
    try:
        return late.wait_for(lambda ms: len(ms) >= max(expected, 1), timeout_s=TIMEOUT_S if expected else 3.0)
    finally:
        late.close()


def test_the_agent_and_a_scored_machine_are_announced_retained(mosquitto, tmp_path: Path) -> None:
    prefix, base, machine = _run(mosquitto, tmp_path, enabled=True)
    configs = dict(_retained(mosquitto, f"{prefix}/#", 7))
    scores = [c for t, c in configs.items() if "_score_" in t]
    assert len(configs) - len(scores) == 6 and scores, sorted(configs)  # agent 3, machine 3, a score per model
    [(topic, body)] = _retained(mosquitto, f"{base}/scores/+", 1)
    assert topic == f"{base}/scores/{machine}" and SCORES_SCHEMA.is_valid(body), body
    for entity in scores:
        assert entity["state_topic"] == topic and entity["state_class"] == "measurement"
        key = entity["value_template"].split('"')[1]  # {{ value_json.scores["{sensor}/{model}"].score }}
        assert key in body["scores"] and isinstance(body["scores"][key]["score"], float), (key, body)
    problem = next(c for t, c in configs.items() if t.startswith(f"{prefix}/binary_sensor/") and "problem" in t)
    assert problem["state_topic"] == f"{base}/state/{machine}" and problem["availability_topic"] == f"{base}/status"
    online = next(c for t, c in configs.items() if t.endswith("/agent_online/config"))
    assert online["state_topic"] == f"{base}/status"
    assert {c["device"]["identifiers"][0] for c in configs.values()} == {
        problem["device"]["identifiers"][0],
        online["device"]["identifiers"][0],
    }


def test_nothing_is_announced_unless_enabled(mosquitto, tmp_path: Path) -> None:
    prefix, base, _ = _run(mosquitto, tmp_path, enabled=False)
    assert _retained(mosquitto, f"{prefix}/#", 0) == []
    assert _retained(mosquitto, f"{base}/scores/+", 0) == []
