"""The InfluxDB schema: every measurement, tag and field name the agent writes.

The writer, the dashboards and their tests import these names; nothing else spells them.
Timestamps are written with nanosecond precision. Source tags are the names in braces of the topic
template (for the default template: ``site``, ``line``, ``machine``, ``sensor``).
"""

from __future__ import annotations

from typing import Final

# Process readings: one point per reading, one field per named value (a scalar reading: ``value``).
READING: Final = "reading"

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

# Alert events: one point per raised/cleared event.
ALERT: Final = "alert"
ALERT_STATE_TAG: Final = "state"
ALERT_SCORE_FIELD: Final = "score"
ALERT_THRESHOLD_FIELD: Final = "threshold"
ALERT_EVENT_FIELD: Final = "event_id"

# Tags added to features, scores and alerts.
TAG_MODEL_ID: Final = "model_id"
TAG_MODEL_VERSION: Final = "model_version"

# Agent self-metrics (heartbeat): one point per heartbeat, one field per counter.
AGENT: Final = "agent"
TAG_AGENT_ID: Final = "agent_id"
