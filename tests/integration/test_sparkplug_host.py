"""The agent as a Sparkplug B primary host, through a real Mosquitto and InfluxDB 1.6.7.

An edge node and its device publish births (``pysparkplug``'s encoder) and then data carrying only aliases,
a DataSet, a seq gap, a stale and a matching NDEATH (hand-made protobuf). The agent stores exactly one
value per numeric metric value published, tagged with group, node and machine; dead-letters the DataSet
with its reason; asks for a rebirth (NCMD) after the gap; ignores the stale death; publishes the node as
stale after the matching one; and keeps its STATE topic retained, with a will that the broker fires (same
timestamp as the online message) when the agent's connection drops without a DISCONNECT.
"""

from __future__ import annotations

import json
import random
import socket
import time
from pathlib import Path

import pysparkplug as psp
import pytest
from pysparkplug._protobuf import Payload as TahuPayload

from agent.bootstrap import build_agent
from agent.config import parse_config
from agent.decode import sparkplug_proto as spb
from agent.storage.influx_v1 import InfluxV1Sink
from tests.integration.mqtt_helpers import RawRecorder as Recorder
from tests.integration.mqtt_helpers import publish

pytestmark = pytest.mark.integration

GROUP, NODE, DEVICE = "plant1", "gw1", "press-7"


def _data(seq: int, ts_ms: int, values: dict[int, tuple[str, object]]) -> bytes:
    payload = TahuPayload(timestamp=ts_ms, seq=seq)
    for alias, (field, value) in values.items():
        setattr(payload.metrics.add(alias=alias), field, value)
    return bytes(payload.SerializeToString())


def _death(bd_seq: int, ts_ms: int) -> bytes:
    payload = TahuPayload(timestamp=ts_ms)
    payload.metrics.add(name="bdSeq", datatype=8, long_value=bd_seq)
    return bytes(payload.SerializeToString())


def test_sparkplug_edge_node_through_the_agent_into_influxdb(
    mosquitto, influxdb_v1, influx_db_name, tmp_path: Path
) -> None:
    agent_id = f"spb-{time.monotonic_ns()}"
    host_id = f"host-{agent_id}"
    config = parse_config(
        {
            "agent": {"id": agent_id, "heartbeat_s": 60},
            "health": {"port": 0},
            "mqtt": {
                "host": mosquitto.host,
                "port": mosquitto.port,
                "decoder": {"type": "sparkplug_b", "host_id": host_id, "group_ids": [GROUP], "reorder_timeout_s": 0.5},
            },
            "storage": {"url": influxdb_v1.url, "v1": {"database": influx_db_name}, "flush_interval_s": 0.2},
            "spool": {"path": str(tmp_path / "spool.db")},
            "inference": {"models": []},
        }
    )
    state_topic = f"spBv1.0/STATE/{host_id}"
    node_state = f"pdm/{agent_id}/sparkplug/{GROUP}/{NODE}"
    rec = Recorder(
        mosquitto.host,
        mosquitto.port,
        [state_topic, f"spBv1.0/{GROUP}/NCMD/#", f"pdm/{agent_id}/sparkplug/#", f"pdm/{agent_id}/deadletter"],
    )
    t0 = time.time_ns() // 1_000_000 - 60_000
    births = [
        (
            f"spBv1.0/{GROUP}/NBIRTH/{NODE}",
            psp.NBirth(
                timestamp=t0,
                seq=0,
                metrics=(
                    psp.Metric(timestamp=t0, name="bdSeq", datatype=psp.DataType.UINT64, value=3),
                    psp.Metric(timestamp=t0, name="Node Control/Rebirth", datatype=psp.DataType.BOOLEAN, value=False),
                    psp.Metric(timestamp=t0, name="supply_v", datatype=psp.DataType.DOUBLE, value=400.0, alias=1),
                ),
            ).encode(),
        ),
        (
            f"spBv1.0/{GROUP}/DBIRTH/{NODE}/{DEVICE}",
            psp.DBirth(
                timestamp=t0,
                seq=1,
                metrics=(
                    psp.Metric(timestamp=t0, name="temperature", datatype=psp.DataType.FLOAT, value=60.0, alias=10),
                    psp.Metric(timestamp=t0, name="rpm", datatype=psp.DataType.INT32, value=1480, alias=11),
                ),
            ).encode(),
        ),
    ]
    # Alias-only data, each with per-metric timestamps; one null (nothing stored for it).
    data = []
    for i in range(20):
        ts = t0 + 1000 * (i + 1)
        values = {10: ("float_value", 60.0 + i), 11: ("int_value", 1480 + i)}
        payload = TahuPayload(timestamp=ts, seq=i + 2)
        for alias, (field, value) in values.items():
            setattr(payload.metrics.add(alias=alias, timestamp=ts), field, value)
        if i == 5:
            payload.metrics.add(alias=10, timestamp=ts + 1, is_null=True)
        data.append((f"spBv1.0/{GROUP}/DDATA/{NODE}/{DEVICE}", bytes(payload.SerializeToString())))
    dataset = TahuPayload(timestamp=t0 + 30_000, seq=22)
    dataset.metrics.add(name="recipe", datatype=16).dataset_value.num_of_columns = 1
    dataset.metrics.add(alias=1, double_value=401.0)
    data.append((f"spBv1.0/{GROUP}/NDATA/{NODE}", bytes(dataset.SerializeToString())))

    agent = build_agent(config)
    agent.start()
    try:
        assert agent.mqtt.wait_subscribed(20)
        online = json.loads(rec.wait_for(lambda m: any(t == state_topic for t, _, _ in m))[-1][1])
        assert online["online"] is True

        publish(mosquitto, births + data)
        rec.wait_for(lambda m: any(t.endswith("/deadletter") for t, _, _ in m))
        # A gap (seq 23 .. 29 never arrive): after the reorder timeout, one rebirth request.
        publish(mosquitto, [(f"spBv1.0/{GROUP}/NDATA/{NODE}", _data(30, t0 + 31_000, {1: ("double_value", 402.0)}))])
        rec.wait_for(lambda m: any("/NCMD/" in t for t, _, _ in m))
        # A stale death (an older session's will) changes nothing; the matching one marks the node stale.
        publish(mosquitto, [(f"spBv1.0/{GROUP}/NDEATH/{NODE}", _death(2, t0 + 32_000))])
        publish(mosquitto, [(f"spBv1.0/{GROUP}/NDEATH/{NODE}", _death(3, t0 + 33_000))])
        rec.wait_for(lambda m: any(t == node_state and json.loads(p)["state"] == "stale" for t, p, _ in m))

        # The connection drops without DISCONNECT: the broker publishes the will (offline, same timestamp).
        sock = agent.mqtt._client.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)
        rec.wait_for(lambda m: any(t == state_topic and not json.loads(p)["online"] for t, p, _ in m))
        rec.wait_for(lambda m: [json.loads(p)["online"] for t, p, _ in m if t == state_topic][-1] is True)
        assert agent.writer.flush(30)
    finally:
        agent.stop()
        rec.close()

    states = [json.loads(p) for p in rec.on(state_topic)]
    will = next(s for s in states if not s["online"])
    assert will["timestamp"] == online["timestamp"]  # the will of the session that published online
    assert states[-1]["online"] is False  # the clean stop's offline, retained

    (ncmd,) = rec.on(f"spBv1.0/{GROUP}/NCMD/{NODE}")
    (metric,) = spb.Payload.FromString(ncmd).metrics
    assert (metric.name, metric.boolean_value) == (b"Node Control/Rebirth", True)

    dead = [json.loads(p) for p in rec.on(f"pdm/{agent_id}/deadletter")]
    assert [(d["code"], "'recipe' is a DataSet" in d["reason"]) for d in dead] == [("unsupported", True)]

    node_states = [json.loads(p) for p in rec.on(node_state)]
    # Online after the births (one message or two: a retained state still waiting is replaced), stale after
    # the matching NDEATH only.
    assert [s["state"] for s in node_states[:-1]] == ["online"] * (len(node_states) - 1) and node_states[:-1]
    assert node_states[-1]["state"] == "stale"
    assert node_states[-1]["devices"] == {DEVICE: "stale"}
    assert agent.metrics.get("decode.events", event="stale_deaths") == 1
    assert agent.metrics.get("decode.events", event="rebirths_requested") == 1
    # The will reached the agent's own persistent session after the reconnect: online again at once.
    assert agent.metrics.get("decode.events", event="state_restored") >= 1

    sink = InfluxV1Sink(influxdb_v1.url, influx_db_name)
    counts = {}
    for machine, field in ((DEVICE, "temperature"), (DEVICE, "rpm"), (NODE, "supply_v")):
        rows = sink.query(
            f'SELECT count("{field}") FROM "reading" WHERE "machine" = \'{machine}\' '
            f"AND \"group\" = '{GROUP}' AND \"node\" = '{NODE}'"
        )
        counts[field] = rows[0]["values"][0][1] if rows else 0
    # One value per metric value published: births 1 + 20 data (the null stores nothing); supply_v:
    # birth, the DataSet message's other metric, and the message after the gap.
    assert counts == {"temperature": 21, "rpm": 21, "supply_v": 3}


def test_fuzzed_sparkplug_payloads_never_stop_the_agent(mosquitto, influxdb_v1, influx_db_name, tmp_path: Path) -> None:
    """Random and mutated protobuf on Sparkplug topics: each is stored or rejected with a known code; the
    ingest worker never fails, and a valid node after them is stored."""
    agent_id = f"spbfuzz-{time.monotonic_ns()}"
    config = parse_config(
        {
            "agent": {"id": agent_id, "heartbeat_s": 60},
            "health": {"port": 0},
            "mqtt": {
                "host": mosquitto.host,
                "port": mosquitto.port,
                "decoder": {"type": "sparkplug_b", "host_id": f"h-{agent_id}", "group_ids": [GROUP]},
            },
            "storage": {"url": influxdb_v1.url, "v1": {"database": influx_db_name}, "flush_interval_s": 0.2},
            "spool": {"path": str(tmp_path / "spool.db")},
            "inference": {"models": []},
        }
    )
    rng = random.Random(20261203)
    t0 = time.time_ns() // 1_000_000 - 60_000
    birth = TahuPayload(timestamp=t0, seq=0)
    birth.metrics.add(name="bdSeq", datatype=8, long_value=1)
    birth.metrics.add(name="temperature", alias=1, datatype=10, double_value=1.0, timestamp=t0)
    seed = bytes(birth.SerializeToString())
    fuzz: list[tuple[str, bytes]] = []
    for i in range(300):
        kind = rng.choice(["NBIRTH", "NDATA", "NDEATH", "DBIRTH/d1", "DDATA/d1"])
        data = bytearray(seed) if i % 2 else bytearray(rng.randbytes(rng.randrange(1, 80)))
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        fuzz.append(
            (
                f"spBv1.0/{GROUP}/{kind.split('/')[0]}/fz{i % 7}" + (f"/{kind.split('/')[1]}" if "/" in kind else ""),
                bytes(data),
            )
        )
    valid = [
        (f"spBv1.0/{GROUP}/NBIRTH/ok", seed),
        (f"spBv1.0/{GROUP}/NDATA/ok", _data(1, t0 + 1000, {1: ("double_value", 2.0)})),
    ]
    agent = build_agent(config)
    agent.start()
    try:
        assert agent.mqtt.wait_subscribed(20)
        publish(mosquitto, fuzz + valid)
        sink = InfluxV1Sink(influxdb_v1.url, influx_db_name)
        query = 'SELECT count("temperature") FROM "reading" WHERE "node" = \'ok\''
        stored = 0
        deadline = time.monotonic() + 60  # the valid node comes last: once stored, everything was taken
        while stored < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            rows = sink.query(query) if agent.writer.flush(30) else []
            stored = rows[0]["values"][0][1] if rows else 0
        assert agent.ingest.is_alive()
    finally:
        agent.stop()
    assert stored == 2
    # Every message taken (plus the agent's own rebirth requests and STATE, which it also subscribes to).
    assert agent.metrics.get("ingest.messages") >= len(fuzz) + len(valid)
    assert agent.metrics.get("pipeline.errors", worker="ingest") == 0


def test_a_sparkplug_device_gets_the_same_commissioning_baseline_and_alerts(
    mosquitto, influxdb_v1, influx_db_name, tmp_path: Path
) -> None:
    """Readings from Sparkplug go through the same stages as JSON ones: the device's process metrics are
    commissioned, and an overheating afterwards raises an alert on the agent's alert topic."""
    agent_id = f"spbalert-{time.monotonic_ns()}"
    config = parse_config(
        {
            "agent": {"id": agent_id, "heartbeat_s": 60},
            "health": {"port": 0},
            "mqtt": {
                "host": mosquitto.host,
                "port": mosquitto.port,
                "decoder": {"type": "sparkplug_b", "host_id": f"h-{agent_id}", "group_ids": [GROUP]},
            },
            "storage": {"url": influxdb_v1.url, "v1": {"database": influx_db_name}, "flush_interval_s": 0.2},
            "spool": {"path": str(tmp_path / "spool.db")},
            "inference": {"models": []},
            "commissioning": {"enabled": True, "commissioning_steps": 60, "smoothing_steps": 5},
        }
    )
    rng = random.Random(7)
    t0 = time.time_ns() // 1_000_000 - 600_000
    channels = {"temperature": (10, 55.0, 0.3), "current": (11, 12.0, 0.1), "pressure": (12, 3.0, 0.02)}

    def step(i: int, fault: float) -> list[psp.Metric]:
        return [
            psp.Metric(
                timestamp=t0 + 1000 * i,
                name=name,
                alias=alias,
                datatype=psp.DataType.DOUBLE,
                value=mean + rng.gauss(0, sd) + (fault if name == "temperature" else 0.0),
            )
            for name, (alias, mean, sd) in channels.items()
        ]

    node = psp.NBirth(
        timestamp=t0,
        seq=0,
        metrics=(psp.Metric(timestamp=t0, name="bdSeq", datatype=psp.DataType.UINT64, value=0),),
    ).encode()
    messages = [(f"spBv1.0/{GROUP}/NBIRTH/{NODE}", node)]
    messages.append(
        (
            f"spBv1.0/{GROUP}/DBIRTH/{NODE}/{DEVICE}",
            psp.DBirth(timestamp=t0, seq=1, metrics=tuple(step(0, 0.0))).encode(),
        )
    )
    for i in range(1, 150):
        fault = 15.0 if i >= 100 else 0.0
        payload = psp.DData(timestamp=t0 + 1000 * i, seq=(i + 1) % 256, metrics=tuple(step(i, fault))).encode()
        messages.append((f"spBv1.0/{GROUP}/DDATA/{NODE}/{DEVICE}", payload))
    alerts = Recorder(mosquitto.host, mosquitto.port, [f"pdm/{agent_id}/alerts/#"])
    agent = build_agent(config)
    agent.start()
    try:
        assert agent.mqtt.wait_subscribed(20)
        publish(mosquitto, messages)
        raised = alerts.wait_for(lambda m: any(json.loads(p).get("state") == "new" for _, p, _ in m), 60)
    finally:
        agent.stop()
        alerts.close()
    topic, body = next((t, json.loads(p)) for t, p, _ in raised if json.loads(p).get("state") == "new")
    assert topic == f"pdm/{agent_id}/alerts/{DEVICE}/process"
    assert body["tags"] == {"group": GROUP, "node": NODE, "machine": DEVICE, "sensor": "process"}
    assert agent.metrics.get("commissioning.steps", phase="commissioning") == 60
    assert agent.metrics.get("decode.events", event="seq_gaps") == 0


@pytest.mark.parametrize("scoring_process", [False, True], ids=["scoring-thread", "scoring-process"])
def test_a_dead_sparkplug_device_opens_no_no_data_alert_and_a_silent_live_one_does(
    mosquitto, influxdb_v1, influx_db_name, tmp_path: Path, scoring_process: bool
) -> None:
    """Both devices are commissioned and scored, then fall silent: the one its DDEATH declared dead opens no
    ``no_data`` alert (counted as suppressed), the live one does. With the scoring process, the decoder's word
    reaches the alert engine in the child."""
    agent_id = f"spbdead-{time.monotonic_ns()}"
    config = parse_config(
        {
            "agent": {"id": agent_id, "heartbeat_s": 60, "scoring_process": scoring_process},
            "health": {"port": 0},
            "mqtt": {
                "host": mosquitto.host,
                "port": mosquitto.port,
                "decoder": {"type": "sparkplug_b", "host_id": f"h-{agent_id}", "group_ids": [GROUP]},
            },
            "storage": {"url": influxdb_v1.url, "v1": {"database": influx_db_name}, "flush_interval_s": 0.2},
            "spool": {"path": str(tmp_path / "spool.db")},
            "inference": {"models": []},
            "commissioning": {"enabled": True, "commissioning_steps": 20, "smoothing_steps": 3},
            "alerts": {"types": {"commissioning-baseline": {"no_data_after_s": 2.0}}},
        }
    )
    rng = random.Random(11)
    t0 = time.time_ns() // 1_000_000 - 600_000
    seq = iter(range(1, 10_000))

    def values(i: int) -> tuple[psp.Metric, ...]:
        means = {"temperature": 55.0, "current": 12.0, "pressure": 3.0}
        return tuple(
            psp.Metric(timestamp=t0 + 1000 * i, name=n, datatype=psp.DataType.DOUBLE, value=m + rng.gauss(0, 0.1))
            for n, m in means.items()
        )

    bd = psp.Metric(timestamp=t0, name="bdSeq", datatype=psp.DataType.UINT64, value=0)
    messages = [(f"spBv1.0/{GROUP}/NBIRTH/{NODE}", psp.NBirth(timestamp=t0, seq=0, metrics=(bd,)).encode())]
    for device in (DEVICE, "lathe-2"):
        birth = psp.DBirth(timestamp=t0, seq=next(seq) % 256, metrics=values(0)).encode()
        messages.append((f"spBv1.0/{GROUP}/DBIRTH/{NODE}/{device}", birth))
    for i in range(1, 40):
        for device in (DEVICE, "lathe-2"):
            data = psp.DData(timestamp=t0 + 1000 * i, seq=next(seq) % 256, metrics=values(i)).encode()
            messages.append((f"spBv1.0/{GROUP}/DDATA/{NODE}/{device}", data))
    death = psp.DDeath(timestamp=t0 + 50_000, seq=next(seq) % 256).encode()
    alerts = Recorder(mosquitto.host, mosquitto.port, [f"pdm/{agent_id}/alerts/#"])
    agent = build_agent(config)
    agent.start()
    try:
        assert agent.mqtt.wait_subscribed(20)
        # The death right behind the data, so that it is decoded long before the silence counts.
        publish(mosquitto, [*messages, (f"spBv1.0/{GROUP}/DDEATH/{NODE}/{DEVICE}", death)])
        alerts.wait_for(lambda m: any(json.loads(p).get("alert_type") == "no_data" for _, p, _ in m), 60)
        deadline = time.monotonic() + 60
        suppressed = 0.0
        while not suppressed and time.monotonic() < deadline:
            time.sleep(0.1)
            suppressed = agent.metrics.get("alerts.suppressed", reason="source_offline", alert_type="no_data")
    finally:
        agent.stop()
        alerts.close()
    gaps = [t for t, p, _ in alerts.messages if json.loads(p).get("alert_type") == "no_data"]
    assert gaps and all(t == f"pdm/{agent_id}/alerts/lathe-2/process" for t in gaps)
    assert suppressed == 1
