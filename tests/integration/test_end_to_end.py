"""The whole agent on a real Mosquitto and a real InfluxDB 1.6.7, fed by the gateway simulator.

This is the demo's scenario, shortened and accelerated: healthy machines plus one with a growing bearing
defect. Readings must all reach InfluxDB, the fault must raise an alert that a separate subscriber
receives, and the healthy machines must raise none.
"""

import json
from pathlib import Path

import jsonschema
import pytest

from pdm_tools.dev.demo import run_demo

pytestmark = pytest.mark.integration

ALERT_SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "agent/schemas/alert.schema.json").read_text())

SCENARIO = """\
broker: {host: 127.0.0.1, port: 1883}
machines: {count: 3}
duration_s: 40
speed: 2.0
seed: 11
faults:
  - {machine: m02, kind: bearing_outer, start_s: 12, severity: 1.0}
"""


def test_injected_fault_alerts_and_healthy_machines_do_not(tmp_path: Path, monkeypatch):
    for name in ("PDM_MQTT_HOST", "PDM_MQTT_PORT", "PDM_INFLUX_URL"):
        monkeypatch.delenv(name, raising=False)
    scenario = tmp_path / "simulator.yaml"
    scenario.write_text(SCENARIO)
    report = run_demo(duration_s=40, speed=2.0, simulator_config=scenario, workdir=tmp_path, log=lambda *_: None)
    print(report.render())

    assert report.agent_exit_code == 0
    assert report.messages_received == report.messages_published > 0
    assert report.decode_errors == 0
    assert report.readings_stored == report.readings_received > 0
    assert report.windows_scored > 0 and report.scores_stored == report.windows_scored
    # raw_vibration around_alerts: the 10 blocks of 2048 samples before the alert of m02 and the 10 after it.
    assert report.vibration_samples_stored == 2 * 10 * 2048
    assert report.matched.get("m02:bearing_outer"), "the injected bearing fault raised no alert"
    assert report.false_alerts == []
    assert {a.machine for a in report.alerts} == {"m02"}
    raised = report.matched["m02:bearing_outer"][0].body
    assert raised["defect"]["defect"] == "outer_race", raised.get("defect")
    for alert in report.alerts:
        jsonschema.validate(alert.body, ALERT_SCHEMA)
