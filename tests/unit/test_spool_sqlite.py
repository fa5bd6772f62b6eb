"""The SQLite spool: FIFO, bounded with counted drops, dead letters, durable across reopen and crash."""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.metrics import Metrics
from agent.spool.sqlite import Spool, SpoolNotWritable


def _lines(n: int, start: int = 0) -> list[str]:
    return [f"m v={i}i {i}" for i in range(start, start + n)]


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def spool(tmp_path: Path, metrics: Metrics) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool.db", max_rows=100, drop_policy="oldest", metrics=metrics)
    yield s
    s.close()


def test_peek_returns_oldest_first_and_keeps_lines_until_acked(spool: Spool, metrics: Metrics) -> None:
    assert spool.append(_lines(5)) == 5
    first = spool.peek(3)
    assert [line for _, line in first] == _lines(3)
    assert spool.peek(3) == first  # peeking does not consume
    spool.ack([i for i, _ in first])
    assert [line for _, line in spool.peek(10)] == _lines(2, start=3)
    assert spool.depth() == 2
    assert metrics.get("spool.depth") == 2
    assert metrics.get("spool.appended") == 5
    assert metrics.get("spool.acked") == 3


def test_ack_of_unknown_ids_is_ignored(spool: Spool) -> None:
    spool.append(_lines(2))
    spool.ack([10_000, 10_001])
    assert spool.depth() == 2


def test_empty_append_and_ack_do_nothing(spool: Spool) -> None:
    assert spool.append([]) == 0
    spool.ack([])
    spool.dead_letter([], "nothing")
    assert spool.depth() == 0
    assert spool.peek(10) == []


def test_drop_oldest_keeps_the_newest_lines_and_counts_the_drop(
    tmp_path: Path, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    with Spool(tmp_path / "s.db", max_rows=10, drop_policy="oldest", metrics=metrics) as spool:
        spool.append(_lines(8))
        with caplog.at_level(logging.WARNING, logger="agent.spool.sqlite"):
            assert spool.append(_lines(5, start=8)) == 5
        assert [line for _, line in spool.peek(100)] == _lines(10, start=3)
        assert spool.depth() == 10
        assert metrics.get("spool.dropped", policy="oldest") == 3
        assert "dropped 3 oldest lines" in caplog.text


def test_drop_newest_refuses_incoming_lines_and_counts_the_drop(
    tmp_path: Path, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    with Spool(tmp_path / "s.db", max_rows=10, drop_policy="newest", metrics=metrics) as spool:
        spool.append(_lines(8))
        with caplog.at_level(logging.WARNING, logger="agent.spool.sqlite"):
            assert spool.append(_lines(5, start=8)) == 2
        assert [line for _, line in spool.peek(100)] == _lines(10)
        assert metrics.get("spool.dropped", policy="newest") == 3
        assert "spool.dropped" in caplog.text
        assert spool.append(_lines(1, start=99)) == 0
        assert metrics.get("spool.dropped") == 4


def test_a_batch_larger_than_the_spool_keeps_its_newest_lines(tmp_path: Path, metrics: Metrics) -> None:
    with Spool(tmp_path / "s.db", max_rows=3, drop_policy="oldest", metrics=metrics) as spool:
        spool.append(_lines(1, start=100))
        assert spool.append(_lines(5)) == 3
        assert [line for _, line in spool.peek(10)] == _lines(3, start=2)
        assert metrics.get("spool.dropped") == 3


def test_dead_letter_moves_lines_with_the_reason(spool: Spool, metrics: Metrics) -> None:
    spool.append(_lines(3))
    items = spool.peek(3)
    spool.dead_letter(items[1:2], "HTTP 400: field type conflict")
    assert [line for _, line in spool.peek(10)] == [_lines(3)[0], _lines(3)[2]]
    assert spool.dead_letters() == [(_lines(3)[1], "HTTP 400: field type conflict")]
    assert spool.dead_letter_depth() == 1
    assert metrics.get("spool.dead_lettered") == 1


def test_dead_letter_table_is_bounded_and_trimming_is_counted(tmp_path: Path, metrics: Metrics) -> None:
    with Spool(tmp_path / "s.db", max_rows=100, metrics=metrics, dead_letter_max_rows=2) as spool:
        spool.append(_lines(3))
        spool.dead_letter(spool.peek(3), "bad")
        assert [line for line, _ in spool.dead_letters()] == _lines(2, start=1)
        assert metrics.get("spool.dead_letter_trimmed") == 1


def test_reopened_spool_resumes_with_undelivered_lines_and_fresh_ids(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    with Spool(path, max_rows=100) as spool:
        spool.append(_lines(4))
        first_two = spool.peek(2)
        spool.ack([i for i, _ in first_two])
        spool.dead_letter(spool.peek(1), "bad")
        last_id = spool.peek(1)[0][0]
    with Spool(path, max_rows=100) as spool:
        assert spool.depth() == 1
        assert spool.peek(10) == [(last_id, _lines(4)[3])]
        assert spool.dead_letter_depth() == 1
        spool.ack([last_id])
        spool.append(["m v=1 1"])
        assert spool.peek(1)[0][0] > last_id  # ids are never reused, even after the spool was empty


def test_spool_runs_in_wal_mode(spool: Spool) -> None:
    spool.append(_lines(1))
    conn = sqlite3.connect(spool.path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_appended_lines_survive_a_killed_process(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    script = (
        "import os, signal\n"
        "from agent.spool.sqlite import Spool\n"
        f"s = Spool({str(path)!r}, max_rows=100)\n"
        "s.append(['m v=1 1', 'm v=2 2'])\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[2], check=False)
    assert proc.returncode == -9
    with Spool(path, max_rows=100) as spool:
        assert [line for _, line in spool.peek(10)] == ["m v=1 1", "m v=2 2"]


def test_oldest_age_is_zero_when_empty_and_positive_otherwise(spool: Spool) -> None:
    assert spool.oldest_age_s() == 0.0
    spool.append(_lines(1))
    assert spool.oldest_age_s() >= 0.0


def test_closed_spool_refuses_operations(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", max_rows=10)
    assert not spool.closed
    spool.close()
    spool.close()  # idempotent
    assert spool.closed
    with pytest.raises(RuntimeError, match="closed"):
        spool.append(["m v=1 1"])
    with pytest.raises(RuntimeError, match="closed"):
        spool.peek(1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"max_rows": 0}, "max_rows"), ({"max_rows": 1, "drop_policy": "random"}, "drop_policy")],
)
def test_bad_settings_are_refused(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Spool(tmp_path / "s.db", **kwargs)  # type: ignore[arg-type]


def test_concurrent_appends_and_acks_lose_nothing(spool: Spool) -> None:
    spool.max_rows = 1_000_000
    n_threads, per_thread = 4, 500
    delivered: list[str] = []
    done = threading.Event()

    def producer(k: int) -> None:
        for i in range(per_thread):
            spool.append([f"m,p={k} v={i}i {i}"])

    def consumer() -> None:
        while not done.is_set() or spool.depth():
            batch = spool.peek(50)
            delivered.extend(line for _, line in batch)
            spool.ack([i for i, _ in batch])

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
    assert spool.depth() == 0


def test_ack_deletes_exactly_the_given_ids_contiguous_or_not(spool: Spool) -> None:
    spool.append([f"m v={i} {i}" for i in range(10)])
    ids = [i for i, _ in spool.peek(10)]
    spool.ack(ids[2:5])  # a contiguous run: one range delete
    spool.ack([ids[0], ids[7], ids[9]])  # scattered ids
    assert [line for _, line in spool.peek(10)] == [f"m v={i} {i}" for i in (1, 5, 6, 8)]
    assert spool.depth() == 4


def test_oldest_age_is_a_gauge_read_when_the_metrics_are_read(tmp_path: Path, metrics: Metrics) -> None:
    spool = Spool(tmp_path / "spool.db", max_rows=10, metrics=metrics)
    assert metrics.snapshot()["spool.oldest_age_s"] == 0.0
    spool.append(_lines(1))
    assert metrics.snapshot()["spool.oldest_age_s"] >= 0.0
    spool.close()
    assert "spool.oldest_age_s" not in metrics.snapshot()  # a closed spool has no age to report


def test_an_open_healthy_spool_is_writable(spool: Spool) -> None:
    assert spool.check_writable() is True
    assert spool.writable()
    spool.append(_lines(3))  # the probe's BEGIN IMMEDIATE/ROLLBACK left nothing behind
    assert spool.depth() == 3 and spool.writable()


def test_a_closed_spool_is_not_writable(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", max_rows=10)
    spool.close()
    assert not spool.writable()
    with pytest.raises(SpoolNotWritable, match="closed"):
        spool.check_writable()


def test_too_little_free_space_makes_the_spool_unwritable(spool: Spool) -> None:
    with pytest.raises(SpoolNotWritable, match="bytes free"):
        spool.check_writable(min_free_bytes=2**62)
    assert not spool.writable(min_free_bytes=2**62)


def test_a_failed_write_makes_the_spool_unwritable_until_a_write_succeeds(spool: Spool) -> None:
    spool._connection().execute("PRAGMA busy_timeout=0")  # fail at once instead of waiting 5 s for the lock
    other = sqlite3.connect(spool.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the write lock
    try:
        with pytest.raises(sqlite3.OperationalError):
            spool.append(_lines(1))
        with pytest.raises(SpoolNotWritable, match=r"last write failed.*locked"):
            spool.check_writable()
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert not spool.writable()  # still the failed write: only a successful one clears it
    assert spool.append(_lines(1)) == 1
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
