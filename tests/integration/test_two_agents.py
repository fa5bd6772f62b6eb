"""Two agents share one plant (``mqtt.shard``): through one real Mosquitto into one InfluxDB 1.6.7, every
reading is stored exactly once, each by the agent that owns its machine, neither agent keeps the other's
machines, and the retained fleet view says which agent owns which."""

from __future__ import annotations

import json
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from agent.bootstrap import build_agent
from agent.config import parse_config
from agent.ingest.shard import owner
from agent.runtime.agent import Agent
from agent.storage.influx_v1 import InfluxV1Sink
from tests.integration.mqtt_helpers import Subscriber

pytestmark = pytest.mark.integration

MACHINES = [f"m{i:02d}" for i in range(12)]
PER_MACHINE = 40


def fleet_agent(index: int, count: int, run: str, mosquitto, influxdb_v1, database: str, tmp_path: Path) -> Agent:
    config = parse_config(
        {
            "agent": {"id": f"{run}-{index}", "heartbeat_s": 60},
            "health": {"port": 0},
            "mqtt": {
                "host": mosquitto.host,
                "port": mosquitto.port,
                "subscriptions": [f"factory/{run}/+/+/+"],
                "shard": {"count": count, "index": index},
            },
            "storage": {"url": influxdb_v1.url, "v1": {"database": database}, "flush_interval_s": 0.2},
            "spool": {"path": str(tmp_path / f"agent{index}" / "spool.db")},
            "inference": {"models": []},
        }
    )
    return build_agent(config)


def publish_all(mosquitto, items: list[tuple[str, bytes]]) -> None:
    """QoS 1, pipelined: all handed over, then each confirmed by the broker."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{time.monotonic_ns()}")
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    client.connect(mosquitto.host, mosquitto.port)
    client.loop_start()
    infos = [client.publish(topic, payload, qos=1) for topic, payload in items]
    for info in infos:
        info.wait_for_publish(60)
    client.loop_stop()
    client.disconnect()


def test_two_agents_store_every_reading_once_each_only_its_own_machines(
    mosquitto, influxdb_v1, influx_db_name, tmp_path: Path
) -> None:
    run = f"fleet{time.monotonic_ns()}"
    agents = [fleet_agent(i, 2, run, mosquitto, influxdb_v1, influx_db_name, tmp_path) for i in range(2)]
    t0 = time.time_ns() - 600 * 10**9
    items = [
        (
            f"factory/{run}/l1/{machine}/process",
            json.dumps({"ts_ns": t0 + k * 10**9, "fields": {"temperature": 20.0 + k}}).encode(),
        )
        for k in range(PER_MACHINE)
        for machine in MACHINES
    ]
    for agent in agents:
        agent.start()
    try:
        assert all(agent.mqtt.wait_subscribed(20) for agent in agents)
        publish_all(mosquitto, items)
        total = len(items)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(a.metrics.get("ingest.messages") < total for a in agents):
            time.sleep(0.1)
        assert all(agent.writer.flush(30) for agent in agents)
    finally:
        for agent in agents:
            agent.stop()

    owned = [sum(PER_MACHINE for m in MACHINES if owner(m, 2) == i) for i in range(2)]
    assert 0 < owned[0] < len(items) and sum(owned) == len(items)
    for index, agent in enumerate(agents):
        assert agent.metrics.get("ingest.messages") == len(items)  # every agent sees everything ...
        assert agent.metrics.get("ingest.readings") == owned[index]  # ... and keeps only its machines
        assert agent.metrics.get("ingest.not_owned") == len(items) - owned[index]
    rows = InfluxV1Sink(influxdb_v1.url, influx_db_name).query(
        f'SELECT count("temperature") FROM "reading" WHERE "site" = \'{run}\' GROUP BY "machine"'
    )
    counts = {series["tags"]["machine"]: series["values"][0][1] for series in rows}
    assert counts == dict.fromkeys(MACHINES, PER_MACHINE)

    # The fleet view, retained: which agent owns which machines (the final one is published at the stop).
    views = Subscriber(mosquitto.host, mosquitto.port, ["pdm/+/fleet"])
    try:
        seen = views.wait_for(lambda msgs: {t for t, _ in msgs} >= {f"pdm/{run}-0/fleet", f"pdm/{run}-1/fleet"})
    finally:
        views.close()
    fleet = {body["agent_id"]: body for topic, body in seen if topic.startswith(f"pdm/{run}-")}
    for index in range(2):
        view = fleet[f"{run}-{index}"]
        assert view["shard"] == {"index": index, "count": 2}
        assert view["machines"] == [m for m in MACHINES if owner(m, 2) == index]
