"""Chaos: readings without a device timestamp are stored once although the agent is killed -9 five times.

Real processes: Mosquitto, InfluxDB 1.6.7 and the agent (``python -m agent run``), through
``tests/chaos_support.py``'s ``Rig``. A publisher sends process readings WITHOUT ``ts`` (QoS 1, a per-topic
``seq`` in each, so that InfluxDB can be counted message by message) while the agent is killed five times,
each time shortly after it came back online, while it works through the backlog the broker kept for it:
the moment when whole batches are committed to the spool and their PUBACKs are on their way. A message
committed but not acknowledged is redelivered (DUP) after the restart; before issue 22 it got a new
arrival time, hence a second point. Now every ``seq`` must be in InfluxDB exactly once.

The publisher's topics are outside the rig recorder's ``factory/#`` (its accounting expects the
simulator's ``ts_ns``): the agent's topic template is moved to ``ident/...`` for this test. No timing
threshold is asserted; the numbers are printed (``-s``) for ``docs/chaos.md``.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from agent.decode.encode import encode_fields

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import chaos_support as chaos

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.timeout(400)]

MACHINES = ("m01", "m02", "m03", "m04")
RATE_PER_S = 1000.0  # messages per second over all topics
KILLS = 5
KILL_AFTER_ONLINE_S = (0.02, 0.05, 0.08, 0.12, 0.16)
"""When each kill comes after the agent said online: while it drains the backlog of its downtime (a few
thousand messages, batches of 500 committed and acknowledged back to back, a few tenths of a second)."""


def _topic(machine: str) -> str:
    return f"ident/site/line/{machine}/process"


def _temperature(seq: int) -> float:
    return 20.0 + (seq % 50) / 10


class Publisher(threading.Thread):
    """A gateway without a clock: process readings without ``ts``, QoS 1, each with its topic's ``seq``."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(name="identity-publisher", daemon=True)
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"ident-pub-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
        )
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)  # unbounded: nothing published is dropped by the client
        self.client.connect(host, port)
        self.client.loop_start()
        self.sent = dict.fromkeys(MACHINES, 0)
        self.infos: list[mqtt.MQTTMessageInfo] = []
        self._halt = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        n = 0
        seq = 0
        while not self._halt.is_set():
            for machine in MACHINES:
                payload = encode_fields({"temperature": _temperature(seq)}, seq=seq)
                self.infos.append(self.client.publish(_topic(machine), payload, qos=1))
                self.sent[machine] = seq + 1
                n += 1
            seq += 1
            ahead = started + n / RATE_PER_S - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)

    def finish(self, timeout_s: float = 60) -> int:
        """Stop publishing, wait for the broker's PUBACKs; how many stayed unacknowledged."""
        self._halt.set()
        self.join()
        deadline = time.monotonic() + timeout_s
        for info in self.infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        unacked = sum(not info.is_published() for info in self.infos)
        self.client.loop_stop()
        self.client.disconnect()
        return unacked


def test_readings_without_a_timestamp_are_stored_once_across_five_agent_kills(tmp_path: Path) -> None:
    template = {"mqtt": {"topic_template": "ident/{site}/{line}/{machine}/{sensor}"}}
    # Mosquitto queues at most 1,000 messages for an offline client by default and drops the rest: the
    # backlog of a downtime at this rate is larger.
    with chaos.Rig(tmp_path, agent_config=template, broker_conf="max_queued_messages 0\n") as rig:
        assert rig.broker is not None and rig.influx is not None and rig.recorder is not None
        rig.start_agent()
        publisher = Publisher(rig.broker.host, rig.broker.port)
        publisher.start()
        restored = redelivered = 0.0
        for delay in KILL_AFTER_ONLINE_S[:KILLS]:
            time.sleep(2.0)  # a steady stream first
            rig.kill_agent()
            time.sleep(4.0)  # a backlog builds up at the broker: thousands of messages to drain at once
            rig.start_agent()
            time.sleep(delay)
            counters = rig.recorder.heartbeat.get("fields", {})
            restored += chaos.counter(counters, "ingest.arrival_restored")
            redelivered += chaos.counter(counters, "ingest.redelivered")
        time.sleep(2.0)
        unacked = publisher.finish()
        published = sum(publisher.sent.values())
        stored_all = rig.wait_stored(published, timeout_s=180)
        readings = rig.influx.readings()
        assert rig.stop_agent() == 0
        counters = rig.recorder.heartbeat.get("fields", {})

    per_seq = Counter((p["machine"], int(p["seq"])) for p in readings)
    expected = {(m, seq) for m in MACHINES for seq in range(publisher.sent[m])}
    lost = len(expected - per_seq.keys())
    duplicated = sum(1 for n in per_seq.values() if n > 1)
    extra_points = sum(n - 1 for n in per_seq.values() if n > 1)
    wrong = sum(1 for p in readings if p["temperature"] != _temperature(int(p["seq"])))
    print(
        f"\ntimestamp-less identity: kills {KILLS}, published {published} (unacked by the broker {unacked}), "
        f"stored points {len(readings)}, distinct messages stored {len(per_seq)}, lost {lost}, "
        f"duplicated messages {duplicated} ({extra_points} extra points), wrong content {wrong}; "
        f"redelivered (DUP, seen in heartbeats) >= {redelivered + chaos.counter(counters, 'ingest.redelivered'):.0f}, "
        f"restored first arrival >= {restored + chaos.counter(counters, 'ingest.arrival_restored'):.0f}"
    )
    assert unacked == 0, "the broker did not acknowledge every published message"
    assert stored_all, "InfluxDB did not get every reading, or the spool did not drain"
    assert rig.agent_starts == KILLS + 1
    assert per_seq.keys() <= expected
    assert lost == 0
    assert duplicated == 0, f"{duplicated} timestamp-less readings were stored more than once"
    assert wrong == 0
