"""The alert JSON payload (schema ``agent/schemas/alert.schema.json``, version ``ALERT_SCHEMA_VERSION``).

Version 4 adds ``image`` (a camera image's sha256, format, size and the URL to fetch it, on alerts of camera
images); version 3 carries its version as ``"v"``, like every other payload of the agent; version 2 called the
same key ``schema_version`` and was otherwise identical (docs/contracts.md, "Payload versions")."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from agent.records import Alert
from agent.topics import format_rfc3339

ALERT_SCHEMA_VERSION = 4
IMAGE_KEY = "image"
"""The key under which the alert engine keeps a camera image's reference with the event's verdict
(``Alert.defect``); the payload shows it as its own ``image`` object."""


def alert_body(alert: Alert, agent_id: str) -> dict[str, Any]:
    """The payload of one lifecycle message as a JSON-able dict."""
    body: dict[str, Any] = {
        "v": ALERT_SCHEMA_VERSION,
        "event_id": alert.event_id,
        "seq": alert.seq,
        "state": alert.state,
        "reason": alert.reason,
        "agent_id": agent_id,
        "alert_type": alert.alert_type,
        "severity": alert.severity,
        "tags": alert.source.as_dict(),
        "machine": alert.source.machine,
        "sensor": alert.source.sensor,
        "score": alert.score,
        "threshold": alert.threshold,
        "peak_score": alert.peak_score,
        "model": {"id": alert.model_id, "version": alert.model_version, "adapter": alert.adapter},
        "window": {"start": format_rfc3339(alert.window_start_ns), "end": format_rfc3339(alert.window_end_ns)},
        "first_detected": format_rfc3339(alert.first_detected_ns),
        "time": format_rfc3339(alert.time_ns),
        "acknowledged_by": alert.acknowledged_by,
        "flapping": alert.flapping,
        "top_features": [{"name": n, "contribution": c} for n, c in alert.top_features],
    }
    if alert.defect is not None:
        defect = dict(alert.defect)
        image = defect.pop(IMAGE_KEY, None)
        body["defect"] = defect
        if isinstance(image, Mapping):
            body[IMAGE_KEY] = dict(image)
    return body


def alert_payload(alert: Alert, agent_id: str) -> bytes:
    """Serialize an alert for the MQTT alerts topic."""
    return _dump(alert_body(alert, agent_id))


def machine_state_payload(state: Mapping[str, Any], agent_id: str, time_ns: int) -> bytes:
    """The retained ``{base}/state/{machine}`` payload from ``AlertEngine.machine_state``."""
    body = {
        "v": 1,
        "agent_id": agent_id,
        "machine": state["machine"],
        "state": state["state"],
        "open_alerts": [
            {**{k: v for k, v in a.items() if k != "since_ns"}, "since": format_rfc3339(a["since_ns"])}
            for a in state["open_alerts"]
        ],
        "silences": [
            {**{k: v for k, v in s.items() if k != "until_ns"}, "until": format_rfc3339(s["until_ns"])}
            for s in state["silences"]
        ],
        "time": format_rfc3339(time_ns),
    }
    return _dump(body)


def _dump(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
