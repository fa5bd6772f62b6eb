"""Input InfluxDB cannot store, or topics of a wrong shape, are dead-lettered with their reason, never lost.

Issue 22: a field name or topic level ending in a backslash was acknowledged and then dropped by the writer
(``storage.unencodable``), and topics with the wrong number of levels never reached the agent with the
default subscription. Through a real Mosquitto and InfluxDB, with the default subscription: each such
message arrives on the dead-letter topic with its code, and only the valid reading is stored.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from agent.bootstrap import build_agent
from agent.config import parse_config
from agent.storage.influx_v1 import InfluxV1Sink
from tests.integration.mqtt_helpers import Subscriber, publish

pytestmark = pytest.mark.integration


def test_wrong_topics_and_unstorable_names_are_dead_lettered_and_nothing_of_them_is_stored(
    mosquitto, influxdb_v1, influx_db_name, tmp_path: Path
) -> None:
    agent_id = f"names-{time.monotonic_ns()}"
    config = parse_config(
        {
            "agent": {"id": agent_id, "heartbeat_s": 60},
            "health": {"port": 0},
            "mqtt": {"host": mosquitto.host, "port": mosquitto.port},  # the default subscription
            "storage": {"url": influxdb_v1.url, "v1": {"database": influx_db_name}, "flush_interval_s": 0.2},
            "spool": {"path": str(tmp_path / "spool.db")},
            "inference": {"models": []},
        }
    )
    ts = time.time_ns() - 10**9
    reading = json.dumps({"ts_ns": ts, "fields": {"temperature": 61.5}}).encode()
    bad = [
        ("factory/s1/l1/m01", reading, "topic"),  # one level short
        ("factory/s1/l1/m01/process/extra", reading, "topic"),  # one level too many
        ("factory/s1/l1/m01\\/process", reading, "name"),  # a machine name ending in a backslash
        ("factory/s1/l1/m01/process", json.dumps({"ts_ns": ts, "fields": {"temp\\": 1.0}}).encode(), "name"),
    ]
    sub = Subscriber(mosquitto.host, mosquitto.port, [f"pdm/{agent_id}/deadletter"])
    agent = build_agent(config)
    agent.start()
    try:
        assert agent.mqtt.wait_subscribed(20)
        publish(mosquitto, [(topic, payload) for topic, payload, _ in bad])
        publish(mosquitto, [("factory/s1/l1/m01/process", reading)])
        # The session's broker is shared: other tests' retained messages (a simulator's ground truth under
        # factory/) reach this agent too and are dead-lettered as well; only this test's topics count.
        ours = {topic for topic, _, _ in bad}
        seen = sub.wait_for(lambda msgs: sum(body["topic"] in ours for _, body in msgs) >= len(bad))
        assert agent.writer.flush(20)
    finally:
        agent.stop()
        sub.close()

    dead = sorted((body["topic"], body["code"]) for _, body in seen if body["topic"] in ours)
    assert dead == sorted((topic, code) for topic, _, code in bad)
    assert agent.metrics.get("storage.unencodable", kind="Reading") == 0
    rows = InfluxV1Sink(influxdb_v1.url, influx_db_name).query('SELECT * FROM "reading"')
    values = [v for series in rows for v in series["values"]]
    assert len(values) == 1
