"""Alert events through the real agent, a real Mosquitto and InfluxDB: new -> acknowledged -> restart -> clear.

A simulated machine's vibration (healthy, then with an outer-race defect, then healthy again) is published
to the broker; an operator acknowledges the event on the command topic; the agent is stopped and a new one
started on the same state file; the clear then follows with the same event id, and no second ``new``.
"""

import json
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from agent.alerts.commands import sign_command
from agent.bootstrap import build_agent
from agent.config import parse_config
from agent.decode.encode import encode_block
from agent.storage.influx_v1 import InfluxV1Sink
from pdm_tools.simulator.machine import Fault, SimulatedMachine, fleet_profile
from tests.integration.mqtt_helpers import Subscriber
from tests.integration.mqtt_helpers import publish as _publish

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((REPO / "agent/schemas/alert.schema.json").read_text())
BLOCK = 2048
OPERATOR_KEY = b"test-key-of-maria-0123456789"


def _config(mosquitto, influxdb_v1, database: str, tmp_path: Path, agent_id: str, scoring_process: bool = False):
    return parse_config(
        {
            "agent": {"id": agent_id, "heartbeat_s": 60, "scoring_process": scoring_process},
            "health": {"port": 0},
            "mqtt": {"host": mosquitto.host, "port": mosquitto.port, "subscriptions": ["factory/#"]},
            "storage": {"url": influxdb_v1.url, "v1": {"database": database}, "flush_interval_s": 0.2},
            "spool": {"path": str(tmp_path / "spool.db")},
            "inference": {"models": [{"path": str(REPO / "models/vibration_anomaly"), "sensors": ["vibration"]}]},
            "alerts": {
                "default": {"raise_n": 2, "raise_m": 3, "clear_after": 3, "cooldown_s": 0, "renotify_s": 0},
                "commands": {"operators": {"maria": {"key": OPERATOR_KEY.decode()}}},
            },
        }
    )


def _blocks(machine: SimulatedMachine, first: int, count: int, t0_ns: int) -> list[tuple[str, bytes]]:
    rate = machine.profile.rate_hz
    step_ns = round(BLOCK * 1e9 / rate)
    out = []
    for k in range(first, first + count):
        samples = machine.vibration(k * BLOCK / rate, BLOCK).astype(np.float32)
        out.append(("factory/s1/l1/m01/vibration", encode_block(samples, rate, ts_ns=t0_ns + k * step_ns, seq=k)))
    return out


def _alerts(sub: Subscriber, agent_id: str) -> list[dict]:
    return [body for topic, body in sub.messages if topic.startswith(f"pdm/{agent_id}/alerts/")]


@pytest.mark.parametrize("scoring_process", [False, True], ids=["scoring-thread", "scoring-process"])
def test_event_is_acknowledged_survives_a_restart_and_clears_once(
    mosquitto, influxdb_v1, influx_db_name, tmp_path: Path, scoring_process: bool
):
    agent_id = f"it-{time.monotonic_ns()}"
    config = _config(mosquitto, influxdb_v1, influx_db_name, tmp_path, agent_id, scoring_process)
    profile = fleet_profile(0, seed=42)
    rate = profile.rate_hz
    fault_start_s, fault_end_s = 12 * BLOCK / rate, 24 * BLOCK / rate
    machine = SimulatedMachine(profile, [Fault(profile.name, "bearing_outer", fault_start_s, fault_end_s)], seed=1)
    t0_ns = time.time_ns() - 120 * 10**9
    sub = Subscriber(mosquitto.host, mosquitto.port, [f"pdm/{agent_id}/#"])
    try:
        agent = build_agent(config)
        agent.start()
        assert agent.mqtt.wait_subscribed(20)
        _publish(mosquitto, _blocks(machine, 0, 24, t0_ns))  # healthy, then the defect
        seen = sub.wait_for(lambda msgs: any(b.get("state") == "new" for t, b in msgs if "/alerts/" in t))
        new = next(b for t, b in seen if "/alerts/" in t and b["state"] == "new")
        assert (new["machine"], new["alert_type"], new["seq"]) == ("m01", "vibration-anomaly", 1)
        assert new["top_features"], "an anomaly alert names its contributing features"

        # The retained machine state carries the open event.
        state_topic = f"pdm/{agent_id}/state/m01"
        sub.wait_for(lambda msgs: any(t == state_topic and b["state"] != "ok" for t, b in msgs))

        # Operator commands: a bad one is refused with its reason, the ack is applied and announced.
        commands, result = f"pdm/{agent_id}/commands", f"pdm/{agent_id}/commands/result"
        _publish(mosquitto, [(commands, sign_command({"command": "ack"}, "maria", OPERATOR_KEY, agent_id))])
        ack = {"command": "ack", "event_id": new["event_id"]}
        _publish(mosquitto, [(commands, sign_command(ack, "maria", OPERATOR_KEY, agent_id))])
        seen = sub.wait_for(lambda msgs: sum(t == result for t, _ in msgs) >= 2)
        replies = [b for t, b in seen if t == result]
        assert [r["accepted"] for r in replies] == [False, True]
        assert replies[0]["detail"].startswith("missing_field")
        seen = sub.wait_for(lambda msgs: any(b.get("reason") == "acknowledged" for _, b in msgs))
        ack = next(b for _, b in seen if b.get("reason") == "acknowledged")
        assert (ack["event_id"], ack["acknowledged_by"], ack["state"]) == (new["event_id"], "maria", "update")
        agent.stop()

        # A new agent process on the same state file: the event continues, healthy windows clear it.
        agent = build_agent(config)
        agent.start()
        assert agent.mqtt.wait_subscribed(20)
        _publish(mosquitto, _blocks(machine, 24, 16, t0_ns))
        seen = sub.wait_for(lambda msgs: any(b.get("state") == "clear" for t, b in msgs if "/alerts/" in t))
        agent.writer.flush(20)
        agent.stop()
    finally:
        sub.close()

    alerts = _alerts(sub, agent_id)
    for body in alerts:
        jsonschema.validate(body, SCHEMA)
    assert [b["state"] for b in alerts].count("new") == 1
    assert [b["state"] for b in alerts][-1] == "clear"
    assert {b["event_id"] for b in alerts} == {new["event_id"]}
    assert [b["seq"] for b in alerts] == list(range(1, len(alerts) + 1))
    assert alerts[-1]["acknowledged_by"] == "maria"

    sink = InfluxV1Sink(influxdb_v1.url, influx_db_name)
    rows = sink.query('SELECT "state", "seq", "active", "acknowledged" FROM "alert" GROUP BY "state"')
    stored = sorted((v[2], s["tags"]["state"], v[3], v[4]) for s in rows for v in s["values"])
    assert stored[0] == (1, "new", 1, 0) and stored[-1][1:] == ("clear", 0, 1)
    assert len(stored) == len(alerts)
    commands_rows = sink.query('SELECT "by", "detail" FROM "alert_command" GROUP BY "result"')
    assert sorted(s["tags"]["result"] for s in commands_rows) == ["accepted", "rejected"]
