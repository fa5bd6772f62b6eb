r"""A ``Metrics`` snapshot in the Prometheus text exposition format, version 0.0.4 (pure, no I/O).

Naming, applied to every series so that new metrics appear without registration:

- dotted snake names get the ``pdm_`` prefix and underscores: ``ingest.messages`` -> ``pdm_ingest_messages``;
  any other character that Prometheus does not allow becomes ``_``;
- units: a trailing ``_s`` becomes ``_seconds`` and ``_ms`` ``_milliseconds`` (``spool.oldest_age_s`` ->
  ``pdm_spool_oldest_age_seconds``);
- counters end in ``_total``; gauges keep the name; histograms (``Metrics.observe``) give
  ``_bucket{le=...}``, ``_sum`` and ``_count``, and their recent p50/p99 a gauge family ``<name>_recent``
  with a ``quantile`` label ("0.5", "0.99"): Prometheus computes quantiles over any range from the buckets,
  the ``_recent`` gauges are the figures the heartbeat shows;
- label names are sanitized like metric names; label values are escaped (``\\``, ``"``, line feed).

Each family has ``# HELP`` (from ``HELP`` when the name is known, else the dotted name) and ``# TYPE``.
Two dotted names that would give the same family (``a.b_c`` and ``a_b.c``, or a gauge named like a
histogram's ``_count``) are not merged: the first, in sorted order, is rendered, the other left out and
logged once. Families and samples are sorted, so that the output is stable.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Mapping

from agent.metrics import (
    QUANTILES,
    RECENT_MAX_AGE_S,
    RECENT_OBSERVATIONS,
    HistogramSnapshot,
    Labels,
    Metrics,
    MetricsSnapshot,
)

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "pdm_"

HELP: Mapping[str, str] = {
    # ingest and decoding
    "ingest.messages": "MQTT messages taken by the ingest worker.",
    "ingest.readings": "Readings decoded from accepted messages.",
    "ingest.blocks": "Sample blocks (vibration) decoded from accepted messages.",
    "ingest.samples": "Samples in the decoded blocks.",
    "ingest.backpressure_waits": "Times the MQTT thread waited on a full message queue (backpressure).",
    "decode.errors": "Rejected messages, by reason (each one also goes to the dead-letter topic).",
    # spool
    "spool.appended": "Points stored durably in the local spool (readings, features, scores, alerts, self-metrics).",
    "spool.acked": "Spooled points delivered to InfluxDB and removed from the spool.",
    "spool.dropped": "Points dropped because the spool was full, by drop policy.",
    "spool.dead_lettered": "Points InfluxDB rejected, moved to the spool's dead-letter table.",
    "spool.dead_letter_trimmed": "Oldest dead letters removed because the dead-letter table was full.",
    "spool.append_failures": "Spool appends that failed (the MQTT messages were not acknowledged).",
    "spool.depth": "Points waiting in the spool for InfluxDB.",
    "spool.oldest_age_s": "Age of the oldest point waiting in the spool (0 when it is empty).",
    # InfluxDB writer
    "storage.points_written": "Points InfluxDB confirmed.",
    "storage.write_failures": "Failed InfluxDB writes, by kind (retryable, rejected, config).",
    "storage.writer_errors": "Unexpected errors of the InfluxDB writer thread.",
    "storage.backoff_s": "Current backoff of the InfluxDB writer (0 when writes succeed).",
    "storage.write_seconds": "Duration of successful InfluxDB writes (one batch each).",
    "storage.unencodable": "Records that could not be encoded as line protocol, by kind.",
    # MQTT
    "mqtt.connected": "1 while connected to the MQTT broker.",
    "mqtt.messages": "MQTT messages received.",
    "mqtt.connects": "Successful connections to the broker.",
    "mqtt.disconnects": "Lost connections to the broker, by reason.",
    "mqtt.connect_failures": "Failed connection attempts, by reason.",
    "mqtt.acks": "QoS 1 messages acknowledged after their readings were stored.",
    "mqtt.acks_stale": "Acknowledgements skipped because the message came on an earlier connection.",
    "mqtt.published": "Messages published (status, heartbeat, alerts, dead letters).",
    "mqtt.publish_errors": "Failed publishes, by reason.",
    "mqtt.watchdog_reconnects": "Reconnects forced by the silence watchdog.",
    # windows, inference, alerts
    "windows.emitted": "Windows cut from the streams.",
    "windows.queued": "Windows queued for scoring.",
    "windows.dropped": "Windows dropped before scoring, by reason.",
    "windows.scored": "Windows scored, by model.",
    "windows.rejected": "Windows not scored, by reason.",
    "inference.runs": "Model runs (one per batch), by model.",
    "inference.seconds": "Duration of one model run on a batch of windows, by model.",
    "inference.window_seconds": "Model run duration divided by the batch size: the cost of one window, by model.",
    "alerts.published": "Alert events published, by state.",
    "models.loaded": "1 for each loaded model, with its version.",
    "pipeline.errors": "Unexpected errors in a pipeline worker, by worker.",
}
"""Descriptions of the known metrics; others are described by their dotted name."""

_INVALID_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_:]")
_INVALID_LABEL_CHARS = re.compile(r"[^a-zA-Z0-9_]")
_LE = frozenset({"le"})
_UNITS = (("_s", "_seconds"), ("_ms", "_milliseconds"))


def metric_name(dotted: str) -> str:
    """The Prometheus base name of a dotted metric name (without the counter's ``_total``).

    >>> metric_name("spool.oldest_age_s"), metric_name("decode.errors"), metric_name("9lives-x")
    ('pdm_spool_oldest_age_seconds', 'pdm_decode_errors', 'pdm_9lives_x')
    """
    name = PREFIX + _INVALID_NAME_CHARS.sub("_", dotted.replace(".", "_"))
    for short, long in _UNITS:
        if name.endswith(short):
            return name[: -len(short)] + long
    return name


def label_name(name: str) -> str:
    """A valid label name: invalid characters become ``_``, a leading digit or ``__`` gets a prefix.

    >>> label_name("model"), label_name("kind-of"), label_name("1st"), label_name("__x")
    ('model', 'kind_of', '_1st', 'label__x')
    """
    name = _INVALID_LABEL_CHARS.sub("_", name) or "_"
    if name[0].isdigit():
        name = "_" + name
    if name.startswith("__"):  # reserved for Prometheus itself
        name = "label" + name
    return name


def escape_label_value(value: str) -> str:
    r"""Escape a label value for the text format: backslash, double quote and line feed.

    >>> escape_label_value('a"b\\c\nd')
    'a\\"b\\\\c\\nd'
    """
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    r"""Escape a HELP text: backslash and line feed.

    >>> escape_help("a\\b\nc")
    'a\\\\b\\nc'
    """
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value (or ``le`` bound): integers without a decimal point, ``NaN``, ``+Inf``, ``-Inf``.

    >>> [format_value(v) for v in (3, 2.0, 0.25, 1e-05, float("inf"), float("-inf"), float("nan"))]
    ['3', '2', '0.25', '1e-05', '+Inf', '-Inf', 'NaN']
    """
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def _labels(labels: Labels, extra: tuple[tuple[str, str], ...] = (), reserved: frozenset[str] = frozenset()) -> str:
    """``{k="v",...}``; a label named like one the format adds (``le``, ``quantile``) gets ``exported_``."""
    reserved = reserved | {k for k, _ in extra}
    pairs = []
    for k, v in labels:
        name = label_name(k)
        pairs.append((f"exported_{name}" if name in reserved else name, v))
    pairs.extend(extra)
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{escape_label_value(v)}"' for k, v in pairs) + "}"


class _Families:
    """Families by name, refusing a second dotted name (or kind) for a name already taken."""

    def __init__(self) -> None:
        self.lines: dict[str, tuple[str, str, list[str]]] = {}  # family -> (type, help, sample lines)
        self._owner: dict[str, tuple[str, str]] = {}  # every sample name -> (dotted name, kind) that owns it
        self._warned: set[tuple[str, str]] = set()

    def claim(self, family: str, samples: tuple[str, ...], dotted: str, kind: str) -> bool:
        owner = (dotted, kind)
        clashes = {self._owner[s] for s in samples if s in self._owner} - {owner}
        if clashes:
            other = next(iter(clashes))
            if (dotted, other[0]) not in self._warned:
                self._warned.add((dotted, other[0]))
                logger.warning(
                    "metric %s (%s) is not exported: its Prometheus name %s is taken by %s (%s)",
                    dotted,
                    kind,
                    family,
                    other[0],
                    other[1],
                )
            return False
        for s in samples:
            self._owner[s] = owner
        return True

    def add(self, family: str, kind: str, help_text: str, samples: list[str]) -> None:
        if family not in self.lines:
            self.lines[family] = (kind, escape_help(help_text), [])
        self.lines[family][2].extend(samples)


def render(snapshot: MetricsSnapshot) -> str:
    """The exposition text of a snapshot, ending with a line feed (empty string without any series)."""
    families = _Families()
    for (dotted, labels), value in sorted(snapshot.counters.items()):
        base = metric_name(dotted)
        family = base if base.endswith("_total") else base + "_total"
        if families.claim(family, (family,), dotted, "counter"):
            families.add(family, "counter", _help(dotted), [f"{family}{_labels(labels)} {format_value(value)}"])
    for (dotted, labels), value in sorted(snapshot.gauges.items()):
        family = metric_name(dotted)
        if families.claim(family, (family,), dotted, "gauge"):
            families.add(family, "gauge", _help(dotted), [f"{family}{_labels(labels)} {format_value(value)}"])
    for (dotted, labels), histogram in sorted(snapshot.histograms.items()):
        family = metric_name(dotted)
        samples = (f"{family}_bucket", f"{family}_sum", f"{family}_count")
        if families.claim(family, (family, *samples), dotted, "histogram"):
            families.add(family, "histogram", _help(dotted), list(_histogram_lines(family, labels, histogram)))
        recent = f"{family}_recent"
        quantiles = [(q, histogram.quantile(q)) for _, q in QUANTILES]
        lines = [
            f"{recent}{_labels(labels, (('quantile', format_value(q)),))} {format_value(v)}"
            for q, v in quantiles
            if v is not None
        ]
        if lines and families.claim(recent, (recent,), dotted, "recent quantiles"):
            help_text = f"{_help(dotted)} Quantiles of the last {RECENT_OBSERVATIONS} observations"
            families.add(recent, "gauge", f"{help_text} of the last {RECENT_MAX_AGE_S:g} s.", lines)
    out: list[str] = []
    for family in sorted(families.lines):
        kind, help_text, sample_lines = families.lines[family]
        out.append(f"# HELP {family} {help_text}")
        out.append(f"# TYPE {family} {kind}")
        out.extend(sample_lines)
    return "\n".join(out) + "\n" if out else ""


def _help(dotted: str) -> str:
    return HELP.get(dotted, f"pdm-agent metric {dotted}.")


def _histogram_lines(family: str, labels: Labels, histogram: HistogramSnapshot) -> Iterator[str]:
    for bound, cumulative in zip(histogram.bounds, histogram.cumulative, strict=True):
        yield f"{family}_bucket{_labels(labels, (('le', format_value(bound)),))} {cumulative}"
    yield f"{family}_bucket{_labels(labels, (('le', '+Inf'),))} {histogram.count}"
    # The same (renamed) labels as the buckets, so that _sum and _count belong to the same series.
    yield f"{family}_sum{_labels(labels, reserved=_LE)} {format_value(histogram.sum)}"
    yield f"{family}_count{_labels(labels, reserved=_LE)} {histogram.count}"


def render_metrics(metrics: Metrics) -> str:
    """``render(metrics.collect())``."""
    return render(metrics.collect())
