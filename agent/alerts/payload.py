"""The alert JSON payload (schema ``agent/schemas/alert.schema.json``, version ``ALERT_SCHEMA_VERSION``)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from agent.records import Alert

ALERT_SCHEMA_VERSION = 1


def rfc3339(time_ns: int) -> str:
    """Nanoseconds since the epoch as an RFC 3339 UTC string with microseconds.

    >>> rfc3339(1_700_000_000_123_456_789)
    '2023-11-14T22:13:20.123456Z'
    """
    dt = datetime.fromtimestamp(time_ns // 1000 / 1e6, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def alert_payload(alert: Alert, agent_id: str) -> bytes:
    """Serialize an alert for the MQTT alerts topic."""
    details = alert.details
    body = {
        "schema_version": ALERT_SCHEMA_VERSION,
        "event_id": details["event_id"],
        "state": alert.state,
        "agent_id": agent_id,
        "tags": alert.source.as_dict(),
        "machine": alert.source.machine,
        "sensor": alert.source.sensor,
        "score": alert.score,
        "threshold": alert.threshold,
        "peak_score": details.get("peak_score", alert.score),
        "model": {"id": alert.model_id, "version": alert.model_version},
        "window": {"start": rfc3339(alert.window_start_ns), "end": rfc3339(alert.window_end_ns)},
        "first_detected": rfc3339(int(details.get("first_detected_ns", alert.window_start_ns))),  # type: ignore[call-overload]
        "time": rfc3339(alert.time_ns),
    }
    if "defect" in details:
        body["defect"] = details["defect"]
    return json.dumps(body, separators=(",", ":")).encode()
