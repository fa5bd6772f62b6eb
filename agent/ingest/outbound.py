"""Outbound MQTT with priorities and bounds: what the agent publishes waits here, by kind, not in paho.

paho has one FIFO for everything a client publishes, capped by ``max_queued_messages``; under a flood of
rejected input the dead letters filled it, and alerts, heartbeats and the dead letters beyond the cap
failed with "Message queue full". Here each kind has its own bounded queue, and a dispatcher thread hands
the most urgent waiting message to the client whenever fewer than ``window`` of its messages are
unconfirmed (no PUBACK yet), so paho's queue never holds more than ``window`` of them:

=============  =====================================  ===============================================
kind           what                                   when its queue is full
=============  =====================================  ===============================================
``alert``      alert lifecycle messages               the oldest is dropped (counted); bound is large
``control``    command replies, retained machine      the oldest is dropped (counted)
               states
``status``     heartbeat, Home Assistant configs      the oldest is dropped (counted)
               and scores (retained)
``deadletter`` rejected input                         never queued beyond it: summarised instead
=============  =====================================  ===============================================

A retained message replaces the one of the same topic still waiting (``mqtt.outbound_superseded``): the
broker keeps only the latest anyway, so a heartbeat or machine state never piles up while the broker is
away. While the connection is down nothing is handed over; the messages already in the client (at most
``window``) are resent by paho after the reconnect, then the queues are served most urgent first.

Dead letters: a token bucket (``deadletter_rate_per_s``, ``deadletter_burst``) decides which rejections
are reported one by one; the others (and those that find the dead-letter queue full) are counted per
reason and published as one summary per ``deadletter_summary_interval_s`` on the same topic
(``Topics.deadletter_summary_payload``). Every rejection is thus either a dead letter or in a summary:
``decode.errors`` = ``mqtt.deadletters`` + ``mqtt.deadletters_summarised``.

Threads: ``publish``, ``dead_letter`` and ``ack`` are called from any worker thread and never block on the
broker (acknowledgements go straight to the connection: a slow outbound path never holds back ingest);
the dispatcher thread is the only one that calls the connection's ``publish``. ``start`` and ``stop`` are
called once each by the owner (``agent.runtime.agent.Agent``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from itertools import count
from typing import Protocol

from agent.ingest.settings import OutboundSettings
from agent.metrics import Metrics
from agent.topics import Topics

logger = logging.getLogger(__name__)

POLL_S = 0.1
"""Longest wait of the dispatcher before it looks again at the connection, the window and the summary."""


class Kind(IntEnum):
    """Outbound kinds, most urgent first (the value is the priority)."""

    ALERT = 0
    CONTROL = 1
    STATUS = 2
    DEADLETTER = 3

    @property
    def label(self) -> str:
        return self.name.lower()


class Delivery(Protocol):
    """What paho's ``MQTTMessageInfo`` tells about one handed-over message."""

    @property
    def rc(self) -> int: ...

    def is_published(self) -> bool: ...

    def wait_for_publish(self, timeout: float | None = None) -> None: ...


class Connection(Protocol):
    """The MQTT side (``agent.ingest.mqtt.MqttConnection``): thread-safe, never blocks on the broker."""

    @property
    def is_connected(self) -> bool: ...

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> Delivery: ...

    def ack(self, mid: int, qos: int) -> None: ...

    def ack_batch(self, acks: Sequence[tuple[int, int]]) -> None: ...


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; ``take`` spends one if there is one.

    >>> bucket = TokenBucket(rate=2.0, burst=2, now=0.0)
    >>> [bucket.take(0.0), bucket.take(0.0), bucket.take(0.0), bucket.take(0.5), bucket.take(0.5)]
    [True, True, False, True, False]
    """

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._at = now

    def take(self, now: float) -> bool:
        self._tokens = min(self._burst, self._tokens + max(0.0, now - self._at) * self._rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


@dataclass(frozen=True)
class _Item:
    kind: Kind
    topic: str
    payload: bytes
    retain: bool
    summary: bool = False


class Outbound:
    """Priority queues in front of one MQTT connection; provides the workers' ``Broker`` and ``DeadLetters``."""

    def __init__(
        self,
        connection: Connection,
        topics: Topics,
        settings: OutboundSettings,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._connection = connection
        self._topics = topics
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._bounds = {
            Kind.ALERT: settings.alerts_max,
            Kind.CONTROL: settings.control_max,
            Kind.STATUS: settings.status_max,
            Kind.DEADLETTER: settings.deadletter_max,
        }
        # Per kind: waiting messages in arrival order; a retained message's key is its topic (replaced in place).
        self._queues: dict[Kind, OrderedDict[Hashable, _Item]] = {kind: OrderedDict() for kind in Kind}
        self._keys = count()
        self._cond = threading.Condition()
        self._bucket = TokenBucket(settings.deadletter_rate_per_s, settings.deadletter_burst, clock())
        self._summary: dict[str, int] = {}  # reason -> rejections not reported one by one, since _summary_from
        self._summary_from: tuple[float, int] | None = None  # (clock, wall ns) of the first of them
        self._summary_waiting = False  # a summary is queued: the next one starts after it was handed over
        self._inflight: list[Delivery] = []  # handed to the client, not yet confirmed (dispatcher thread only)
        self._deadline: float | None = None  # set by stop(): drain until then
        self._thread: threading.Thread | None = None
        for kind, q in self._queues.items():
            metrics.set_function("mqtt.outbound_queued", q.__len__, kind=kind.label)
        metrics.set_function("mqtt.outbound_inflight", lambda: len(self._inflight))

    # --- the workers' side (any thread) -----------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        """Queue a message by the kind of its topic; False if it displaced the oldest of its kind (counted).

        Everything is published with QoS 1 (``qos`` is accepted for the ``Broker`` protocol)."""
        return self._put(_Item(self._kind(topic), topic, payload, retain))

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge an inbound message: straight to the connection, never behind outbound messages."""
        self._connection.ack(mid, qos)

    def ack_batch(self, acks: Sequence[tuple[int, int]]) -> None:
        """Acknowledge a batch of ``(mid, qos)``: like ``ack`` for each, with one wake-up of the network thread."""
        self._connection.ack_batch(acks)

    def dead_letter(self, topic: str, code: str, detail: str, payload: bytes) -> bool:
        """Report one rejected message: one by one within the rate (True), else counted for the next summary."""
        now = self._clock()
        with self._cond:
            room = len(self._queues[Kind.DEADLETTER]) < self._bounds[Kind.DEADLETTER]
            if room and self._bucket.take(now):
                body = self._topics.deadletter_payload(topic, code, detail, payload)
                self._queue(_Item(Kind.DEADLETTER, self._topics.deadletter, body, retain=False))
                self._cond.notify()
                self._metrics.inc("mqtt.deadletters")
                return True
            if self._summary_from is None:
                self._summary_from = (now, time.time_ns())
            self._summary[code] = self._summary.get(code, 0) + 1
        self._metrics.inc("mqtt.deadletters_summarised", reason=code)
        return False

    # --- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("Outbound.start() called twice")
        self._thread = threading.Thread(target=self._run, name="mqtt-outbound", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float) -> None:
        """Publish what is waiting (the pending summary too) and wait for the broker's confirmations, for at
        most ``timeout_s`` and only while connected; what is left then is dropped and counted
        (``reason=stopped``)."""
        deadline = self._clock() + timeout_s
        with self._cond:
            self._deadline = deadline
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s + POLL_S)
        for delivery in self._inflight if self._connection.is_connected else ():
            delivery.wait_for_publish(max(0.0, deadline - self._clock()))
        with self._cond:
            left = {kind: len(q) for kind, q in self._queues.items() if q}
            for q in self._queues.values():
                q.clear()
        for kind, n in left.items():
            self._metrics.inc("mqtt.outbound_dropped", n, kind=kind.label, reason="stopped")
        unconfirmed = sum(not d.is_published() for d in self._inflight)
        if left or unconfirmed:
            logger.warning(
                "outbound MQTT stopped with %s message(s) not sent and %d not confirmed by the broker",
                ", ".join(f"{n} {kind.label}" for kind, n in left.items()) or "no",
                unconfirmed,
            )

    # --- internals -------------------------------------------------------------------------------------

    def _kind(self, topic: str) -> Kind:
        base = self._topics.base
        if topic.startswith(f"{base}/alerts/"):
            return Kind.ALERT
        if topic.startswith(f"{base}/state/") or topic == self._topics.command_result:
            return Kind.CONTROL
        if topic == self._topics.deadletter:
            return Kind.DEADLETTER
        return Kind.STATUS

    def _put(self, item: _Item) -> bool:
        with self._cond:
            kept = self._queue(item)
            self._cond.notify()
        return kept

    def _queue(self, item: _Item) -> bool:
        """Append under the lock; False when the oldest of the kind had to go (counted and logged)."""
        q = self._queues[item.kind]
        key: Hashable = item.topic if item.retain else next(self._keys)
        if key in q:
            q[key] = item  # the broker keeps only the latest retained message anyway
            self._metrics.inc("mqtt.outbound_superseded", kind=item.kind.label)
            return True
        q[key] = item
        if item.summary or len(q) <= self._bounds[item.kind]:
            return True
        _, dropped = q.popitem(last=False)
        self._metrics.inc("mqtt.outbound_dropped", kind=item.kind.label, reason="queue_full")
        logger.warning("outbound %s queue full (%d): dropped the oldest, to %s", item.kind.label, len(q), dropped.topic)
        return False

    def _run(self) -> None:
        while True:
            try:
                item = self._next()
                if item is None:
                    return
                self._hand_over(item)
            except Exception:
                logger.exception("outbound MQTT dispatcher: unexpected error; continuing")
                time.sleep(POLL_S)

    def _next(self) -> _Item | None:
        """The most urgent waiting message once the connection is up and the window has room; None at stop."""
        while True:
            self._inflight = [d for d in self._inflight if not d.is_published()]
            if len(self._inflight) >= self._settings.window:
                self._inflight[0].wait_for_publish(POLL_S)
                if self._deadline is not None and self._clock() >= self._deadline:
                    return None
                continue
            with self._cond:
                now = self._clock()
                self._summarise(now, force=self._deadline is not None)
                waiting = next((q for q in self._queues.values() if q), None)
                stopped = self._deadline is not None and (
                    waiting is None or now >= self._deadline or not self._connection.is_connected
                )
                if stopped:
                    return None
                if waiting is not None and self._connection.is_connected:
                    _, item = waiting.popitem(last=False)
                    if item.summary:
                        self._summary_waiting = False
                    return item
                self._cond.wait(POLL_S)

    def _summarise(self, now: float, force: bool) -> None:
        """Queue the summary of the rejections not reported one by one, once per interval (under the lock)."""
        if self._summary_from is None or self._summary_waiting:
            return
        started, from_ns = self._summary_from
        if not force and now - started < self._settings.deadletter_summary_interval_s:
            return
        counts, self._summary, self._summary_from = self._summary, {}, None
        to_ns = time.time_ns()
        body = self._topics.deadletter_summary_payload(counts, from_ns, to_ns, self._settings.deadletter_rate_per_s)
        self._queue(_Item(Kind.DEADLETTER, self._topics.deadletter, body, retain=False, summary=True))
        self._summary_waiting = True
        self._metrics.inc("mqtt.deadletter_summaries")
        logger.warning(
            "%d rejected message(s) beyond the dead-letter rate (%g/s) in %.1f s, summarised: %s",
            sum(counts.values()),
            self._settings.deadletter_rate_per_s,
            (to_ns - from_ns) / 1e9,
            ", ".join(f"{code} {n}" for code, n in sorted(counts.items())),
        )

    def _hand_over(self, item: _Item) -> None:
        delivery = self._connection.publish(item.topic, item.payload, qos=1, retain=item.retain)
        if delivery.rc == 0:
            self._inflight.append(delivery)
        else:
            # The connection counted and logged the client's error (mqtt.publish_errors).
            self._metrics.inc("mqtt.outbound_dropped", kind=item.kind.label, reason="client_error")
