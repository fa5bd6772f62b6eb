"""What the workers share: the broker and spool they write to, the thread base, queue draining."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from agent.metrics import Metrics
from agent.records import Message
from agent.spool.codec import Entry

logger = logging.getLogger(__name__)

POLL_S = 0.2
GATHER_S = 0.005
"""How long a consumer of windows lets them gather after the first when fewer than a batch are queued
(``drain_gathered``). Ingest queues windows one by one as their messages are decoded; a consumer that took
each at once would score batches of one, and the fixed cost of a batch (a model run per model, the
features' numpy calls, the alert decisions' bookkeeping, the lines' entry) would be paid per window:
the scoring thread's CPU per message was 2-5 times that of batches of 50 at moderate rates (2026-12-04,
docs/benchmarks.md). Small against the alert latency target (250 ms)."""
T = TypeVar("T")


class Broker(Protocol):
    """The MQTT side the workers need; ``agent.ingest.mqtt.MqttConnection`` provides it (thread-safe)."""

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> object: ...

    def ack(self, mid: int, qos: int) -> None: ...

    def ack_batch(self, acks: Sequence[tuple[int, int]]) -> None: ...


class DeadLetters(Protocol):
    """Where the ingest worker reports a rejected message (``agent.ingest.outbound.Outbound``, thread-safe,
    never blocks): on the dead-letter topic one by one within a rate, else counted per reason in a summary.
    Returns whether it was reported one by one."""

    def dead_letter(self, topic: str, code: str, detail: str, payload: bytes) -> bool: ...


class LineLog(Protocol):
    """Where the scoring worker and the heartbeat store the points they produce: the spool
    (``agent.spool.sqlite.Spool``: committed when ``append_lines``/``append_entries`` returns, raising
    ``OSError`` or ``sqlite3.Error`` otherwise), or the ingest worker, which spools them with its next
    transaction (``IngestWorker.append_lines``/``append_entries``: returns at once). Thread-safe.
    ``append_entries`` takes produced points as spool entries (``LINES``, ``FEATURES``), formatted by the writer.
    """

    def append_lines(self, lines: Sequence[str]) -> object: ...

    def append_entries(self, entries: Sequence[Entry]) -> object: ...


class EntryLog(LineLog, Protocol):
    """The durable local log the ingest worker appends what arrived to (``agent.spool.sqlite.Spool``).

    ``append`` returns each entry's spool id (None: refused by a full spool, counted there) once they are
    committed to disk, and raises when they are not.
    """

    def append(self, entries: Sequence[Entry]) -> list[int | None]: ...


class ScoringStage(Protocol):
    """What the agent runs its scoring with: the scoring thread (``agent.runtime.scoring.ScoringWorker``) or
    a scoring process (``agent.runtime.scoring_process.ScoringProcess``)."""

    def restore(self) -> int: ...

    def start(self) -> None: ...

    def stop(self, timeout_s: float) -> None: ...

    def is_alive(self) -> bool: ...


def to_lines(encode: Callable[[T], list[str]], record: T, metrics: Metrics) -> list[str]:
    """Line-protocol lines of one record; a record InfluxDB cannot hold is counted and logged, not raised."""
    try:
        return encode(record)
    except ValueError as exc:
        metrics.inc("storage.unencodable", kind=type(record).__name__)
        logger.warning("%s not stored: %s", type(record).__name__, exc)
        return []


class MessageQueue(queue.Queue[Message]):
    """The received messages waiting for the ingest worker, bounded in messages and in payload bytes.

    A count alone lets 10,000 messages of 10 kB vibration blocks hold 100 MB in memory; the byte bound keeps a
    few ingest batches' worth. ``put`` waits while either bound is reached (on paho's network thread, which then
    stops reading the socket: the broker keeps the rest); a message is always taken into an empty queue, so one
    larger than ``max_bytes`` still passes.

    >>> q = MessageQueue(maxsize=10, max_bytes=5)
    >>> q.put(Message("t", b"abc", 1, 1, 0)); q.put(Message("t", b"abc", 1, 2, 0))
    >>> q.full(), q.payload_bytes
    (True, 6)
    >>> q.get().mid, q.full(), q.payload_bytes
    (1, False, 3)
    """

    def __init__(self, maxsize: int, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"MessageQueue: max_bytes must be > 0, got {max_bytes}")
        super().__init__(maxsize)
        self.max_bytes = max_bytes
        self.payload_bytes = 0

    def _put(self, item: Message) -> None:
        self.queue.append(item)
        self.payload_bytes += len(item.payload)

    def _get(self) -> Message:
        item: Message = self.queue.popleft()
        self.payload_bytes -= len(item.payload)
        return item

    def _is_full(self) -> bool:  # under self.mutex
        n = self._qsize()
        return n >= self.maxsize > 0 or (n > 0 and self.payload_bytes >= self.max_bytes)

    def full(self) -> bool:
        with self.mutex:
            return self._is_full()

    def put(self, item: Message, block: bool = True, timeout: float | None = None) -> None:
        """As ``queue.Queue.put``, with both bounds."""
        with self.not_full:
            if not block:
                if self._is_full():
                    raise queue.Full
            elif timeout is None:
                while self._is_full():
                    self.not_full.wait()
            else:
                if timeout < 0:
                    raise ValueError("'timeout' must be a non-negative number")
                deadline = time.monotonic() + timeout
                while self._is_full():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise queue.Full
                    self.not_full.wait(remaining)
            self._put(item)
            self.unfinished_tasks += 1
            self.not_empty.notify()


def drain(q: queue.Queue[T], first_timeout_s: float, limit: int) -> list[T]:
    """Wait up to ``first_timeout_s`` for one item, then take whatever else is ready, up to ``limit``."""
    try:
        items = [q.get(timeout=first_timeout_s)]
    except queue.Empty:
        return []
    while len(items) < limit:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            break
    return items


def drain_gathered(q: queue.Queue[T], first_timeout_s: float, limit: int, gather_s: float) -> list[T]:
    """``drain``, and when it took fewer than ``limit``, sleep ``gather_s`` once and take what came meanwhile.

    A sleep, not a wait on the queue: the producer's puts wake nobody while the batch gathers.
    """
    items = drain(q, first_timeout_s, limit)
    if gather_s > 0 and 0 < len(items) < limit:
        time.sleep(gather_s)
        items += drain(q, 0, limit - len(items))
    return items


class Worker(threading.Thread):
    """A daemon thread that runs ``step`` until stopped, then ``finish`` to drain its input."""

    def __init__(self, name: str, metrics: Metrics) -> None:
        super().__init__(name=name, daemon=True)
        self._stop_event = threading.Event()
        self._metrics = metrics

    def stop(self, timeout_s: float) -> None:
        self._stop_event.set()
        self.join(timeout_s)
        if self.is_alive():
            logger.warning("%s did not stop within %.1f s", self.name, timeout_s)

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.step()
            except Exception:
                # A bug in one batch must not kill the pipeline; the batch is lost to processing only,
                # never to storage (unacknowledged messages are redelivered by the broker).
                self._metrics.inc("pipeline.errors", worker=self.name)
                logger.exception("%s: unexpected error; continuing", self.name)
                time.sleep(POLL_S)
        try:
            self.finish()
        except Exception:
            logger.exception("%s: error while draining at stop", self.name)

    def step(self) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Process what is still queued (called once, after stop)."""
