"""The local durable spool: a log of what arrived, in SQLite, read by each sink at its own cursor.

One row per entry (``agent.spool.codec``): the readings of one message, one vibration block (float32
bytes), a batch of points the agent produced, or a raw-data release. Rows only grow in id
(``AUTOINCREMENT``) and are never changed; a sink reads them in id order through a ``SinkCursor`` and
moves its durable cursor after the database confirmed them. A row is removed once every configured sink's
cursor is past it (``compact``). *Held* rows give no sink a point: they stay ``hold_s`` so that an alert
can still release them, and once released until every sink is past the release. Earlier builds spooled
every block of ``around_alerts`` as a held row; the agent now holds those blocks in memory
(``agent.storage.points.RawVibrationPolicy``), and the spool keeps handling the held rows of such a file.

Durability: WAL mode with ``synchronous=NORMAL``. A committed ``append`` is in the write-ahead log before
it returns, so it survives a crash or kill of the agent process; only an OS crash or power loss can take
back the last transactions before a checkpoint (``synchronous="FULL"`` closes that gap at the cost of an
fsync per append). The ingest worker acknowledges MQTT QoS 1 messages after ``append`` returns.

Bounded in bytes and in points. When an append would exceed a cap, the drop policy decides: ``oldest``
drops the oldest rows (recent data is worth more for dashboards), ``newest`` refuses the incoming entries
(history is kept). Every drop is counted (``spool.dropped`` in points, ``spool.dropped_bytes``) and logged
(at most one warning per ``DROP_LOG_INTERVAL_S``), never silent.

Processes and threads: the ``Spool`` (the owner: appends, caps, compaction) lives in the agent process,
one connection behind a lock. Each sink's writer, in a thread or in its own process, opens its own
``SinkCursor`` on the same file; SQLite's WAL lets it read while the owner appends, and a busy timeout
serialises their short write transactions (``agent.spool.cursor``, ``agent.spool.db``).

Over 400 lines: one class whose appends, caps, compaction, maintenance and readiness share one lock and
the counters of rows, points and bytes; split, each part would reach into the others' state.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Literal, cast, get_args

from agent.metrics import Metrics
from agent.spool import arrivals
from agent.spool.codec import Entry, Kind, decode_raw_ref, encode_lines
from agent.spool.cursor import SinkCursor
from agent.spool.db import DEFAULT_DEAD_LETTER_MAX_ROWS, HELD, ROW_OVERHEAD_BYTES, Row, connect, immediate

__all__ = [
    "DEFAULT_DEAD_LETTER_MAX_ROWS",
    "ROW_OVERHEAD_BYTES",
    "Row",
    "SinkCursor",
    "Spool",
    "SpoolFull",
    "SpoolNotWritable",
]

logger = logging.getLogger(__name__)

DropPolicy = Literal["oldest", "newest"]
DROP_POLICIES: tuple[str, ...] = get_args(DropPolicy)
DROP_LOG_INTERVAL_S = 10.0
DEFAULT_SINKS = ("local",)
MIN_FREE_BYTES = 16 * 1024 * 1024
"""Free space below which ``writable()`` says no: room for a few WAL growths of large batches."""
COMPACT_INTERVAL_S = 0.5
CHECKPOINT_INTERVAL_S = 1.0
COMPACT_CHUNK_IDS = 20_000
"""Compaction deletes at most this many ids per transaction (a full disk: per maintenance pass)."""
WAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024
"""A write-ahead log that grew beyond this (a burst, a long read) is truncated to it when it restarts."""
SLOW_APPEND_S = 1.0
INSERT_SIZES = (64, 16, 4, 1)
"""Rows per multi-row INSERT statement (a few fixed sizes: see ``Spool._insert_rows``)."""
_INSERT_SQL = {
    k: "INSERT INTO entry (kind, body, points, held, enqueued_ns) VALUES " + ", ".join(["(?, ?, ?, ?, ?)"] * k)
    for k in INSERT_SIZES
}
BACKLOG_CACHE_S = 0.5
BACKLOG_SCAN_SHARE = 20.0
"""A backlog scan that took ``t`` seconds is not repeated within ``BACKLOG_SCAN_SHARE * t`` (at most 5 % of a
core): after days without an upstream one scan reads a gigabyte of rows, and every scrape asked for it."""
BACKLOG_SCAN_CHEAP_S = 0.01
"""Scans faster than this are repeated after every append (exact depths for small backlogs, as before)."""
HELD_EXPIRED = f"held != 0 AND held = {HELD} AND enqueued_ns < ?"
RELEASED_PASSED = "held != 0 AND held > 0 AND held <= ?"
"""Compaction's held rows: ``held != 0`` repeated so that SQLite uses the partial index ``entry_held`` (it only
does when the query names the index's own condition): without it each compaction pass, every 0.5 s, read the
whole table, which a day's backlog for an upstream makes 1.35 GB."""


class SpoolNotWritable(Exception):
    """The spool cannot take appends now; the message says why."""


class SpoolFull(SpoolNotWritable):
    """The spool's file system is full: appends are refused until there is room (``Spool`` docstring)."""


SQLITE_FULL = 13
SQLITE_IOERR = 10
FULL_APPEND_MARGIN_BYTES = 1024 * 1024
"""While the disk is full, an append is tried only if the file's free pages hold it with this to spare."""


def is_disk_full(exc: BaseException, free_bytes: int | None = None) -> bool:
    """Whether ``exc`` says the disk is full: SQLite's SQLITE_FULL, or an I/O error while ``free_bytes``
    is below ``MIN_FREE_BYTES`` (a failed growth of the WAL index can surface as an I/O error)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if not isinstance(exc, sqlite3.Error):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF == SQLITE_FULL:
        return True
    if "database or disk is full" in str(exc):
        return True
    low = free_bytes is not None and free_bytes < MIN_FREE_BYTES
    return low and code is not None and code & 0xFF == SQLITE_IOERR


def _migrate_lines_table(conn: sqlite3.Connection, path: Path) -> None:
    """A spool of version 0.2 held one line per row in ``spool``: move what is undelivered into entries."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'spool'").fetchone() is None:
        return
    moved = 0
    with immediate(conn):
        last = 0
        while True:
            rows = conn.execute("SELECT id, line FROM spool WHERE id > ? ORDER BY id LIMIT 5000", (last,)).fetchall()
            if not rows:
                break
            entry = encode_lines([str(line) for _, line in rows])
            conn.execute(
                "INSERT INTO entry (kind, body, points, held, enqueued_ns) VALUES (?, ?, ?, 0, ?)",
                (int(entry.kind), entry.body, entry.points, time.time_ns()),
            )
            moved += len(rows)
            last = int(rows[-1][0])
        conn.execute("DROP TABLE spool")
    logger.warning("spool %s: moved %d undelivered lines of the previous spool format into the log", path, moved)


class Spool:
    """The owner of the spool file: appends, caps, compaction, readiness (see the module docstring)."""

    def __init__(
        self,
        path: Path | str,
        max_bytes: int,
        max_points: int,
        drop_policy: DropPolicy = "oldest",
        metrics: Metrics | None = None,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        dead_letter_max_rows: int = DEFAULT_DEAD_LETTER_MAX_ROWS,
        sinks: Sequence[str] = DEFAULT_SINKS,
        hold_s: float = 120.0,
        reserve_bytes: int = 0,
        arrivals_max_age_s: float = arrivals.DEFAULT_MAX_AGE_S,
        arrivals_max_rows: int = arrivals.DEFAULT_MAX_ROWS,
    ) -> None:
        if reserve_bytes < 0:
            raise ValueError(f"reserve_bytes must be >= 0, not {reserve_bytes}")
        if max_bytes < 1 or max_points < 1:
            raise ValueError(f"max_bytes and max_points must be >= 1, not {max_bytes}, {max_points}")
        if drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy {drop_policy!r} is not one of {', '.join(DROP_POLICIES)}")
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        if not sinks or len(set(sinks)) != len(sinks):
            raise ValueError(f"sinks must be distinct names, at least one, not {list(sinks)}")
        if str(path) == ":memory:":
            raise ValueError("the spool needs a file: its sinks read it through their own connections")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_points = max_points
        self.drop_policy = drop_policy
        self.dead_letter_max_rows = dead_letter_max_rows
        self.sinks = tuple(sinks)
        self.hold_s = hold_s
        self._synchronous = synchronous
        self._metrics = metrics if metrics is not None else Metrics()
        self._arrivals = arrivals.ArrivalRetention(arrivals_max_age_s, arrivals_max_rows, self._metrics)
        self._lock = threading.Lock()
        self._last_drop_log = -float("inf")
        self._dropped_since_log = 0
        self._write_error: str | None = None  # the error of the last failed transaction, None after a commit
        self._last_compact = 0.0
        self._last_checkpoint = 0.0
        self._compacted_to = 0  # no ordinary row at or below this id is left (see compact)
        # (taken at, least interval before the next scan, result); the scans run on their own read connection
        # so that the appending threads never wait for one (``backlogs``).
        self._backlog_cache: tuple[float, float, dict[str, tuple[int, int, float, int]]] = (-float("inf"), 0.0, {})
        self._backlog_stale = True
        self._backlog_lock = threading.Lock()
        self._backlog_reader: sqlite3.Connection | None = None
        self.reserve_bytes = reserve_bytes
        self._reserve_path = self.path.with_name(self.path.name + ".reserve")
        self._full_since: float | None = None  # monotonic time the disk was found full; None while there is room
        self._full_detail = ""
        self._full_events = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn: sqlite3.Connection | None = connect(self.path, synchronous)
        # A run of rows goes in as multi-row INSERTs of INSERT_SIZES, largest first (see _insert_rows); 64 rows
        # of 5 parameters stay within any SQLite's limit (999 before 3.32).
        self._rows_per_insert = INSERT_SIZES[0]
        conn = self._conn
        # The appending threads never checkpoint (a checkpoint copies the WAL into the file and fsyncs it:
        # seconds on a slow disk); the maintenance thread does, from its own connection (``start``).
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
        self._maintenance: threading.Thread | None = None
        self._stopping = threading.Event()
        _migrate_lines_table(conn, self.path)
        with immediate(conn):
            known = {str(s) for (s,) in conn.execute("SELECT sink FROM cursor")}
            for gone in sorted(known - set(self.sinks)):
                logger.warning("spool %s: sink %r is no longer configured; forgetting its cursor", self.path, gone)
                conn.execute("DELETE FROM cursor WHERE sink = ?", (gone,))
                conn.execute("DELETE FROM sink_state WHERE sink = ?", (gone,))
            for sink in self.sinks:  # a new sink starts at the oldest retained row
                conn.execute("INSERT OR IGNORE INTO cursor (sink, last_id) VALUES (?, 0)", (sink,))
        rows, points, size = conn.execute(
            "SELECT count(*), coalesce(sum(points), 0), "
            f"coalesce(sum(length(body)) + count(*) * {ROW_OVERHEAD_BYTES}, 0) FROM entry"
        ).fetchone()
        self._rows, self._points, self._bytes = int(rows), int(points), int(size)
        self._last_id = int(conn.execute("SELECT coalesce(max(id), 0) FROM entry").fetchone()[0])
        self._publish_gauges()
        self._metrics.set("spool.reserve_bytes", 0)
        self._metrics.set("spool.disk_full", 0)
        if not self._make_reserve():
            # Started on a full disk (say, after the disk filled up): appending first would take the room the
            # sinks need to move their cursors and free rows.
            self._enter_full(f"no room for the {self.reserve_bytes}-byte reserve: {self._fs_free()} bytes free")
        # Sampled when the metrics are read (heartbeat, /metrics): backlogs move while nothing is appended.
        self._metrics.set_function("spool.depth", lambda: self._backlog_gauge(1))
        self._metrics.set_function("spool.oldest_age_s", lambda: self._backlog_gauge(2))
        for sink in self.sinks:
            self._metrics.set_function("spool.backlog_points", partial(self._sink_backlog, sink, 1), sink=sink)
            self._metrics.set_function("spool.backlog_age_s", partial(self._sink_backlog, sink, 2), sink=sink)
            self._metrics.set_function("spool.backlog_rows", partial(self._sink_backlog, sink, 0), sink=sink)
            self._metrics.set_function("spool.backlog_bytes", partial(self._sink_backlog, sink, 3), sink=sink)
        if self._rows:
            logger.info("spool %s resumes with %d rows (%d points)", self.path, self._rows, self._points)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"spool {self.path} is closed")
        return self._conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction on the owner's connection; call with the lock held. Remembers a failure."""
        try:
            with immediate(self._connection()) as conn:
                yield conn
        except sqlite3.Error as exc:
            self._write_error = f"{type(exc).__name__}: {exc}"  # for writable(), until a commit succeeds
            if is_disk_full(exc, self._fs_free()):
                self._enter_full(str(exc))
            raise
        self._write_error = None

    # -- appending -------------------------------------------------------------------------------

    def append(self, entries: Sequence[Entry]) -> list[int | None]:
        """Store ``entries`` durably in one transaction; returns each one's spool id (None: refused).

        With ``oldest`` every entry is kept (unless one batch is larger than a cap) and older rows may
        be dropped instead; with ``newest`` the entries that do not fit are refused. Both counted.
        """
        if not entries:
            return []
        started = time.monotonic()
        incoming_points = sum(e.points for e in entries)
        incoming_bytes = sum(len(e.body) + ROW_OVERHEAD_BYTES for e in entries)
        if self._full_since is not None:
            self._refuse_if_no_room(incoming_bytes)
        if self._points + incoming_points > self.max_points or self._bytes + incoming_bytes > self.max_bytes:
            self.compact()  # rows every sink has confirmed go first: dropping them would lose nothing
        now = time.time_ns()
        ids: list[int | None] = [None] * len(entries)
        with self._lock:
            rows, points, size = self._rows, self._points, self._bytes
            keep = self._fitting(entries, points, size)
            dropped_points = sum(e.points for i, e in enumerate(entries) if i not in keep)
            dropped_bytes = sum(len(e.body) + ROW_OVERHEAD_BYTES for i, e in enumerate(entries) if i not in keep)
            with self._transaction() as conn:
                run: list[int] = []  # indexes of plain rows waiting for one multi-row INSERT
                for i in sorted(keep):
                    e = entries[i]
                    if e.kind == Kind.ARRIVAL:  # not a row: the arrival time of a message of this transaction
                        arrivals.record(conn, e.body)
                        continue
                    run.append(i)
                    rows += 1
                    points += e.points
                    size += len(e.body) + ROW_OVERHEAD_BYTES
                    if e.kind == Kind.RAW_REF:  # pins rows by id: its own id must be known now
                        self._insert_rows(conn, entries, run, ids, now)
                        run = []
                        self._pin(conn, decode_raw_ref(e.body), cast(int, ids[i]))
                    elif len(run) >= self._rows_per_insert:
                        self._insert_rows(conn, entries, run, ids, now)
                        run = []
                self._insert_rows(conn, entries, run, ids, now)
                if points > self.max_points or size > self.max_bytes:  # only with "oldest"
                    gone = self._drop_oldest(conn, points - self.max_points, size - self.max_bytes)
                    rows -= gone[0]
                    points -= gone[1]
                    size -= gone[2]
                    dropped_points += gone[1]
                    dropped_bytes += gone[2]
            self._rows, self._points, self._bytes = rows, points, size
            self._last_id = max([self._last_id, *(i for i in ids if i is not None)])
        self._backlog_stale = True
        self._metrics.inc("spool.appended", sum(entries[i].points for i in keep))
        self._publish_gauges()
        if dropped_points or dropped_bytes:
            self._count_drop(dropped_points, dropped_bytes)
        took = time.monotonic() - started
        self._metrics.observe("spool.append_seconds", took)
        if took >= SLOW_APPEND_S:
            logger.warning("spool %s: an append of %d entries took %.2f s", self.path, len(entries), took)
        if self._maintenance is None and time.monotonic() - self._last_compact >= COMPACT_INTERVAL_S:
            self.compact()  # no maintenance thread (tests, tools): the appending thread compacts
        return ids

    def _insert_rows(
        self,
        conn: sqlite3.Connection,
        entries: Sequence[Entry],
        indexes: Sequence[int],
        ids: list[int | None],
        now: int,
    ) -> None:
        """Insert ``entries[i]`` for ``i`` in ``indexes`` with one statement and note their ids in ``ids``.

        One statement rather than one per row: SQLite releases the interpreter lock for each statement, and
        with the scoring and MQTT threads busy each release costs the ingest thread a wait for it. The ids
        are consecutive, ending at ``lastrowid``: this connection is the only writer inside the transaction
        and ``AUTOINCREMENT`` gives each new row the largest id so far plus one.
        """
        start = 0
        while start < len(indexes):
            # Statements of a few sizes only (INSERT_SIZES): the sqlite3 module caches each distinct SQL
            # text with its last bound values (here: the bodies) until it runs again, so a statement per
            # batch size kept up to 128 batches' bodies alive (80 MB for 600 batches of 2 kB rows).
            size = next(k for k in INSERT_SIZES if k <= len(indexes) - start)
            chunk = indexes[start : start + size]
            params: list[object] = []
            for i in chunk:
                e = entries[i]
                params += (int(e.kind), e.body, e.points, HELD if e.held else 0, now)
            cur = conn.execute(_INSERT_SQL[size], params)
            last = cast(int, cur.lastrowid)
            for offset, i in enumerate(chunk):
                ids[i] = last - size + 1 + offset
            start += size

    def append_lines(self, lines: Sequence[str]) -> object:
        """Points the agent produced itself (already line protocol), as one entry."""
        return self.append([encode_lines(lines)]) if lines else []

    def append_entries(self, entries: Sequence[Entry]) -> object:
        """Points the agent produced itself, as entries (``LINES``, ``FEATURES``)."""
        return self.append(entries) if entries else []

    def _fitting(self, entries: Sequence[Entry], points: int, size: int) -> set[int]:
        """Indexes of the entries to insert: all but what does not fit under ``newest``; under ``oldest``
        the newest entries that fit in the caps on their own."""
        keep: set[int] = set()
        if self.drop_policy == "newest":
            for i, e in enumerate(entries):
                cost = len(e.body) + ROW_OVERHEAD_BYTES
                if points + e.points <= self.max_points and size + cost <= self.max_bytes:
                    keep.add(i)
                    points += e.points
                    size += cost
            return keep
        total_points = total_bytes = 0
        for i in range(len(entries) - 1, -1, -1):
            e = entries[i]
            total_points += e.points
            total_bytes += len(e.body) + ROW_OVERHEAD_BYTES
            if total_points > self.max_points or total_bytes > self.max_bytes:
                break
            keep.add(i)
        return keep

    def _drop_oldest(self, conn: sqlite3.Connection, over_points: int, over_bytes: int) -> tuple[int, int, int]:
        """Delete the oldest rows until ``over_points`` points and ``over_bytes`` bytes are gone."""
        rows = points = size = 0
        last_id = 0
        for row_id, row_points, row_bytes in conn.execute(
            f"SELECT id, points, length(body) + {ROW_OVERHEAD_BYTES} FROM entry ORDER BY id"
        ):
            if points >= over_points and size >= over_bytes:
                break
            rows += 1
            points += int(row_points)
            size += int(row_bytes)
            last_id = int(row_id)
        if rows:
            conn.execute("DELETE FROM entry WHERE id <= ?", (last_id,))
        return rows, points, size

    def _count_drop(self, points: int, size: int) -> None:
        self._metrics.inc("spool.dropped", points, policy=self.drop_policy)
        self._metrics.inc("spool.dropped_bytes", size, policy=self.drop_policy)
        with self._lock:
            self._dropped_since_log += points
            now = time.monotonic()
            if now - self._last_drop_log < DROP_LOG_INTERVAL_S:
                return
            total, self._dropped_since_log = self._dropped_since_log, 0
            self._last_drop_log = now
        logger.warning(
            "spool %s is full (caps %d points, %d bytes): dropped %d %s points (drop_policy=%s; counted in "
            "spool.dropped)",
            self.path,
            self.max_points,
            self.max_bytes,
            total,
            self.drop_policy,
            self.drop_policy,
        )

    # -- a full disk -------------------------------------------------------------------------------
    #
    # A reserve file of ``reserve_bytes`` lies beside the spool while there is room. When a write fails
    # for lack of space, the spool is *full*: the reserve is deleted, so that what frees space (the sinks'
    # cursor updates, compaction, checkpoints) and the agent's other state files still have room, and
    # appends are refused (the ingest worker does not acknowledge; the broker keeps the messages) unless
    # the file's own free pages hold them. It is no longer full once the file system has room for the
    # reserve again, or the file has that much room inside it (delivered rows were removed).

    def _fs_free(self) -> int | None:
        try:
            stat = os.statvfs(self.path.parent)
        except OSError:
            return None
        return stat.f_bavail * stat.f_frsize

    def _in_file_free(self) -> int:
        """Bytes of free pages inside the spool file (rows removed since it last grew)."""
        conn = self._connection()
        pages = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
        return pages * int(conn.execute("PRAGMA page_size").fetchone()[0])

    def _make_reserve(self) -> bool:
        """Create the reserve file if it is missing and there is room for it; True if it is there."""
        if self.reserve_bytes == 0:
            return True
        try:
            if self._reserve_path.stat().st_size >= self.reserve_bytes:
                return True
        except FileNotFoundError:
            pass
        free = self._fs_free()
        if free is None or free < self.reserve_bytes + FULL_APPEND_MARGIN_BYTES:
            return False
        try:
            fd = os.open(self._reserve_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.reserve_bytes)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self._reserve_path.unlink(missing_ok=True)
            logger.warning("spool %s: could not create its %d-byte reserve: %s", self.path, self.reserve_bytes, exc)
            return False
        self._metrics.set("spool.reserve_bytes", self.reserve_bytes)
        return True

    def _enter_full(self, detail: str) -> None:
        """A write failed for lack of space: give the reserve back and refuse appends (see above)."""
        self._full_detail = detail
        if self._full_since is not None:
            return
        self._full_since = time.monotonic()
        self._full_events += 1
        released = self._reserve_path.exists()
        self._reserve_path.unlink(missing_ok=True)
        self._metrics.set("spool.reserve_bytes", 0)
        self._metrics.set("spool.disk_full", 1)
        self._metrics.inc("spool.disk_full_events")
        logger.error(
            "spool %s: the disk is full (%s); new messages are not acknowledged until there is room%s",
            self.path,
            detail,
            f"; released its {self.reserve_bytes}-byte reserve so that delivery can go on" if released else "",
        )

    def _refuse_if_no_room(self, incoming_bytes: int) -> None:
        """While full, raise ``SpoolFull`` unless the file's free pages hold ``incoming_bytes``."""
        with self._lock:
            room = self._in_file_free()
        if room < incoming_bytes + FULL_APPEND_MARGIN_BYTES:
            raise SpoolFull(self._full_text(room))

    def _full_text(self, in_file_free: int) -> str:
        since = 0.0 if self._full_since is None else time.monotonic() - self._full_since
        return (
            f"spool {self.path}: disk full for {since:.0f} s ({self._full_detail}); {self._fs_free()} bytes free "
            f"on its file system, {in_file_free} inside the spool file; not acknowledging new messages"
        )

    def _check_room(self) -> None:
        """Maintenance while full: leave the full state once there is room again (logged once)."""
        if self._full_since is None:
            if not self._reserve_path.exists():
                self._make_reserve()  # lost earlier (file system full without a failed write), or deleted
            return
        with self._lock:
            in_file = self._in_file_free()
        if not self._make_reserve() and in_file < self.reserve_bytes + FULL_APPEND_MARGIN_BYTES:
            return
        took = time.monotonic() - self._full_since
        self._full_since = None
        self._metrics.set("spool.disk_full", 0)
        logger.warning(
            "spool %s: room again after %.0f s (%s bytes free on its file system, %d inside the file); "
            "acknowledging new messages",
            self.path,
            took,
            self._fs_free(),
            in_file,
        )

    @property
    def disk_full(self) -> bool:
        """True while appends are refused for lack of space (see ``_enter_full``)."""
        return self._full_since is not None

    # -- removing what every sink has ----------------------------------------------------------

    def cursors(self) -> dict[str, int]:
        """Each configured sink's cursor: the id of the last row it has confirmed."""
        with self._lock:
            rows = self._connection().execute("SELECT sink, last_id FROM cursor").fetchall()
        found = {str(s): int(i) for s, i in rows}
        return {s: found.get(s, 0) for s in self.sinks}

    @staticmethod
    def _pin(conn: sqlite3.Connection, ids: Sequence[int], release_id: int) -> None:
        """A release names held blocks: keep them until every sink has passed the release itself."""
        for start in range(0, len(ids), 500):
            part = ids[start : start + 500]
            marks = ",".join("?" * len(part))
            conn.execute(f"UPDATE entry SET held = ? WHERE held = {HELD} AND id IN ({marks})", (release_id, *part))

    def compact(self) -> int:
        """Remove what no sink needs any more; returns how many rows.

        - an ordinary row (``held = 0``) once every sink's cursor is past it;
        - a held block no alert released (``held = -1``) once it is ``hold_s`` old, wherever the cursors are:
          it gives no sink a point, so an outage does not make held blocks pile up;
        - a released block (``held`` = the id of its release) once every sink is past the release, however
          old it is: a sink catching up after an outage reads the release long after the block arrived.
        """
        self._last_compact = time.monotonic()
        floor = min(self.cursors().values())
        cutoff = time.time_ns() - int(self.hold_s * 1e9)
        removed = 0
        first = True
        while True:
            # Ordinary rows up to the previous floor are gone already: scan only what the cursors passed since
            # (held rows stay below the floor for hold_s; scanning them every time would read every one of
            # them), in chunks of ids: a short write lock for ingest, and a bounded WAL growth for a full disk,
            # where one chunk per call leaves the checkpoint between chunks its room.
            upper = min(floor, self._compacted_to + COMPACT_CHUNK_IDS)
            clauses: list[tuple[str, tuple[int, ...]]] = [
                ("held = 0 AND id > ? AND id <= ?", (self._compacted_to, upper))
            ]
            if first:
                clauses += [(HELD_EXPIRED, (cutoff,)), (RELEASED_PASSED, (floor,))]
            removed += self._delete(clauses, prune=first)
            self._compacted_to = max(self._compacted_to, upper)
            first = False
            if upper >= floor or self._full_since is not None:
                return removed

    def _delete(self, clauses: Sequence[tuple[str, tuple[int, ...]]], prune: bool) -> int:
        """One compaction transaction: delete the rows ``clauses`` select; the rows removed."""
        rows = points = size = 0
        with self._lock:
            with self._transaction() as conn:
                for where, bounds in clauses:
                    n, p, b = conn.execute(
                        f"SELECT count(*), coalesce(sum(points), 0), coalesce(sum(length(body)), 0) + count(*) * "
                        f"{ROW_OVERHEAD_BYTES} FROM entry WHERE {where}",
                        bounds,
                    ).fetchone()
                    if n:
                        conn.execute(f"DELETE FROM entry WHERE {where}", bounds)
                        rows, points, size = rows + int(n), points + int(p), size + int(b)
                if prune:
                    self._arrivals.prune(conn)
            self._rows -= rows
            self._points -= points
            self._bytes -= size
        if rows:
            self._metrics.inc("spool.acked", int(points))
            self._publish_gauges()
        return int(rows)

    # -- what the metrics and the readiness probe show -----------------------------------------

    def _publish_gauges(self) -> None:
        self._metrics.set("spool.rows", self._rows)
        self._metrics.set("spool.points", self._points)
        self._metrics.set("spool.bytes", self._bytes)

    def backlogs(self) -> dict[str, tuple[int, int, float, int]]:
        """Per sink: rows, points after its cursor, the age in seconds of the oldest of them, and their bytes
        (held blocks are not a sink's backlog: they give it nothing until released).

        Sampled: a result is reused for ``BACKLOG_CACHE_S``, and a scan that took long (a big backlog) is not
        repeated before ``BACKLOG_SCAN_SHARE`` times its duration. The scan reads on its own connection, outside
        the spool's lock, so ingest appends while a metrics scrape counts a day's backlog."""
        with self._backlog_lock:
            taken_at, least, cached = self._backlog_cache
            since = time.monotonic() - taken_at
            if since < least or (since < BACKLOG_CACHE_S and not self._backlog_stale):
                return cached
            self._backlog_stale = False
            cursors = self.cursors()
            reader = self._backlog_reader
            if reader is None:
                reader = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30.0)
                reader.execute("PRAGMA query_only=ON")
                self._backlog_reader = reader
            started = time.monotonic()
            now = time.time_ns()
            out: dict[str, tuple[int, int, float, int]] = {}
            for sink, last_id in cursors.items():
                rows, points, oldest, size = reader.execute(
                    "SELECT count(*), coalesce(sum(points), 0), min(enqueued_ns), "
                    f"coalesce(sum(length(body)), 0) + count(*) * {ROW_OVERHEAD_BYTES} FROM entry "
                    "WHERE id > ? AND held = 0",
                    (last_id,),
                ).fetchone()
                age = 0.0 if oldest is None else max(0.0, (now - int(oldest)) / 1e9)
                out[sink] = (int(rows), int(points), age, int(size))
            took = time.monotonic() - started
            least = BACKLOG_SCAN_SHARE * took if took >= BACKLOG_SCAN_CHEAP_S else 0.0
            self._backlog_cache = (time.monotonic(), least, out)
            return out

    def _sink_backlog(self, sink: str, index: int) -> float | None:
        if self._conn is None:
            return None
        return float(self.backlogs()[sink][index])

    def _backlog_gauge(self, index: int) -> float | None:
        """The slowest sink's backlog in points (index 1) or its age (2); None once closed."""
        if self._conn is None:
            return None
        return float(max(b[index] for b in self.backlogs().values()))

    def depth(self) -> int:
        """Points the slowest sink has not confirmed yet (sampled: ``backlogs``)."""
        if self._conn is None:
            return 0
        return max(b[1] for b in self.backlogs().values())

    def caught_up(self, sink: str) -> bool:
        """True when ``sink`` has confirmed every row appended so far (exact, not cached)."""
        return self.cursors()[sink] >= self._last_id

    def oldest_age_s(self) -> float:
        """Seconds since the oldest row a sink still waits for was appended (wall clock), 0.0 when none."""
        return max(b[2] for b in self.backlogs().values())

    def size(self) -> tuple[int, int, int]:
        """Rows, points and bytes held now (counted as they are appended and removed)."""
        return self._rows, self._points, self._bytes

    def arrival_ns(self, key: bytes) -> int | None:
        """The arrival time recorded for a message without a device timestamp (``agent.spool.arrivals``)."""
        with self._lock:
            return arrivals.lookup(self._connection(), key)

    def dead_letters(self, limit: int = 1000) -> list[tuple[str, str]]:
        """Up to ``limit`` dead-lettered ``(line, reason)``, oldest first (inspection, tests, demo)."""
        with self._lock:
            rows = (
                self._connection()
                .execute("SELECT line, reason FROM dead_letter ORDER BY id LIMIT ?", (limit,))
                .fetchall()
            )
        return [(str(line), str(reason)) for line, reason in rows]

    def dead_letter_depth(self) -> int:
        with self._lock:
            return int(self._connection().execute("SELECT count(*) FROM dead_letter").fetchone()[0])

    @property
    def closed(self) -> bool:
        return self._conn is None

    def check_writable(self, min_free_bytes: int = MIN_FREE_BYTES) -> bool:
        """True if an append would be accepted now; otherwise raise ``SpoolNotWritable`` saying why.

        Checks, cheaply (for a readiness probe): the spool is open and its disk is not full (``SpoolFull``),
        its last transaction did not fail (a failing disk, a read-only file), it has room (its reserve file,
        or ``reserve_bytes`` — ``min_free_bytes`` without a reserve configured — free on the file system or
        inside the spool file), and the write lock can be taken (``BEGIN IMMEDIATE`` then ``ROLLBACK``).
        """
        if self._conn is None:
            raise SpoolNotWritable(f"spool {self.path} is closed")
        if self._full_since is not None:
            with self._lock:
                raise SpoolFull(self._full_text(self._in_file_free()))
        if self._write_error is not None:
            raise SpoolNotWritable(f"spool {self.path}: the last write failed: {self._write_error}")
        free = self._fs_free()
        if free is None:
            raise SpoolNotWritable(f"spool {self.path}: cannot stat its file system")
        # With its reserve file in place the spool has its room; without one (none configured, or no room to
        # make it again yet) it needs that much free on the file system or inside its file.
        need = self.reserve_bytes or min_free_bytes
        if free < need and not (self.reserve_bytes and self._reserve_path.exists()):
            with self._lock:
                room = free + self._in_file_free()
            if room < need:
                raise SpoolNotWritable(
                    f"spool {self.path}: only {free} bytes free on its file system and {room - free} inside "
                    f"the spool file, no reserve (need {need})"
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

    def cursor(self, sink: str) -> SinkCursor:
        """A new reader of this spool for ``sink``, with its own connection (one per writer thread)."""
        if sink not in self.sinks:
            raise ValueError(f"sink {sink!r} is not one of this spool's sinks {list(self.sinks)}")
        return SinkCursor(self.path, sink, self.dead_letter_max_rows, self._synchronous)

    # -- maintenance -----------------------------------------------------------------------------

    def start(self) -> None:
        """Compact and checkpoint from a thread of their own, so that appending threads only append."""
        if self._maintenance is not None:
            raise RuntimeError("spool maintenance already started")
        self._maintenance = threading.Thread(target=self._maintain, name="spool-maintenance", daemon=True)
        self._maintenance.start()

    def _maintain(self) -> None:
        checkpointer = connect(self.path, self._synchronous)
        checkpointer.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
        steps = (("compaction", self._compact_pass), ("checkpoint", partial(self._checkpoint_pass, checkpointer)))
        try:
            while not self._stopping.wait(COMPACT_INTERVAL_S):
                # Each step on its own: on a full disk, only a checkpointed WAL is reused from its start
                # instead of growing, which is what gives a failed compaction its room back.
                for what, step in steps:
                    try:
                        step()
                    except (sqlite3.Error, OSError, RuntimeError) as exc:
                        if self._conn is None:
                            return
                        if is_disk_full(exc, self._fs_free()):
                            self._enter_full(str(exc))  # logged once; retried every pass
                        else:
                            logger.warning("spool %s: %s failed, will retry: %s", self.path, what, exc)
        finally:
            checkpointer.close()

    def _compact_pass(self) -> None:
        self._check_room()
        self.compact()

    def _checkpoint_pass(self, checkpointer: sqlite3.Connection) -> None:
        """Every ``CHECKPOINT_INTERVAL_S``, PASSIVE: copies what no reader still needs, never waits for a reader
        or the writer (a WAL grown by a burst is cut back to ``WAL_SIZE_LIMIT_BYTES`` when it restarts)."""
        if self._full_since is None and time.monotonic() - self._last_checkpoint < CHECKPOINT_INTERVAL_S:
            return
        self._last_checkpoint = started = time.monotonic()
        # While full, TRUNCATE: waits for readers (the busy timeout), then gives the WAL's room back to the
        # file system, where the reserve (and leaving the full state) needs it.
        mode = "PASSIVE" if self._full_since is None else "TRUNCATE"
        checkpointer.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        self._metrics.observe("spool.checkpoint_seconds", time.monotonic() - started)

    def close(self) -> None:
        """Remove what every sink has, checkpoint the WAL into the database file and close; idempotent."""
        if self._conn is None:
            return
        self._stopping.set()
        if self._maintenance is not None:
            self._maintenance.join(30.0)
        try:
            self.compact()
        except sqlite3.Error as exc:
            logger.warning("spool %s: final compaction failed: %s", self.path, exc)
        with self._lock:
            if self._conn is None:
                return
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:  # a full disk: the WAL is checkpointed when the spool next opens
                logger.warning("spool %s: final checkpoint failed: %s", self.path, exc)
            finally:
                self._conn.close()
                self._conn = None
        with self._backlog_lock:
            if self._backlog_reader is not None:
                self._backlog_reader.close()
                self._backlog_reader = None

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
