"""Outbound topic names and the status, dead-letter and state payloads (docs/contracts.md)."""

from __future__ import annotations

import doctest
import json

import pytest

import agent.topics
from agent.topics import Topics, format_rfc3339

T_NS = 1_732_575_600_250_000_000  # 2024-11-25T23:00:00.250Z


def test_topic_names_under_the_default_base() -> None:
    t = Topics("edge-01")
    assert t.agent_id == "edge-01"
    assert t.base == "pdm/edge-01"
    assert t.status == "pdm/edge-01/status"
    assert t.heartbeat == "pdm/edge-01/heartbeat"
    assert t.deadletter == "pdm/edge-01/deadletter"
    assert t.alerts("press-7", "vibration") == "pdm/edge-01/alerts/press-7/vibration"
    assert t.alerts_filter == "pdm/edge-01/alerts/+/+"
    assert t.state("press-7") == "pdm/edge-01/state/press-7"
    assert t.state_filter == "pdm/edge-01/state/+"


def test_custom_base_template() -> None:
    assert Topics("a1", "site/berlin/agents/{agent_id}").status == "site/berlin/agents/a1/status"


@pytest.mark.parametrize(
    "agent_id, base, fragment",
    [
        ("", "pdm/{agent_id}", "agent_id must be a non-empty string"),
        ("a/b", "pdm/{agent_id}", "agent_id must be"),
        ("a+", "pdm/{agent_id}", "agent_id must be"),
        ("a", "pdm/{agent}", "only the placeholder {agent_id} is allowed"),
        ("a", "pdm/{0}", "only the placeholder {agent_id} is allowed"),
        ("a", "pdm//{agent_id}", "base topic 'pdm//{agent_id}': level"),
        ("a", "pdm/#/{agent_id}", "base topic"),
    ],
)
def test_bad_agent_id_or_base_is_refused(agent_id: str, base: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        Topics(agent_id, base)
    assert fragment in str(info.value)


@pytest.mark.parametrize("machine, sensor", [("a/b", "s"), ("m", "+"), ("", "s"), ("m", "#")])
def test_alert_topic_refuses_levels_that_would_change_the_topic(machine: str, sensor: str) -> None:
    with pytest.raises(ValueError):
        Topics("edge-01").alerts(machine, sensor)


def test_status_payload() -> None:
    body = json.loads(Topics("edge-01").status_payload("online", T_NS))
    assert body == {"v": 1, "state": "online", "agent_id": "edge-01", "time": "2024-11-25T23:00:00.250Z"}
    assert json.loads(Topics("edge-01").status_payload("offline"))["state"] == "offline"
    with pytest.raises(ValueError):
        Topics("edge-01").status_payload("sleeping")  # type: ignore[arg-type]


def test_deadletter_payload_carries_reason_and_an_excerpt() -> None:
    payload = b'{"value":NaN,"pad":"' + b"x" * 1000 + b'"}'
    body = json.loads(Topics("edge-01").deadletter_payload("factory/b/l/m/s", "value", "value is NaN", payload, T_NS))
    assert body["v"] == 1
    assert body["topic"] == "factory/b/l/m/s"
    assert body["code"] == "value"
    assert body["reason"] == "value is NaN"
    assert body["payload_excerpt"] == payload[:256].decode()
    assert body["payload_bytes"] == len(payload)
    assert body["time"] == "2024-11-25T23:00:00.250Z"


def test_deadletter_excerpt_of_binary_payload_is_text() -> None:
    body = json.loads(Topics("edge-01").deadletter_payload("t", "not_utf8", "bad", b"\xff\xfeok", T_NS))
    assert body["payload_excerpt"] == "\ufffd\ufffdok"
    assert body["payload_bytes"] == 4


def test_command_topics_and_result_payload() -> None:
    t = Topics("edge-01")
    assert (t.commands, t.command_result) == ("pdm/edge-01/commands", "pdm/edge-01/commands/result")
    body = json.loads(t.command_result_payload("ack", "maria", True, "event e1 acknowledged", T_NS))
    assert body == {
        "v": 1,
        "command": "ack",
        "by": "maria",
        "accepted": True,
        "detail": "event e1 acknowledged",
        "time": "2024-11-25T23:00:00.250Z",
    }


def test_format_rfc3339_has_milliseconds() -> None:
    assert format_rfc3339(0) == "1970-01-01T00:00:00.000Z"
    assert format_rfc3339(T_NS + 999_999) == "2024-11-25T23:00:00.250Z"


def test_doctests() -> None:
    assert doctest.testmod(agent.topics).failed == 0
