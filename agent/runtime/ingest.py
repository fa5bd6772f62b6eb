"""The ingest worker: decode each message, make its records durable, acknowledge, and cut windows."""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from collections.abc import Sequence

from agent.commissioning.scorer import CommissioningScorer
from agent.decode.base import Decoder
from agent.decode.errors import DecodeError
from agent.features.windows import Windower
from agent.metrics import Metrics
from agent.records import Decoded, Message, Reading, SampleBlock, Window
from agent.runtime.defect import ShaftSpeeds
from agent.runtime.worker import POLL_S, Broker, LineLog, Worker, drain, to_lines
from agent.storage.points import RawVibrationPolicy, block_lines, reading_lines
from agent.topics import Topics

logger = logging.getLogger(__name__)


def for_scoring(item: Decoded, windower: Windower, baseline: CommissioningScorer | None) -> list[Window | Reading]:
    """What the scoring worker gets for one decoded item: the windows it completes and, for a machine's
    commissioning baseline, the reading itself."""
    out: list[Window | Reading] = list(windower.add(item))
    if baseline is not None and isinstance(item, Reading) and baseline.handles(item.source):
        out.append(item)
    return out


class IngestWorker(Worker):
    """Decodes messages, makes their readings durable in the spool, acknowledges, and builds windows.

    Windows (and, with a commissioning baseline, process readings) go to the scoring queue; once it has
    stayed full for ``put_timeout_s``, the rest of a batch is dropped from scoring (counted), never from
    storage.
    """

    def __init__(
        self,
        messages: queue.Queue[Message],
        windows: queue.Queue[Window | Reading],
        decoder: Decoder,
        spool: LineLog,
        raw_policy: RawVibrationPolicy,
        windower: Windower,
        broker: Broker,
        topics: Topics,
        metrics: Metrics,
        put_timeout_s: float,
        baseline: CommissioningScorer | None = None,
        speeds: ShaftSpeeds | None = None,
        batch_max: int = 500,
    ) -> None:
        super().__init__("ingest", metrics)
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
        self._raw_released: deque[SampleBlock] = deque()

    def store_raw(self, blocks: Sequence[SampleBlock]) -> None:
        """Raw blocks released by an alert (called from the scoring thread; stored with the next batch).

        Formatting thousands of sample lines would delay the next alerts if the scoring thread did it.
        """
        self._raw_released.extend(blocks)

    def step(self) -> None:
        batch = drain(self._messages, POLL_S, self._batch_max)
        if batch or self._raw_released:
            self.process(batch)

    def finish(self) -> None:
        while batch := drain(self._messages, 0, self._batch_max):
            self.process(batch)
        if self._raw_released:
            self.process([])

    def process(self, batch: Sequence[Message]) -> None:
        lines: list[str] = []
        decoded: list[Decoded] = []
        for msg in batch:
            self._metrics.inc("ingest.messages")
            try:
                items = self._decoder.decode(msg)
            except DecodeError as exc:
                self._reject(msg, exc)
                continue
            for item in items:
                if isinstance(item, Reading):
                    lines.extend(to_lines(reading_lines, item, self._metrics))
                    self._metrics.inc("ingest.readings")
                    if self._speeds is not None:
                        self._speeds.observe(item)
                else:
                    self._metrics.inc("ingest.blocks")
                    self._metrics.inc("ingest.samples", len(item.samples))
                    for block in self._raw.decide(item):
                        lines.extend(to_lines(block_lines, block, self._metrics))
            decoded.extend(items)
        # Windows go to scoring before the spool commit: alerts do not wait for the disk, and scoring a
        # reading that is not yet durable is harmless (the acknowledgement below still waits for it).
        # Once the scoring queue has stayed full for put_timeout_s, the rest of this batch does not wait again.
        wait_s = self._put_timeout_s
        for item in decoded:
            for queued in for_scoring(item, self._windower, self._baseline):
                wait_s = self._put(queued, wait_s)
        while self._raw_released:
            lines.extend(to_lines(block_lines, self._raw_released.popleft(), self._metrics))
        if lines:
            self._append_durably(lines)
        # Acknowledge only now: every reading of these messages is on disk (or the message was rejected
        # and reported on the dead-letter topic).
        for msg in batch:
            if msg.qos > 0:
                self._broker.ack(msg.mid, msg.qos)

    def _append_durably(self, lines: list[str]) -> None:
        delay = POLL_S
        while True:
            try:
                self._spool.append(lines)
                return
            except Exception:
                # Disk full or locked: do not acknowledge, keep trying; the broker keeps the messages.
                self._metrics.inc("spool.append_failures")
                logger.exception("spool append failed; retrying in %.1f s", delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)

    def _reject(self, msg: Message, exc: DecodeError) -> None:
        self._metrics.inc("decode.errors", reason=exc.code)
        logger.warning("rejected message on %s: %s (%s)", msg.topic, exc.detail, exc.code)
        payload = self._topics.deadletter_payload(msg.topic, exc.code, exc.detail, msg.payload)
        self._broker.publish(self._topics.deadletter, payload, qos=1, retain=False)

    def _put(self, item: Window | Reading, wait_s: float) -> float:
        """Queue an item for scoring; returns how long the next put of this batch may wait."""
        try:
            self._windows.put(item, timeout=wait_s) if wait_s > 0 else self._windows.put_nowait(item)
            self._metrics.inc("windows.queued")
            return wait_s
        except queue.Full:
            # Explicit, counted drop: scoring is behind; the readings themselves are stored.
            self._metrics.inc("windows.dropped", reason="queue_full")
            logger.warning("scoring queue full; %s of %s dropped", type(item).__name__, item.source)
            return 0.0
