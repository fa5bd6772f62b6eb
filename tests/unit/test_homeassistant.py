"""Home Assistant MQTT discovery configs (``agent.alerts.homeassistant``): topics, ids, and what each entity
reads, announced once per machine."""

from __future__ import annotations

import json

import pytest

from agent.alerts.homeassistant import Discovery
from agent.config import ConfigError, parse_config
from agent.topics import Topics

TOPICS = Topics("edge-01")


def _decoded(configs: list[tuple[str, bytes]]) -> dict[str, dict]:
    return {topic: json.loads(payload) for topic, payload in configs}


def test_the_agent_and_a_machine_are_announced_once() -> None:
    discovery = Discovery(TOPICS, "homeassistant")
    first = _decoded(discovery.for_machine("press-7"))
    assert sorted(first) == [
        "homeassistant/binary_sensor/pdm_edge-01/agent_online/config",
        "homeassistant/binary_sensor/pdm_edge-01/press-7_problem/config",
        "homeassistant/sensor/pdm_edge-01/agent_messages/config",
        "homeassistant/sensor/pdm_edge-01/agent_rejected/config",
        "homeassistant/sensor/pdm_edge-01/press-7_open_alerts/config",
        "homeassistant/sensor/pdm_edge-01/press-7_severity/config",
    ]
    assert discovery.for_machine("press-7") == []
    assert len(discovery.for_machine("m02")) == 3  # only the new machine's entities


def test_machine_entities_read_its_state_topic_and_go_unavailable_with_the_agent() -> None:
    configs = _decoded(Discovery(TOPICS).machine("press 7.a"))  # not a valid discovery id as it is
    assert all(t.split("/")[3].startswith("press_7_a_") for t in configs)
    unique_ids = [c["unique_id"] for c in configs.values()]
    assert len(set(unique_ids)) == 3
    for config in configs.values():
        assert config["state_topic"] == TOPICS.state("press 7.a")
        assert config["availability_topic"] == TOPICS.status and config["payload_not_available"] == "offline"
        assert config["device"]["via_device"] == "pdm_edge-01" and config["device"]["name"] == "press 7.a"
    problem = next(c for t, c in configs.items() if t.startswith("homeassistant/binary_sensor/"))
    assert problem["device_class"] == "problem" and "value_json.state == 'ok'" in problem["value_template"]


def test_the_agent_is_a_device_whose_connectivity_is_its_status() -> None:
    configs = _decoded(Discovery(TOPICS, "ha/").agent())
    online = configs["ha/binary_sensor/pdm_edge-01/agent_online/config"]
    assert (online["state_topic"], online["payload_on"], online["payload_off"]) == (TOPICS.status, "online", "offline")
    assert "availability_topic" not in online  # it is the availability itself


def test_the_discovery_prefix_is_configured_and_checked() -> None:
    assert parse_config({}).homeassistant.enabled is False
    assert parse_config({"homeassistant": {"enabled": True}}).homeassistant.discovery_prefix == "homeassistant"
    with pytest.raises(ConfigError, match=r"homeassistant\.discovery_prefix"):
        parse_config({"homeassistant": {"discovery_prefix": "ha/#"}})
