"""Metrics: counters, gauges, function gauges and latency histograms with recent quantiles, from many threads."""

from __future__ import annotations

import doctest
import logging
import math
import threading

import pytest

from agent import metrics as metrics_module
from agent.metrics import LATENCY_BUCKETS_S, RECENT_MAX_AGE_S, RECENT_OBSERVATIONS, Metrics


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_module_doctests_pass() -> None:
    assert doctest.testmod(metrics_module).failed == 0


def test_counters_add_up_per_label_set_and_in_total() -> None:
    m = Metrics()
    m.inc("decode.errors", reason="bad_json")
    m.inc("decode.errors", 2, reason="nan")
    m.inc("ingest.messages", 5)
    assert m.get("decode.errors", reason="nan") == 2
    assert m.get("decode.errors") == 3
    assert m.get("ingest.messages") == 5
    assert m.get("never.touched") == 0
    assert m.snapshot() == {"decode.errors{reason=bad_json}": 1, "decode.errors{reason=nan}": 2, "ingest.messages": 5}


def test_gauges_keep_the_last_value() -> None:
    m = Metrics()
    m.set("spool.depth", 7)
    m.set("spool.depth", 3)
    m.set("models.loaded", 1, model="a", version="1.0.0")
    assert m.get("spool.depth") == 3
    assert m.get("models.loaded", model="a", version="1.0.0") == 1
    assert m.snapshot() == {"spool.depth": 3, "models.loaded{model=a,version=1.0.0}": 1}


def test_observations_fill_cumulative_buckets_with_sum_and_count() -> None:
    m = Metrics(buckets=(0.1, 1.0, 10.0))
    for value in (0.05, 0.1, 0.5, 1.0, 20.0):  # a value equal to a bound belongs to that bucket (le)
        m.observe("storage.write_seconds", value)
    (histogram,) = m.collect().histograms.values()
    assert histogram.bounds == (0.1, 1.0, 10.0)
    assert histogram.cumulative == (2, 4, 4)
    assert histogram.count == 5  # the +Inf bucket
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
    assert "inference.seconds" not in snap


def test_the_recent_window_is_bounded_in_count() -> None:
    m = Metrics()
    for _ in range(5000):
        m.observe("inference.seconds", 9.0)  # old and slow
    for _ in range(RECENT_OBSERVATIONS):
        m.observe("inference.seconds", 0.001)  # recent and fast: they fill the window
    assert m.quantile("inference.seconds", 0.99) == 0.001
    (histogram,) = m.collect().histograms.values()
    assert len(histogram.recent) == RECENT_OBSERVATIONS
    assert histogram.count == 5000 + RECENT_OBSERVATIONS  # the buckets keep everything


def test_the_recent_window_forgets_old_observations_but_the_buckets_do_not() -> None:
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
        Metrics().observe("inference.seconds", math.nan)


@pytest.mark.parametrize("buckets", [(), (1.0, 0.5), (0.1, 0.1)])
def test_buckets_must_increase(buckets: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        Metrics(buckets=buckets)


def test_default_buckets_span_microseconds_to_a_minute() -> None:
    assert LATENCY_BUCKETS_S[0] <= 1e-5 and LATENCY_BUCKETS_S[-1] >= 60.0


def test_function_gauges_are_read_when_the_metrics_are_read() -> None:
    m = Metrics()
    age = [0.0]
    m.set_function("spool.oldest_age_s", lambda: age[0])
    age[0] = 12.5
    assert m.snapshot()["spool.oldest_age_s"] == 12.5
    assert m.get("spool.oldest_age_s") == 12.5
    m.set_function("spool.oldest_age_s", lambda: None)  # replaced; None: nothing to report
    assert "spool.oldest_age_s" not in m.snapshot()


def test_a_failing_function_gauge_is_left_out_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics()
    m.inc("ingest.messages")

    def broken() -> float:
        raise RuntimeError("spool closed")

    m.set_function("spool.oldest_age_s", broken)
    with caplog.at_level(logging.WARNING, logger="agent.metrics"):
        assert m.snapshot() == {"ingest.messages": 1}
        assert m.snapshot() == {"ingest.messages": 1}
    assert [r.getMessage() for r in caplog.records] == ["metric spool.oldest_age_s: reading it failed: spool closed"]


def test_concurrent_updates_are_all_counted_and_readers_see_consistent_histograms() -> None:
    m = Metrics(buckets=(0.25, 0.5, 0.75))
    n_threads, per_thread = 8, 4000
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
                if list(h.cumulative) != sorted(h.cumulative) or h.cumulative[-1] > h.count:
                    problems.append(f"{key}: {h.cumulative} of {h.count}")
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
    histograms = m.collect().histograms
    assert sum(h.count for h in histograms.values()) == total
    for h in histograms.values():
        # Values 0.1, 0.35, 0.6, 0.85 in equal numbers: one per bucket, the last one above every bound.
        assert h.cumulative == (h.count // 4, h.count // 2, 3 * h.count // 4)
        assert h.sum == pytest.approx(h.count / 4 * (0.1 + 0.35 + 0.6 + 0.85))
        assert len(h.recent) == RECENT_OBSERVATIONS
        assert set(h.recent) <= {0.1, 0.35, 0.6, 0.85}  # the last ones, whatever the interleaving
