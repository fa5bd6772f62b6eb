"""The spool file's schema and connections, shared by its owner (``agent.spool.sqlite.Spool``) and the
sinks' readers (``agent.spool.cursor.SinkCursor``), which may run in another process."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DEAD_LETTER_MAX_ROWS = 100_000
BUSY_TIMEOUT_MS = 10_000
ROW_OVERHEAD_BYTES = 48
"""What a row costs beyond its body (id, kind, points, bytes, time, the b-tree cell): counted in the byte caps."""
HELD = -1
"""``entry.held`` of a block kept for a possible release; 0 for other rows; the release's id once released."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS entry (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind INTEGER NOT NULL,
    body BLOB NOT NULL,
    points INTEGER NOT NULL,
    held INTEGER NOT NULL DEFAULT 0,
    enqueued_ns INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS entry_held ON entry (held, enqueued_ns) WHERE held != 0;
CREATE TABLE IF NOT EXISTS cursor (
    sink TEXT PRIMARY KEY,
    last_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sink_state (
    sink TEXT PRIMARY KEY,
    state BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letter (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sink TEXT NOT NULL,
    entry_id INTEGER NOT NULL,
    line TEXT NOT NULL,
    reason TEXT NOT NULL,
    dead_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS arrival (
    id INTEGER PRIMARY KEY,
    key BLOB NOT NULL UNIQUE,
    arrival_ns INTEGER NOT NULL
);
"""
"""``sink_state``: what a sink's writer must resume with besides its cursor (an upstream's open downsampling
buckets), saved in the same transaction as the cursor. ``arrival``: the arrival time of each stored message
that had no device timestamp (``agent.spool.arrivals``);
``id`` grows with each record, so pruning takes the oldest first without an index on the time."""


@dataclass(frozen=True, slots=True)
class Row:
    """One spool row as a sink reads it."""

    id: int
    kind: int
    body: bytes
    points: int
    held: bool = False
    """A held or released block: it gives a sink nothing by itself, so its body is not read (empty)."""


def connect(path: Path | str, synchronous: str) -> sqlite3.Connection:
    # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
    conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    # Debian's SQLite overwrites every freed page with zeros (SQLITE_SECURE_DELETE): removing delivered rows
    # would write them all again to the WAL, which doubles compaction's I/O and, on a full disk, needs as much
    # room as the rows it frees. Freed pages are reused by the next appends; the file's permissions guard them.
    conn.execute("PRAGMA secure_delete=OFF")
    columns = {str(row[1]) for row in conn.execute("PRAGMA table_info(dead_letter)")}
    if "spool_id" in columns:  # a spool of version 0.2 (rows of lines): keep its dead letters aside
        conn.execute("ALTER TABLE dead_letter RENAME TO dead_letter_v1")
    conn.executescript(SCHEMA)
    return conn


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``conn`` inside BEGIN IMMEDIATE ... COMMIT, rolled back on error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
