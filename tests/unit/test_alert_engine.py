"""The alert engine's lifecycle rules, operator commands and persistence (pure logic, simulated time)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import jsonschema
import pytest

from agent.alerts.engine import AlertEngine, CommandError, SilenceLimits
from agent.alerts.payload import alert_body, machine_state_payload
from agent.alerts.rules import AlertRule, RuleBook
from agent.alerts.store import AlertStateStore
from agent.metrics import Metrics
from agent.records import Alert, Score, Source

S = 10**9
T0 = 1_790_000_000 * S
SRC = Source.of(site="s1", line="l1", machine="m01", sensor="vibration")
OTHER = Source.of(site="s1", line="l1", machine="m02", sensor="vibration")
SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "agent/schemas/alert.schema.json").read_text())
DEFECT = {"defect": "outer_race", "probability": 0.9, "probabilities": {"normal": 0.1, "outer_race": 0.9}}


class Clock:
    """One window per second per source, the decision right at its end."""

    def __init__(self, engine: AlertEngine) -> None:
        self.engine = engine
        self.t = 0
        self.out: list[Alert] = []

    def feed(self, ratios: list[float], source: Source = SRC, **kwargs: object) -> list[Alert]:
        new: list[Alert] = []
        for r in ratios:
            score = Score(source, T0 + self.t * S, T0 + (self.t + 1) * S, "vib", "1.0.0", r * 2.0, 2.0)
            new += self.engine.observe(score, T0 + (self.t + 1) * S, **kwargs)  # type: ignore[arg-type]
            new += self.engine.tick(T0 + (self.t + 1) * S)
            self.t += 1
        self.out += new
        return new

    def wait(self, seconds: int) -> list[Alert]:
        self.t += seconds
        new = self.engine.tick(T0 + self.t * S)
        self.out += new
        return new


def _engine(metrics: Metrics | None = None, **rule: float) -> AlertEngine:
    ids = itertools.count(1)
    defaults: dict[str, float] = {"raise_n": 2, "raise_m": 3, "clear_after": 3, "cooldown_s": 0, "renotify_s": 0}
    return AlertEngine(
        RuleBook(AlertRule(**{**defaults, **rule})),  # type: ignore[arg-type]
        new_event_id=lambda: f"event-{next(ids):04d}",
        metrics=metrics,
    )


def states(alerts: list[Alert]) -> list[tuple[str, str]]:
    return [(a.state, a.reason) for a in alerts]


def test_n_of_m_debounce_raises_on_the_second_hot_window_of_three():
    c = Clock(_engine())
    assert c.feed([2.0, 0.5, 0.5, 2.0, 0.5]) == []  # hot windows too far apart
    new = c.feed([2.0])
    assert states(new) == [("new", "raised")]
    assert new[0].first_detected_ns == T0 + 3 * S  # start of the first hot window among the last three
    assert (new[0].seq, new[0].event_id, new[0].severity) == (1, "event-0001", "major")


def test_hysteresis_band_neither_raises_nor_clears():
    c = Clock(_engine(exit=0.8))
    c.feed([2.0, 2.0])
    # 0.9 x threshold: below the enter level but above exit; never counts as cool.
    assert c.feed([0.9] * 20) == []
    assert states(c.feed([0.5, 0.5, 0.5])) == [("clear", "recovered")]
    # And a band window resets the count of cool ones.
    c.feed([2.0, 2.0])
    assert c.feed([0.5, 0.5, 0.9, 0.5, 0.5]) == []
    assert states(c.feed([0.5])) == [("clear", "recovered")]


def test_min_duration_holds_the_raise_until_the_hot_run_is_long_enough():
    c = Clock(_engine(raise_n=1, raise_m=1, min_duration_s=5))
    assert c.feed([2.0] * 4) == []
    assert states(c.feed([2.0])) == [("new", "raised")]


def test_cooldown_suppresses_a_new_event_right_after_a_clear_and_counts_it():
    metrics = Metrics()
    c = Clock(_engine(metrics, cooldown_s=30))
    c.feed([2.0, 2.0, 0.1, 0.1, 0.1])
    assert states(c.out) == [("new", "raised"), ("clear", "recovered")]
    assert c.feed([2.0] * 10) == []
    assert metrics.get("alerts.suppressed", reason="cooldown", alert_type="vib") > 0
    c.feed([2.0] * 20)
    assert states(c.out)[-1] == ("new", "raised")
    assert c.out[-1].event_id == "event-0002"


def test_updates_on_severity_and_defect_changes_with_a_minimum_interval():
    c = Clock(_engine(update_min_interval_s=10))
    c.feed([1.2, 1.2])
    assert c.out[-1].severity == "warning"
    assert c.feed([5.0] * 5) == []  # critical, but within 10 s of the new
    new = c.feed([5.0] * 10)
    assert states(new) == [("update", "severity")]
    assert new[0].severity == "critical" and new[0].seq == 2
    new = c.feed([5.0] * 12, defect=DEFECT)
    assert states(new) == [("update", "defect")]
    assert new[0].defect == DEFECT
    # The same class again is not material.
    assert c.feed([5.0] * 12, defect=DEFECT) == []
    assert max(a.peak_score for a in c.out) == 10.0


def test_renotify_repeats_an_unacknowledged_event_and_ack_stops_it():
    c = Clock(_engine(renotify_s=60))
    c.feed([2.0, 2.0])
    c.feed([2.0] * 59)
    assert states(c.out) == [("new", "raised")]
    c.feed([2.0])
    assert states(c.out)[-1] == ("update", "renotify")
    outcome = c.engine.command({"command": "ack", "event_id": "event-0001", "by": "maria"}, T0 + c.t * S)
    assert states(list(outcome.alerts)) == [("update", "acknowledged")]
    assert outcome.alerts[0].acknowledged_by == "maria"
    assert c.feed([2.0] * 200) == []
    assert c.feed([0.1] * 3)[0].acknowledged_by == "maria"


def test_silence_withholds_messages_and_releases_an_open_event_when_it_ends():
    c = Clock(_engine())
    c.engine.machines.add("m01")  # scored before (only known machines may be silenced)
    c.engine.command({"command": "silence", "machine": "m01", "duration_s": 30, "by": "ops"}, T0)
    new = c.feed([2.0, 2.0])
    assert states(new) == [("new", "raised")] and new[0].silenced
    c.feed([2.0] * 40)
    released = [a for a in c.out if a.reason == "unsilenced"]
    assert len(released) == 1 and not released[0].silenced and released[0].state == "new"
    # Another machine is not covered.
    assert not c.feed([2.0, 2.0], source=OTHER)[0].silenced


def test_a_clear_is_withheld_only_when_its_new_was():
    c = Clock(_engine())
    c.feed([2.0, 2.0])  # published new
    c.engine.command({"command": "silence", "machine": "m01", "duration_s": 300, "by": "ops"}, T0 + c.t * S)
    clear = c.feed([0.1] * 3)
    assert states(clear) == [("clear", "recovered")] and not clear[0].silenced
    c.feed([2.0, 2.0])  # raised during the silence: never published
    clear = c.feed([0.1] * 3)
    assert clear[0].state == "clear" and clear[0].silenced


def test_unsilence_ends_a_silence_and_unknown_ones_are_refused():
    engine = _engine()
    engine.machines.add("m01")
    engine.command({"command": "silence", "machine": "m01", "sensor": "vibration", "duration_s": 60, "by": "a"}, T0)
    with pytest.raises(CommandError, match="no_such_silence"):
        engine.command({"command": "unsilence", "machine": "m01", "by": "a"}, T0)
    outcome = engine.command({"command": "unsilence", "machine": "m01", "sensor": "vibration", "by": "a"}, T0)
    assert "1 silence" in outcome.detail


def silence(machine: str, sensor: str | None = None, duration_s: float = 60) -> dict[str, object]:
    body: dict[str, object] = {"command": "silence", "machine": machine, "duration_s": duration_s, "by": "ops"}
    if sensor is not None:
        body["sensor"] = sensor
    return body


def test_a_machine_never_scored_cannot_be_silenced_and_gets_no_retained_state():
    # Issue 22: a silence for a machine the agent had never seen was accepted (and published as its state).
    c = Clock(_engine())
    with pytest.raises(CommandError) as info:
        c.engine.command(silence("ghost"), T0)
    assert info.value.code == "unknown_machine"
    assert c.engine.changed_machines == set() and c.engine.to_state()["silences"] == []
    c.feed([0.1])
    c.engine.changed_machines.clear()
    c.engine.command(silence("m01"), T0 + c.t * S)
    assert c.engine.changed_machines == {"m01"}


def test_silences_are_bounded_in_duration_per_machine_and_in_all():
    engine = AlertEngine(
        RuleBook(AlertRule()), silence_limits=SilenceLimits(max_duration_s=3600, max_per_machine=2, max_total=3)
    )
    engine.machines.update({"m01", "m02"})
    with pytest.raises(CommandError, match="bad_value"):
        engine.command(silence("m01", duration_s=3601), T0)
    engine.command(silence("m01", "a"), T0)
    engine.command(silence("m01", "b"), T0)
    with pytest.raises(CommandError) as info:
        engine.command(silence("m01", "c"), T0)
    assert info.value.code == "too_many_silences"
    engine.command(silence("m01", "b", duration_s=600), T0)  # the same scope again: replaced, not added
    assert len(engine.to_state()["silences"]) == 2
    engine.command(silence("m02"), T0)
    with pytest.raises(CommandError, match="too_many_silences"):
        engine.command(silence("m02", "x"), T0)  # 3 in all


def test_the_machines_known_survive_a_restart_so_they_can_be_silenced_at_once():
    c = Clock(_engine())
    c.feed([0.1], source=OTHER)
    assert c.engine.dirty
    after = _engine()
    after.restore(c.engine.to_state(), T0)
    after.command(silence("m02"), T0)
    with pytest.raises(CommandError, match="unknown_machine"):
        after.command(silence("m01"), T0)


def test_flapping_holds_the_event_open_says_so_once_and_clears_when_quiet():
    metrics = Metrics()
    c = Clock(_engine(metrics, flap_window_s=100, flap_max_transitions=6))
    for _ in range(2):
        c.feed([2.0, 2.0, 0.1, 0.1, 0.1])
    assert states(c.out) == [("new", "raised"), ("clear", "recovered")] * 2
    c.feed([2.0, 2.0, 0.1, 0.1, 0.1])  # the third clear would be the 6th transition: held
    assert states(c.out)[-2:] == [("new", "raised"), ("update", "flapping")]
    assert c.out[-1].flapping and metrics.get("alerts.suppressed", reason="flapping", alert_type="vib") == 1
    for _ in range(5):
        c.feed([2.0, 2.0, 0.1, 0.1, 0.1])
    assert states(c.out)[-1] == ("update", "flapping")  # no new/clear while flapping
    c.feed([0.1] * 100)
    assert states(c.out)[-1] == ("clear", "recovered")
    assert sum(a.state == "new" for a in c.out) == 3


def test_an_event_whose_source_goes_quiet_is_cleared_as_stale():
    c = Clock(_engine(stale_after_s=120))
    c.feed([2.0, 2.0])
    assert c.wait(100) == []
    assert states(c.wait(30)) == [("clear", "no_data")]


def test_restart_continues_open_events_without_new_or_a_flood_of_clears(tmp_path: Path):
    store = AlertStateStore(tmp_path / "state" / "alerts.json")
    c = Clock(_engine(cooldown_s=600))
    c.feed([2.0, 2.0])
    c.feed([2.0, 2.0, 0.1, 0.1, 0.1], source=OTHER)  # cleared: its cooldown must survive too
    c.engine.command({"command": "ack", "event_id": "event-0001", "by": "maria"}, T0 + c.t * S)
    assert c.engine.dirty
    store.save(c.engine.to_state())
    assert not c.engine.dirty

    after = _engine(cooldown_s=600)
    assert after.restore(store.load() or {}, T0 + c.t * S) == 1
    assert after.changed_machines == {"m01"}
    d = Clock(after)
    d.t = c.t
    assert d.feed([2.0] * 5) == []  # still the same open event: no second new
    assert d.feed([2.0, 2.0], source=OTHER) == []  # cooldown of m02 continues
    clear = d.feed([0.1] * 3)
    assert states(clear) == [("clear", "recovered")]
    assert (clear[0].event_id, clear[0].acknowledged_by, clear[0].seq) == ("event-0001", "maria", 3)


def test_a_corrupt_state_file_is_moved_aside_and_ignored(tmp_path: Path):
    path = tmp_path / "alerts.json"
    path.write_text("{not json")
    assert AlertStateStore(path).load() is None
    assert (tmp_path / "alerts.json.corrupt").read_text() == "{not json"
    with pytest.raises(ValueError, match="version"):
        _engine().restore({"version": 99}, T0)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ([], "bad_command"),
        ({"command": "ack", "event_id": "x"}, "missing_field"),
        ({"command": "ack", "by": "", "event_id": "x"}, "bad_value"),
        ({"command": "reboot", "by": "a"}, "unknown_command"),
        ({"command": "ack", "by": "a", "event_id": "nope"}, "no_such_event"),
        ({"command": "silence", "by": "a", "machine": "m01", "duration_s": 0}, "bad_value"),
        ({"command": "silence", "by": "a", "machine": "m01", "duration_s": 10**7}, "bad_value"),
        ({"command": "silence", "by": "a", "duration_s": 60}, "missing_field"),
    ],
)
def test_bad_commands_are_refused_with_a_specific_code(body: object, code: str):
    with pytest.raises(CommandError) as info:
        _engine().command(body, T0)
    assert info.value.code == code


def test_machine_state_names_the_worst_open_event_and_silences():
    c = Clock(_engine())
    assert c.engine.machine_state("m01", T0)["state"] == "ok"
    c.feed([1.2, 1.2])
    c.feed([5.0, 5.0], source=Source.of(site="s1", line="l1", machine="m01", sensor="vibration_fe"))
    c.engine.command({"command": "silence", "machine": "m01", "duration_s": 60, "by": "ops"}, T0 + c.t * S)
    state = c.engine.machine_state("m01", T0 + c.t * S)
    assert state["state"] == "critical"
    assert sorted(a["severity"] for a in state["open_alerts"]) == ["critical", "warning"]
    assert all(a["silenced"] for a in state["open_alerts"])
    body = json.loads(machine_state_payload(state, "edge-01", T0 + c.t * S))
    assert body["silences"][0]["until"].endswith("Z") and body["open_alerts"][0]["since"].endswith("Z")


def test_every_message_kind_validates_against_the_alert_schema():
    c = Clock(_engine(renotify_s=30, update_min_interval_s=0, flap_window_s=1000, flap_max_transitions=4))
    c.feed([1.5, 1.5], defect=DEFECT, top_features=[("band_3", 4.0), ("rms", 1.5)])
    c.feed([5.0] * 31)
    c.engine.command({"command": "ack", "event_id": "event-0001", "by": "maria"}, T0 + c.t * S)
    c.out += c.engine.command({"command": "ack", "event_id": "event-0001", "by": "x"}, T0).alerts
    for _ in range(3):
        c.feed([2.0, 2.0, 0.1, 0.1, 0.1])
    c.feed([0.1] * 1001)
    reasons = {a.reason for a in c.out}
    assert {"raised", "renotify", "severity", "flapping", "recovered"} <= reasons
    for alert in c.out:
        body = alert_body(alert, "edge-01")
        jsonschema.validate(body, SCHEMA)
    first = alert_body(c.out[0], "edge-01")
    assert first["top_features"] == [{"name": "band_3", "contribution": 4.0}, {"name": "rms", "contribution": 1.5}]
    assert first["defect"] == DEFECT


def test_rule_validation_names_the_problem():
    with pytest.raises(ValueError, match="exit"):
        AlertRule(enter=1.0, exit=1.2)
    with pytest.raises(ValueError, match="raise_n"):
        AlertRule(raise_n=4, raise_m=3)


def test_a_cooldown_ending_on_a_cool_window_does_not_raise():
    # Hot windows seen during the cooldown used to raise a `new` on the first window after it, even a cool one.
    c = Clock(_engine(cooldown_s=60))
    c.feed([2.0, 2.0] + [0.1] * 5)  # cleared at 5 s: cooldown until 65 s
    c.feed([2.0] * 57)  # hot until 64 s, all within the cooldown
    assert states(c.out) == [("new", "raised"), ("clear", "recovered")]
    assert c.feed([0.1] * 5) == []
    new = c.feed([2.0, 2.0])
    assert states(new) == [("new", "raised")] and new[0].score == 4.0


def test_severity_escalates_on_sustained_levels_only_and_never_drops_within_an_event():
    c = Clock(_engine(update_min_interval_s=0))
    c.feed([1.2, 1.2])
    assert c.feed([9.0, 1.2, 1.2, 9.0, 1.2]) == []  # single spikes: not sustained
    up = c.feed([9.0, 9.0])
    assert states(up) == [("update", "severity")] and up[0].severity == "critical"
    assert c.feed([1.2] * 10) == []  # back to warning level: no downgrade message
    assert c.feed([0.1] * 3)[0].severity == "critical"


def test_the_defect_class_is_voted_and_normal_never_replaces_it():
    c = Clock(_engine(update_min_interval_s=600))
    normal = {"defect": "normal", "probability": 0.8, "probabilities": {"normal": 0.8, "ball": 0.2}}
    ball = {"defect": "ball", "probability": 0.7, "probabilities": {"normal": 0.3, "ball": 0.7}}
    inner = {"defect": "inner_race", "probability": 0.9, "probabilities": {"normal": 0.1, "inner_race": 0.9}}
    assert c.feed([2.0, 2.0], defect=normal)[0].defect == normal
    first = c.feed([2.0], defect=ball)  # the first class named: at once, despite the update interval
    assert states(first) == [("update", "defect")] and first[0].defect == ball
    for _ in range(10):  # a flickering verdict makes no messages
        assert c.feed([2.0], defect=normal) == [] and c.feed([2.0], defect=ball) == []
    assert c.feed([2.0] * 5, defect=inner) == []  # 5 inner_race votes against 11 ball votes
    assert c.feed([2.0] * 7, defect=inner) == []  # inner_race leads now, but the interval has not passed
    later = c.feed([2.0] * 600, defect=inner)
    assert states(later) == [("update", "defect")] and later[0].defect == inner


def test_a_source_that_stops_sending_opens_one_no_data_event_until_it_sends_again():
    c = Clock(_engine(no_data_after_s=30, stale_after_s=60))
    c.feed([0.1] * 10)
    assert c.wait(20) == []
    silent = c.wait(15)
    assert states(silent) == [("new", "silent")]
    gap = silent[0]
    assert (gap.alert_type, gap.severity, gap.threshold) == ("no_data", "major", 30.0) and gap.score >= 30
    jsonschema.validate(alert_body(gap, "edge-01"), SCHEMA)
    assert c.wait(600) == []  # one event per silence, and never cleared as stale
    assert c.engine.machine_state("m01", T0 + c.t * S)["state"] == "major"
    resumed = c.feed([0.1])
    assert states(resumed) == [("clear", "data_resumed")] and resumed[0].event_id == gap.event_id
    jsonschema.validate(alert_body(resumed[0], "edge-01"), SCHEMA)


def test_an_anomaly_event_of_a_silent_source_clears_as_stale_beside_its_no_data_event():
    c = Clock(_engine(no_data_after_s=30, stale_after_s=120))
    c.feed([2.0, 2.0])
    c.wait(130)
    assert sorted(states(c.out)) == [("clear", "no_data"), ("new", "raised"), ("new", "silent")]
