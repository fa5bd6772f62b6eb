"""Metrics: the catalog, and the facade over prometheus_client (counters, gauges, function gauges, histograms
with recent quantiles) from many threads."""

from __future__ import annotations

import ast
import doctest
import logging
import math
import re
import threading
from pathlib import Path

import pytest

from agent import metrics as metrics_module
from agent.metrics import (
    CATALOG,
    RECENT_MAX_AGE_S,
    RECENT_OBSERVATIONS,
    SPECS,
    Metrics,
    MetricSpec,
    UnknownMetricError,
)

AGENT = Path(__file__).resolve().parents[2] / "agent"
KIND_OF_CALL = {"inc": "counter", "set": "gauge", "set_function": "gauge", "observe": "histogram"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_module_doctests_pass() -> None:
    assert doctest.testmod(metrics_module).failed == 0


# --- the catalog against the code ---------------------------------------------------------------------------


def metric_calls() -> list[tuple[str, str, str, frozenset[str] | None]]:
    """``(where, method, name, label names)`` of every ``<...metrics>.inc/set/set_function/observe("name", ...)``
    in ``agent/``; label names None when the call passes ``**labels``."""
    calls = []
    for path in sorted(AGENT.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr not in KIND_OF_CALL or not ast.unparse(node.func.value).endswith("metrics"):
                continue
            first = node.args[0] if node.args else None
            where = f"{path.relative_to(AGENT.parent)}:{node.lineno}"
            assert isinstance(first, ast.Constant) and isinstance(first.value, str), (
                f"{where}: the metric name must be a string literal, so that this test can check it"
            )
            keywords = [k.arg for k in node.keywords]
            labels = None if None in keywords else frozenset(k for k in keywords if k not in ("n", "fn", "value"))
            calls.append((where, node.func.attr, first.value, labels))
    return calls


def test_the_call_sites_are_found() -> None:
    names = {name for _, _, name, _ in metric_calls()}
    assert {"ingest.messages", "mqtt.connected", "spool.oldest_age_s", "inference.seconds"} <= names


def test_every_metric_used_in_agent_is_declared_with_its_kind_and_labels() -> None:
    problems = []
    for where, method, name, labels in metric_calls():
        spec = SPECS.get(name)
        if spec is None:
            problems.append(f"{where}: {name} is not declared in agent.metric_catalog.CATALOG")
            continue
        if spec.kind != KIND_OF_CALL[method]:
            problems.append(f"{where}: {method}({name!r}) but {name} is a {spec.kind}")
        if labels is not None and labels != set(spec.labels):
            problems.append(f"{where}: {name} with labels {sorted(labels)}, declared {list(spec.labels)}")
    assert not problems, "\n".join(problems)


def test_every_declared_metric_is_used_in_agent() -> None:
    used = {name for _, _, name, _ in metric_calls()}
    assert [spec.name for spec in CATALOG if spec.name not in used] == []


def test_the_catalog_follows_the_prometheus_conventions() -> None:
    assert len(SPECS) == len(CATALOG)
    for spec in CATALOG:
        name = spec.prometheus_name
        assert re.fullmatch(r"pdm_[a-z][a-z0-9_]*", name), name
        assert name.endswith("_total") == (spec.kind == "counter"), name
        assert not re.search(r"_(ms|milliseconds|us|microseconds|minutes|hours|kb|mb|kilobytes)(_|$)", name), name
        assert spec.help.endswith(".") and len(spec.help) > 20, f"{spec.name}: {spec.help!r}"
        assert "le" not in spec.labels and "quantile" not in spec.labels, spec.name
        if spec.kind == "histogram":
            assert name.endswith("_seconds"), f"{name}: every histogram measures a duration, in seconds"


def test_a_metric_in_other_units_than_the_base_ones_is_refused() -> None:
    with pytest.raises(ValueError, match="base units"):
        MetricSpec("inference.last_batch_ms", "gauge", "Duration of the last batch.")
    with pytest.raises(ValueError, match="no help"):
        MetricSpec("spool.depth", "gauge", " ")


# --- the facade ---------------------------------------------------------------------------------------------


def test_counters_add_up_per_label_set_and_in_total() -> None:
    m = Metrics()
    m.inc("decode.errors", reason="bad_json")
    m.inc("decode.errors", 2, reason="nan")
    m.inc("ingest.messages", 5)
    assert m.get("decode.errors", reason="nan") == 2
    assert m.get("decode.errors", reason="never") == 0
    assert m.get("decode.errors") == 3
    assert m.get("ingest.messages") == 5
    snap = m.snapshot()
    assert (snap["decode.errors{reason=bad_json}"], snap["decode.errors{reason=nan}"]) == (1, 2)
    assert snap["ingest.messages"] == 5


def test_unlabelled_counters_and_gauges_exist_from_the_start_with_their_initial_value() -> None:
    snap = Metrics().snapshot()
    for spec in CATALOG:
        if spec.kind != "histogram" and not spec.labels:
            assert snap[spec.name] == spec.initial, spec.name
    assert snap["mqtt.connected"] == 0
    assert not any("{" in name for name in snap)  # a labelled series only once a label set is used


def test_gauges_keep_the_last_value() -> None:
    m = Metrics()
    m.set("spool.depth", 7)
    m.set("spool.depth", 3)
    m.set("models.loaded", 1, model="a", version="1.0.0")
    assert m.get("spool.depth") == 3
    assert m.get("models.loaded", model="a", version="1.0.0") == 1
    snap = m.snapshot()
    assert (snap["spool.depth"], snap["models.loaded{model=a,version=1.0.0}"]) == (3, 1)


def test_an_undeclared_name_fails_loudly() -> None:
    m = Metrics()
    for call in (
        lambda: m.inc("ingest.mesages"),
        lambda: m.set("spool.dept", 1),
        lambda: m.set_function("spool.age", lambda: 1.0),
        lambda: m.observe("inference.second", 0.1),
        lambda: m.get("never.declared"),
        lambda: m.quantile("never.declared", 0.5),
    ):
        with pytest.raises(UnknownMetricError, match=r"not declared in agent\.metric_catalog\.CATALOG"):
            call()


def test_the_wrong_kind_or_other_labels_fail_loudly() -> None:
    m = Metrics()
    with pytest.raises(TypeError, match=r"spool\.depth is a gauge, not a counter"):
        m.inc("spool.depth")
    with pytest.raises(TypeError, match="is a counter, not a histogram"):
        m.observe("ingest.messages", 1.0)
    with pytest.raises(ValueError, match=r"decode.errors: labels \[\], declared \['reason'\]"):
        m.inc("decode.errors")
    with pytest.raises(ValueError, match=r"labels \['kind'\], declared \['reason'\]"):
        m.inc("decode.errors", kind="x")
    with pytest.raises(ValueError, match=r"ingest.messages: labels \['reason'\], declared \[\]"):
        m.inc("ingest.messages", reason="x")


def test_agents_in_one_process_have_their_own_registries() -> None:
    a, b = Metrics(), Metrics()
    a.inc("ingest.messages", 3)
    assert (a.get("ingest.messages"), b.get("ingest.messages")) == (3, 0)
    assert a.registry is not b.registry


def test_observations_are_counted_and_summed() -> None:
    m = Metrics()
    for value in (0.05, 0.1, 0.5, 1.0, 20.0):
        m.observe("storage.write_seconds", value)
    histogram = m.collect().histograms[("storage.write_seconds", ())]
    assert histogram.count == 5
    assert histogram.sum == pytest.approx(21.65)
    assert m.get("storage.write_seconds") == 5


def test_quantiles_are_nearest_rank_over_the_recent_observations() -> None:
    m = Metrics()
    for value in range(1, 101):
        m.observe("inference.seconds", value / 1000, model="a")
    assert m.quantile("inference.seconds", 0.5, model="a") == 0.050
    assert m.quantile("inference.seconds", 0.99, model="a") == 0.099
    assert m.quantile("inference.seconds", 0.5, model="other") is None


def test_snapshot_shows_p50_and_p99_of_each_histogram_series() -> None:
    m = Metrics()
    for value in (0.001, 0.002, 0.003):
        m.observe("inference.seconds", value, model="a")
    m.observe("inference.seconds", 0.5, model="b")
    snap = m.snapshot()
    assert snap["inference.seconds.p50{model=a}"] == 0.002
    assert snap["inference.seconds.p99{model=a}"] == 0.003
    assert snap["inference.seconds.p50{model=b}"] == snap["inference.seconds.p99{model=b}"] == 0.5
    assert not any(name.startswith("inference.seconds{") or name == "inference.seconds" for name in snap)


def test_the_recent_window_is_bounded_in_count() -> None:
    m = Metrics()
    for _ in range(5000):
        m.observe("inference.seconds", 9.0, model="a")  # old and slow
    for _ in range(RECENT_OBSERVATIONS):
        m.observe("inference.seconds", 0.001, model="a")  # recent and fast: they fill the window
    assert m.quantile("inference.seconds", 0.99, model="a") == 0.001
    histogram = m.collect().histograms[("inference.seconds", (("model", "a"),))]
    assert len(histogram.recent) == RECENT_OBSERVATIONS
    assert histogram.count == 5000 + RECENT_OBSERVATIONS  # the Prometheus histogram keeps everything


def test_the_recent_window_forgets_old_observations_but_the_histogram_does_not() -> None:
    clock = FakeClock()
    m = Metrics(clock=clock)
    m.observe("storage.write_seconds", 2.0)
    clock.now += RECENT_MAX_AGE_S / 2
    m.observe("storage.write_seconds", 0.01)
    assert m.quantile("storage.write_seconds", 0.99) == 2.0
    clock.now += RECENT_MAX_AGE_S / 2 + 1
    assert m.quantile("storage.write_seconds", 0.99) == 0.01
    clock.now += RECENT_MAX_AGE_S
    assert m.quantile("storage.write_seconds", 0.5) is None
    assert "storage.write_seconds.p50" not in m.snapshot()
    assert m.get("storage.write_seconds") == 2


def test_nan_cannot_be_observed() -> None:
    with pytest.raises(ValueError, match="NaN"):
        Metrics().observe("inference.seconds", math.nan, model="a")


def test_function_gauges_are_read_when_the_metrics_are_read() -> None:
    m = Metrics()
    assert m.snapshot()["spool.oldest_age_s"] == 0  # the initial value until the spool registers its function
    age = [0.0]
    m.set_function("spool.oldest_age_s", lambda: age[0])
    age[0] = 12.5
    assert m.snapshot()["spool.oldest_age_s"] == 12.5
    assert m.get("spool.oldest_age_s") == 12.5
    m.set_function("spool.oldest_age_s", lambda: None)  # replaced; None: nothing to report
    assert "spool.oldest_age_s" not in m.snapshot()
    assert m.get("spool.oldest_age_s") == 0


def test_a_failing_function_gauge_is_left_out_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics()

    def broken() -> float:
        raise RuntimeError("spool closed")

    m.set_function("spool.oldest_age_s", broken)
    with caplog.at_level(logging.WARNING, logger="agent.metrics"):
        assert "spool.oldest_age_s" not in m.snapshot()
        assert "spool.oldest_age_s" not in m.collect().gauges
    assert [r.getMessage() for r in caplog.records] == ["metric spool.oldest_age_s: reading it failed: spool closed"]


def test_concurrent_updates_are_all_counted() -> None:
    m = Metrics()
    n_threads, per_thread = 8, 2000
    start = threading.Barrier(n_threads + 1)
    done = threading.Event()
    problems: list[str] = []

    def writer(k: int) -> None:
        start.wait()
        for i in range(per_thread):
            m.inc("ingest.messages")
            m.inc("decode.errors", reason=f"r{k % 2}")
            m.set("spool.depth", i)
            m.observe("inference.seconds", (i % 4) / 4 + 0.1, model=f"m{k % 2}")

    def reader() -> None:
        start.wait()
        while not done.is_set():
            for key, h in m.collect().histograms.items():
                # Copied before the counts are read, and appended after the histogram: never more.
                if len(h.recent) > min(h.count, RECENT_OBSERVATIONS):
                    problems.append(f"{key}: {len(h.recent)} recent of {h.count}")
            m.snapshot()

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(n_threads)]
    watcher = threading.Thread(target=reader)
    for t in [*threads, watcher]:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()

    total = n_threads * per_thread
    assert problems == []
    assert m.get("ingest.messages") == total
    assert m.get("decode.errors", reason="r0") == m.get("decode.errors", reason="r1") == total / 2
    histograms = {key: h for key, h in m.collect().histograms.items() if key[0] == "inference.seconds"}
    assert len(histograms) == 2
    assert sum(h.count for h in histograms.values()) == total
    for h in histograms.values():
        assert h.sum == pytest.approx(h.count / 4 * (0.1 + 0.35 + 0.6 + 0.85))
        assert len(h.recent) == RECENT_OBSERVATIONS
        assert set(h.recent) <= {0.1, 0.35, 0.6, 0.85}  # the last ones, whatever the interleaving


def test_replayed_calls_are_checked_like_direct_ones() -> None:
    m = Metrics()
    m.replay([("inc", "ingest.messages", 2, {}), ("set", "storage.backoff_s", 1.5, {})])
    assert m.get("ingest.messages") == 2 and m.get("storage.backoff_s") == 1.5
    with pytest.raises(UnknownMetricError):
        m.replay([("inc", "no.such.metric", 1, {})])
    with pytest.raises(ValueError, match="cannot replay"):
        m.replay([("drop", "ingest.messages", 1, {})])
