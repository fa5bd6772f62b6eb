"""The SQLite spool: a log of entries read by each sink at its own durable cursor, bounded in points and
bytes with counted drops, held blocks, dead letters, durable across reopen and crash, migration from 0.2."""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.metrics import Metrics
from agent.records import SampleBlock, Source
from agent.spool import sqlite as spool_module
from agent.spool.codec import Entry, Kind, encode_block, encode_lines, encode_raw_ref
from agent.spool.sqlite import ROW_OVERHEAD_BYTES, Row, SinkCursor, Spool, SpoolNotWritable
from agent.storage.entries import entry_lines

SRC = Source.of(machine="m1", sensor="vibration")
BIG = 10**12


def _line(i: int) -> str:
    return f"m v={i}i {i}"


def _entries(n: int, start: int = 0) -> list[Entry]:
    """``n`` entries of one point each."""
    return [encode_lines([_line(i)]) for i in range(start, start + n)]


def _sized(n: int, body_bytes: int, start: int = 0) -> list[Entry]:
    """``n`` entries of one point and exactly ``body_bytes`` body bytes each (a padded string field)."""
    out = []
    for i in range(start, start + n):
        pad = body_bytes - len(f'm s="" {i}')
        assert pad >= 0
        out.append(encode_lines([f'm s="{"x" * pad}" {i}']))
    return out


def _held(n: int = 4) -> Entry:
    block = SampleBlock(SRC, 10**18, 1000.0, np.arange(n, dtype=np.float32), "x")
    return encode_block(block, store_raw=False, held=True)


def _append(spool: Spool, entries: list[Entry]) -> list[int]:
    """``spool.append`` of entries that all fit: their ids."""
    ids = spool.append(entries)
    assert None not in ids
    return [i for i in ids if i is not None]


def _lines_of(rows: list[Row]) -> list[str]:
    return [line for row in rows for line in entry_lines(row.kind, row.body)]


def _all(spool: Spool, sink: str = "local") -> list[str]:
    """The lines of every row after ``sink``'s cursor."""
    cursor = spool.cursor(sink)
    try:
        return _lines_of(cursor.read(BIG))
    finally:
        cursor.close()


def _age(path: Path, ids: list[int], seconds: float) -> None:
    """Make rows look ``seconds`` older (what a long outage does), through a connection of our own."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        marks = ",".join("?" * len(ids))
        conn.execute(
            f"UPDATE entry SET enqueued_ns = enqueued_ns - ? WHERE id IN ({marks})", (int(seconds * 1e9), *ids)
        )
    finally:
        conn.close()


@pytest.fixture(autouse=True)
def _exact_backlogs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backlogs are sampled (cached for BACKLOG_CACHE_S): read them afresh each time in these tests."""
    monkeypatch.setattr(spool_module, "BACKLOG_CACHE_S", 0.0)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def spool(tmp_path: Path, metrics: Metrics) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool.db", max_bytes=BIG, max_points=100, drop_policy="oldest", metrics=metrics)
    yield s
    s.close()


@pytest.fixture
def cursor(spool: Spool) -> Iterator[SinkCursor]:
    c = spool.cursor("local")
    yield c
    c.close()


# -- appending, reading, confirming --------------------------------------------------------------


def test_read_returns_oldest_first_and_keeps_rows_until_the_cursor_moves(
    spool: Spool, cursor: SinkCursor, metrics: Metrics
) -> None:
    ids = _append(spool, _entries(5))
    assert ids == sorted(ids)
    first = cursor.read(3)
    assert [r.id for r in first] == ids[:3]
    assert _lines_of(first) == [_line(i) for i in range(3)]
    assert cursor.read(3) == first  # reading does not consume
    cursor.advance(first[-1].id)
    assert cursor.position == ids[2]
    assert _lines_of(cursor.read(10)) == [_line(i) for i in (3, 4)]
    assert spool.depth() == 2
    assert metrics.get("spool.depth") == 2
    assert metrics.get("spool.backlog_points", sink="local") == 2
    assert metrics.get("spool.appended") == 5
    assert spool.compact() == 3
    assert metrics.get("spool.acked") == 3
    assert spool.size()[:2] == (2, 2)
    assert (metrics.get("spool.rows"), metrics.get("spool.points")) == (2, 2)


def test_read_stops_at_max_points_but_returns_at_least_one_row(spool: Spool, cursor: SinkCursor) -> None:
    spool.append([encode_lines([_line(i) for i in range(5)]), *_entries(3, start=5)])
    assert [r.points for r in cursor.read(2)] == [5]  # a row larger than max_points still comes alone
    assert [r.points for r in cursor.read_after(cursor.read(1)[0].id, 2)] == [1, 1]
    assert len(cursor.read(BIG, max_rows=2)) == 2


def test_read_after_reads_ahead_of_the_cursor_without_moving_it(spool: Spool, cursor: SinkCursor) -> None:
    ids = _append(spool, _entries(4))
    assert [r.id for r in cursor.read_after(ids[1], 10)] == ids[2:]
    assert cursor.position == 0


def test_advance_never_moves_back(spool: Spool, cursor: SinkCursor) -> None:
    ids = _append(spool, _entries(3))
    cursor.advance(ids[2])
    cursor.advance(ids[0])
    assert cursor.position == ids[2]
    assert spool.cursors() == {"local": ids[2]}


def test_empty_appends_do_nothing(spool: Spool, cursor: SinkCursor) -> None:
    assert spool.append([]) == []
    assert spool.append_lines([]) == []
    assert cursor.dead_letter([], "nothing") == 0
    assert cursor.bodies([]) == []
    assert spool.depth() == 0
    assert cursor.read(10) == []


def test_append_lines_is_one_entry_of_the_agents_own_points(spool: Spool, cursor: SinkCursor) -> None:
    spool.append_lines(["features x=1 1", "anomaly_score score=0.5 1"])
    (row,) = cursor.read(10)
    assert (row.kind, row.points) == (Kind.LINES, 2)
    assert entry_lines(row.kind, row.body) == ["features x=1 1", "anomaly_score score=0.5 1"]


def test_latest_id_and_caught_up_follow_appends_and_the_cursor(spool: Spool, cursor: SinkCursor) -> None:
    assert cursor.latest_id() == 0
    assert spool.caught_up("local")
    ids = _append(spool, _entries(2))
    assert cursor.latest_id() == ids[-1]
    assert not spool.caught_up("local")
    cursor.advance(ids[-1])
    assert spool.caught_up("local")


# -- sinks and their cursors ---------------------------------------------------------------------


def test_two_sinks_read_at_independent_cursors_and_a_row_stays_until_both_have_it(
    tmp_path: Path, metrics: Metrics
) -> None:
    with Spool(tmp_path / "s.db", BIG, 100, metrics=metrics, sinks=("local", "cloud")) as spool:
        local, cloud = spool.cursor("local"), spool.cursor("cloud")
        ids = _append(spool, _entries(4))
        local.advance(ids[3])
        assert spool.compact() == 0  # the cloud has none of them yet
        assert spool.backlogs()["local"][:2] == (0, 0)
        assert spool.backlogs()["cloud"][:2] == (4, 4)
        assert spool.depth() == 4  # the slowest sink
        assert metrics.get("spool.backlog_points", sink="cloud") == 4
        assert metrics.get("spool.backlog_points", sink="local") == 0
        assert spool.caught_up("local") and not spool.caught_up("cloud")
        assert [r.id for r in cloud.read(10)] == ids
        cloud.advance(ids[1])
        assert spool.compact() == 2  # what both have
        assert metrics.get("spool.acked") == 2
        assert [r.id for r in cloud.read(10)] == ids[2:]
        cloud.advance(ids[3])
        assert spool.compact() == 2
        assert spool.size() == (0, 0, 0)
        assert metrics.get("spool.acked") == 4
        local.close()
        cloud.close()


def test_a_cursor_is_only_for_a_configured_sink(spool: Spool) -> None:
    with pytest.raises(ValueError, match="not one of this spool's sinks"):
        spool.cursor("cloud")
    with pytest.raises(ValueError, match="no cursor for sink 'cloud'"):
        SinkCursor(spool.path, "cloud")


def test_a_sink_added_later_starts_at_the_oldest_row_and_a_removed_one_is_forgotten(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Spool(path, BIG, 100, sinks=("local",)) as spool:
        ids = _append(spool, _entries(3))
        cursor = spool.cursor("local")
        cursor.advance(ids[0])
        cursor.close()
        spool.compact()
    with Spool(path, BIG, 100, sinks=("local", "cloud")) as spool:
        assert spool.cursors() == {"local": ids[0], "cloud": 0}
        assert _all(spool, "cloud") == [_line(1), _line(2)]  # what is still retained
        assert _all(spool, "local") == [_line(1), _line(2)]
    with Spool(path, BIG, 100, sinks=("cloud",)) as spool:
        assert spool.cursors() == {"cloud": 0}
        conn = sqlite3.connect(path)
        assert [s for (s,) in conn.execute("SELECT sink FROM cursor")] == ["cloud"]
        conn.close()


# -- caps and drop policies ----------------------------------------------------------------------


def test_drop_oldest_keeps_the_newest_points_and_counts_the_drop(
    tmp_path: Path, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    with Spool(tmp_path / "s.db", BIG, max_points=10, drop_policy="oldest", metrics=metrics) as spool:
        spool.append(_entries(8))
        with caplog.at_level(logging.WARNING, logger="agent.spool.sqlite"):
            ids = spool.append(_entries(5, start=8))
        assert None not in ids
        assert _all(spool) == [_line(i) for i in range(3, 13)]
        assert spool.depth() == 10
        assert spool.size()[1] == 10
        assert metrics.get("spool.dropped", policy="oldest") == 3
        assert metrics.get("spool.dropped_bytes", policy="oldest") == sum(
            len(e.body) + ROW_OVERHEAD_BYTES for e in _entries(3)
        )
        assert "dropped 3 oldest points" in caplog.text


def test_drop_newest_refuses_incoming_entries_and_counts_the_drop(
    tmp_path: Path, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    with Spool(tmp_path / "s.db", BIG, max_points=10, drop_policy="newest", metrics=metrics) as spool:
        spool.append(_entries(8))
        with caplog.at_level(logging.WARNING, logger="agent.spool.sqlite"):
            ids = spool.append(_entries(5, start=8))
        assert [i is not None for i in ids] == [True, True, False, False, False]
        assert _all(spool) == [_line(i) for i in range(10)]
        assert metrics.get("spool.dropped", policy="newest") == 3
        assert "spool.dropped" in caplog.text
        assert spool.append(_entries(1, start=99)) == [None]
        assert metrics.get("spool.dropped") == 4
        assert metrics.get("spool.dropped_bytes", policy="newest") == sum(
            len(e.body) + ROW_OVERHEAD_BYTES for e in [*_entries(3, start=10), *_entries(1, start=99)]
        )


def test_drop_newest_keeps_a_smaller_entry_that_still_fits(tmp_path: Path, metrics: Metrics) -> None:
    with Spool(tmp_path / "s.db", BIG, max_points=5, drop_policy="newest", metrics=metrics) as spool:
        big = encode_lines([_line(i) for i in range(3)])
        ids = spool.append([*_entries(3), big, *_entries(1, start=9)])
        assert [i is not None for i in ids] == [True, True, True, False, True]
        assert metrics.get("spool.dropped", policy="newest") == 3


def test_a_batch_larger_than_the_spool_keeps_its_newest_entries(tmp_path: Path, metrics: Metrics) -> None:
    with Spool(tmp_path / "s.db", BIG, max_points=3, drop_policy="oldest", metrics=metrics) as spool:
        spool.append(_entries(1, start=100))
        ids = spool.append(_entries(5))
        assert [i is not None for i in ids] == [False, False, True, True, True]
        assert _all(spool) == [_line(i) for i in (2, 3, 4)]
        assert metrics.get("spool.dropped") == 3  # two refused of the batch, one old row


@pytest.mark.parametrize("policy", ["oldest", "newest"])
def test_the_byte_cap_applies_independently_of_the_point_cap(tmp_path: Path, metrics: Metrics, policy: str) -> None:
    entries = _sized(6, body_bytes=52)  # 100 bytes a row with the overhead
    assert {len(e.body) + ROW_OVERHEAD_BYTES for e in entries} == {100}
    with Spool(tmp_path / "s.db", max_bytes=450, max_points=BIG, drop_policy=policy, metrics=metrics) as spool:  # type: ignore[arg-type]
        spool.append(entries)
        assert spool.size() == (4, 4, 400)
        assert metrics.get("spool.bytes") == 400
        kept = [int(line.split()[-1]) for line in _all(spool)]
        assert kept == ([2, 3, 4, 5] if policy == "oldest" else [0, 1, 2, 3])
        assert metrics.get("spool.dropped", policy=policy) == 2
        assert metrics.get("spool.dropped_bytes", policy=policy) == 200


def test_held_blocks_count_in_bytes_but_not_in_points(tmp_path: Path, metrics: Metrics) -> None:
    with Spool(tmp_path / "s.db", max_bytes=BIG, max_points=2, metrics=metrics) as spool:
        ids = _append(spool, [_held(1000) for _ in range(5)])
        assert None not in ids
        rows, points, size = spool.size()
        assert (rows, points) == (5, 0)
        assert size == 5 * (len(_held(1000).body) + ROW_OVERHEAD_BYTES)
        assert metrics.get("spool.dropped") == 0


def test_rows_every_sink_has_are_removed_before_anything_is_dropped(
    tmp_path: Path, metrics: Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_module, "COMPACT_INTERVAL_S", float("inf"))  # no periodic compaction
    for policy in ("oldest", "newest"):
        with Spool(tmp_path / f"{policy}.db", BIG, max_points=10, drop_policy=policy, metrics=metrics) as spool:
            ids = _append(spool, _entries(8))
            cursor = spool.cursor("local")
            cursor.advance(ids[-1])  # delivered, not yet compacted
            assert None not in spool.append(_entries(5, start=8))
            assert _all(spool) == [_line(i) for i in range(8, 13)]
            assert metrics.get("spool.dropped", policy=policy) == 0
            cursor.close()


def test_drops_are_logged_at_most_once_per_interval_but_all_counted(
    tmp_path: Path, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    with Spool(tmp_path / "s.db", BIG, max_points=1, drop_policy="newest", metrics=metrics) as spool:
        spool.append(_entries(1))
        with caplog.at_level(logging.WARNING, logger="agent.spool.sqlite"):
            for i in range(5):
                spool.append(_entries(1, start=i))
        assert metrics.get("spool.dropped", policy="newest") == 5
        assert caplog.text.count("is full") == 1


# -- held blocks ---------------------------------------------------------------------------------


def test_a_batch_of_many_rows_returns_each_entrys_own_id(tmp_path: Path, metrics: Metrics) -> None:
    """Rows go in with multi-row INSERTs (one statement per run of rows, cut at a release, which pins by id):
    every id returned must name that entry's row, and the release must pin the blocks before it."""
    with Spool(tmp_path / "s.db", BIG, BIG, metrics=metrics) as spool:
        spool._rows_per_insert = 7  # several full statements and a partial one
        first = _append(spool, [_held(), *_entries(3)])
        batch = [*_entries(20, start=3), _held(5), encode_raw_ref([first[0]]), *_entries(9, start=23), _held(6)]
        ids = _append(spool, batch)
        assert len(set(ids)) == len(batch) and ids == sorted(ids) and ids[0] > first[-1]
        cursor = spool.cursor("local")
        assert cursor.bodies(ids) == [e.body for e in batch]
        release = ids[21]
        held = spool._conn.execute("SELECT held FROM entry WHERE id = ?", (first[0],)).fetchone()  # type: ignore[union-attr]
        assert held == (release,)  # pinned to its release
        cursor.close()


def test_batches_of_any_size_use_a_few_insert_statements(tmp_path: Path, metrics: Metrics) -> None:
    """The sqlite3 module caches every distinct statement with its last bound values (the rows' bodies) until
    it runs again: one statement per batch size kept up to 128 batches' bodies in memory."""
    with Spool(tmp_path / "s.db", BIG, BIG, metrics=metrics) as spool:
        sizes: set[int] = set()  # rows per INSERT statement run (the trace shows each with its values)

        def trace(sql: str) -> None:
            if sql.startswith("INSERT INTO entry"):
                sizes.add(sql.count("), (") + 1)

        assert spool._conn is not None
        spool._conn.set_trace_callback(trace)
        for n in range(1, 151):
            ids = _append(spool, _entries(n))
            assert len(set(ids)) == n
        assert sizes == set(spool_module.INSERT_SIZES)


def test_a_held_block_outlives_compaction_for_hold_s_and_can_be_read_by_id(tmp_path: Path, metrics: Metrics) -> None:
    path = tmp_path / "s.db"
    with Spool(path, BIG, 100, metrics=metrics, hold_s=60.0) as spool:
        cursor = spool.cursor("local")
        held_id, line_id = _append(spool, [_held(), *_entries(1)])
        assert held_id is not None and line_id is not None
        cursor.advance(line_id)
        assert spool.compact() == 1  # the line; the held block stays
        assert spool.size()[0] == 1
        assert cursor.bodies([held_id, 12345]) == [_held().body]  # an id no longer there is left out
        _age(path, [held_id], 61.0)  # the block is older than hold_s and every sink passed newer rows
        later = _append(spool, _entries(1, start=1))
        cursor.advance(later[0])
        spool.compact()
        assert cursor.bodies([held_id]) == []
        assert spool.size() == (0, 0, 0)
        cursor.close()


def test_a_released_block_stays_until_every_sink_has_read_its_release_however_old(
    tmp_path: Path, metrics: Metrics
) -> None:
    """After an outage a sink passes an old held block long before it reads the release appended right
    after it: the released block must still be there then, however old it is by the wall clock."""
    path = tmp_path / "s.db"
    with Spool(path, BIG, 100, metrics=metrics, hold_s=60.0) as spool:
        cursor = spool.cursor("local")
        held_id, line_id = _append(spool, [_held(), *_entries(1)])
        assert held_id is not None and line_id is not None
        (ref_id,) = _append(spool, [encode_raw_ref([held_id])])
        assert ref_id is not None
        _age(path, [held_id, line_id, ref_id], 3600.0)  # all of it arrived an hour ago, during the outage
        cursor.advance(line_id)  # the sink passed the block, not yet its release
        spool.compact()
        assert cursor.bodies([held_id]) == [_held().body]
        cursor.advance(ref_id)  # the release is written: the block can go
        spool.compact()
        assert cursor.bodies([held_id]) == []
        assert spool.size() == (0, 0, 0)
        cursor.close()


def test_an_unreleased_held_block_leaves_after_hold_s_even_while_the_sink_is_away(
    tmp_path: Path, metrics: Metrics
) -> None:
    """During a database outage the cursor does not move; held blocks no alert wants must not pile up."""
    path = tmp_path / "s.db"
    with Spool(path, BIG, 100, metrics=metrics, hold_s=60.0) as spool:
        held_id, line_id = _append(spool, [_held(), *_entries(1)])
        assert held_id is not None and line_id is not None
        _age(path, [held_id], 61.0)
        assert spool.compact() == 1  # the block; the line waits for its sink
        assert spool.size()[0] == 1 and spool.cursors() == {"local": 0}


def test_drop_oldest_may_drop_held_blocks_counting_their_bytes(tmp_path: Path, metrics: Metrics) -> None:
    held = _held()
    with Spool(tmp_path / "s.db", BIG, max_points=2, metrics=metrics) as spool:
        cursor = spool.cursor("local")
        held_id = _append(spool, [held, *_entries(2)])[0]
        spool.append(_entries(1, start=2))
        assert cursor.bodies([held_id]) == []
        expected_bytes = len(held.body) + len(_entries(1)[0].body) + 2 * ROW_OVERHEAD_BYTES
        assert metrics.get("spool.dropped_bytes", policy="oldest") == expected_bytes
        assert metrics.get("spool.dropped", policy="oldest") == 1
        cursor.close()


# -- dead letters ----------------------------------------------------------------------------------


def test_dead_letters_are_kept_with_their_reason(spool: Spool, cursor: SinkCursor) -> None:
    ids = _append(spool, _entries(3))
    assert cursor.dead_letter([(ids[1], _line(1))], "HTTP 400: field type conflict") == 0
    assert spool.dead_letters() == [(_line(1), "HTTP 400: field type conflict")]
    assert spool.dead_letter_depth() == 1


def test_dead_letter_table_is_bounded_and_trimming_is_reported(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db", BIG, 100, dead_letter_max_rows=2) as spool:
        cursor = spool.cursor("local")
        assert cursor.dead_letter([(i, _line(i)) for i in range(3)], "bad") == 1
        assert [line for line, _ in spool.dead_letters()] == [_line(1), _line(2)]
        assert cursor.dead_letter([(9, _line(9))], "bad") == 1
        assert [line for line, _ in spool.dead_letters()] == [_line(2), _line(9)]
        assert spool.dead_letter_depth() == 2
        cursor.close()


# -- durability ------------------------------------------------------------------------------------


def test_a_reopened_spool_resumes_at_each_cursor_with_fresh_ids(tmp_path: Path, metrics: Metrics) -> None:
    path = tmp_path / "spool.db"
    with Spool(path, BIG, 100) as spool:
        ids = _append(spool, _entries(4))
        cursor = spool.cursor("local")
        cursor.advance(ids[1])
        cursor.dead_letter([(ids[2], _line(2))], "bad")
        cursor.close()
    with Spool(path, BIG, 100, metrics=metrics) as spool:
        assert spool.size()[:2] == (2, 2)  # counted again from the file
        assert metrics.get("spool.points") == 2
        assert spool.depth() == 2
        assert spool.cursors() == {"local": ids[1]}
        assert _all(spool) == [_line(2), _line(3)]
        assert spool.dead_letter_depth() == 1
        cursor = spool.cursor("local")
        cursor.advance(ids[3])
        spool.compact()
        assert spool.size() == (0, 0, 0)
        new = _append(spool, _entries(1))
        assert new[0] > ids[3]  # ids are never reused, even after the spool was empty
        cursor.close()
    with Spool(path, BIG, 100) as spool:
        assert _append(spool, _entries(1))[0] > new[0]


def test_spool_runs_in_wal_mode(spool: Spool) -> None:
    spool.append(_entries(1))
    conn = sqlite3.connect(spool.path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_appended_entries_survive_a_killed_process(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    script = (
        "import os, signal\n"
        "from agent.spool.codec import encode_lines\n"
        "from agent.spool.sqlite import Spool\n"
        f"s = Spool({str(path)!r}, max_bytes=10**9, max_points=100)\n"
        "print(s.append([encode_lines(['m v=1 1', 'm v=2 2']), encode_lines(['m v=3 3'])]), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=Path(__file__).parents[2], check=False, capture_output=True, text=True
    )
    assert proc.returncode == -9, proc.stderr
    assert proc.stdout.strip() == "[1, 2]"
    with Spool(path, BIG, 100) as spool:
        assert _all(spool) == ["m v=1 1", "m v=2 2", "m v=3 3"]
        assert spool.size()[:2] == (2, 3)


def test_a_moved_cursor_survives_a_killed_process(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    with Spool(path, BIG, 100) as spool:
        spool.append(_entries(3))
    script = (
        "import os, signal\n"
        "from agent.spool.sqlite import SinkCursor\n"
        f"c = SinkCursor({str(path)!r}, 'local')\n"
        "c.advance(2)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[2], check=False)
    assert proc.returncode == -9
    with Spool(path, BIG, 100) as spool:
        assert spool.cursors() == {"local": 2}
        assert _all(spool) == [_line(2)]


# -- migration of a 0.2 spool --------------------------------------------------------------------


def _spool_v02(path: Path, lines: list[str], dead: list[tuple[int, str, str]]) -> None:
    """A spool file as version 0.2 left it: one line per row, dead letters with a ``spool_id``."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(
        """
        CREATE TABLE spool (id INTEGER PRIMARY KEY AUTOINCREMENT, line TEXT NOT NULL, enqueued_ns INTEGER NOT NULL);
        CREATE TABLE dead_letter (
            id INTEGER PRIMARY KEY AUTOINCREMENT, spool_id INTEGER NOT NULL, line TEXT NOT NULL,
            reason TEXT NOT NULL, dead_ns INTEGER NOT NULL
        );
        """
    )
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO spool (line, enqueued_ns) VALUES (?, 1)", ((line,) for line in lines))
    conn.execute("DELETE FROM spool WHERE id = 1")  # 0.2 deleted what it had delivered
    conn.executemany("INSERT INTO dead_letter (spool_id, line, reason, dead_ns) VALUES (?, ?, ?, 1)", dead)
    conn.execute("COMMIT")
    conn.close()


def test_a_spool_of_version_0_2_is_migrated_into_entries(
    tmp_path: Path, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spool.db"
    lines = [_line(i) for i in range(12_002)]
    _spool_v02(path, lines, [(7, "bad v=1 1", "HTTP 400: old reason")])
    with caplog.at_level(logging.WARNING, logger="agent.spool.sqlite"):
        spool = Spool(path, BIG, BIG, metrics=metrics)
    assert "moved 12001 undelivered lines" in caplog.text
    cursor = spool.cursor("local")
    rows = cursor.read(BIG)
    assert {r.kind for r in rows} == {Kind.LINES}
    assert [r.points for r in rows] == [5000, 5000, 2001]
    assert _lines_of(rows) == lines[1:]
    assert spool.size()[1] == 12_001
    conn = sqlite3.connect(path)
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "spool" not in tables
    assert conn.execute("SELECT line, reason FROM dead_letter_v1").fetchall() == [("bad v=1 1", "HTTP 400: old reason")]
    conn.close()
    assert spool.dead_letters() == []  # the new table starts empty ...
    cursor.dead_letter([(rows[0].id, "x v=1 1")], "new")  # ... and works
    assert spool.dead_letters() == [("x v=1 1", "new")]
    cursor.close()
    spool.close()
    with Spool(path, BIG, BIG) as spool:  # migrated once only
        assert spool.size()[1] == 12_001


def test_an_empty_spool_of_version_0_2_is_migrated_to_an_empty_log(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    _spool_v02(path, ["m v=0 0"], [])  # its only row was delivered
    with Spool(path, BIG, 100) as spool:
        assert spool.size() == (0, 0, 0)
        assert spool.append(_entries(1)) != [None]


# -- gauges, readiness, settings -------------------------------------------------------------------


def test_oldest_age_is_zero_when_empty_and_positive_otherwise(spool: Spool) -> None:
    assert spool.oldest_age_s() == 0.0
    spool.append(_entries(1))
    assert spool.oldest_age_s() >= 0.0
    _age(spool.path, [1], 100.0)
    assert spool.oldest_age_s() >= 100.0
    assert spool.backlogs()["local"][2] >= 100.0


def test_backlog_gauges_are_read_when_the_metrics_are_read(tmp_path: Path, metrics: Metrics) -> None:
    spool = Spool(tmp_path / "spool.db", BIG, 10, metrics=metrics)
    assert metrics.snapshot()["spool.oldest_age_s"] == 0.0
    assert metrics.snapshot()["spool.depth"] == 0.0
    spool.append(_entries(3))
    assert metrics.snapshot()["spool.oldest_age_s"] >= 0.0
    assert metrics.snapshot()["spool.depth"] == 3.0
    assert metrics.snapshot()["spool.backlog_points{sink=local}"] == 3.0
    spool.close()
    snapshot = metrics.snapshot()
    for name in ("spool.oldest_age_s", "spool.depth", "spool.backlog_points{sink=local}"):
        assert name not in snapshot  # a closed spool has no backlog to report


def test_backlogs_are_sampled_but_caught_up_is_exact(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = _append(spool, _entries(2))
    monkeypatch.setattr(spool_module, "BACKLOG_CACHE_S", 3600.0)
    assert spool.depth() == 2
    cursor = spool.cursor("local")
    cursor.advance(ids[-1])
    cursor.close()
    assert spool.depth() == 2  # the cached sample
    assert spool.caught_up("local")


def test_closed_spool_refuses_operations(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", BIG, 10)
    assert not spool.closed
    spool.close()
    spool.close()  # idempotent
    assert spool.closed
    assert spool.depth() == 0
    with pytest.raises(RuntimeError, match="closed"):
        spool.append(_entries(1))
    with pytest.raises(RuntimeError, match="closed"):
        spool.cursors()


def test_a_closed_cursor_refuses_reads(spool: Spool) -> None:
    cursor = spool.cursor("local")
    cursor.close()
    cursor.close()
    with pytest.raises(RuntimeError, match="closed"):
        cursor.read(1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_bytes": 0}, "max_bytes"),
        ({"max_points": 0}, "max_points"),
        ({"drop_policy": "random"}, "drop_policy"),
        ({"synchronous": "OFF"}, "synchronous"),
        ({"sinks": ()}, "sinks"),
        ({"sinks": ("a", "a")}, "sinks"),
    ],
)
def test_bad_settings_are_refused(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    settings: dict[str, object] = {"max_bytes": BIG, "max_points": 10}
    settings.update(kwargs)
    with pytest.raises(ValueError, match=message):
        Spool(tmp_path / "s.db", **settings)  # type: ignore[arg-type]


def test_the_spool_needs_a_file() -> None:
    with pytest.raises(ValueError, match="needs a file"):
        Spool(":memory:", BIG, 10)


def test_concurrent_appends_and_a_reader_lose_nothing(tmp_path: Path) -> None:
    n_threads, per_thread = 4, 300
    with Spool(tmp_path / "s.db", BIG, BIG) as spool:
        delivered: list[str] = []
        done = threading.Event()

        def producer(k: int) -> None:
            for i in range(per_thread):
                spool.append([encode_lines([f"m,p={k} v={i}i {i}"])])

        def consumer() -> None:
            cursor = spool.cursor("local")
            while True:
                finished = done.is_set()
                rows = cursor.read(50)
                delivered.extend(_lines_of(rows))
                if rows:
                    cursor.advance(rows[-1].id)
                    spool.compact()
                elif finished:
                    break
            cursor.close()

        producers = [threading.Thread(target=producer, args=(k,)) for k in range(n_threads)]
        reader = threading.Thread(target=consumer)
        reader.start()
        for t in producers:
            t.start()
        for t in producers:
            t.join()
        done.set()
        reader.join()
        expected = [f"m,p={k} v={i}i {i}" for k in range(n_threads) for i in range(per_thread)]
        assert sorted(delivered) == sorted(expected)
        spool.compact()
        assert spool.size() == (0, 0, 0)


def test_an_open_healthy_spool_is_writable(spool: Spool) -> None:
    assert spool.check_writable() is True
    assert spool.writable()
    spool.append(_entries(3))  # the probe's BEGIN IMMEDIATE/ROLLBACK left nothing behind
    assert spool.size()[0] == 3 and spool.writable()


def test_a_closed_spool_is_not_writable(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", BIG, 10)
    spool.close()
    assert not spool.writable()
    with pytest.raises(SpoolNotWritable, match="closed"):
        spool.check_writable()


def test_too_little_free_space_makes_the_spool_unwritable(spool: Spool) -> None:
    with pytest.raises(SpoolNotWritable, match="bytes free"):
        spool.check_writable(min_free_bytes=2**62)
    assert not spool.writable(min_free_bytes=2**62)


def test_a_failed_write_makes_the_spool_unwritable_until_a_write_succeeds(spool: Spool) -> None:
    spool._connection().execute("PRAGMA busy_timeout=0")  # fail at once instead of waiting for the lock
    other = sqlite3.connect(spool.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the write lock
    try:
        with pytest.raises(sqlite3.OperationalError):
            spool.append(_entries(1))
        with pytest.raises(SpoolNotWritable, match=r"last write failed.*locked"):
            spool.check_writable()
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert not spool.writable()  # still the failed write: only a successful one clears it
    assert spool.append(_entries(1)) != [None]
    assert spool.writable()


def test_a_held_write_lock_makes_the_spool_unwritable(spool: Spool) -> None:
    spool._connection().execute("PRAGMA busy_timeout=0")
    other = sqlite3.connect(spool.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(SpoolNotWritable, match="write lock"):
            spool.check_writable()
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert spool.writable()


def test_the_maintenance_thread_compacts_and_checkpoints_so_appending_threads_only_append(
    tmp_path: Path, metrics: Metrics
) -> None:
    path = tmp_path / "s.db"
    with Spool(path, BIG, 1000, metrics=metrics) as spool:
        spool.start()
        cursor = spool.cursor("local")
        ids = _append(spool, _entries(5))
        last = ids[-1]
        assert last is not None
        cursor.advance(last)
        deadline = time.monotonic() + 30.0
        while (spool.size()[0] or metrics.get("spool.checkpoint_seconds") < 1) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert spool.size() == (0, 0, 0)  # compacted without another append
        assert metrics.get("spool.checkpoint_seconds") >= 1  # the WAL was checkpointed by that thread
        assert metrics.get("spool.append_seconds") == 1  # one append, timed
        cursor.close()
    assert spool._maintenance is not None and not spool._maintenance.is_alive()  # stopped by close


def test_a_backlog_scan_does_not_hold_up_appends(spool: Spool) -> None:
    """Counting a sink's backlog (a metrics scrape, /readyz) reads on its own connection: an append made while
    the scan runs completes before the scan ends (under the spool's lock it would wait for the whole scan)."""
    _append(spool, _entries(50))
    spool.backlogs()  # opens the reader connection
    reader = spool._backlog_reader
    assert reader is not None
    appended = threading.Event()

    def append_one() -> None:
        _append(spool, _entries(1, start=50))

    def append_meanwhile() -> int:
        if not appended.is_set():
            worker = threading.Thread(target=append_one)
            worker.start()
            worker.join(10.0)
            appended.set()  # once only; the assertion below tells a completed append from a timed-out one
        return 0

    reader.set_progress_handler(append_meanwhile, 1)
    spool.append(_entries(1, start=51))  # a new row: the next call scans again
    spool.backlogs()
    reader.set_progress_handler(None, 1)
    assert spool.size()[0] == 52, "the append made during the scan did not complete while the scan ran"


def test_a_slow_backlog_scan_is_not_repeated_at_once(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scan slower than BACKLOG_SCAN_CHEAP_S waits BACKLOG_SCAN_SHARE times its duration before the next one,
    appends or not; a cheap one is repeated after the next append (exact depths while backlogs are small)."""
    _append(spool, _entries(3))
    assert spool.depth() == 3
    _append(spool, _entries(2, start=3))
    assert spool.depth() == 5  # cheap: exact after an append
    monkeypatch.setattr(spool_module, "BACKLOG_SCAN_CHEAP_S", 0.0)
    monkeypatch.setattr(spool_module, "BACKLOG_SCAN_SHARE", 1e9)
    _append(spool, _entries(1, start=5))
    assert spool.depth() == 6  # this scan counts as slow: the next waits
    _append(spool, _entries(1, start=6))
    assert spool.depth() == 6
