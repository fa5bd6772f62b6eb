"""The alert-quality benchmark's core runs one short fault on the real scoring path (no timing thresholds).

``benchmarks/alert_quality.py`` drives the shipped models, the defect classifier and the alert engine with
the rules of ``config/agent.yaml`` in simulated time; ``docs/alert_quality.md`` holds the full run. This
test runs a few simulated minutes of one machine whose outer-race fault starts and ends, and checks the
structure of what the engine published: one event, raised after the onset, a bounded number of updates,
a clear after the end.
"""

from pathlib import Path

import pytest

from agent.config import load_config
from benchmarks.alert_quality import DutyCycle, FaultCase, fault_scenario

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ONSET_S = 60.0
DURATION_S = 120.0
MAX_UPDATES = 10


def test_a_bearing_fault_gives_one_new_a_few_updates_and_a_clear_after_it_ends() -> None:
    config = load_config(REPO / "config" / "agent.yaml")
    case = FaultCase("bearing_outer", "bearing_outer", severity=0.5, ramp_s=10.0)
    result = fault_scenario(
        config, case, machines=1, onset_s=ONSET_S, duration_s=DURATION_S, after_end_s=90.0, duty=DutyCycle(1.0, 1.0)
    )
    messages = result["messages"]
    assert all(m["machine"] == "m01" for m in messages)
    news = [m for m in messages if m["state"] == "new"]
    assert [(m["alert_type"], m["sensor"]) for m in news] == [("vibration-anomaly", "vibration")], messages
    new = news[0]
    assert ONSET_S <= new["t_s"] <= ONSET_S + DURATION_S
    event = [m for m in messages if m["event_id"] == new["event_id"]]
    updates = [m for m in event if m["state"] == "update"]
    assert len(updates) <= MAX_UPDATES, updates
    assert event[-1]["state"] == "clear" and event[-1]["reason"] == "recovered"
    assert event[-1]["t_s"] >= ONSET_S + DURATION_S
    assert [m["state"] for m in event].count("clear") == 1
    assert "outer_race" in {m["defect"] for m in event}  # the defect classifier is wired in and sees it

    outcome = result["per_machine"][0]
    assert outcome["detected_during_fault"] and outcome["all_cleared"]
    assert outcome["false_new_before_onset"] == 0
    assert result["counters"].get("pipeline.errors{worker=scoring}", 0) == 0
