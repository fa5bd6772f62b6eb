"""A sink's reader of the spool: its own connection and its durable cursor (usable from another process)."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from agent.spool.db import DEFAULT_DEAD_LETTER_MAX_ROWS, ROW_OVERHEAD_BYTES, Row, connect, immediate


class SinkCursor:
    """One sink's position in the spool, with its own connection (usable from another process).

    ``read`` returns rows after the cursor; ``advance`` moves the cursor durably once the sink confirmed
    them; ``dead_letter`` records points the sink refused, with its reason. Rows are never deleted here:
    the owner's ``Spool.compact`` removes what every sink has.
    """

    def __init__(
        self,
        path: Path | str,
        sink: str,
        dead_letter_max_rows: int = DEFAULT_DEAD_LETTER_MAX_ROWS,
        synchronous: str = "NORMAL",
    ) -> None:
        self.path = Path(path)
        self.sink = sink
        self.dead_letter_max_rows = dead_letter_max_rows
        self._lock = threading.Lock()  # the writer's reading and sending threads share the connection
        self._conn: sqlite3.Connection | None = connect(self.path, synchronous)
        row = self._conn.execute("SELECT last_id FROM cursor WHERE sink = ?", (sink,)).fetchone()
        if row is None:
            raise ValueError(f"spool {self.path} has no cursor for sink {sink!r} (the owner creates it)")
        self._position = int(row[0])

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"cursor {self.sink} of spool {self.path} is closed")
        return self._conn

    @property
    def position(self) -> int:
        """The id of the last row this sink confirmed."""
        return self._position

    def read(self, max_points: int, max_rows: int = 10_000) -> list[Row]:
        """Rows after the cursor, oldest first, until ``max_points`` points (at least one row) or ``max_rows``."""
        return self.read_after(self._position, max_points, max_rows)

    def read_after(self, after_id: int, max_points: int, max_rows: int = 10_000, overshoot: bool = False) -> list[Row]:
        """``read`` from another position (a writer reads ahead of what its sink has confirmed);
        ``overshoot``: the last row may take the points past ``max_points`` (full batches)."""
        rows: list[Row] = []
        points = 0
        with self._lock:
            cur = self._connection().execute(
                "SELECT id, kind, CASE WHEN held = 0 THEN body END, points FROM entry WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, max_rows),
            )
            for row_id, kind, body, row_points in cur:
                if rows and (points >= max_points if overshoot else points + int(row_points) > max_points):
                    break
                rows.append(
                    Row(int(row_id), int(kind), b"" if body is None else bytes(body), int(row_points), body is None)
                )
                points += int(row_points)
            cur.close()
        return rows

    def bodies(self, ids: Sequence[int]) -> list[bytes]:
        """The bodies of the rows with these ids that are still in the spool (held blocks), in id order."""
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        with self._lock:
            cur = self._connection().execute(f"SELECT body FROM entry WHERE id IN ({marks}) ORDER BY id", tuple(ids))
            return [bytes(body) for (body,) in cur]

    def advance(self, last_id: int, state: bytes | None = None) -> None:
        """The sink confirmed every row up to ``last_id``: move the cursor there, durably, with the writer's
        ``state`` as of that row (an upstream's open buckets) in the same transaction."""
        if last_id <= self._position:
            return
        with self._lock, immediate(self._connection()) as conn:
            conn.execute("UPDATE cursor SET last_id = ? WHERE sink = ?", (last_id, self.sink))
            if state is not None:
                conn.execute("INSERT OR REPLACE INTO sink_state (sink, state) VALUES (?, ?)", (self.sink, state))
        self._position = last_id

    def state(self) -> bytes | None:
        """The state saved with the cursor by the last ``advance`` that had one."""
        with self._lock:
            row = self._connection().execute("SELECT state FROM sink_state WHERE sink = ?", (self.sink,)).fetchone()
        return None if row is None else bytes(row[0])

    def backlog_cut(self, after_id: int, max_bytes: int | None, max_age_s: float) -> tuple[int, int, int, int]:
        """Where this sink's backlog after ``after_id`` must start so that it holds at most ``max_bytes``
        (bodies plus the per-row overhead) and nothing older than ``max_age_s``: ``(cut id, rows, points,
        bytes)`` of the oldest rows to pass over (``after_id`` and zeros when within both caps).

        Held blocks count for neither cap (they leave the spool by themselves, ``Spool.compact``). The age is
        found from the oldest rows on; the bytes need a scan of the whole backlog (``max_bytes`` None: skip it)."""
        cutoff = time.time_ns() - int(max_age_s * 1e9)
        cut = after_id
        with self._lock:
            conn = self._connection()
            young = conn.execute(
                "SELECT id FROM entry WHERE id > ? AND held = 0 AND enqueued_ns >= ? ORDER BY id LIMIT 1",
                (after_id, cutoff),
            ).fetchone()
            if young is None:
                old = conn.execute("SELECT max(id) FROM entry WHERE id > ? AND held = 0", (after_id,)).fetchone()
                cut = after_id if old[0] is None else int(old[0])
            else:
                cut = max(after_id, int(young[0]) - 1)
            over = 0
            if max_bytes is not None:
                (size,) = conn.execute(
                    f"SELECT coalesce(sum(length(body)), 0) + count(*) * {ROW_OVERHEAD_BYTES} FROM entry "
                    "WHERE id > ? AND held = 0",
                    (cut,),
                ).fetchone()
                over = int(size) - max_bytes
            if over > 0:
                cur = conn.execute(
                    f"SELECT id, length(body) + {ROW_OVERHEAD_BYTES} FROM entry WHERE id > ? AND held = 0 ORDER BY id",
                    (cut,),
                )
                for row_id, row_bytes in cur:
                    cut = int(row_id)
                    over -= int(row_bytes)
                    if over <= 0:
                        break
                cur.close()
            if cut <= after_id:
                return after_id, 0, 0, 0
            rows, points, size = conn.execute(
                f"SELECT count(*), coalesce(sum(points), 0), coalesce(sum(length(body)), 0) + count(*) * "
                f"{ROW_OVERHEAD_BYTES} FROM entry WHERE id > ? AND id <= ? AND held = 0",
                (after_id, cut),
            ).fetchone()
        return cut, int(rows), int(points), int(size)

    def dead_letter(self, items: Sequence[tuple[int, str]], reason: str) -> int:
        """Record ``(row id, line)`` the sink refused, with its reason; returns how many old ones were trimmed."""
        if not items:
            return 0
        now = time.time_ns()
        with self._lock, immediate(self._connection()) as conn:
            conn.executemany(
                "INSERT INTO dead_letter (sink, entry_id, line, reason, dead_ns) VALUES (?, ?, ?, ?, ?)",
                ((self.sink, i, line, reason, now) for i, line in items),
            )
            depth = int(conn.execute("SELECT count(*) FROM dead_letter").fetchone()[0])
            trimmed = 0
            if depth > self.dead_letter_max_rows:
                trimmed = conn.execute(
                    "DELETE FROM dead_letter WHERE id IN (SELECT id FROM dead_letter ORDER BY id LIMIT ?)",
                    (depth - self.dead_letter_max_rows,),
                ).rowcount
        return trimmed

    def latest_id(self) -> int:
        """The id of the newest row in the spool (0 when it has never had one)."""
        with self._lock:
            row = self._connection().execute("SELECT seq FROM sqlite_sequence WHERE name = 'entry'").fetchone()
        return 0 if row is None else int(row[0])

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
