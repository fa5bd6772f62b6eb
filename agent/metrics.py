"""The ``Metrics`` facade the stages count with; every metric is declared once in ``agent.metric_catalog``.

Rates are counted here, events are logged. Every stage gets the one ``Metrics`` instance from the
composition root and calls it by dotted name (``ingest.messages``, ``decode.errors``):

- ``inc`` counts (monotonic), ``set`` records a gauge (last value wins);
- ``set_function`` makes a gauge read a callable whenever the metrics are read (``spool.oldest_age_s``
  changes with time, not with events);
- ``observe`` records a duration in seconds (or any non-negative size) into a histogram, and into a bounded
  window of the most recent observations (the last ``RECENT_OBSERVATIONS`` of the last ``RECENT_MAX_AGE_S``
  seconds) from which ``quantile`` computes the p50/p99 the heartbeat shows.

A name that is not in ``CATALOG``, a call of the wrong kind (``inc`` on a gauge) or other label names than
the declared ones raise at once, on the caller's thread: a misspelled metric is a bug, not a new series.
``tests/unit/test_metrics.py`` checks that every name used in ``agent/`` is declared, and every declared
one used.

Underneath, each ``Metrics`` owns a ``prometheus_client.CollectorRegistry`` (``registry``) holding one
``Counter``, ``Gauge`` or ``Histogram`` per catalog entry, plus the process, platform and garbage
collector collectors (``process_*``, ``python_*``). It is not the library's global registry, so that
several agents (tests) in one process do not collide. ``/metrics`` is ``generate_latest(registry)``.

Prometheus names follow from the dotted ones: ``pdm_`` prefix, dots become underscores, a trailing ``_s``
becomes ``_seconds`` and counters end in ``_total`` (``spool.oldest_age_s`` ->
``pdm_spool_oldest_age_seconds``, ``decode.errors`` -> ``pdm_decode_errors_total``). Durations are in
seconds, sizes in bytes; a name in other units (``_ms``) is refused when the catalog is built. Every
unlabelled gauge and counter exists from the start, with its initial value (``pdm_mqtt_connected 0``
before the first connection); a labelled one once a label set is used.

Readers: ``registry`` (Prometheus), ``snapshot()`` (flat ``name{k=v}`` -> value, for the heartbeat and
tests) and ``collect()`` (typed, for the InfluxDB self-metrics in ``agent/health/selfmetrics.py``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeAlias

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from agent.metric_catalog import CATALOG, SPECS, Kind, MetricSpec, prometheus_name

logger = logging.getLogger(__name__)

# The ``_created`` series (a Unix time per counter and histogram series) would double the number of
# families on /metrics for a figure nobody here reads; the switch is process-wide in prometheus_client.
prometheus_client.disable_created_metrics()

Labels: TypeAlias = tuple[tuple[str, str], ...]
Key: TypeAlias = tuple[str, Labels]
"""A series: its dotted name and its labels, sorted by label name."""

RECENT_OBSERVATIONS = 1024
RECENT_MAX_AGE_S = 300.0
QUANTILES: tuple[tuple[str, float], ...] = (("p50", 0.5), ("p99", 0.99))
"""The quantiles ``snapshot()`` reports for every histogram, as ``{name}.p50`` and ``{name}.p99``."""


class UnknownMetricError(KeyError):
    """A metric name that ``CATALOG`` does not declare."""

    def __str__(self) -> str:
        return f"metric {self.args[0]!r} is not declared in agent.metric_catalog.CATALOG"


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

    count: int
    """Observations since the start."""
    sum: float
    recent: tuple[float, ...]
    """The recent observations (see the module docstring), sorted."""

    def quantile(self, q: float) -> float | None:
        return quantile(self.recent, q)


@dataclass(frozen=True)
class MetricsSnapshot:
    """Every series of the catalog at one moment, by kind; what the self-metrics read."""

    counters: dict[Key, float]
    """Every series of every counter; an unlabelled counter from the start."""
    gauges: dict[Key, float]
    """Set gauges and the current values of function gauges (without those that have no value now)."""
    histograms: dict[Key, HistogramSnapshot]


def flat_name(name: str, labels: Labels) -> str:
    """``name{k=v,...}`` as in ``snapshot()``; just ``name`` without labels."""
    label = ",".join(f"{k}={v}" for k, v in labels)
    return f"{name}{{{label}}}" if label else name


_Metric: TypeAlias = Counter | Gauge | Histogram


class Metrics:
    """The catalog's metrics in a registry of their own, safe to update from any thread."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = CollectorRegistry()
        self._clock = clock
        self._lock = threading.Lock()
        self._recent: dict[Key, deque[tuple[float, float]]] = {}  # (monotonic time, value)
        self._failing_functions: set[Key] = set()
        self._metrics: dict[str, _Metric] = {}
        self._children: dict[tuple[object, ...], _Metric] = {}
        for spec in CATALOG:
            self._metrics[spec.name] = _build(spec, self.registry)
        prometheus_client.ProcessCollector(registry=self.registry)
        prometheus_client.PlatformCollector(registry=self.registry)
        prometheus_client.GCCollector(registry=self.registry)

    def inc(self, name: str, n: float = 1, **labels: str) -> None:
        """Add ``n`` (>= 0) to a counter."""
        counter = self._series(name, "counter", labels)
        assert isinstance(counter, Counter)
        counter.inc(n)

    def set(self, name: str, value: float, **labels: str) -> None:
        gauge = self._series(name, "gauge", labels)
        assert isinstance(gauge, Gauge)
        gauge.set(value)

    def set_function(self, name: str, fn: Callable[[], float | None], **labels: str) -> None:
        """A gauge read from ``fn`` whenever the metrics are read; ``fn`` returns None when it has no value.

        ``fn`` runs on the reader's thread (heartbeat, HTTP scrape) and must be quick. Without a value (None,
        or ``fn`` raised: the first failure is logged) the gauge is NaN on ``/metrics`` and left out of
        ``collect()`` and ``snapshot()``. Registering again replaces it.
        """
        gauge = self._series(name, "gauge", labels)
        assert isinstance(gauge, Gauge)
        key = _key(name, labels)

        def read() -> float:
            value = self._call(key, fn)
            return math.nan if value is None else value

        gauge.set_function(read)

    def observe(self, name: str, value: float, **labels: str) -> None:
        """Record one observation (a duration in seconds, or a size) into the histogram ``name``."""
        if math.isnan(value):
            raise ValueError(f"{name}: cannot observe NaN")
        histogram = self._series(name, "histogram", labels)
        assert isinstance(histogram, Histogram)
        histogram.observe(value)
        key = _key(name, labels)
        now = self._clock()
        with self._lock:
            recent = self._recent.get(key)
            if recent is None:
                recent = self._recent[key] = deque(maxlen=RECENT_OBSERVATIONS)
            recent.append((now, value))

    def replay(self, calls: Iterable[tuple[str, str, float, Mapping[str, str]]]) -> None:
        """Apply ``(method, name, value, labels)`` calls recorded elsewhere (another process's metrics,
        ``agent.child.RelayMetrics``), in order; the names are checked as any call's are."""
        for method, name, value, labels in calls:
            if method == "inc":
                self.inc(name, value, **labels)
            elif method == "set":
                self.set(name, value, **labels)
            elif method == "observe":
                self.observe(name, value, **labels)
            else:
                raise ValueError(f"{name}: cannot replay a {method!r} call")

    def quantile(self, name: str, q: float, **labels: str) -> float | None:
        """Quantile ``q`` (0..1) of the recent observations of one histogram series; None without any."""
        _spec(name, "histogram")
        key = _key(name, labels)
        with self._lock:
            recent = list(self._recent.get(key, ()))
        return quantile(self._sorted_recent(recent), q)

    def get(self, name: str, **labels: str) -> float:
        """Value of one counter or gauge series; without labels, the sum over every label set.

        For a histogram, its number of observations. 0 for a series never counted or set.
        """
        spec = _spec(name)
        wanted = {k: str(v) for k, v in labels.items()}
        sample_name = {
            "counter": spec.prometheus_name,
            "gauge": spec.prometheus_name,
            "histogram": spec.prometheus_name + "_count",
        }[spec.kind]
        total = 0.0
        for family in self._metrics[name].collect():
            for sample in family.samples:
                if sample.name != sample_name or math.isnan(sample.value):
                    continue
                if not wanted or sample.labels == wanted:
                    total += sample.value
        return total

    def collect(self) -> MetricsSnapshot:
        """Every series of the catalog (function gauges are read here, on the caller's thread)."""
        counters: dict[Key, float] = {}
        gauges: dict[Key, float] = {}
        histograms: dict[Key, HistogramSnapshot] = {}
        with self._lock:
            recent = {key: list(values) for key, values in self._recent.items()}
        for spec in CATALOG:
            base = prometheus_name(spec.name)
            sums: dict[Labels, float] = {}
            for family in self._metrics[spec.name].collect():
                for sample in family.samples:
                    labels = tuple(sorted(sample.labels.items()))
                    key = (spec.name, labels)
                    if spec.kind == "counter" and sample.name == base + "_total":
                        counters[key] = sample.value
                    elif spec.kind == "gauge" and not math.isnan(sample.value):
                        gauges[key] = sample.value
                    elif spec.kind == "histogram" and sample.name == base + "_sum":
                        sums[labels] = sample.value
                    elif spec.kind == "histogram" and sample.name == base + "_count":
                        values = self._sorted_recent(recent.get(key, []))
                        histograms[key] = HistogramSnapshot(int(sample.value), 0.0, values)
            for labels, total in sums.items():
                key = (spec.name, labels)
                if key in histograms:
                    h = histograms[key]
                    histograms[key] = HistogramSnapshot(h.count, total, h.recent)
        return MetricsSnapshot(counters=counters, gauges=gauges, histograms=histograms)

    def snapshot(self) -> dict[str, float]:
        """Flat copy, labels rendered as ``name{k=v}``; for the heartbeat, summaries and tests.

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

    def _series(self, name: str, kind: Kind, labels: dict[str, str]) -> _Metric:
        """The prometheus_client object of one series; raises on an undeclared name, kind or label set."""
        if labels:
            # Hot path (per message, per batch): a labelled series is validated once, then looked up.
            cached = self._children.get((name, kind, *labels.items()))
            if cached is not None:
                return cached
        spec = _spec(name, kind)
        metric = self._metrics[name]
        if not spec.labels and not labels:
            return metric
        if set(labels) != set(spec.labels):
            raise ValueError(f"metric {name}: labels {sorted(labels)}, declared {list(spec.labels)}")
        child = metric.labels(**labels)
        self._children[(name, kind, *labels.items())] = child  # a dict assignment: safe across threads
        return child

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


def _spec(name: str, kind: Kind | None = None) -> MetricSpec:
    spec = SPECS.get(name)
    if spec is None:
        raise UnknownMetricError(name)
    if kind is not None and spec.kind != kind:
        raise TypeError(f"metric {name} is a {spec.kind}, not a {kind}")
    return spec


def _key(name: str, labels: dict[str, str]) -> Key:
    return (name, tuple(sorted((k, str(v)) for k, v in labels.items())))


def _build(spec: MetricSpec, registry: CollectorRegistry) -> _Metric:
    name = prometheus_name(spec.name)
    if spec.kind == "counter":
        return Counter(name, spec.help, spec.labels, registry=registry)
    if spec.kind == "histogram":
        return Histogram(name, spec.help, spec.labels, registry=registry, buckets=spec.buckets)
    gauge = Gauge(name, spec.help, spec.labels, registry=registry)
    if not spec.labels:
        gauge.set(spec.initial)
    return gauge
