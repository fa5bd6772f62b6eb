"""Every outbound payload the agent builds, and the operator commands it takes, match the JSON Schemas in
``agent/schemas`` (``tests/integration/test_payload_schemas_live.py`` checks what a running agent sends)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from agent.alerts.commands import sign_command
from agent.alerts.payload import machine_state_payload
from agent.health.selfmetrics import agent_fields, series_field
from agent.metrics import Metrics
from agent.topics import Topics

SCHEMAS = Path(__file__).resolve().parents[2] / "agent" / "schemas"
TOPICS = Topics("edge-01")
T = 1_790_000_000_250_000_000


def schema(name: str) -> dict[str, Any]:
    loaded = json.loads((SCHEMAS / f"{name}.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(loaded)
    return loaded


def valid(name: str, payload: bytes | dict[str, Any]) -> bool:
    body = json.loads(payload) if isinstance(payload, bytes) else payload
    return jsonschema.Draft202012Validator(schema(name)).is_valid(body)


def test_status_payloads() -> None:
    assert valid("status", TOPICS.status_payload("online", T)) and valid("status", TOPICS.status_payload("offline"))
    assert not valid("status", {"v": 1, "state": "maybe", "agent_id": "edge-01", "time": "2026-01-01T00:00:00.000Z"})


def test_dead_letter_and_summary_payloads() -> None:
    assert valid("deadletter", TOPICS.deadletter_payload("factory/a/b/m1/process", "json", "invalid JSON", b"{x", T))
    assert valid("deadletter", TOPICS.deadletter_payload("t", "value", "bad", b"\xff" * 1000, T))  # excerpt, not bytes
    assert valid("deadletter", TOPICS.deadletter_summary_payload({"json": 3, "shape": 1}, T - 10**10, T, 20.0, T))
    single = json.loads(TOPICS.deadletter_payload("t", "json", "bad", b"x", T))
    assert not valid("deadletter", {**single, "code": "summary"})  # a summary has counts, not a payload


def test_command_result_payloads() -> None:
    assert valid("command_result", TOPICS.command_result_payload("silence", "ana", True, "silenced m01", T))
    assert valid("command_result", TOPICS.command_result_payload("", "", False, "bad_json: not JSON", T))


def test_machine_state_payload() -> None:
    state = {
        "machine": "m01",
        "state": "major",
        "open_alerts": [
            {
                "event_id": "e1",
                "sensor": "vibration",
                "alert_type": "vibration-anomaly",
                "severity": "major",
                "since_ns": T - 10**9,
                "acknowledged_by": None,
                "silenced": False,
                "flapping": False,
            }
        ],
        "silences": [{"sensor": None, "alert_type": None, "until_ns": T + 3600 * 10**9, "by": "ana"}],
    }
    assert valid("state", machine_state_payload(state, "edge-01", T))
    assert valid("state", machine_state_payload({**state, "state": "ok", "open_alerts": [], "silences": []}, "e", T))


def test_heartbeat_payload_names_every_metric_as_the_schema_says() -> None:
    metrics = Metrics()
    metrics.inc("decode.errors", reason="json")
    metrics.observe("inference.seconds", 0.002, model="vibration-anomaly")
    body = json.loads(Topics("edge-01").heartbeat_payload(agent_fields(metrics.collect()), T))
    assert valid("heartbeat", body)
    assert body["v"] == 2 and "counters" not in body  # version 2: the labelled keys are gone
    assert body["time"] == "2026-09-21T14:13:20.250Z" and body["time_ns"] == T  # RFC 3339 like every payload
    assert not valid("heartbeat", {k: v for k, v in body.items() if k != "time"})
    assert body["fields"]["decode_errors"] == body["fields"]["decode_errors_reason_json"] == 1  # flat, and the total
    assert "inference_seconds_p99_model_vibration_anomaly" in body["fields"]
    assert not valid("heartbeat", {**body, "fields": {"decode.errors{reason=json}": 1}})
    assert not valid("heartbeat", {**body, "counters": {"decode.errors": 1}})  # a version 1 body is not a 2
    assert not valid("heartbeat", {**body, "v": 1})


def test_every_key_of_heartbeat_version_1_has_its_value_in_version_2_fields() -> None:
    """The migration note's promise: ``series_field`` finds each v1 ``counters`` value among the v2 fields
    (labelled and unlabelled counters, several labels, gauges, histogram quantiles)."""
    metrics = Metrics()
    metrics.inc("decode.errors", reason="json")
    metrics.inc("decode.errors", 2, reason="bad_topic")
    metrics.inc("alerts.suppressed", reason="cooldown", alert_type="vibration_anomaly")
    metrics.inc("ingest.messages", 5)
    metrics.set("spool.depth", 7)
    metrics.observe("inference.seconds", 0.002, model="vibration-anomaly")
    version_1 = metrics.snapshot()  # what version 1 published as counters
    fields = agent_fields(metrics.collect())
    assert len(version_1) >= 6
    for key, value in version_1.items():
        assert fields[series_field(key)] == value, key
    assert fields[series_field("decode.errors")] == 3  # a v1 consumer summing over labels reads the total


@pytest.mark.parametrize(
    "command",
    [
        {"command": "ack", "event_id": "e1"},
        {"command": "silence", "machine": "m01", "sensor": "vibration", "duration_s": 3600, "note": "bearing swap"},
        {"command": "unsilence", "machine": "m01"},
        {"command": "rebaseline", "machine": "m01"},
    ],
)
def test_signed_commands_and_their_content(command: dict[str, Any]) -> None:
    envelope = json.loads(sign_command(command, "ana", b"k" * 32, "edge-01", ts=1.0, nonce="n0nce-123"))
    assert valid("command", envelope)
    assert valid("command", json.loads(envelope["cmd"]))  # what was signed
    assert valid("command", {**command, "by": "ana"})  # unsigned (auth: none)


@pytest.mark.parametrize(
    "command",
    [
        {"command": "silense", "machine": "m01", "by": "ana"},  # a typo is not a command
        {"command": "ack", "by": "ana"},  # which event?
        {"command": "silence", "machine": "m01", "duration_s": -5, "by": "ana"},
        {"v": 1, "key_id": "ana", "cmd": "{}", "sig": "not hex"},
    ],
)
def test_malformed_commands_do_not_match(command: dict[str, Any]) -> None:
    assert not valid("command", command)
