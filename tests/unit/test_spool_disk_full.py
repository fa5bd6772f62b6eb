"""The spool on a full disk: its reserve, refusing appends, appending into freed pages, leaving the state.

SQLite's ``max_page_count`` makes a write fail with SQLITE_FULL exactly as a full file system does; the
free space the spool reads from the file system is replaced where a test needs a full or an empty one.
The same path with a real full file system and real processes: ``tests/integration/test_chaos_diskfull.py``.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from agent.metrics import Metrics
from agent.spool import sqlite as spool_module
from agent.spool.codec import Entry, encode_lines
from agent.spool.sqlite import FULL_APPEND_MARGIN_BYTES, Spool, SpoolFull, is_disk_full

RESERVE = 256 * 1024
ROW_BYTES = 32 * 1024


def _entries(n: int, start: int = 0) -> list[Entry]:
    pad = "x" * ROW_BYTES
    return [encode_lines([f"m,k={pad} v={i}i {i}"]) for i in range(start, start + n)]


def _fill(spool: Spool) -> int:
    """Append one row at a time until the disk (the page cap) is full; the rows appended."""
    conn = spool._connection()
    pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
    conn.execute(f"PRAGMA max_page_count = {pages + 3 * (FULL_APPEND_MARGIN_BYTES + RESERVE) // 4096}")
    n = 0
    while True:
        try:
            spool.append(_entries(1, n))
        except sqlite3.Error as exc:
            assert is_disk_full(exc), exc
            return n
        n += 1


@pytest.fixture
def full_spool(tmp_path: Path, metrics: Metrics) -> Spool:
    spool = Spool(tmp_path / "spool.db", max_bytes=10**12, max_points=10**9, metrics=metrics, reserve_bytes=RESERVE)
    assert (tmp_path / "spool.db.reserve").stat().st_size == RESERVE
    assert metrics.get("spool.reserve_bytes") == RESERVE and not spool.disk_full
    _fill(spool)
    return spool


def test_a_failed_write_for_lack_of_space_releases_the_reserve_and_refuses_appends(
    full_spool: Spool, metrics: Metrics, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert full_spool.disk_full
    assert not (tmp_path / "spool.db.reserve").exists()
    assert metrics.get("spool.disk_full") == 1 and metrics.get("spool.disk_full_events") == 1
    assert metrics.get("spool.reserve_bytes") == 0
    with caplog.at_level(logging.ERROR):
        for _ in range(3):  # refused at once, before any write, and not logged again
            with pytest.raises(SpoolFull, match=r"disk full .* not acknowledging"):
                full_spool.append(_entries(1))
    assert "the disk is full" not in caplog.text
    with pytest.raises(SpoolFull, match="inside the spool file"):
        full_spool.check_writable()
    full_spool.close()


def test_while_full_appends_go_into_the_pages_delivered_rows_freed(full_spool: Spool, metrics: Metrics) -> None:
    rows_before = full_spool.size()[0]
    cursor = full_spool.cursor("local")
    cursor.advance(cursor.latest_id())  # the sink confirmed everything (its update needs no new page)
    cursor.close()
    assert full_spool.compact() == rows_before
    assert full_spool.disk_full  # the file system is still full: only the file has room
    ids = full_spool.append(_entries(5, 1000))
    assert all(i is not None for i in ids) and full_spool.size()[0] == 5
    full_spool.close()


def test_room_on_the_file_system_remakes_the_reserve_and_ends_the_full_state(
    full_spool: Spool,
    metrics: Metrics,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(full_spool, "_fs_free", lambda: 0)
    full_spool._check_room()
    assert full_spool.disk_full, "no room anywhere: still full"
    monkeypatch.setattr(full_spool, "_fs_free", lambda: 10**12)
    with caplog.at_level(logging.WARNING):
        full_spool._check_room()
        full_spool._check_room()
    assert not full_spool.disk_full and metrics.get("spool.disk_full") == 0
    assert (tmp_path / "spool.db.reserve").stat().st_size == RESERVE
    assert caplog.text.count("room again") == 1
    full_spool.close()


def test_room_inside_the_file_also_ends_the_full_state(
    full_spool: Spool, metrics: Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(full_spool, "_fs_free", lambda: 0)
    cursor = full_spool.cursor("local")
    cursor.advance(cursor.latest_id())
    cursor.close()
    full_spool.compact()
    full_spool._check_room()
    assert not full_spool.disk_full and metrics.get("spool.reserve_bytes") == 0  # no room for the file itself
    assert full_spool.check_writable()  # the spool file's free pages are its room
    full_spool.close()


def test_a_spool_opened_without_room_for_its_reserve_starts_full(
    tmp_path: Path, metrics: Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Spool, "_fs_free", lambda self: RESERVE // 2)
    spool = Spool(tmp_path / "spool.db", max_bytes=10**12, max_points=10**9, metrics=metrics, reserve_bytes=RESERVE)
    assert spool.disk_full and metrics.get("spool.disk_full") == 1
    with pytest.raises(SpoolFull, match="no room for the"):
        spool.append(_entries(1))
    spool.close()


def test_disk_full_errors_are_told_apart_from_other_errors() -> None:
    assert is_disk_full(sqlite3.OperationalError("database or disk is full"))
    assert is_disk_full(OSError(28, "No space left on device"))
    assert not is_disk_full(sqlite3.OperationalError("database is locked"))
    assert not is_disk_full(OSError(13, "Permission denied"))
    assert not is_disk_full(ValueError("database or disk is full"))


def test_removing_delivered_rows_writes_far_less_than_they_held(spool: Spool, tmp_path: Path) -> None:
    """Compaction on a full disk needs WAL room: freed pages are not rewritten (``secure_delete`` off; with
    it on, as Debian's SQLite defaults, the WAL grows by as much as the rows held)."""
    spool.append(_entries(100))
    cursor = spool.cursor("local")
    cursor.advance(cursor.latest_id())
    cursor.close()
    freed = spool.size()[2]
    wal = tmp_path / "spool.db-wal"
    before = wal.stat().st_size
    assert spool.compact() == 100
    assert wal.stat().st_size - before < freed / 10


def test_compaction_goes_in_chunks_and_only_one_per_pass_while_full(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_module, "COMPACT_CHUNK_IDS", 10)
    spool.append([encode_lines([f"m v={i}i {i}"]) for i in range(35)])
    cursor = spool.cursor("local")
    cursor.advance(cursor.latest_id())
    assert spool.compact() == 35  # four transactions of at most 10 ids
    spool.append([encode_lines([f"m v={i}i {i}"]) for i in range(35)])
    cursor.advance(cursor.latest_id())
    cursor.close()
    spool._enter_full("a test")
    assert [spool.compact() for _ in range(5)] == [10, 10, 10, 5, 0]  # a checkpoint between them, each its room
