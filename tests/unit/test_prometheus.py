"""``/metrics``: the catalog's registry as prometheus_client writes it, read back by prometheus_client's parser."""

from __future__ import annotations

import math
import sys

import pytest
from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from agent.metric_catalog import CATALOG, LATENCY_BUCKETS_S
from agent.metrics import Metrics


def exposition(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def families(metrics: Metrics) -> dict[str, Metric]:
    """Families by name as the parser names them (a counter without its ``_total``)."""
    parsed = list(text_string_to_metric_families(exposition(metrics)))
    by_name = {family.name: family for family in parsed}
    assert len(by_name) == len(parsed), "a family appears twice"
    return by_name


def value(family: Metric, name: str, **labels: str) -> float:
    found = [s.value for s in family.samples if s.name == name and s.labels == labels]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples in {family.samples}"
    return found[0]


def test_every_family_has_help_and_a_type() -> None:
    m = Metrics()
    m.inc("decode.errors", reason="bad_json")
    m.observe("inference.seconds", 0.003, model="vibration-anomaly")
    for name, family in families(m).items():
        assert family.documentation.strip(), f"{name} has no HELP"
        assert family.type in ("counter", "gauge", "histogram", "info"), f"{name}: {family.type}"


def test_a_fresh_agent_exposes_every_declared_metric_with_its_help_and_type() -> None:
    found = families(Metrics())
    for spec in CATALOG:
        name = spec.prometheus_name.removesuffix("_total")  # how the parser names a counter family
        assert name in found, f"{spec.prometheus_name} is not on /metrics"
        family = found[name]
        assert (family.type, family.documentation) == (spec.kind, spec.help), name


def test_every_unlabelled_gauge_is_there_from_the_start_with_its_initial_value() -> None:
    found = families(Metrics())
    gauges = [spec for spec in CATALOG if spec.kind == "gauge"]
    assert gauges
    for spec in gauges:
        family = found[spec.prometheus_name]
        if not spec.labels:
            assert value(family, spec.prometheus_name) == spec.initial, spec.name
    # Before any connection, and whether or not the broker can be reached at all.
    assert "pdm_mqtt_connected 0.0" in exposition(Metrics()).splitlines()


def test_no_gauge_carries_quantiles_and_no_name_is_in_milliseconds() -> None:
    m = Metrics()
    for v in (0.001, 0.002):
        m.observe("inference.seconds", v, model="a")
        m.observe("storage.write_seconds", v)
    for name, family in families(m).items():
        assert "milli" not in name and not name.endswith("_ms"), name
        for sample in family.samples:
            assert "quantile" not in sample.labels, f"{sample.name}: quantiles are computed from the buckets"
        assert not name.endswith("_recent"), name


def test_latency_is_a_histogram_in_seconds_with_buckets_sum_and_count() -> None:
    m = Metrics()
    for v in (0.0005, 0.003, 0.003, 2.0, 120.0):
        m.observe("inference.seconds", v, model="vibration-anomaly")
    family = families(m)["pdm_inference_seconds"]
    assert family.type == "histogram"
    labels = {"model": "vibration-anomaly"}
    buckets = [(float(s.labels["le"]), s.value) for s in family.samples if s.name.endswith("_bucket")]
    assert [b for b, _ in buckets] == [*LATENCY_BUCKETS_S, math.inf]
    cumulative = dict(buckets)
    assert (cumulative[0.0005], cumulative[0.0025], cumulative[0.005], cumulative[60.0]) == (1, 1, 3, 4)
    assert cumulative[math.inf] == value(family, "pdm_inference_seconds_count", **labels) == 5
    assert value(family, "pdm_inference_seconds_sum", **labels) == pytest.approx(122.0065)
    for spec in CATALOG:
        if spec.kind == "histogram":
            assert spec.prometheus_name.endswith("_seconds")


def test_counters_end_in_total_and_split_by_their_labels() -> None:
    m = Metrics()
    m.inc("decode.errors", 2, reason="bad_json")
    m.inc("decode.errors", reason="non_finite")
    m.inc("ingest.messages", 7)
    lines = exposition(m).splitlines()
    assert "# TYPE pdm_decode_errors_total counter" in lines
    assert 'pdm_decode_errors_total{reason="bad_json"} 2.0' in lines
    assert 'pdm_decode_errors_total{reason="non_finite"} 1.0' in lines
    assert "pdm_ingest_messages_total 7.0" in lines
    assert not any("_created" in line for line in lines)


def test_units_are_seconds_in_prometheus_names() -> None:
    m = Metrics()
    m.set("storage.backoff_s", 2.5)
    m.set("inference.last_batch_s", 0.004, model="a")
    m.set_function("spool.oldest_age_s", lambda: 12.0)
    found = families(m)
    assert value(found["pdm_storage_backoff_seconds"], "pdm_storage_backoff_seconds") == 2.5
    assert value(found["pdm_inference_last_batch_seconds"], "pdm_inference_last_batch_seconds", model="a") == 0.004
    assert value(found["pdm_spool_oldest_age_seconds"], "pdm_spool_oldest_age_seconds") == 12.0


def test_label_values_are_escaped_and_read_back() -> None:
    m = Metrics()
    odd = 'a "quoted" \\ value\nwith a line feed'
    m.inc("mqtt.publish_errors", reason=odd)
    family = families(m)["pdm_mqtt_publish_errors"]
    assert value(family, "pdm_mqtt_publish_errors_total", reason=odd) == 1


def test_a_function_gauge_without_a_value_is_nan_and_a_failing_one_does_not_break_the_scrape() -> None:
    m = Metrics()
    m.set_function("spool.oldest_age_s", lambda: None)
    family = families(m)["pdm_spool_oldest_age_seconds"]
    assert math.isnan(value(family, "pdm_spool_oldest_age_seconds"))

    def broken() -> float:
        raise OSError("spool closed")

    m.set_function("spool.oldest_age_s", broken)
    m.inc("ingest.messages")
    found = families(m)
    assert math.isnan(value(found["pdm_spool_oldest_age_seconds"], "pdm_spool_oldest_age_seconds"))
    assert value(found["pdm_ingest_messages"], "pdm_ingest_messages_total") == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process_* comes from /proc")
def test_process_and_python_series_are_there() -> None:
    found = families(Metrics())
    assert value(found["process_resident_memory_bytes"], "process_resident_memory_bytes") > 0
    assert value(found["process_cpu_seconds"], "process_cpu_seconds_total") >= 0
    assert found["process_cpu_seconds"].type == "counter"
    assert "process_open_fds" in found and "process_start_time_seconds" in found
    assert "python_info" in found and "python_gc_collections" in found
