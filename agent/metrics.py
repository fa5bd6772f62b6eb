"""Thread-safe counters, gauges and latency histograms: rates are counted here, events are logged.

Every stage gets the one ``Metrics`` instance from the composition root. Names are dotted
(``ingest.messages``, ``decode.errors``); an optional ``reason`` or other labels split a series.

- ``inc`` counts (monotonic), ``set`` records a gauge (last value wins).
- ``set_function`` registers a gauge whose value is read when the metrics are read (``spool.oldest_age_s``
  changes with time, not with events).
- ``observe`` records a duration (or any non-negative size) into a histogram with fixed buckets
  (``LATENCY_BUCKETS_S``), plus a bounded window of the most recent observations (the last
  ``RECENT_OBSERVATIONS`` of the last ``RECENT_MAX_AGE_S`` seconds) from which ``quantile`` computes
  p50/p99. The hot path calls it once per batch: a bisect and a deque append under the lock.

Readers: ``snapshot()`` (flat ``name{k=v}`` -> value, for the heartbeat and tests) and ``collect()``
(typed, for the Prometheus renderer and the InfluxDB self-metrics in ``agent/health/``).
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

Labels = tuple[tuple[str, str], ...]
Key = tuple[str, Labels]
"""A series: its dotted name and its labels, sorted by label name."""

LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""Upper bounds (seconds) of the histogram buckets: from 10 µs (one window through a tiny model) to a
minute (an InfluxDB write that ends in a timeout)."""

RECENT_OBSERVATIONS = 1024
RECENT_MAX_AGE_S = 300.0
QUANTILES: tuple[tuple[str, float], ...] = (("p50", 0.5), ("p99", 0.99))
"""The quantiles ``snapshot()`` reports for every histogram, as ``{name}.p50`` and ``{name}.p99``."""


def quantile(sorted_values: tuple[float, ...] | list[float], q: float) -> float | None:
    """Nearest-rank quantile of already sorted values; None when there are none.

    >>> quantile([1.0, 2.0, 3.0, 4.0], 0.5), quantile([1.0, 2.0, 3.0, 4.0], 0.99), quantile([], 0.5)
    (2.0, 4.0, None)
    """
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass(frozen=True)
class HistogramSnapshot:
    """One histogram series at one moment."""

    bounds: tuple[float, ...]
    """Bucket upper bounds, ascending; the implicit last bucket is +Inf."""
    cumulative: tuple[int, ...]
    """Observations <= each bound (same length as ``bounds``); ``count`` is the +Inf bucket."""
    count: int
    sum: float
    recent: tuple[float, ...]
    """The recent observations (see the module docstring), sorted."""

    def quantile(self, q: float) -> float | None:
        return quantile(self.recent, q)


@dataclass(frozen=True)
class MetricsSnapshot:
    """Every series at one moment, by kind; what renderers read."""

    counters: dict[Key, float]
    gauges: dict[Key, float]
    """Set gauges and the current values of function gauges."""
    histograms: dict[Key, HistogramSnapshot]


class _Histogram:
    __slots__ = ("buckets", "count", "recent", "sum")

    def __init__(self, n_bounds: int) -> None:
        self.buckets = [0] * (n_bounds + 1)  # per bucket (not cumulative); the last one is +Inf
        self.count = 0
        self.sum = 0.0
        self.recent: deque[tuple[float, float]] = deque(maxlen=RECENT_OBSERVATIONS)  # (monotonic time, value)


def _key(name: str, labels: dict[str, str]) -> Key:
    return (name, tuple(sorted((k, str(v)) for k, v in labels.items())))


def flat_name(name: str, labels: Labels) -> str:
    """``name{k=v,...}`` as in ``snapshot()``; just ``name`` without labels."""
    label = ",".join(f"{k}={v}" for k, v in labels)
    return f"{name}{{{label}}}" if label else name


class Metrics:
    """Counters (monotonic), gauges (last value) and histograms, safe to update from any thread."""

    def __init__(
        self,
        buckets: tuple[float, ...] = LATENCY_BUCKETS_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if list(buckets) != sorted(set(buckets)) or not buckets:
            raise ValueError(f"buckets must be strictly increasing and not empty, got {buckets!r}")
        self._buckets = tuple(float(b) for b in buckets)
        self._clock = clock
        self._lock = threading.Lock()
        self._counters: Counter[Key] = Counter()
        self._gauges: dict[Key, float] = {}
        self._functions: dict[Key, Callable[[], float | None]] = {}
        self._failing_functions: set[Key] = set()
        self._histograms: dict[Key, _Histogram] = {}

    def inc(self, name: str, n: int = 1, **labels: str) -> None:
        key = _key(name, labels)
        with self._lock:
            self._counters[key] += n

    def set(self, name: str, value: float, **labels: str) -> None:
        key = _key(name, labels)
        with self._lock:
            self._gauges[key] = value

    def set_function(self, name: str, fn: Callable[[], float | None], **labels: str) -> None:
        """A gauge read from ``fn`` whenever the metrics are read; ``fn`` returns None to be left out.

        ``fn`` runs on the reader's thread (heartbeat, HTTP scrape) and must be quick; if it raises, the
        gauge is left out of that reading and the first failure is logged. Registering again replaces it.
        """
        key = _key(name, labels)
        with self._lock:
            self._functions[key] = fn

    def observe(self, name: str, value: float, **labels: str) -> None:
        """Record one observation (e.g. a duration in seconds) into the histogram ``name``."""
        if math.isnan(value):
            raise ValueError(f"{name}: cannot observe NaN")
        key = _key(name, labels)
        index = bisect.bisect_left(self._buckets, value)  # the first bucket whose bound is >= value
        now = self._clock()
        with self._lock:
            histogram = self._histograms.get(key)
            if histogram is None:
                histogram = self._histograms[key] = _Histogram(len(self._buckets))
            histogram.buckets[index] += 1
            histogram.count += 1
            histogram.sum += value
            histogram.recent.append((now, value))

    def quantile(self, name: str, q: float, **labels: str) -> float | None:
        """Quantile ``q`` (0..1) of the recent observations of one histogram series; None without any."""
        key = _key(name, labels)
        with self._lock:
            histogram = self._histograms.get(key)
            recent = list(histogram.recent) if histogram is not None else []
        return quantile(self._sorted_recent(recent), q)

    def get(self, name: str, **labels: str) -> float:
        """Value of one counter or gauge; without labels, the sum over all label sets of a counter.

        For a histogram, its number of observations.
        """
        series: list[float]
        with self._lock:
            if labels:
                key = _key(name, labels)
                series = [self._counters[key]] if key in self._counters else []
                series += [self._gauges[key]] if key in self._gauges else []
                series += [self._histograms[key].count] if key in self._histograms else []
            else:
                key = (name, ())
                series = [v for (n, _), v in self._counters.items() if n == name and v]
                series = series or [v for (n, _), v in self._gauges.items() if n == name]
                series = series or [h.count for (n, _), h in self._histograms.items() if n == name]
            function = self._functions.get(key)
        if series:
            return sum(series)
        value = self._call(key, function) if function is not None else None
        return 0 if value is None else value

    def collect(self) -> MetricsSnapshot:
        """A consistent copy of every series (function gauges are read after the lock is released)."""
        with self._lock:
            counters: dict[Key, float] = dict(self._counters)
            gauges = dict(self._gauges)
            functions = dict(self._functions)
            histograms = {key: (list(h.buckets), h.count, h.sum, list(h.recent)) for key, h in self._histograms.items()}
        for key, fn in functions.items():
            value = self._call(key, fn)
            if value is not None:
                gauges[key] = value
        out: dict[Key, HistogramSnapshot] = {}
        for key, (buckets, count, total, recent) in histograms.items():
            cumulative: list[int] = []
            running = 0
            for n in buckets[:-1]:
                running += n
                cumulative.append(running)
            out[key] = HistogramSnapshot(self._buckets, tuple(cumulative), count, total, self._sorted_recent(recent))
        return MetricsSnapshot(counters=counters, gauges=gauges, histograms=out)

    def snapshot(self) -> dict[str, float]:
        """Flat copy, labels rendered as ``name{k=v}``; for status messages, summaries and tests.

        A histogram appears as its recent quantiles, ``name.p50{k=v}`` and ``name.p99{k=v}`` (absent while
        it has no recent observation).
        """
        collected = self.collect()
        out: dict[str, float] = {}
        for (name, labels), value in [*collected.counters.items(), *collected.gauges.items()]:
            out[flat_name(name, labels)] = value
        for (name, labels), histogram in collected.histograms.items():
            for suffix, q in QUANTILES:
                p = histogram.quantile(q)
                if p is not None:
                    out[flat_name(f"{name}.{suffix}", labels)] = p
        return out

    def _sorted_recent(self, recent: list[tuple[float, float]]) -> tuple[float, ...]:
        """Values of a copy of a recent window that are at most ``RECENT_MAX_AGE_S`` old, sorted."""
        oldest = self._clock() - RECENT_MAX_AGE_S
        return tuple(sorted(v for t, v in recent if t >= oldest))

    def _call(self, key: Key, fn: Callable[[], float | None]) -> float | None:
        try:
            value = fn()
        except Exception as exc:
            with self._lock:
                first = key not in self._failing_functions
                self._failing_functions.add(key)
            if first:
                logger.warning("metric %s: reading it failed: %s", flat_name(*key), exc)
            return None
        if key in self._failing_functions:
            with self._lock:
                self._failing_functions.discard(key)
        return None if value is None else float(value)
