"""Arrival times of messages without a device timestamp, kept so that a redelivery stores the same points.

InfluxDB identifies a point by its series and its time. A payload without ``ts`` is stamped with its
arrival time; when the broker redelivers it (the agent stopped after the spool commit and before the
PUBACK reached the broker), a new arrival time would make a second point. So for each such message the
spool keeps its arrival time under a key of the message, written in the SAME transaction as the message's
entries (``Spool.append`` stores an ``ARRIVAL`` entry here instead of in ``entry``): the record is durable
exactly when the readings are. A redelivery carries the MQTT DUP flag (``Message.dup``); the ingest worker
looks its key up and, if found, decodes it with the recorded time: the same points again, which InfluxDB
overwrites with themselves. A message without DUP always gets a fresh time: two byte-identical
timestamp-less messages are two readings.

The key is a 16-byte BLAKE2b digest of the topic, the MQTT packet id and the payload. A redelivery keeps
its packet id (MQTT 3.1.1 §4.4, MQTT 5 §4.4; checked with Mosquitto after a kill -9 of the subscriber), and
the broker only reuses a packet id once the previous message with it was acknowledged. Without the packet
id, a redelivered message that was never stored (killed before the commit) but repeats the payload of an
earlier reading (a constant value, a quantised one) would take that reading's time and be lost in it;
with it, that needs the same payload on the same packet id within the retention.

Only messages whose decoded items actually used the arrival time get a record (``used_arrival_time``), so
payloads with ``ts`` cost nothing. Records are pruned in the spool's maintenance (``ArrivalRetention``),
oldest first, by age and by count, a bounded number per pass. A redelivery whose record was pruned gets a
fresh time (a duplicate point): keep ``spool.arrivals_max_age_s`` at least as long as the broker keeps the
agent's session (``mqtt.session_expiry_s``).
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import struct
import time
from collections.abc import Sequence
from typing import Protocol

from agent.metrics import Metrics
from agent.records import Decoded, Message, SampleBlock
from agent.spool.codec import Entry, Kind

logger = logging.getLogger(__name__)

KEY_BYTES = 16
DEFAULT_MAX_AGE_S = 86_400.0
"""A day: the broker's default session expiry (``mqtt.session_expiry_s``), after which it redelivers nothing."""
DEFAULT_MAX_ROWS = 1_000_000
"""About 60 MB of spool file at most (key, time, row id and the key's index)."""
PRUNE_INTERVAL_S = 10.0
PRUNE_BATCH = 10_000
"""Rows looked at (and at most deleted) per rule and pass: a pass stays a few milliseconds."""

_PACKET_ID_MASK = 0xFFFF
_BODY = struct.Struct(f"<{KEY_BYTES}sq")
_HEAD = struct.Struct("<IH")


class ArrivalLog(Protocol):
    """Where the ingest worker looks up recorded arrival times (``agent.spool.sqlite.Spool``), from its
    own thread; may raise ``sqlite3.Error``."""

    def arrival_ns(self, key: bytes) -> int | None: ...


def arrival_key(message: Message) -> bytes:
    """The key of a message's arrival record: topic, packet id (``Message.mid``'s low 16 bits), payload."""
    topic = message.topic.encode("utf-8", errors="replace")
    digest = hashlib.blake2b(digest_size=KEY_BYTES)
    digest.update(_HEAD.pack(len(topic), message.mid & _PACKET_ID_MASK))
    digest.update(topic)
    digest.update(message.payload)
    return digest.digest()


def used_arrival_time(items: Sequence[Decoded], received_ns: int) -> bool:
    """Whether any decoded item is stamped with the arrival time (its payload had no ``ts``).

    A device timestamp equal to the arrival time to the nanosecond also counts: one needless record.
    """
    return any((item.start_ns if isinstance(item, SampleBlock) else item.time_ns) == received_ns for item in items)


def encode_arrival(key: bytes, arrival_ns: int) -> Entry:
    """The entry that records ``arrival_ns`` under ``key`` in the transaction of the message's entries."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"an arrival key has {KEY_BYTES} bytes, not {len(key)}")
    return Entry(Kind.ARRIVAL, _BODY.pack(key, arrival_ns), 0)


def record(conn: sqlite3.Connection, body: bytes) -> None:
    """Store an ``ARRIVAL`` entry's record (inside the caller's transaction). The same key again (the same
    message redelivered and not found, or the packet id's earlier message) takes the newer time."""
    key, arrival_ns = _BODY.unpack(body)
    conn.execute("INSERT OR REPLACE INTO arrival (key, arrival_ns) VALUES (?, ?)", (key, arrival_ns))


def lookup(conn: sqlite3.Connection, key: bytes) -> int | None:
    """The arrival time recorded under ``key``, or None."""
    row = conn.execute("SELECT arrival_ns FROM arrival WHERE key = ?", (key,)).fetchone()
    return None if row is None else int(row[0])


class ArrivalRetention:
    """Prunes the arrival records: older than ``max_age_s``, or beyond the newest ``max_rows``.

    Called by the spool's compaction inside its transaction; does something at most every
    ``PRUNE_INTERVAL_S`` and removes at most ``PRUNE_BATCH`` rows per rule, so that a large backlog of
    records (a lowered cap) goes over several passes instead of one long write lock.
    """

    def __init__(self, max_age_s: float, max_rows: int, metrics: Metrics) -> None:
        if max_age_s <= 0 or max_rows < 1:
            raise ValueError(f"arrivals need max_age_s > 0 and max_rows >= 1, not {max_age_s}, {max_rows}")
        self.max_age_s = max_age_s
        self.max_rows = max_rows
        self._metrics = metrics
        self._last = -float("inf")

    def prune(self, conn: sqlite3.Connection, now_ns: int | None = None, *, force: bool = False) -> int:
        """Delete what is due (inside the caller's transaction); how many rows."""
        if not force and time.monotonic() - self._last < PRUNE_INTERVAL_S:
            return 0
        self._last = time.monotonic()
        top = conn.execute("SELECT max(id) FROM arrival").fetchone()[0]
        if top is None:
            return 0
        # Row ids grow with each record, so the oldest rows come first without an index on the time.
        gone = conn.execute(
            "DELETE FROM arrival WHERE id IN (SELECT id FROM arrival WHERE id <= ? ORDER BY id LIMIT ?)",
            (int(top) - self.max_rows, PRUNE_BATCH),
        ).rowcount
        cutoff = (time.time_ns() if now_ns is None else now_ns) - int(self.max_age_s * 1e9)
        gone += conn.execute(
            "DELETE FROM arrival WHERE id IN "
            "(SELECT id FROM (SELECT id, arrival_ns FROM arrival ORDER BY id LIMIT ?) WHERE arrival_ns < ?)",
            (PRUNE_BATCH, cutoff),
        ).rowcount
        if gone:
            self._metrics.inc("spool.arrivals_pruned", gone)
        return int(gone)
