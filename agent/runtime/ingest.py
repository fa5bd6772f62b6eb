"""The ingest worker: decode each message, make its records durable, acknowledge, and cut windows."""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace

from agent.commissioning.scorer import CommissioningScorer
from agent.decode.base import Decoder, Outbox
from agent.decode.errors import DecodeError
from agent.features.windows import Windower
from agent.images.points import image_lines
from agent.images.store import ImageStore
from agent.logs import RateLimitedLog
from agent.metrics import Metrics
from agent.records import Decoded, ImageFrame, Message, Reading, SampleBlock, ScoringItem
from agent.runtime.defect import ShaftSpeeds
from agent.runtime.inspection import PendingImages
from agent.runtime.worker import POLL_S, Broker, DeadLetters, EntryLog, Worker, drain
from agent.spool.arrivals import ArrivalLog, arrival_key, encode_arrival, used_arrival_time
from agent.spool.codec import Entry, check_block, encode_block, encode_lines, encode_raw_blocks, encode_readings
from agent.spool.sqlite import SpoolNotWritable
from agent.storage.points import RawVibrationPolicy
from agent.topics import Topics

logger = logging.getLogger(__name__)

APPEND_RETRY_MAX_S = 2.0
"""Longest wait between spool append attempts (a refused append of a full spool costs a page count)."""
REJECTED_LOG_LINES = 10
REJECTED_LOG_INTERVAL_S = 60.0
"""Rejected messages logged one by one (WARNING) per interval; the rest of the interval's rejections are
summarised in one line at its end (each is still counted in ``decode.errors`` and on the dead-letter topic)."""
HELD_CHECK_S = 1.0  # how often held raw blocks are expired and counted (storage.raw_held_*)
EVICTED_LOG_INTERVAL_S = 60.0  # at most one warning a minute that held raw blocks were given up for the byte cap


def for_scoring(item: Decoded, windower: Windower, baseline: CommissioningScorer | None) -> list[ScoringItem]:
    """What the scoring worker gets for one decoded item: the windows it completes and, for a machine's
    commissioning baseline, the reading itself; a camera image is scored whole (it is its own window)."""
    if isinstance(item, ImageFrame):
        return [item]
    out: list[ScoringItem] = list(windower.add(item))
    if baseline is not None and isinstance(item, Reading) and baseline.handles(item.source):
        out.append(item)
    return out


class IngestWorker(Worker):
    """Decodes messages, makes their readings durable in the spool, acknowledges, and builds windows.

    Windows (and, with a commissioning baseline, process readings) go to the scoring queue; once it has
    stayed full for ``put_timeout_s``, the rest of a batch is dropped from scoring (counted), never from
    storage.

    With ``arrivals`` (the spool), a message without a device timestamp keeps the arrival time of its first
    stored delivery when the broker redelivers it (``agent.spool.arrivals``): no second point in InfluxDB.
    """

    def __init__(
        self,
        messages: queue.Queue[Message],
        windows: queue.Queue[ScoringItem],
        decoder: Decoder,
        spool: EntryLog,
        raw_policy: RawVibrationPolicy,
        windower: Windower,
        broker: Broker,
        topics: Topics,
        metrics: Metrics,
        put_timeout_s: float,
        baseline: CommissioningScorer | None = None,
        speeds: ShaftSpeeds | None = None,
        batch_max: int = 500,
        arrivals: ArrivalLog | None = None,
        dead_letters: DeadLetters | None = None,
        images: ImageStore | None = None,
        pending_images: PendingImages | None = None,
        before_commit: Callable[[], None] | None = None,
    ) -> None:
        super().__init__("ingest", metrics)
        self._before_commit = before_commit
        self._images = images
        self._pending_images = pending_images
        self._messages = messages
        self._windows = windows
        self._decoder = decoder
        self._spool = spool
        self._raw = raw_policy
        self._windower = windower
        self._broker = broker
        self._topics = topics
        self._put_timeout_s = put_timeout_s
        self._baseline = baseline
        self._speeds = speeds
        self._batch_max = batch_max
        self._arrivals = arrivals
        self._dead_letters = dead_letters
        self._raw_released: deque[list[SampleBlock]] = deque()
        self._expire_at = 0.0  # when the raw policy's held blocks are next looked over (monotonic)
        self._produced: deque[Entry] = deque()
        self._handoff_lock = threading.Lock()
        self._closed = False  # after finish: what other threads hand over goes to the spool directly
        self._append_failing_since: float | None = None  # logged once per failing period (a full disk)
        self._rejected_log = RateLimitedLog(logger, "rejected message(s)", REJECTED_LOG_LINES, REJECTED_LOG_INTERVAL_S)
        self._evicted_log = RateLimitedLog(logger, "evictions of held raw blocks", 1, EVICTED_LOG_INTERVAL_S)

    def store_raw(self, blocks: Sequence[SampleBlock]) -> None:
        """Held blocks an alert released (called from the scoring thread): spooled with the next batch, as
        one entry, encoded here in the ingest thread; the alert's path only hands over the references."""
        if not blocks:
            return
        with self._handoff_lock:
            if not self._closed:
                self._raw_released.append(list(blocks))
                return
        self._append_durably([encode_raw_blocks(blocks)])

    def append_lines(self, lines: Sequence[str]) -> None:
        """Points the scoring thread produced (features, scores, alerts): spooled with the next batch, in the
        ingest thread's transaction, so that the scoring thread never waits for the spool's write lock.
        A crash loses them as it would have before they were appended (they are not acknowledged data)."""
        if lines:
            self.append_entries([encode_lines(lines)])

    def append_entries(self, entries: Sequence[Entry]) -> None:
        """Points the scoring thread produced, as entries (``append_lines``; features come as one entry)."""
        if not entries:
            return
        with self._handoff_lock:
            if not self._closed:
                self._produced.extend(entries)
                return
        self._append_durably(list(entries))

    def step(self) -> None:
        batch = drain(self._messages, POLL_S, self._batch_max)
        if batch or self._raw_released or self._produced:
            self.process(batch)
        self.talk_back()
        self._rejected_log.flush()
        self._evicted_log.flush()
        now = time.monotonic()
        if now >= self._expire_at:
            self._expire_at = now + HELD_CHECK_S
            self._raw.expire()
            blocks, held_bytes = self._raw.held()
            self._metrics.set("storage.raw_held_blocks", blocks)
            self._metrics.set("storage.raw_held_bytes", held_bytes)

    def finish(self) -> None:
        while batch := drain(self._messages, 0, self._batch_max):
            self.process(batch)
        self.talk_back(final=True)
        self._rejected_log.flush(force=True)
        self._evicted_log.flush(force=True)
        with self._handoff_lock:
            self._closed = True
        if self._raw_released or self._produced:
            self.process([])

    def process(self, batch: Sequence[Message]) -> None:
        entries: list[Entry] = []
        held: list[SampleBlock] = []  # blocks kept for an alert (in memory, once this batch is durable)
        readings_n = blocks_n = samples_n = images_n = queued_n = 0  # counted once per batch: a metric call costs
        # Windows go to scoring as soon as their message is decoded, before the spool commit: alerts wait
        # neither for the disk nor for the rest of the batch, and scoring a reading that is not yet durable
        # is harmless (the acknowledgement below still waits for it). Once the scoring queue has stayed
        # full for put_timeout_s, the rest of this batch does not wait again.
        wait_s = self._put_timeout_s
        for msg in batch:
            restored = False
            if msg.dup:
                msg, restored = self._first_arrival(msg)
            try:
                items = self._decoder.decode(msg)
            except DecodeError as exc:
                self._reject(msg, exc)
                continue
            try:
                message_entries, message_held = self._entries(items)
            except ValueError as exc:
                # The spool's format cannot hold it (a name or tag beyond its limits): reported like bad input
                # on the dead-letter topic, not acknowledged and dropped.
                self._metrics.inc("storage.unencodable", kind=type(items[0]).__name__ if items else "message")
                self._reject(msg, DecodeError("too_large", f"cannot be stored: {exc}"))
                continue
            if self._arrivals is not None and msg.qos and not restored and used_arrival_time(items, msg.received_ns):
                # Durable with the readings (same transaction), so that a redelivery finds the same time.
                message_entries.append(encode_arrival(arrival_key(msg), msg.received_ns))
            held.extend(message_held)
            entries.extend(message_entries)
            for item in items:
                if isinstance(item, Reading):
                    readings_n += 1
                    if self._speeds is not None:
                        self._speeds.observe(item)
                elif isinstance(item, SampleBlock):
                    blocks_n += 1
                    samples_n += len(item.samples)
                else:
                    images_n += 1
            for item in items:
                for queued in for_scoring(item, self._windower, self._baseline):
                    if isinstance(queued, ImageFrame):
                        image = self._image_for_scoring(queued)
                        if image is None:
                            continue
                        queued = image
                    if self._put(queued, wait_s):
                        queued_n += 1
                    else:
                        wait_s = 0.0  # the queue stayed full: the rest of this batch does not wait again
        self._metrics.inc("ingest.messages", len(batch))
        if readings_n:
            self._metrics.inc("ingest.readings", readings_n)
        if blocks_n:
            self._metrics.inc("ingest.blocks", blocks_n)
            self._metrics.inc("ingest.samples", samples_n)
        if images_n:
            self._metrics.inc("images.received", images_n)
        if queued_n:
            self._metrics.inc("windows.queued", queued_n)
        while self._raw_released:
            entries.append(encode_raw_blocks(self._raw_released.popleft()))
        while self._produced:
            entries.append(self._produced.popleft())
        if entries:
            if self._before_commit is not None:
                self._before_commit()
            if self._append_durably(entries) is None:
                return  # stopping without room in the spool: nothing of this batch is acknowledged
        evicted = sum(self._raw.hold(block) for block in held)
        if evicted:
            self._metrics.inc("storage.raw_hold_evicted", evicted)
            self._evicted_log.warning(
                "hold_max_bytes",
                "gave up %d held raw block(s) to stay within storage.raw_vibration.hold_max_bytes (%d bytes): "
                "alerts come with less raw data from before them; more channels than the cap allows for",
                evicted,
                self._raw.max_bytes,
            )
        # Acknowledge only now: every reading of these messages is on disk (or the message was rejected
        # and reported on the dead-letter topic).
        self._broker.ack_batch([(msg.mid, msg.qos) for msg in batch if msg.qos > 0])

    def talk_back(self, final: bool = False) -> None:
        """What a stateful decoder (``agent.decode.base.Outbox``) wants said: its requests published, its
        partial rejections reported like rejected messages."""
        if not isinstance(self._decoder, Outbox):
            return
        publish, rejected = self._decoder.outbox(time.time_ns(), final)
        for item in publish:
            self._broker.publish(item.topic, item.payload, qos=item.qos, retain=item.retain)
        for rejection in rejected:
            self._report(rejection.topic, rejection.error, rejection.payload)

    def _first_arrival(self, msg: Message) -> tuple[Message, bool]:
        """A redelivered message (DUP) with the arrival time of its first, stored delivery, if one was
        recorded (it had no device timestamp); else unchanged. True if restored."""
        self._metrics.inc("ingest.redelivered")
        if self._arrivals is None:
            return msg, False
        try:
            first_ns = self._arrivals.arrival_ns(arrival_key(msg))
        except sqlite3.Error as exc:
            # Decoded with a fresh time: at worst a second point, never a lost reading.
            logger.warning("could not look up the first arrival of a redelivered message on %s: %s", msg.topic, exc)
            return msg, False
        if first_ns is None:
            return msg, False
        self._metrics.inc("ingest.arrival_restored")
        return replace(msg, received_ns=first_ns), True

    def _entries(self, items: Sequence[Decoded]) -> tuple[list[Entry], list[SampleBlock]]:
        """One message's spool entries (its readings together, each stored block), and its blocks to hold
        for a possible alert (not spooled); ``ValueError`` when the spool's format cannot hold one of them."""
        entries: list[Entry] = []
        held: list[SampleBlock] = []
        readings = [item for item in items if isinstance(item, Reading)]
        if readings:
            entries.append(encode_readings(readings))
        for item in items:
            if isinstance(item, ImageFrame):
                # The bytes once in the image store, a reference in the spool (agent/images/store.py says why).
                stored = self._images is not None and self._images.put(item.sha256, item.format, item.payload)
                entries.append(encode_lines(image_lines(item, stored)))
            elif isinstance(item, SampleBlock):
                decision = self._raw.decide(item)
                if decision == "skip":
                    continue
                if decision == "hold":
                    check_block(item)  # refused now, as a stored block would be, not when an alert wants it
                    held.append(item)
                else:
                    entries.append(encode_block(item, store_raw=True))
        return entries, held

    def _append_durably(self, entries: list[Entry]) -> list[int | None] | None:
        """Append ``entries``, retrying with a backoff while the spool cannot take them (a full disk, a lock);
        None when the worker is stopping and they are still not stored: the caller must not acknowledge.

        Logged once when appends start failing and once when they succeed again, not per retry.
        """
        delay = POLL_S
        while True:
            try:
                ids = self._spool.append(entries)
            except (OSError, sqlite3.Error, SpoolNotWritable) as exc:
                # Not acknowledged: the broker keeps the messages (and stops sending once its in-flight
                # window to this client is full), so this is backpressure, not loss.
                self._metrics.inc("spool.append_failures")
                if self._append_failing_since is None:
                    self._append_failing_since = time.monotonic()
                    logger.error("spool append failed; not acknowledging, retrying: %s", exc)
                if self._stop_event.is_set():
                    logger.warning(
                        "stopping with %d spool entries not stored: their messages are not acknowledged and the "
                        "broker redelivers them",
                        len(entries),
                    )
                    return None
                self._stop_event.wait(delay)
                delay = min(delay * 2, APPEND_RETRY_MAX_S)
                continue
            if self._append_failing_since is not None:
                took = time.monotonic() - self._append_failing_since
                self._append_failing_since = None
                logger.warning("spool appends succeed again after %.1f s", took)
            return ids

    def _reject(self, msg: Message, exc: DecodeError) -> None:
        self._report(msg.topic, exc, msg.payload)

    def _report(self, topic: str, exc: DecodeError, payload: bytes) -> None:
        """Count a rejected message and report it: through ``dead_letters`` (one by one within its rate, else
        in a summary that the outbound side logs), or without it (tests) as a dead letter on the broker. Those
        reported one by one are logged one by one up to ``REJECTED_LOG_LINES`` per interval, then summarised."""
        self._metrics.inc("decode.errors", reason=exc.code)
        if self._dead_letters is None:
            body = self._topics.deadletter_payload(topic, exc.code, exc.detail, payload)
            self._broker.publish(self._topics.deadletter, body, qos=1, retain=False)
            one_by_one = True
        else:
            one_by_one = self._dead_letters.dead_letter(topic, exc.code, exc.detail, payload)
        if one_by_one:
            self._rejected_log.warning(exc.code, "rejected message on %s: %s (%s)", topic, exc.detail, exc.code)
        else:
            logger.debug("rejected message on %s: %s (%s)", topic, exc.detail, exc.code)

    def _image_for_scoring(self, frame: ImageFrame) -> ImageFrame | None:
        """The frame to queue (without its file bytes: they are in the store now), or None when the pixels
        already waiting for scoring are at their byte bound (counted; the image stays stored and referenced)."""
        if self._pending_images is not None and not self._pending_images.take(frame.gray.nbytes):
            self._metrics.inc("images.unscored", reason="backlog")
            return None
        return replace(frame, payload=b"")

    def _put(self, item: ScoringItem, wait_s: float) -> bool:
        """Queue an item for scoring, waiting up to ``wait_s``; False: dropped (counted), the queue is full."""
        try:
            self._windows.put(item, timeout=wait_s) if wait_s > 0 else self._windows.put_nowait(item)
            return True
        except queue.Full:
            # Explicit, counted drop: scoring is behind; the readings themselves are stored.
            self._metrics.inc("windows.dropped", reason="queue_full")
            if isinstance(item, ImageFrame) and self._pending_images is not None:
                self._pending_images.give_back(item.gray.nbytes)
            logger.warning("scoring queue full; %s of %s dropped", type(item).__name__, item.source)
            return False
