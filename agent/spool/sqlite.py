"""The local durable spool: line-protocol lines waiting for the InfluxDB writer, in SQLite.

Durability: the database runs in WAL mode with ``synchronous=NORMAL``. A committed ``append`` is in the
write-ahead log before it returns, so it survives a crash or kill of the agent process; only an OS crash
or power loss can take back the last transactions before a checkpoint (``synchronous="FULL"`` closes
that gap at the cost of an fsync per append). The ingest worker acknowledges MQTT QoS 1 messages after
``append`` returns.

Bounded: at most ``max_rows`` lines are kept. When an append would exceed it, the drop policy decides
which lines go: ``oldest`` drops the oldest queued lines (recent data is worth more for dashboards),
``newest`` refuses the incoming ones (history is kept intact). Every drop is counted in
``spool.dropped`` and logged (at most one warning per ``DROP_LOG_INTERVAL_S``), never silent.

Threads: one connection guarded by a lock; the ingest worker appends while the writer thread peeks,
acks and dead-letters. Ids only grow (``AUTOINCREMENT``), so an id in flight is never reused.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, get_args

from agent.metrics import Metrics

logger = logging.getLogger(__name__)

DropPolicy = Literal["oldest", "newest"]
DROP_POLICIES: tuple[str, ...] = get_args(DropPolicy)
DROP_LOG_INTERVAL_S = 10.0
DEFAULT_DEAD_LETTER_MAX_ROWS = 100_000
MIN_FREE_BYTES = 16 * 1024 * 1024
"""Free space below which ``writable()`` says no: room for a few WAL growths of large batches."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    line TEXT NOT NULL,
    enqueued_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letter (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    spool_id INTEGER NOT NULL,
    line TEXT NOT NULL,
    reason TEXT NOT NULL,
    dead_ns INTEGER NOT NULL
);
"""


class SpoolNotWritable(Exception):
    """The spool cannot take appends now; the message says why."""


class Spool:
    """A bounded FIFO of lines in SQLite that survives restarts (see the module docstring)."""

    def __init__(
        self,
        path: Path | str,
        max_rows: int,
        drop_policy: DropPolicy = "oldest",
        metrics: Metrics | None = None,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        dead_letter_max_rows: int = DEFAULT_DEAD_LETTER_MAX_ROWS,
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, not {max_rows}")
        if drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy {drop_policy!r} is not one of {', '.join(DROP_POLICIES)}")
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        self.path = Path(path)
        self.max_rows = max_rows
        self.drop_policy = drop_policy
        self.dead_letter_max_rows = dead_letter_max_rows
        self._metrics = metrics if metrics is not None else Metrics()
        self._lock = threading.Lock()
        self._last_drop_log = -float("inf")
        self._write_error: str | None = None  # the error of the last failed transaction, None after a commit
        self._dropped_since_log = 0
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are explicit (see _transaction).
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            str(path), check_same_thread=False, isolation_level=None
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(f"PRAGMA synchronous={synchronous}")
        self._conn.executescript(_SCHEMA)
        self._depth = int(self._conn.execute("SELECT count(*) FROM spool").fetchone()[0])
        self._dead_depth = int(self._conn.execute("SELECT count(*) FROM dead_letter").fetchone()[0])
        self._metrics.set("spool.depth", self._depth)
        # Sampled when the metrics are read (heartbeat, /metrics): the age grows while nothing happens.
        self._metrics.set_function("spool.oldest_age_s", self._oldest_age_if_open)
        if self._depth:
            logger.info("spool %s resumes with %d undelivered lines", self.path, self._depth)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"spool {self.path} is closed")
        return self._conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """The connection inside BEGIN IMMEDIATE ... COMMIT, rolled back on error; call with the lock held."""
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            self._write_error = f"{type(exc).__name__}: {exc}"  # for writable(), until a commit succeeds
            raise
        self._write_error = None

    def append(self, lines: Sequence[str]) -> int:
        """Store ``lines`` durably in one transaction; returns how many of them were kept.

        With the ``oldest`` policy all of them are kept (unless there are more than ``max_rows``) and
        older lines may be dropped instead; with ``newest`` the lines that do not fit are refused.
        """
        if not lines:
            return 0
        now = time.time_ns()
        with self._lock:
            depth = self._depth
            if self.drop_policy == "newest":
                keep = list(lines[: max(0, self.max_rows - depth)])
            else:
                keep = list(lines[-self.max_rows :])
            dropped = len(lines) - len(keep)
            with self._transaction() as conn:
                conn.executemany("INSERT INTO spool (line, enqueued_ns) VALUES (?, ?)", ((line, now) for line in keep))
                depth += len(keep)
                if depth > self.max_rows:  # only with "oldest"
                    removed = conn.execute(
                        "DELETE FROM spool WHERE id IN (SELECT id FROM spool ORDER BY id LIMIT ?)",
                        (depth - self.max_rows,),
                    ).rowcount
                    depth -= removed
                    dropped += removed
            self._depth = depth
        self._metrics.inc("spool.appended", len(keep))
        self._metrics.set("spool.depth", depth)
        if dropped:
            self._count_drop(dropped)
        return len(keep)

    def _count_drop(self, dropped: int) -> None:
        self._metrics.inc("spool.dropped", dropped, policy=self.drop_policy)
        with self._lock:
            self._dropped_since_log += dropped
            now = time.monotonic()
            if now - self._last_drop_log < DROP_LOG_INTERVAL_S:
                return
            total, self._dropped_since_log = self._dropped_since_log, 0
            self._last_drop_log = now
        logger.warning(
            "spool %s is full (%d lines): dropped %d %s lines (drop_policy=%s; counted in spool.dropped)",
            self.path,
            self.max_rows,
            total,
            self.drop_policy,
            self.drop_policy,
        )

    def peek(self, limit: int) -> list[tuple[int, str]]:
        """Up to ``limit`` queued ``(id, line)``, oldest first; they stay queued until acked."""
        with self._lock:
            cur = self._connection().execute("SELECT id, line FROM spool ORDER BY id LIMIT ?", (limit,))
            rows = cur.fetchall()
        return [(int(i), str(line)) for i, line in rows]

    def ack(self, ids: Sequence[int]) -> None:
        """Delete delivered lines (ids already gone, e.g. dropped meanwhile, are ignored)."""
        if not ids:
            return
        lo, hi = min(ids), max(ids)
        # The writer acks what it peeked: usually a contiguous run of ids, deleted in one range statement
        # (a quarter of the lock time of one DELETE per id, measured in benchmarks/spool_micro.py).
        contiguous = hi - lo + 1 == len(ids) == len(set(ids))
        with self._lock:
            with self._transaction() as conn:
                if contiguous:
                    deleted = conn.execute("DELETE FROM spool WHERE id BETWEEN ? AND ?", (lo, hi)).rowcount
                else:
                    deleted = conn.executemany("DELETE FROM spool WHERE id = ?", ((i,) for i in ids)).rowcount
            self._depth -= deleted
            depth = self._depth
        self._metrics.inc("spool.acked", deleted)
        self._metrics.set("spool.depth", depth)

    def dead_letter(self, items: Sequence[tuple[int, str]], reason: str) -> None:
        """Move lines the database refused to the ``dead_letter`` table, with the reason and the time."""
        if not items:
            return
        now = time.time_ns()
        trimmed = 0
        with self._lock:
            with self._transaction() as conn:
                conn.executemany(
                    "INSERT INTO dead_letter (spool_id, line, reason, dead_ns) VALUES (?, ?, ?, ?)",
                    ((i, line, reason, now) for i, line in items),
                )
                ids = ((i,) for i, _ in items)
                deleted = conn.executemany("DELETE FROM spool WHERE id = ?", ids).rowcount
                dead_depth = self._dead_depth + len(items)
                if dead_depth > self.dead_letter_max_rows:
                    trimmed = conn.execute(
                        "DELETE FROM dead_letter WHERE id IN (SELECT id FROM dead_letter ORDER BY id LIMIT ?)",
                        (dead_depth - self.dead_letter_max_rows,),
                    ).rowcount
                    dead_depth -= trimmed
            self._depth -= deleted
            self._dead_depth = dead_depth
            depth = self._depth
        self._metrics.inc("spool.dead_lettered", len(items))
        self._metrics.set("spool.depth", depth)
        if trimmed:
            self._metrics.inc("spool.dead_letter_trimmed", trimmed)
            logger.warning("spool %s: dead-letter table full, removed its %d oldest rows", self.path, trimmed)

    def dead_letters(self, limit: int = 1000) -> list[tuple[str, str]]:
        """Up to ``limit`` dead-lettered ``(line, reason)``, oldest first (inspection, tests, demo)."""
        with self._lock:
            rows = (
                self._connection()
                .execute("SELECT line, reason FROM dead_letter ORDER BY id LIMIT ?", (limit,))
                .fetchall()
            )
        return [(str(line), str(reason)) for line, reason in rows]

    @property
    def closed(self) -> bool:
        return self._conn is None

    def depth(self) -> int:
        """Number of queued lines (kept in memory, so cheap to poll)."""
        return self._depth

    def dead_letter_depth(self) -> int:
        return self._dead_depth

    def oldest_age_s(self) -> float:
        """Seconds since the oldest queued line was appended (wall clock), 0.0 when empty."""
        with self._lock:
            row = self._connection().execute("SELECT enqueued_ns FROM spool ORDER BY id LIMIT 1").fetchone()
        if row is None:
            return 0.0
        return max(0.0, (time.time_ns() - int(row[0])) / 1e9)

    def _oldest_age_if_open(self) -> float | None:
        return None if self._conn is None else self.oldest_age_s()

    def check_writable(self, min_free_bytes: int = MIN_FREE_BYTES) -> bool:
        """True if an append would be accepted now; otherwise raise ``SpoolNotWritable`` saying why.

        Checks, cheaply (for a readiness probe): the spool is open, its last transaction did not fail
        (a full or failing disk, a read-only file), the file system has ``min_free_bytes`` free for the
        agent's user, and the write lock can be taken (``BEGIN IMMEDIATE`` then ``ROLLBACK``).
        """
        if self._conn is None:
            raise SpoolNotWritable(f"spool {self.path} is closed")
        if self._write_error is not None:
            raise SpoolNotWritable(f"spool {self.path}: the last write failed: {self._write_error}")
        if str(self.path) != ":memory:":
            try:
                stat = os.statvfs(self.path.parent)
            except OSError as exc:
                raise SpoolNotWritable(f"spool {self.path}: cannot stat its file system: {exc}") from exc
            free = stat.f_bavail * stat.f_frsize
            if free < min_free_bytes:
                raise SpoolNotWritable(
                    f"spool {self.path}: only {free} bytes free on its file system (need {min_free_bytes})"
                )
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("ROLLBACK")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise SpoolNotWritable(f"spool {self.path}: cannot take the write lock: {exc}") from exc
        return True

    def writable(self, min_free_bytes: int = MIN_FREE_BYTES) -> bool:
        """``check_writable`` as a bool (the reason is lost: prefer ``check_writable`` for a readiness check)."""
        try:
            return self.check_writable(min_free_bytes)
        except (SpoolNotWritable, RuntimeError):
            return False

    def close(self) -> None:
        """Checkpoint the WAL into the database file and close; idempotent."""
        with self._lock:
            if self._conn is None:
                return
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
