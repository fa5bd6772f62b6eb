"""The InfluxDB schema: every measurement, tag and field name the agent writes.

The writer, the dashboards and their tests import these names; nothing else spells them.
Timestamps are written with nanosecond precision. Source tags are the names in braces of the topic
template (for the default template: ``site``, ``line``, ``machine``, ``sensor``).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Final

# Process readings: one point per reading, one field per named value (a scalar reading: ``value``).
READING: Final = "reading"
READING_SEQ_FIELD: Final = "seq"  # the publisher's sequence number (integer), when the payload has one

# Raw vibration samples (stored according to ``storage.raw_vibration``): one point per sample.
VIBRATION: Final = "vibration"
VIBRATION_FIELD: Final = "value"
TAG_CHANNEL: Final = "channel"

# Feature vectors: one point per scored window, one field per feature name of the model's spec.
FEATURES: Final = "features"

# Scores: one point per scored window, at the window's end time.
SCORE: Final = "anomaly_score"
SCORE_FIELD: Final = "score"
THRESHOLD_FIELD: Final = "threshold"
ANOMALOUS_FIELD: Final = "anomalous"
WINDOW_START_FIELD: Final = "window_start_ns"

# Defect classification of anomalous vibration windows: one point per classified window, at its end.
DEFECT: Final = "defect"
DEFECT_CLASS_TAG: Final = "defect"
DEFECT_PROBABILITY_FIELD: Final = "probability"
DEFECT_PROBABILITY_PREFIX: Final = "p_"  # one field per class: p_normal, p_inner_race, ...

# Camera images: one ``image`` point per accepted image at its time, written with the message's
# acknowledgement (the reference: the bytes are in the image store, ``agent/images/store.py``), and one
# ``inspection`` point per classified image (class as a tag, its probability and one per class).
IMAGE: Final = "image"
IMAGE_SHA256_FIELD: Final = "sha256"
IMAGE_FORMAT_FIELD: Final = "format"
IMAGE_WIDTH_FIELD: Final = "width"
IMAGE_HEIGHT_FIELD: Final = "height"
IMAGE_BYTES_FIELD: Final = "bytes"
IMAGE_STORED_FIELD: Final = "stored"  # false: the store could not keep it (disk full) or it exceeded the cap
IMAGE_METADATA_PREFIX: Final = "m_"  # one string field per key of the camera's metadata
INSPECTION: Final = "inspection"
INSPECTION_CLASS_TAG: Final = "class"
INSPECTION_DEFECT_FIELD: Final = "defect"  # true when the class is a defect class at camera.min_confidence

# Alert events: one point per published lifecycle message (new, update, clear), at the decision time.
# Tags: the source tags, model tags, ``state``, ``alert_type`` and ``severity``.
ALERT: Final = "alert"
ALERT_STATE_TAG: Final = "state"  # new | update | clear
ALERT_TYPE_TAG: Final = "alert_type"
ALERT_SEVERITY_TAG: Final = "severity"  # warning | major | critical
ALERT_SCORE_FIELD: Final = "score"
ALERT_THRESHOLD_FIELD: Final = "threshold"
ALERT_EVENT_FIELD: Final = "event_id"
ALERT_SEQ_FIELD: Final = "seq"  # 1 for ``new``, +1 for each message of the event
ALERT_ACTIVE_FIELD: Final = "active"  # 1 while the event is open (new/update), 0 on clear
ALERT_DEFECT_FIELD: Final = "defect"  # defect class (string), when classified
ALERT_ACKED_FIELD: Final = "acknowledged"  # 1 once an operator acknowledged the event
ALERT_SILENCED_FIELD: Final = "silenced"  # 1 while a silence covers it (not published on MQTT then)
ALERT_FLAPPING_FIELD: Final = "flapping"  # 1 while flapping suppression holds the event open

# Operator commands on the command topic (acknowledge, silence, unsilence), accepted or rejected.
ALERT_COMMAND: Final = "alert_command"
COMMAND_TAG: Final = "command"
COMMAND_RESULT_TAG: Final = "result"  # accepted | rejected
COMMAND_BY_FIELD: Final = "by"
COMMAND_DETAIL_FIELD: Final = "detail"

# Tags added to features, scores and alerts.
TAG_MODEL_ID: Final = "model_id"
TAG_MODEL_VERSION: Final = "model_version"
TAG_ADAPTER: Final = "adapter"  # scores of a machine with a LoRA adapter: which one (machine@sha256 prefix)

# Agent self-metrics (heartbeat): one point per heartbeat, one field per counter.
AGENT: Final = "agent"
TAG_AGENT_ID: Final = "agent_id"
# The fields the dashboards read, named as ``agent/health/selfmetrics.py`` renders the metrics: dotted names
# in snake_case, a counter also as the sum over its labels (``decode_errors``), a histogram as its recent
# quantiles (``storage_write_seconds_p99``). Counter totals and unlabelled gauges exist from the first
# heartbeat (``agent.metric_catalog.CATALOG`` declares them); a labelled series once counted or set.
AGENT_FIELDS: Final = (
    "ingest_messages",
    "ingest_readings",
    "ingest_samples",
    "windows_scored",
    "storage_points_written",
    "spool_depth",
    "spool_oldest_age_s",
    "spool_appended",
    "spool_acked",
    "spool_dropped",
    "spool_dead_lettered",
    "storage_backoff_s",
    "mqtt_connected",
    "alerts_published",
    "alerts_silenced",
    "storage_write_seconds_p50",
    "storage_write_seconds_p99",
    # errors
    "decode_errors",
    "storage_write_failures",
    "storage_writer_errors",
    "storage_unencodable",
    "spool_append_failures",
    "pipeline_errors",
    "mqtt_publish_errors",
    "mqtt_callback_errors",
    "windows_dropped",
    "windows_rejected",
    "alerts_state_errors",
)
# Per-label families the dashboards read by prefix: ``inference_seconds_p99_model_vibration_anomaly``.
AGENT_FIELD_PREFIXES: Final = ("inference_seconds_p50_", "inference_seconds_p99_")

# Every measurement: the tags it adds to the source tags (``reading`` ... ``defect``; ``alert_command`` and
# ``agent`` have none of those) and its fields, a name ending in ``*`` standing for fields named by the data
# (a reading's values, a model's features, one probability per class). The README's schema table is checked
# against it (``tests/unit/test_schema_docs.py``).
MEASUREMENTS: Final[dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    READING: ((), ("*", READING_SEQ_FIELD)),
    VIBRATION: ((TAG_CHANNEL,), (VIBRATION_FIELD,)),
    FEATURES: ((TAG_MODEL_ID, TAG_MODEL_VERSION), ("*",)),
    SCORE: (
        (TAG_MODEL_ID, TAG_MODEL_VERSION, TAG_ADAPTER),
        (SCORE_FIELD, THRESHOLD_FIELD, ANOMALOUS_FIELD, WINDOW_START_FIELD),
    ),
    DEFECT: (
        (TAG_MODEL_ID, TAG_MODEL_VERSION, DEFECT_CLASS_TAG),
        (DEFECT_PROBABILITY_FIELD, f"{DEFECT_PROBABILITY_PREFIX}*"),
    ),
    IMAGE: (
        (),
        (
            IMAGE_SHA256_FIELD,
            IMAGE_FORMAT_FIELD,
            IMAGE_WIDTH_FIELD,
            IMAGE_HEIGHT_FIELD,
            IMAGE_BYTES_FIELD,
            IMAGE_STORED_FIELD,
            f"{IMAGE_METADATA_PREFIX}*",
        ),
    ),
    INSPECTION: (
        (TAG_MODEL_ID, TAG_MODEL_VERSION, INSPECTION_CLASS_TAG),
        (
            DEFECT_PROBABILITY_FIELD,
            f"{DEFECT_PROBABILITY_PREFIX}*",
            IMAGE_SHA256_FIELD,
            INSPECTION_DEFECT_FIELD,
        ),
    ),
    ALERT: (
        (TAG_MODEL_ID, TAG_MODEL_VERSION, ALERT_STATE_TAG, ALERT_TYPE_TAG, ALERT_SEVERITY_TAG),
        (
            ALERT_SCORE_FIELD,
            ALERT_THRESHOLD_FIELD,
            ALERT_EVENT_FIELD,
            ALERT_SEQ_FIELD,
            ALERT_ACTIVE_FIELD,
            ALERT_DEFECT_FIELD,
            ALERT_ACKED_FIELD,
            ALERT_SILENCED_FIELD,
            ALERT_FLAPPING_FIELD,
        ),
    ),
    ALERT_COMMAND: ((COMMAND_TAG, COMMAND_RESULT_TAG, "machine"), (COMMAND_BY_FIELD, COMMAND_DETAIL_FIELD)),
    AGENT: ((TAG_AGENT_ID,), ("*",)),
}


# --- what a name can be --------------------------------------------------------------------------------

_LINE_BREAK: Final = re.compile(r"[\n\r]")
# Line protocol escapes ',', '=' and ' ' with a backslash but never escapes a backslash: one written before
# them (or at the end, before the separator) turns the escape around, and InfluxDB refuses the whole
# batch (`unable to parse ... invalid field format`, measured with InfluxDB 1.6.7).
_BACKSLASH_ESCAPE: Final = re.compile(r"\\(?:[ ,=]|$)")
_SURROGATE: Final = re.compile("[\ud800-\udfff]")


@lru_cache(maxsize=8192)  # topic levels and field names repeat with every message
def name_problem(name: str) -> str | None:
    r"""Why ``name`` cannot be a measurement, tag key, tag value or field key in InfluxDB, or ``None``.

    The one rule that the decoder (which refuses such input with a reason) and the line-protocol encoder
    (which must never meet it) share, so that nothing is accepted that cannot be stored.

    >>> [name_problem(n) for n in ("press-7", "a b,c=d", "a\\b")]
    [None, None, None]
    >>> name_problem("")
    'is empty'
    >>> name_problem("x\\")
    'ends with a backslash'
    >>> name_problem("a\\,b")
    "has a backslash before ',' (line protocol cannot carry it)"
    """
    if not name:
        return "is empty"
    if _LINE_BREAK.search(name):
        return "contains a line break"
    if _SURROGATE.search(name):
        return "is not valid Unicode (a lone surrogate)"
    bad = _BACKSLASH_ESCAPE.search(name)
    if bad is not None:
        after = bad.group()[1:]
        return (
            "ends with a backslash"
            if not after
            else f"has a backslash before {after!r} (line protocol cannot carry it)"
        )
    return None
