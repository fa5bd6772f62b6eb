import json
from itertools import count
from pathlib import Path

import jsonschema
import pytest

from agent.alerts.payload import alert_payload
from agent.alerts.policy import ThresholdAlertPolicy
from agent.records import Score, Source

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "agent/schemas/alert.schema.json").read_text())
SRC = Source.of(site="s1", line="l1", machine="m01", sensor="vibration")


def _score(value: float, i: int, source: Source = SRC) -> Score:
    return Score(source, i * 10**9, i * 10**9 + 5 * 10**8, "vib", "1.0.0", value, threshold=1.0)


def _run(policy: ThresholdAlertPolicy, values: list[float], source: Source = SRC):
    return [(i, a) for i, v in enumerate(values) if (a := policy.update(_score(v, i, source), i)) is not None]


def _policy(raise_after: int = 2, clear_after: int = 3) -> ThresholdAlertPolicy:
    ids = count(1)
    return ThresholdAlertPolicy(raise_after, clear_after, new_event_id=lambda: f"event-{next(ids):04d}")


def test_alert_is_raised_after_consecutive_anomalous_windows_only():
    events = _run(_policy(), [0.5, 2.0, 0.5, 2.0, 2.0, 3.0])
    assert [(i, a.state) for i, a in events] == [(4, "raised")]
    alert = events[0][1]
    assert alert.details["first_detected_ns"] == 3 * 10**9
    assert alert.details["event_id"] == "event-0001"


def test_alert_clears_after_consecutive_normal_windows_with_the_same_event_id():
    events = _run(_policy(), [2.0, 2.0, 0.1, 2.0, 0.1, 0.1, 0.1, 0.1])
    assert [(i, a.state) for i, a in events] == [(1, "raised"), (6, "cleared")]
    assert events[0][1].details["event_id"] == events[1][1].details["event_id"]


def test_a_new_episode_gets_a_new_event_id():
    events = _run(_policy(raise_after=1, clear_after=1), [2.0, 0.1, 2.0])
    assert [a.details["event_id"] for _, a in events] == ["event-0001", "event-0001", "event-0002"]


def test_sources_are_tracked_independently():
    policy = _policy(raise_after=2)
    other = Source.of(site="s1", line="l1", machine="m02", sensor="vibration")
    assert policy.update(_score(2.0, 0), 0) is None
    assert policy.update(_score(2.0, 0, other), 0) is None
    assert policy.update(_score(2.0, 1), 1) is not None
    assert set(policy.open_alerts()) == {(SRC, "vib")}


def test_invalid_debounce_is_refused():
    with pytest.raises(ValueError):
        ThresholdAlertPolicy(0, 1)


def test_alert_payload_follows_the_published_schema():
    events = _run(_policy(raise_after=1, clear_after=1), [2.5, 0.2])
    for _, alert in events:
        body = json.loads(alert_payload(alert, "edge-01"))
        jsonschema.validate(body, SCHEMA)
        assert body["machine"] == "m01"
        assert body["model"] == {"id": "vib", "version": "1.0.0"}
    broken = json.loads(alert_payload(events[0][1], "edge-01"))
    del broken["threshold"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)
