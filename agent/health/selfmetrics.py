"""The agent's self-metrics as fields of its ``agent`` point in InfluxDB (pure: a snapshot in, fields out).

Field names are snake_case so that InfluxQL reads them without quotes (``SELECT ingest_messages FROM
agent``); units stay as in the dotted names (``spool_oldest_age_s``):

- a counter ``decode.errors`` -> ``decode_errors`` (the sum over its labels, 0 before the first count, so
  that every counter of ``agent.metric_catalog.CATALOG`` is a field from the first heartbeat) and, per label set,
  ``decode_errors_reason_bad_json`` (label name and value appended, each sanitized);
- a gauge ``spool.depth`` -> ``spool_depth``; with labels, one field per label set only (a sum of
  gauges means nothing in general);
- a histogram ``inference.seconds{model=m}`` -> ``inference_seconds_p50_model_m``,
  ``inference_seconds_p99_model_m`` (recent quantiles, absent without a recent observation) and
  ``inference_seconds_count_model_m`` (all observations since the start).

Every value is a float (a field keeps one type across points); non-finite values are left out (line
protocol cannot carry them). When two series would give the same field name, the first one wins (counters
before gauges before histograms, each in sorted order).
"""

from __future__ import annotations

import math
import re

from agent.metrics import CATALOG, QUANTILES, Labels, MetricsSnapshot

_INVALID = re.compile(r"[^A-Za-z0-9_]+")


def field_name(name: str, labels: Labels = ()) -> str:
    """The field name of one series.

    >>> field_name("decode.errors", (("reason", "bad json"),)), field_name("models.loaded", (("version", "1.0.0"),))
    ('decode_errors_reason_bad_json', 'models_loaded_version_1_0_0')
    """
    parts = [name, *(f"{k}_{v}" for k, v in labels)]
    return "_".join(_INVALID.sub("_", p).strip("_") for p in parts)


def series_field(key: str) -> str:
    """The field of a series written ``name{label=value,...}`` (``Metrics.snapshot``'s keys, the stop line's
    summary, heartbeat version 1's ``counters``): where that value is in the heartbeat's ``fields`` and the
    ``agent`` point. Unlabelled, a counter's field is its sum over every label set.

    >>> series_field("decode.errors{reason=bad json}"), series_field("decode.errors"), series_field("spool.depth")
    ('decode_errors_reason_bad_json', 'decode_errors', 'spool_depth')
    >>> series_field("inference.seconds.p99{model=vibration-anomaly}")
    'inference_seconds_p99_model_vibration_anomaly'
    """
    name, _, rest = key.partition("{")
    labels = (
        tuple((k, v) for k, _, v in (part.partition("=") for part in rest.removesuffix("}").split(","))) if rest else ()
    )
    return field_name(name, labels)


def agent_fields(snapshot: MetricsSnapshot) -> dict[str, float]:
    """The fields of one ``agent`` point: every counter, gauge and histogram of ``snapshot`` (see above)."""
    fields: dict[str, float] = {}

    def put(name: str, value: float) -> None:
        if math.isfinite(value):
            fields.setdefault(name, float(value))

    totals = {spec.name: 0.0 for spec in CATALOG if spec.kind == "counter"}
    for (name, labels), value in sorted(snapshot.counters.items()):
        totals[name] += value
        if labels:
            put(field_name(name, labels), value)
    for name, total in totals.items():
        put(field_name(name), total)
    for (name, labels), value in sorted(snapshot.gauges.items()):
        put(field_name(name, labels), value)
    for (name, labels), histogram in sorted(snapshot.histograms.items()):
        for suffix, q in QUANTILES:
            p = histogram.quantile(q)
            if p is not None:
                put(field_name(f"{name}.{suffix}", labels), p)
        put(field_name(f"{name}.count", labels), histogram.count)
    return dict(sorted(fields.items()))
