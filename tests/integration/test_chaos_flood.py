"""Chaos: a hostile flood through the broker. Every rejection is dead-lettered or summarised, with exact counts.

Real processes: Mosquitto, InfluxDB 1.6.7 and the agent (``python -m agent run``, the example config as in
``tests/chaos_support.py``, outbound defaults: 20 dead letters/s one by one, the rest summarised). A
hostile publisher sends tens of thousands of bad messages of many kinds, interleaved with valid readings
(each with a ``seq``) of a few machines and, in the middle of the flood, a machine whose temperature leaves
its normal range, which must raise an alert. At the end, exact counts:

- every valid reading is in InfluxDB exactly once;
- per reason: dead letters received + summary counts == ``decode.errors`` of the agent == bad messages
  published of the kinds that give that reason;
- the alert was delivered; heartbeats kept arriving during the flood; no outbound message was dropped;
- the agent's peak RSS (main process and writer process, ``VmHWM``) is printed, and bounded.

Before agent/ingest/outbound.py, the dead letters went through paho's one outgoing queue (10,000): most of
a flood's dead letters failed with "Message queue full", and the per-reason equality fails.

The reasons ``topic`` (a topic with the wrong number of levels), ``name`` (a field name or topic level
InfluxDB cannot store) and ``too_many_fields`` depend on the fixes of issue 22 items 5 and 6 (default
subscription wider than the template, names checked and fields per message bounded in the decoder).
"""

from __future__ import annotations

import itertools
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import chaos_support as chaos

from agent import schema
from pdm_tools.dev import services as devservices
from pdm_tools.simulator.machine import SimulatedMachine, fleet_profile

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.timeout(900)]

NS = 1_000_000_000
# The agent and the observer must get every message, however far behind they are: no per-client limit.
BROKER_CONF = "max_queued_messages 0\nmax_queued_bytes 0\n"
VALID_MACHINES = ("v01", "v02", "v03")
VALID_PER_MACHINE = 200
ALERT_MACHINE = "hot1"
REASON_FIELD = "decode_errors_reason_"  # the heartbeat field of decode.errors{reason=...}, before the reason
ALERT_NORMAL, ALERT_HOT = 60, 40  # readings at 1 s intervals (device time): normal, then hot


def _topic(machine: str, sensor: str = "process") -> str:
    return f"factory/s1/l1/{machine}/{sensor}"


def _readings(machine: str, index: int, n: int, t0_ns: int, hot_from: int | None = None) -> list[tuple[str, ...]]:
    """A simulated machine's process readings at 1 s intervals (device time); from ``hot_from`` on, its
    temperature is 100 degrees above normal."""
    sim = SimulatedMachine(fleet_profile(index, 7), [], index)
    out = []
    for seq in range(n):
        fields = sim.process(float(seq)) or {}
        if hot_from is not None and seq >= hot_from:
            fields["temperature"] += 100.0
        body = {"v": 1, "ts_ns": t0_ns + seq * NS, "seq": seq, "fields": fields}
        out.append((machine, _topic(machine), json.dumps(body).encode()))
    return out


def _hostile(rng: random.Random) -> list[tuple[str, str, bytes]]:
    """(reason the agent must give, topic, payload) of every bad message."""
    out: list[tuple[str, str, bytes]] = []

    def add(reason: str, n: int, make) -> None:  # type: ignore[no-untyped-def]
        out.extend((reason, *make(i)) for i in range(n))

    t = _topic("x01")
    add("json", 6000, lambda i: (t, b'{"v":1,"value":' + str(i).encode()))
    add("not_object", 2000, lambda i: (t, json.dumps([i, i + 1]).encode()))
    add("shape", 5000, lambda i: (t, json.dumps({"v": 1, "foo": i}).encode()))
    add("too_large", 20, lambda i: (t, b'{"v":1,"value":1,"pad":"' + b"x" * 1_100_000 + b'"}'))
    nonfinite = (b"NaN", b"Infinity", b"-Infinity", b"1e999")
    add("value", 5000, lambda i: (t, b'{"v":1,"fields":{"a":' + nonfinite[i % 4] + b"}}"))
    add("encoding", 3000, lambda i: (t, b'{"v":1,"rate_hz":100,"encoding":"f64le","data":"AAAA"}'))
    add("version", 2000, lambda i: (t, json.dumps({"v": 2 + i % 50, "value": 1}).encode()))
    add("not_utf8", 2000, lambda i: (t, b"\xff\xfe" + bytes([i % 256])))
    add("timestamp", 2000, lambda i: (t, json.dumps({"v": 1, "ts": "yesterday", "value": i}).encode()))
    # Issue 22 item 5: wrong number of topic levels, names InfluxDB cannot store (a trailing backslash).
    add("topic", 1000, lambda i: ("factory/s1/l1/x02", b'{"v":1,"value":1}'))
    add("topic", 1000, lambda i: ("factory/s1/l1/x02/process/extra", b'{"v":1,"value":1}'))
    add("name", 1000, lambda i: (t, b'{"v":1,"fields":{"temp\\\\":1.0}}'))
    add("name", 1000, lambda i: ("factory/s1/l1/x03\\/process", b'{"v":1,"value":1}'))
    # Issue 22 item 6: thousands of fields in one message.
    many = ("{" + ",".join(f'"f{k}":1' for k in range(3000)) + "}").encode()
    add("too_many_fields", 200, lambda i: (t, b'{"v":1,"fields":' + many + b"}"))
    rng.shuffle(out)
    return out


class Observer(chaos.Recorder):
    """The rig's recorder without the data topics (a flood's payloads are not the simulator's), plus every
    dead letter and alert, and when each heartbeat arrived."""

    def __init__(self, host: str, port: int, agent_id: str) -> None:
        self.deadletters: list[dict] = []
        self.alerts: list[tuple[float, dict]] = []
        self.heartbeat_arrivals: list[tuple[float, int]] = []  # (monotonic arrival, the heartbeat's time_ns)
        super().__init__(host, port, agent_id)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            return
        base = self._base
        client.subscribe([(f"{base}/{s}", 1) for s in ("status", "heartbeat", "deadletter", "alerts/+/+")])
        self._connected.set()

    def _on_message(self, client, userdata, msg) -> None:
        now = time.monotonic()
        body = json.loads(msg.payload)
        with self._cond:
            if msg.topic.endswith("/deadletter"):
                self.deadletters.append(body)
            elif "/alerts/" in msg.topic:
                self.alerts.append((now, body))
            elif msg.topic.endswith("/heartbeat") and not msg.retain:
                self.heartbeat_arrivals.append((now, int(body["time_ns"])))
        super()._on_message(client, userdata, msg)


class FloodRig(chaos.Rig):
    """The chaos rig with a broker that queues without limit and the observer instead of the recorder."""

    def __enter__(self) -> FloodRig:
        self.workdir.mkdir(parents=True, exist_ok=True)
        broker_dir = self.workdir / "mosquitto"
        broker_dir.mkdir(exist_ok=True)
        self.broker = devservices.start_mosquitto(broker_dir, extra_conf=BROKER_CONF)
        self.influxdb = devservices.start_influxdb_v1(self.workdir / "influxdb")
        self.influx = chaos.Influx(self.influxdb.url, self.database)
        self.config_path = self._write_agent_config()
        config = yaml.safe_load(self.config_path.read_text())
        config["storage"]["raw_vibration"]["mode"] = "none"
        # Several summaries in a flood of a few seconds (default 10 s), and the last one at stop.
        config["mqtt"].setdefault("outbound", {})["deadletter_summary_interval_s"] = 2
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.recorder = self.observer = Observer(self.broker.host, self.broker.port, self.agent_id)
        if not self.recorder.wait_connected(20):
            raise RuntimeError("the observer could not connect")
        return self


class Publisher:
    """One QoS 1 client with a wide in-flight window; counts what the broker acknowledged."""

    def __init__(self, host: str, port: int) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"flood-{time.monotonic_ns()}")
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.connect(host, port)
        self.client.loop_start()
        self.infos: list[tuple[str, mqtt.MQTTMessageInfo]] = []

    def send(self, category: str, topic: str, payload: bytes) -> None:
        self.infos.append((category, self.client.publish(topic, payload, qos=1)))

    def acknowledged(self, timeout_s: float) -> Counter[str]:
        published: Counter[str] = Counter()
        for category, info in self.infos:
            info.wait_for_publish(timeout_s)
            if info.is_published():
                published[category] += 1
        return published

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _peak_rss_mb(pid: int) -> float:
    """Peak resident set of a process and its children (the writer process), from ``VmHWM``."""
    total = 0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1])
    return total / 1024


def _stored_seqs(influx: chaos.Influx, machine: str) -> Counter[int]:
    q = f'SELECT "seq" FROM "{schema.READING}" WHERE "machine" = \'{machine}\''
    return Counter(int(v[1]) for s in influx.query(q, timeout_s=60) for v in s["values"])


def test_a_hostile_flood_is_dead_lettered_or_summarised_exactly_and_valid_readings_and_alerts_get_through(
    tmp_path: Path,
) -> None:
    rng = random.Random(22)
    bad = _hostile(rng)
    t0_ns = (time.time_ns() // NS - 3600) * NS  # device time of the valid readings: the last hour
    valid = [
        ("valid", topic, payload)
        for m, machine in enumerate(VALID_MACHINES)
        for _, topic, payload in _readings(machine, m, VALID_PER_MACHINE, t0_ns)
    ]
    alert = [
        ("alert_machine", topic, payload)
        for _, topic, payload in _readings(ALERT_MACHINE, 9, ALERT_NORMAL + ALERT_HOT, t0_ns, hot_from=ALERT_NORMAL)
    ]
    # Interleave, keeping each machine's readings in order: valid readings spread over the whole flood, the
    # alert machine's in its middle third.
    stream: list[tuple[str, str, bytes]] = [(reason, topic, payload) for reason, topic, payload in bad]
    step = len(stream) // (len(valid) + 1)
    for k, item in enumerate(valid):
        stream.insert((k + 1) * step + k, item)
    third = len(stream) // 3
    step = third // (len(alert) + 1)
    for k, item in enumerate(alert):
        stream.insert(third + (k + 1) * step + k, item)

    with FloodRig(tmp_path) as rig:
        assert rig.broker is not None and rig.influx is not None and rig.agent is None
        observer = rig.observer
        rig.start_agent()
        assert rig.agent is not None
        rss_before = _peak_rss_mb(rig.agent.pid)
        publisher = Publisher(rig.broker.host, rig.broker.port)
        flood_start_ns = time.time_ns()
        hot_sent: float | None = None
        for category, topic, payload in stream:
            if category == "alert_machine" and hot_sent is None and json.loads(payload)["seq"] == ALERT_NORMAL:
                hot_sent = time.monotonic()
            publisher.send(category, topic, payload)
        published = publisher.acknowledged(120)
        flood_end_ns = time.time_ns()
        publisher.close()
        total = sum(published.values())
        assert total == len(stream), f"the broker acknowledged {total} of {len(stream)}"
        chaos.log(f"flood published in {(flood_end_ns - flood_start_ns) / NS:.1f} s: {dict(published)}")

        # The agent has taken in everything once it counted every message (or, if some never reach it, once
        # its count stopped moving for 20 s: the accounting below then says which).
        last, since = -1.0, time.monotonic()
        while time.monotonic() - since < 20:
            taken = chaos.counter(observer.heartbeat.get("fields", {}), "ingest.messages")
            if taken >= total:
                break
            if taken != last:
                last, since = taken, time.monotonic()
            time.sleep(0.5)
        expected_readings = len(VALID_MACHINES) * VALID_PER_MACHINE + len(alert)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (rig.influx.reading_count() or 0) < expected_readings:
            time.sleep(0.5)
        observer.wait(lambda r: any(b["machine"] == ALERT_MACHINE for _, b in r.alerts), 60)
        rss_peak = _peak_rss_mb(rig.agent.pid)
        stop_ns = time.time_ns()
        assert rig.stop_agent() == 0
        observer.wait(lambda r: int(r.heartbeat.get("time_ns", 0)) >= stop_ns, 30)
        counters = dict(observer.heartbeat.get("fields", {}))
        # The final summary goes out at stop, with the final heartbeat; both are confirmed before the agent exits.
        with observer._cond:
            deadletters = list(observer.deadletters)
            alerts = list(observer.alerts)
            heartbeats = list(observer.heartbeat_arrivals)

        stored = {m: _stored_seqs(rig.influx, m) for m in (*VALID_MACHINES, ALERT_MACHINE)}

    one_by_one = Counter(d["code"] for d in deadletters if d["code"] != "summary")
    summaries = [d for d in deadletters if d["code"] == "summary"]
    summarised: Counter[str] = Counter()
    for s in summaries:
        summarised.update(s["counts"])
        assert s["total"] == sum(s["counts"].values())
    reported = one_by_one + summarised
    errors = {  # the heartbeat's decode_errors_reason_{code} fields
        key.removeprefix(REASON_FIELD): int(v) for key, v in counters.items() if key.startswith(REASON_FIELD)
    }
    bad_published = {reason: n for reason, n in published.items() if reason not in ("valid", "alert_machine")}
    hb_during = [a for a, t in heartbeats if flood_start_ns <= t <= flood_end_ns]
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(heartbeats)]
    raised = [(at, b) for at, b in alerts if b["machine"] == ALERT_MACHINE and b["state"] == "new"]
    alert_latency = raised[0][0] - hot_sent if raised and hot_sent is not None else None
    lost_or_doubled = {m: {s: n for s, n in c.items() if n != 1} for m, c in stored.items()}
    print(
        f"\nflood: published {total} messages ({sum(bad_published.values())} bad, "
        f"{published['valid'] + published['alert_machine']} valid readings)"
        f"\n  bad per reason {dict(sorted(bad_published.items()))}"
        f"\n  rejected by the agent (decode.errors): {sum(errors.values())} {dict(sorted(errors.items()))}"
        f"\n  dead letters one by one: {sum(one_by_one.values())}, summaries: {len(summaries)} covering "
        f"{sum(summarised.values())}; per reason {dict(sorted(reported.items()))}"
        f"\n  readings stored: {sum(sum(c.values()) for c in stored.values())} of {expected_readings}; "
        f"not exactly once: {lost_or_doubled}"
        f"\n  alerts: {[(b['machine'], b['state']) for _, b in alerts]}, latency from the first hot reading "
        f"{'-' if alert_latency is None else f'{alert_latency:.2f} s'}"
        f"\n  heartbeats: {len(heartbeats)} live, {len(hb_during)} built during the flood, largest gap "
        f"{max(gaps, default=0):.2f} s"
        f"\n  agent peak RSS (with the writer process): {rss_before:.0f} MB before the flood, {rss_peak:.0f} MB peak"
        f"\n  outbound counters: "
        f"{ {k: v for k, v in counters.items() if k.startswith(('mqtt_outbound', 'mqtt_deadletter', 'mqtt_publish'))} }"
    )

    # Every valid reading exactly once.
    assert all(sorted(c) == list(range(VALID_PER_MACHINE)) for m, c in stored.items() if m != ALERT_MACHINE)
    assert sorted(stored[ALERT_MACHINE]) == list(range(len(alert)))
    assert not any(lost_or_doubled.values()), lost_or_doubled
    # Every rejection reported, alone or in a summary: per reason, what the observer got == what the agent
    # counted == what was published. (topic, name, too_many_fields: issue 22 items 5 and 6.)
    assert dict(reported) == errors == bad_published
    assert chaos.counter(counters, "mqtt.deadletters") == sum(one_by_one.values())
    assert chaos.counter(counters, "mqtt.deadletters_summarised") == sum(summarised.values())
    # Alerts, replies and heartbeats were never dropped behind the dead letters.
    assert chaos.counter(counters, "mqtt.outbound_dropped") == 0
    assert chaos.counter(counters, "mqtt.publish_errors") == 0
    assert raised, f"no alert for {ALERT_MACHINE}: {alerts}"
    assert hb_during, "no heartbeat built during the flood arrived"
    assert rss_peak < 1024, f"agent peak RSS {rss_peak:.0f} MB"
