"""Outbound MQTT priorities and bounds (agent.ingest.outbound) against a fake connection: which message the
dispatcher hands over first, what a full queue drops, how dead letters beyond the rate are summarised."""

from __future__ import annotations

import json
import threading

import pytest

from agent.ingest.outbound import Outbound
from agent.ingest.settings import OutboundSettings
from agent.metrics import Metrics
from agent.topics import Topics

TOPICS = Topics("edge-01")
WAIT_S = 10.0


class FakeDelivery:
    def __init__(self) -> None:
        self.rc = 0
        self._done = threading.Event()

    def complete(self) -> None:
        self._done.set()

    def is_published(self) -> bool:
        return self._done.is_set()

    def wait_for_publish(self, timeout: float | None = None) -> None:
        self._done.wait(timeout)


class FakeConnection:
    """Records what the dispatcher hands over; confirms it at once unless ``hold`` (then the test does)."""

    def __init__(self, connected: bool = True, hold: bool = False) -> None:
        self.connected = threading.Event()
        if connected:
            self.connected.set()
        self.hold = hold
        self.sent: list[tuple[str, bytes, bool]] = []
        self.deliveries: list[FakeDelivery] = []
        self.unconfirmed_at_publish: list[int] = []
        self.acks: list[int] = []
        self.cond = threading.Condition()

    @property
    def is_connected(self) -> bool:
        return self.connected.is_set()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> FakeDelivery:
        delivery = FakeDelivery()
        with self.cond:
            self.unconfirmed_at_publish.append(sum(not d.is_published() for d in self.deliveries))
            self.sent.append((topic, payload, retain))
            self.deliveries.append(delivery)
            if not self.hold:
                delivery.complete()
            self.cond.notify_all()
        return delivery

    def ack(self, mid: int, qos: int) -> None:
        self.acks.append(mid)

    def ack_batch(self, acks: list[tuple[int, int]]) -> None:
        self.acks.extend(mid for mid, _ in acks)

    def wait_sent(self, n: int) -> list[tuple[str, bytes, bool]]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.sent) >= n, WAIT_S), f"{len(self.sent)} of {n} sent"
            return list(self.sent)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _outbound(connection: FakeConnection, metrics: Metrics, clock: Clock | None = None, **settings: float) -> Outbound:
    return Outbound(connection, TOPICS, OutboundSettings(**settings), metrics, clock=clock or Clock())


def _kinds(sent: list[tuple[str, bytes, bool]]) -> list[str]:
    return [topic.split("/")[2] for topic, _, _ in sent]


def test_alerts_go_first_then_replies_and_states_then_heartbeats_then_dead_letters() -> None:
    connection = FakeConnection(connected=False)
    metrics = Metrics()
    outbound = _outbound(connection, metrics)
    outbound.dead_letter("factory/a/b/m1/process", "json", "invalid JSON", b"{")
    outbound.publish(TOPICS.heartbeat, b"{}", retain=True)
    outbound.publish(TOPICS.state("m1"), b"{}", retain=True)
    outbound.publish(TOPICS.alerts("m1", "process"), b'{"n":1}')
    outbound.publish(TOPICS.command_result, b"{}")
    outbound.publish(TOPICS.alerts("m2", "process"), b'{"n":2}')
    outbound.start()
    connection.connected.set()  # the broker is back: the most urgent kind goes first
    sent = connection.wait_sent(6)
    outbound.stop(WAIT_S)
    assert _kinds(sent) == ["alerts", "alerts", "state", "commands", "heartbeat", "deadletter"]
    assert [json.loads(p)["n"] for _, p, _ in sent[:2]] == [1, 2]  # in order within a kind


def test_the_client_never_holds_more_than_the_window_of_unconfirmed_messages() -> None:
    connection = FakeConnection(hold=True)
    outbound = _outbound(connection, Metrics(), window=2)
    for n in range(8):
        outbound.publish(TOPICS.alerts("m1", "process"), str(n).encode())
    outbound.start()
    for k in range(2, 8):
        connection.wait_sent(k)
        connection.deliveries[k - 2].complete()  # the broker confirms the oldest: room for one more
    connection.wait_sent(8)
    for d in connection.deliveries:
        d.complete()
    outbound.stop(WAIT_S)
    assert max(connection.unconfirmed_at_publish) == 1  # i.e. at most 2 with the one being handed over
    assert [p for _, p, _ in connection.sent] == [str(n).encode() for n in range(8)]


def test_a_waiting_retained_heartbeat_is_replaced_by_the_newer_one() -> None:
    connection = FakeConnection(connected=False)
    metrics = Metrics()
    outbound = _outbound(connection, metrics)
    for n in range(5):
        outbound.publish(TOPICS.heartbeat, str(n).encode(), retain=True)
    assert metrics.get("mqtt.outbound_superseded", kind="status") == 4
    outbound.start()
    connection.connected.set()
    assert connection.wait_sent(1) == [(TOPICS.heartbeat, b"4", True)]
    outbound.stop(WAIT_S)
    assert len(connection.sent) == 1


def test_a_full_alert_queue_drops_the_oldest_and_counts_it() -> None:
    connection = FakeConnection(connected=False)
    metrics = Metrics()
    outbound = _outbound(connection, metrics, alerts_max=3)
    kept = [outbound.publish(TOPICS.alerts("m1", "process"), str(n).encode()) for n in range(5)]
    assert kept == [True, True, True, False, False]
    assert metrics.get("mqtt.outbound_dropped", kind="alert", reason="queue_full") == 2
    outbound.start()
    connection.connected.set()
    assert [p for _, p, _ in connection.wait_sent(3)] == [b"2", b"3", b"4"]
    outbound.stop(WAIT_S)


def test_dead_letters_beyond_the_rate_are_summarised_per_reason_and_every_rejection_is_accounted() -> None:
    connection = FakeConnection()
    metrics = Metrics()
    clock = Clock()
    outbound = _outbound(
        connection, metrics, clock, deadletter_rate_per_s=2.0, deadletter_burst=3, deadletter_summary_interval_s=10
    )
    codes = ["json", "value", "topic", "json"] * 25
    one_by_one = [outbound.dead_letter("factory/a/b/m1/process", code, "bad", b"x") for code in codes]
    assert one_by_one[:3] == [True] * 3 and not any(one_by_one[3:])  # the burst, then nothing within the same second
    clock.now += 1.0  # two more tokens
    shapes = [outbound.dead_letter("factory/a/b/m1/process", "shape", "bad", b"x") for _ in range(3)]
    assert shapes == [True, True, False]
    outbound.start()
    connection.wait_sent(5)
    clock.now += 10.0  # the summary interval has passed
    sent = connection.wait_sent(6)
    outbound.stop(WAIT_S)
    bodies = [json.loads(p) for _, p, _ in sent]
    assert {t for t, _, _ in sent} == {TOPICS.deadletter}
    single, summaries = bodies[:5], bodies[5:]
    assert [b["code"] for b in single] == ["json", "value", "topic", "shape", "shape"]
    assert len(summaries) == 1 and summaries[0]["code"] == "summary"
    assert summaries[0]["counts"] == {"json": 49, "value": 24, "topic": 24, "shape": 1}
    assert summaries[0]["total"] == len(codes) + 3 - len(single) == 98
    assert metrics.get("mqtt.deadletters") == 5
    assert sum(metrics.get("mqtt.deadletters_summarised", reason=c) for c in ("json", "value", "topic", "shape")) == 98
    assert metrics.get("mqtt.deadletter_summaries") == 1


def test_a_rejection_that_finds_the_dead_letter_queue_full_goes_into_the_summary() -> None:
    connection = FakeConnection(connected=False)
    metrics = Metrics()
    outbound = _outbound(connection, metrics, deadletter_max=2, deadletter_burst=50)
    reported = [outbound.dead_letter("factory/a/b/m1/process", "json", "bad", b"x") for _ in range(5)]
    assert reported == [True, True, False, False, False]
    outbound.start()
    connection.connected.set()
    outbound.stop(WAIT_S)  # at stop the pending summary goes out without waiting for its interval
    bodies = [json.loads(p) for _, p, _ in connection.sent]
    assert [b["code"] for b in bodies] == ["json", "json", "summary"]
    assert bodies[2]["counts"] == {"json": 3}


def test_acknowledgements_do_not_wait_behind_outbound_messages() -> None:
    connection = FakeConnection(connected=False)
    outbound = _outbound(connection, Metrics())
    for _ in range(10):
        outbound.publish(TOPICS.alerts("m1", "process"), b"{}")
    outbound.ack(7, 1)
    assert connection.acks == [7] and connection.sent == []


def test_stop_while_disconnected_counts_what_was_not_sent() -> None:
    connection = FakeConnection(connected=False)
    metrics = Metrics()
    outbound = _outbound(connection, metrics)
    outbound.start()
    outbound.publish(TOPICS.alerts("m1", "process"), b"{}")
    outbound.publish(TOPICS.heartbeat, b"{}", retain=True)
    outbound.stop(WAIT_S)
    assert connection.sent == []
    assert metrics.get("mqtt.outbound_dropped", kind="alert", reason="stopped") == 1
    assert metrics.get("mqtt.outbound_dropped", kind="status", reason="stopped") == 1


@pytest.mark.parametrize("field", ["window", "alerts_max", "deadletter_rate_per_s", "deadletter_summary_interval_s"])
def test_bounds_must_be_positive(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        OutboundSettings(**{field: 0})
