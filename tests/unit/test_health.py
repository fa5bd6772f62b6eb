"""Health without a network: self-metrics fields for InfluxDB, the checks, the health config section."""

from __future__ import annotations

import doctest
import math

import pytest

from agent import schema
from agent.config import ConfigError, parse_config
from agent.health import selfmetrics, server
from agent.health.selfmetrics import agent_fields, field_name
from agent.health.server import HealthServer, build_health_server, run_checks
from agent.metrics import CATALOG, Metrics
from agent.storage.line_protocol import format_point


def test_module_doctests_pass() -> None:
    assert doctest.testmod(selfmetrics).failed == 0
    assert doctest.testmod(server).failed == 0


def test_agent_fields_are_snake_case_with_totals_per_labelled_counter() -> None:
    m = Metrics()
    m.inc("ingest.messages", 10)
    m.inc("decode.errors", 2, reason="bad_json")
    m.inc("decode.errors", 1, reason="non-finite")
    m.set("spool.depth", 7)
    m.set_function("spool.oldest_age_s", lambda: 4.5)
    m.set("models.loaded", 1, model="vibration-anomaly", version="1.0.0")
    m.set("inference.last_batch_s", 0.003, model="a")
    m.set("inference.last_batch_s", 0.005, model="b")
    fields = agent_fields(m.collect())
    assert {k: v for k, v in fields.items() if v} == {
        "decode_errors": 3.0,
        "decode_errors_reason_bad_json": 2.0,
        "decode_errors_reason_non_finite": 1.0,
        "inference_last_batch_s_model_a": 0.003,  # gauges are not summed
        "inference_last_batch_s_model_b": 0.005,
        "ingest_messages": 10.0,
        "models_loaded_model_vibration_anomaly_version_1_0_0": 1.0,
        "spool_depth": 7.0,
        "spool_oldest_age_s": 4.5,
    }


def test_every_counter_total_and_unlabelled_gauge_is_a_field_from_the_start() -> None:
    """The dashboards read 0, not "no data", before the first error."""
    fields = agent_fields(Metrics().collect())
    for spec in CATALOG:
        if spec.kind == "counter" or (spec.kind == "gauge" and not spec.labels):
            assert fields[field_name(spec.name)] == spec.initial, spec.name
    assert fields["mqtt_connected"] == 0 and fields["decode_errors"] == 0
    assert fields["storage_write_seconds_count"] == 0 and "storage_write_seconds_p99" not in fields


def test_agent_fields_carry_p50_p99_and_count_of_each_histogram() -> None:
    m = Metrics()
    for value in (0.001, 0.002, 0.003, 0.004):
        m.observe("inference.seconds", value, model="vib")
    m.observe("storage.write_seconds", 0.02)
    fields = agent_fields(m.collect())
    assert {k: v for k, v in fields.items() if "_seconds_" in k} == {
        "inference_seconds_p50_model_vib": 0.002,
        "inference_seconds_p99_model_vib": 0.004,
        "inference_seconds_count_model_vib": 4.0,
        "storage_write_seconds_p50": 0.02,
        "storage_write_seconds_p99": 0.02,
        "storage_write_seconds_count": 1.0,
        # Unlabelled histograms nothing observed yet: a count of 0, no percentiles.
        "spool_append_seconds_count": 0.0,
        "spool_checkpoint_seconds_count": 0.0,
    }


def test_agent_fields_are_floats_without_non_finite_values_and_make_a_valid_point() -> None:
    m = Metrics()
    m.inc("ingest.messages", 3)
    m.set("spool.depth", math.inf)
    m.set("storage.backoff_s", math.nan)
    m.set_function("spool.oldest_age_s", lambda: None)  # a closed spool
    fields = agent_fields(m.collect())
    assert fields["ingest_messages"] == 3.0
    assert not {"spool_depth", "storage_backoff_s", "spool_oldest_age_s"} & set(fields)
    assert all(type(v) is float and math.isfinite(v) for v in fields.values())  # one type across heartbeats
    tags = {schema.TAG_AGENT_ID: "edge-01"}
    assert format_point(schema.AGENT, tags, {"ingest_messages": fields["ingest_messages"]}, 1) == (
        "agent,agent_id=edge-01 ingest_messages=3.0 1"
    )
    format_point(schema.AGENT, tags, fields, 1)  # every field encodes


def test_field_names_need_no_quoting_in_influxql() -> None:
    assert field_name("mqtt.publish_errors", (("reason", "The client is not currently connected."),)) == (
        "mqtt_publish_errors_reason_The_client_is_not_currently_connected"
    )


def test_checks_pass_fail_or_raise_without_stopping_the_others() -> None:
    calls: list[str] = []

    def broker() -> bool:
        calls.append("broker")
        raise ConnectionError("broker unreachable")

    ok, states = run_checks({"broker": broker, "models": lambda: True, "spool": lambda: False})
    assert not ok
    assert states == {
        "broker": {"ok": False, "error": "ConnectionError: broker unreachable"},
        "models": {"ok": True},
        "spool": {"ok": False},
    }
    assert run_checks({}) == (True, {})


def test_health_section_defaults_to_local_port_9108() -> None:
    config = parse_config({}, environ={})
    assert (config.health.enabled, config.health.host, config.health.port) == (True, "127.0.0.1", 9108)
    health = build_health_server(config, Metrics(), {"x": lambda: True})
    assert isinstance(health, HealthServer)
    assert (health.host, health.port) == ("127.0.0.1", 9108)  # built, not started: nothing is bound


def test_a_disabled_health_section_builds_no_server() -> None:
    config = parse_config({"health": {"enabled": False}}, environ={})
    assert build_health_server(config, Metrics(), {}) is None


@pytest.mark.parametrize(
    ("data", "path", "reason"),
    [
        ({"health": {"port": 70000}}, "health.port", "0..65535"),
        ({"health": {"port": -1}}, "health.port", "0..65535"),
        ({"health": {"port": "9108"}}, "health.port", "expected an integer"),
        ({"health": {"host": ""}}, "health.host", "must not be empty"),
        ({"health": {"enabled": "yes"}}, "health.enabled", "true or false"),
        ({"health": {"path": "/x"}}, "health.path", "unknown key"),
    ],
)
def test_bad_health_settings_are_refused_with_key_path(data: dict, path: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, environ={})
    assert info.value.path == path
    assert reason in info.value.reason
