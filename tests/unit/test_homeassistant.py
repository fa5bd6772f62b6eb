"""Home Assistant MQTT discovery configs (``agent.alerts.homeassistant``): topics, ids, and what each entity
reads, announced once per machine."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from agent.alerts.homeassistant import Discovery
from agent.config import ConfigError, parse_config
from agent.records import Score, Source
from agent.topics import Topics

TOPICS = Topics("edge-01")
NS = 1_000_000_000


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


def _score(machine: str, sensor: str, value: float, end_s: int, model: str = "vibration-anomaly") -> Score:
    source = Source.of(site="s1", line="l1", machine=machine, sensor=sensor)
    return Score(source, (end_s - 1) * NS, end_s * NS, model, "1.0.0", value, 0.8)


def test_a_score_entity_is_announced_with_the_first_score_of_its_sensor_and_model() -> None:
    discovery = Discovery(TOPICS, "homeassistant", scores_interval_s=10)
    first = _decoded(discovery.on_score(_score("press-7", "vibration", 0.4, 100), 100 * NS))
    entity = first["homeassistant/sensor/pdm_edge-01/press-7_score_vibration_vibration-anomaly/config"]
    assert entity["state_topic"] == entity["json_attributes_topic"] == TOPICS.scores("press-7")
    assert entity["value_template"] == '{{ value_json.scores["vibration/vibration-anomaly"].score }}'
    assert entity["state_class"] == "measurement" and entity["availability_topic"] == TOPICS.status
    problem = _decoded(discovery.machine("press-7"))["homeassistant/binary_sensor/pdm_edge-01/press-7_problem/config"]
    assert entity["device"] == problem["device"]  # one device: the alert entities and the scores
    assert "homeassistant/binary_sensor/pdm_edge-01/agent_online/config" in first  # the agent before its machines
    assert TOPICS.scores("press-7") in first  # its first score at once
    assert discovery.on_score(_score("press-7", "vibration", 0.5, 101), 101 * NS) == []  # no second config
    process = discovery.on_score(_score("press-7", "process", 2.0, 102, "process-anomaly"), 102 * NS)
    assert [t for t, _ in process] == ["homeassistant/sensor/pdm_edge-01/press-7_score_process_process-anomaly/config"]


def test_a_machines_scores_go_out_at_most_every_interval_with_the_latest_of_each_sensor() -> None:
    discovery = Discovery(TOPICS, "homeassistant", scores_interval_s=10)
    published = _decoded(discovery.on_score(_score("m1", "vibration", 0.4, 100), 100 * NS))
    body = published[TOPICS.scores("m1")]  # the first score of a machine goes out at once
    assert valid_scores(body) and body["scores"]["vibration/vibration-anomaly"]["score"] == 0.4
    assert discovery.on_score(_score("m1", "vibration", 1.6, 105), 105 * NS) == []
    assert discovery.on_score(_score("m1", "process", 0.2, 106, "process-anomaly"), 106 * NS)  # its config only
    assert discovery.due(109 * NS) == []
    [(topic, payload)] = discovery.due(110 * NS)  # the interval is over: the latest of each, without a new score
    body = json.loads(payload)
    assert topic == TOPICS.scores("m1") and valid_scores(body)
    vibration = body["scores"]["vibration/vibration-anomaly"]
    assert (vibration["score"], vibration["ratio"], vibration["anomalous"]) == (1.6, 2.0, True)
    assert body["scores"]["process/process-anomaly"]["score"] == 0.2
    assert discovery.on_score(_score("m1", "vibration", 0.3, 115), 115 * NS) == []  # within the interval: waits
    assert discovery.due(116 * NS) == []
    [(_, payload)] = discovery.due(116 * NS, final=True)  # at the agent's stop it goes out anyway
    assert json.loads(payload)["scores"]["vibration/vibration-anomaly"]["score"] == 0.3
    assert discovery.due(200 * NS) == []  # nothing new since


def test_no_score_entities_with_a_zero_interval_and_a_nan_score_is_null() -> None:
    assert Discovery(TOPICS, scores_interval_s=0).on_score(_score("m1", "vibration", 0.4, 100), 100 * NS) == []
    published = _decoded(Discovery(TOPICS).on_score(_score("m1", "vibration", float("nan"), 100), 100 * NS))
    body = published[TOPICS.scores("m1")]
    assert valid_scores(body) and body["scores"]["vibration/vibration-anomaly"]["score"] is None
    assert parse_config({"homeassistant": {"enabled": True}}).homeassistant.scores_interval_s == 10
    with pytest.raises(ConfigError, match=r"homeassistant\.scores_interval_s"):
        parse_config({"homeassistant": {"scores_interval_s": -1}})


def valid_scores(body: dict) -> bool:
    schema = json.loads((Path(__file__).resolve().parents[2] / "agent" / "schemas" / "scores.schema.json").read_text())
    return jsonschema.Draft202012Validator(schema).is_valid(body)
