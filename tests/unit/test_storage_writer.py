"""A sink's writer against a scripted in-test sink: entries to lines, batching, retry, bisection,
unencodable rows, raw-data releases, cursors, flush and stop."""

from __future__ import annotations

import doctest
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.metrics import Metrics
from agent.records import Reading, SampleBlock, Source
from agent.spool.codec import Entry, encode_block, encode_lines, encode_raw_blocks, encode_raw_ref, encode_readings
from agent.spool.sqlite import SinkCursor, Spool
from agent.storage import writer as writer_module
from agent.storage.base import PermanentWriteError, RetryableWriteError, WriteError
from agent.storage.points import block_lines, reading_lines
from agent.storage.writer import SinkWriter, backoff_s
from tests.spool_support import wait_for

FLUSH_TIMEOUT_S = 30.0  # a generous bound for waiting, never a performance assertion
SRC = Source.of(machine="m1", sensor="vibration")
PROC = Source.of(machine="m1", sensor="process")
T0 = 1_732_575_600_000_000_000


class ScriptedSink:
    """Records every write; ``fail`` decides, per batch, which error to raise (None: accept)."""

    def __init__(self, fail: Callable[[list[str]], WriteError | None] | None = None) -> None:
        self.fail = fail
        self.calls: list[list[str]] = []
        self.accepted: list[str] = []
        self.lock = threading.Lock()

    def write(self, lines: list[str]) -> None:
        with self.lock:
            self.calls.append(list(lines))
            error = self.fail(lines) if self.fail else None
            if error is not None:
                raise error
            self.accepted.extend(lines)

    def close(self) -> None:
        pass


def _lines(n: int, start: int = 0) -> list[str]:
    return [f"m v={i}i {i}" for i in range(start, start + n)]


def _one_per_row(lines: list[str]) -> list[Entry]:
    return [encode_lines([line]) for line in lines]


def _block(n: int, k: int = 0, samples: np.ndarray | None = None) -> SampleBlock:
    values = np.arange(n, dtype=np.float32) + k if samples is None else samples
    return SampleBlock(SRC, T0 + k * 10**9, 1000.0, values, "x")


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    wait_for(condition, what, FLUSH_TIMEOUT_S)


@pytest.fixture
def make_writer(spool: Spool, metrics: Metrics) -> Iterator[Callable[..., SinkWriter]]:
    writers: list[SinkWriter] = []
    cursors: list[SinkCursor] = []

    def make(sink: ScriptedSink, sink_name: str = "local", start: bool = True, **kwargs: float) -> SinkWriter:
        options = {"batch_size": 10, "flush_interval_s": 3600.0, "backoff_min_s": 0.001, "backoff_max_s": 0.01}
        options.update(kwargs)
        cursor = spool.cursor(sink_name)
        cursors.append(cursor)
        w = SinkWriter(cursor, sink, metrics, rng=random.Random(1), **options)  # type: ignore[arg-type]
        writers.append(w)
        if start:
            w.start()
        return w

    yield make
    for w in writers:
        w.stop(5.0)
    for c in cursors:
        c.close()


# -- backoff -------------------------------------------------------------------------------------


def test_backoff_doctest_passes() -> None:
    assert doctest.testmod(writer_module).failed == 0


def test_backoff_grows_exponentially_with_jitter_and_is_capped() -> None:
    rng = random.Random(3)
    for failures in range(1, 12):
        ceiling = min(4.0, 0.25 * 2 ** (failures - 1))
        for _ in range(20):
            assert ceiling / 2 <= backoff_s(failures, 0.25, 4.0, rng) <= ceiling
    assert 2.0 <= backoff_s(10_000, 0.25, 4.0, rng) <= 4.0  # no overflow for a long outage


# -- delivery ------------------------------------------------------------------------------------


def test_entries_are_written_as_lines_in_batches_the_cursor_moved_and_counted(
    spool: Spool, metrics: Metrics, make_writer: Callable[..., SinkWriter]
) -> None:
    sink = ScriptedSink()
    spool.append(_one_per_row(_lines(25)))
    writer = make_writer(sink)
    assert writer.flush(FLUSH_TIMEOUT_S)
    assert sink.accepted == _lines(25)
    assert all(len(call) <= 10 for call in sink.calls)
    assert spool.caught_up("local")
    assert spool.compact() == 25
    assert metrics.get("storage.points_written") == 25
    # One duration per successful write, in the write latency histogram.
    assert metrics.get("storage.write_seconds") == len(sink.calls)
    assert (metrics.quantile("storage.write_seconds", 0.99) or -1.0) >= 0.0
    assert metrics.get("storage.backoff_s") == 0.0


def test_every_kind_of_entry_becomes_its_lines_in_spool_order(
    spool: Spool, metrics: Metrics, make_writer: Callable[..., SinkWriter]
) -> None:
    readings = [Reading(PROC, T0, {"temperature": 61.5, "current": 2.0}, 7), Reading(PROC, T0 + 1, {"value": 1.0})]
    stored = _block(3, k=1)
    spool.append(
        [
            encode_readings(readings),
            encode_block(stored, store_raw=True),
            encode_block(_block(4, k=2), store_raw=False),  # skipped raw data: a row of no lines
            encode_lines(["features rms=0.5 1", "anomaly_score score=0.1 1"]),
        ]
    )
    sink = ScriptedSink()
    writer = make_writer(sink, batch_size=1000)
    assert writer.flush(FLUSH_TIMEOUT_S)
    expected = [
        *[line for r in readings for line in reading_lines(r)],
        *block_lines(stored),
        "features rms=0.5 1",
        "anomaly_score score=0.1 1",
    ]
    assert sink.accepted == expected
    assert metrics.get("storage.points_written") == len(expected)


def test_a_row_larger_than_a_batch_is_written_whole(spool: Spool, make_writer: Callable[..., SinkWriter]) -> None:
    sink = ScriptedSink()
    spool.append([encode_lines(_lines(25)), *_one_per_row(_lines(3, start=25))])
    writer = make_writer(sink, batch_size=10)
    assert writer.flush(FLUSH_TIMEOUT_S)
    assert sink.accepted == _lines(28)
    assert len(sink.calls[0]) == 25


def test_failed_writes_are_counted_by_kind_and_not_timed(
    spool: Spool, metrics: Metrics, make_writer: Callable[..., SinkWriter]
) -> None:
    attempts = iter([RetryableWriteError("database away"), None])
    sink = ScriptedSink(lambda _lines: next(attempts))
    spool.append(_one_per_row(_lines(3)))
    writer = make_writer(sink)
    assert writer.flush(FLUSH_TIMEOUT_S)
    assert metrics.get("storage.write_failures", kind="retryable") == 1
    assert metrics.get("storage.write_seconds") == 1  # only the write that succeeded


def test_alive_follows_the_writer_threads(spool: Spool, make_writer: Callable[..., SinkWriter]) -> None:
    writer = make_writer(ScriptedSink(), start=False)
    assert not writer.alive
    writer.start()
    assert writer.alive
    with pytest.raises(RuntimeError, match="already started"):
        writer.start()
    writer.stop(FLUSH_TIMEOUT_S)
    assert not writer.alive


def test_partial_batch_waits_for_the_flush_interval_unless_flushed(
    spool: Spool, make_writer: Callable[..., SinkWriter]
) -> None:
    sink = ScriptedSink()
    writer = make_writer(sink, batch_size=1000)
    spool.append(_one_per_row(_lines(3)))
    assert writer.flush(FLUSH_TIMEOUT_S)  # flush() does not wait for the hour-long interval
    assert sink.accepted == _lines(3)


def test_a_partial_batch_goes_out_once_its_flush_interval_passed(
    spool: Spool, make_writer: Callable[..., SinkWriter]
) -> None:
    sink = ScriptedSink()
    make_writer(sink, batch_size=1000, flush_interval_s=0.0)
    spool.append(_one_per_row(_lines(3)))
    _wait_for(lambda: spool.caught_up("local"), "the interval's write")  # without any flush()
    assert sink.accepted == _lines(3)


def test_flush_covers_rows_appended_while_the_writer_runs(spool: Spool, make_writer: Callable[..., SinkWriter]) -> None:
    sink = ScriptedSink()
    writer = make_writer(sink, batch_size=7)
    for k in range(5):
        spool.append(_one_per_row(_lines(11, start=11 * k)))
        assert writer.flush(FLUSH_TIMEOUT_S)
        assert sink.accepted == _lines(11 * (k + 1))


class BodySink(ScriptedSink):
    """A sink that takes the batch joined by the preparing thread (``write_body``) when it can."""

    def __init__(self, fail: Callable[[list[str]], WriteError | None] | None = None) -> None:
        super().__init__(fail)
        self.bodies: list[tuple[bytes, int]] = []

    def write_body(self, payload: bytes, points: int) -> None:
        with self.lock:
            self.bodies.append((payload, points))
        self.write(payload.decode().split("\n"))


def test_a_sink_with_write_body_gets_the_joined_batch_and_bisection_still_works(
    spool: Spool, metrics: Metrics, make_writer: Callable[..., SinkWriter]
) -> None:
    bad = "m v=6i 6"
    sink = BodySink(fail=lambda lines: PermanentWriteError("HTTP 400", 400) if bad in lines else None)
    spool.append(_one_per_row(_lines(10)))
    assert make_writer(sink, batch_size=10).flush(FLUSH_TIMEOUT_S)
    assert sink.bodies[0] == ("\n".join(_lines(10)).encode(), 10)
    assert sorted(sink.accepted) == sorted(set(_lines(10)) - {bad})
    assert [line for line, _ in spool.dead_letters()] == [bad]
    assert metrics.get("storage.points_written") == 9


# -- retry, bisection, configuration errors ---------------------------------------------------------


def test_retryable_errors_keep_the_batch_and_retry_until_it_is_delivered(
    spool: Spool, metrics: Metrics, make_writer: Callable[..., SinkWriter]
) -> None:
    failures = iter([RetryableWriteError("connection refused")] * 3)
    sink = ScriptedSink(fail=lambda lines: next(failures, None))
    spool.append(_one_per_row(_lines(5)))
    writer = make_writer(sink)
    assert writer.flush(FLUSH_TIMEOUT_S)
    assert sink.accepted == _lines(5)
    assert [len(call) for call in sink.calls] == [5, 5, 5, 5]  # the same batch, whole, each time
    assert metrics.get("storage.write_failures", kind="retryable") == 3
    assert spool.dead_letter_depth() == 0
    assert metrics.get("storage.backoff_s") == 0.0  # back to 0 once a write succeeded


def test_a_longer_retry_after_replaces_the_backoff(
    spool: Spool, metrics: Metrics, make_writer: Callable[..., SinkWriter]
) -> None:
    sink = ScriptedSink(fail=lambda lines: RetryableWriteError("HTTP 429", 429, retry_after_s=3600.0))
    spool.append(_one_per_row(_lines(2)))
    writer = make_writer(sink, flush_interval_s=0.0)  # its own backoff is at most 10 ms
    _wait_for(lambda: metrics.get("storage.backoff_s") > 0, "the first failed write")
    assert metrics.get("storage.backoff_s") == 3600.0
    assert len(sink.calls) == 1  # waiting as the server asked
    writer.stop(FLUSH_TIMEOUT_S)  # interrupts the wait
    assert not writer.alive
    assert spool.cursors() == {"local": 0}


def test_a_shorter_retry_after_does_not_shorten_the_backoff(
    spool: Spool, metrics: Metrics, make_writer: Callable[..., SinkWriter]
) -> None:
    sink = ScriptedSink(fail=lambda lines: RetryableWriteError("HTTP 503", 503, retry_after_s=0.001))
    spool.append(_one_per_row(_lines(2)))
    writer = make_writer(sink, flush_interval_s=0.0, backoff_min_s=3600.0, backoff_max_s=3600.0)
    _wait_for(lambda: metrics.get("storage.backoff_s") > 0, "the first failed write")
    assert 1800.0 <= metrics.get("storage.backoff_s") <= 3600.0
    writer.stop(FLUSH_TIMEOUT_S)


def test_rejected_lines_are_isolated_and_dead_lettered_while_the_others_are_written(
    spool: Spool, metrics: Metrics, make_writer: Callable[..., SinkWriter]
) -> None:
    bad = {"m v=3i 3", "m v=4i 4", "m v=17i 17"}

    def fail(lines: list[str]) -> WriteError | None:
        refused = bad.intersection(lines)
        if refused:
            message = f"HTTP 400: partial write: {sorted(refused)[0]}"
            return PermanentWriteError(message, 400, rejects_data=True)
        return None

    sink = ScriptedSink(fail=fail)
    lines = _lines(20)
    spool.append([encode_lines(lines[:10]), *_one_per_row(lines[10:])])  # lines of one row and of many
    writer = make_writer(sink, batch_size=20)
    assert writer.flush(FLUSH_TIMEOUT_S)
    assert sorted(sink.accepted) == sorted(set(lines) - bad)
    assert len(sink.accepted) == len(set(sink.accepted))  # each good line written once here
    dead = dict(spool.dead_letters())
    assert set(dead) == bad
    assert all(reason.startswith("HTTP 400") for reason in dead.values())
    assert metrics.get("storage.points_written") == 17
    assert metrics.get("spool.dead_lettered") == 3
    assert metrics.get("storage.write_failures", kind="rejected") == 1
    assert spool.caught_up("local")  # the refused lines do not hold the cursor back


def test_dead_lettered_rows_name_their_spool_row(spool: Spool, make_writer: Callable[..., SinkWriter]) -> None:
    sink = ScriptedSink(fail=lambda lines: PermanentWriteError("HTTP 400", 400) if "m v=1i 1" in lines else None)
    ids = spool.append(_one_per_row(_lines(3)))
    assert make_writer(sink).flush(FLUSH_TIMEOUT_S)
    conn = sqlite3.connect(spool.path)
    assert conn.execute("SELECT sink, entry_id, line FROM dead_letter").fetchall() == [("local", ids[1], "m v=1i 1")]
    conn.close()


def test_dead_letter_trimming_is_counted(tmp_path: Path, metrics: Metrics) -> None:
    with Spool(tmp_path / "s.db", 10**12, 10**9, metrics=metrics, dead_letter_max_rows=2) as spool:
        cursor = spool.cursor("local")
        sink = ScriptedSink(fail=lambda lines: PermanentWriteError("HTTP 400: bad", 400))
        spool.append(_one_per_row(_lines(3)))
        writer = SinkWriter(cursor, sink, metrics, batch_size=10, flush_interval_s=3600.0)
        writer.start()
        try:
            assert writer.flush(FLUSH_TIMEOUT_S)
        finally:
            writer.stop(FLUSH_TIMEOUT_S)
            cursor.close()
        assert [line for line, _ in spool.dead_letters()] == _lines(2, start=1)
        assert metrics.get("spool.dead_lettered") == 3
        assert metrics.get("spool.dead_letter_trimmed") == 1


@pytest.mark.parametrize("status", [401, 403, 404])
def test_a_setup_error_keeps_the_data_spooled_instead_of_dead_lettering_it(
    spool: Spool, metrics: Metrics, make_writer: Callable[..., SinkWriter], status: int
) -> None:
    fixed = threading.Event()

    def fail(lines: list[str]) -> WriteError | None:
        if fixed.is_set():
            return None
        return PermanentWriteError(f"HTTP {status}: database not found", status, rejects_data=False)

    sink = ScriptedSink(fail=fail)
    spool.append(_one_per_row(_lines(5)))
    writer = make_writer(sink, flush_interval_s=0.0)
    _wait_for(lambda: metrics.get("storage.write_failures", kind="config") >= 2, "two refused writes")
    assert spool.cursors() == {"local": 0}
    assert spool.dead_letter_depth() == 0
    assert all(len(call) == 5 for call in sink.calls)  # never split: the data is not at fault
    assert metrics.get("storage.write_failures", kind="rejected") == 0
    fixed.set()
    assert writer.flush(FLUSH_TIMEOUT_S)
    assert sink.accepted == _lines(5)
    assert spool.dead_letter_depth() == 0


def test_a_setup_error_waits_backoff_max_s(
    spool: Spool, metrics: Metrics, make_writer: Callable[..., SinkWriter]
) -> None:
    sink = ScriptedSink(fail=lambda lines: PermanentWriteError("HTTP 401", 401, rejects_data=False))
    spool.append(_one_per_row(_lines(1)))
    writer = make_writer(sink, flush_interval_s=0.0, backoff_max_s=3600.0)
    _wait_for(lambda: metrics.get("storage.backoff_s") > 0, "the refused write")
    assert metrics.get("storage.backoff_s") == 3600.0
    writer.stop(FLUSH_TIMEOUT_S)
    assert len(sink.calls) == 1


def test_a_retryable_error_during_isolation_keeps_the_rest_for_later(
    spool: Spool, metrics: Metrics, make_writer: Callable[..., SinkWriter]
) -> None:
    state = {"calls": 0}

    def fail(lines: list[str]) -> WriteError | None:
        state["calls"] += 1
        if state["calls"] == 1:
            return PermanentWriteError("HTTP 400: bad line", 400, rejects_data=True)
        if state["calls"] == 3:
            return RetryableWriteError("timeout")
        if "m v=7i 7" in lines:
            return PermanentWriteError("HTTP 400: bad line m v=7i 7", 400, rejects_data=True)
        return None

    sink = ScriptedSink(fail=fail)
    spool.append(_one_per_row(_lines(10)))
    writer = make_writer(sink)
    assert writer.flush(FLUSH_TIMEOUT_S)
    assert sorted(set(sink.accepted)) == sorted(set(_lines(10)) - {"m v=7i 7"})
    assert [line for line, _ in spool.dead_letters()] == ["m v=7i 7"]
    assert metrics.get("storage.write_failures", kind="retryable") == 1


def test_unexpected_sink_exceptions_do_not_kill_the_threads(
    spool: Spool, metrics: Metrics, make_writer: Callable[..., SinkWriter]
) -> None:
    errors = iter([KeyError("bug")])

    def fail(lines: list[str]) -> WriteError | None:
        exc = next(errors, None)
        if exc is not None:
            raise exc
        return None

    sink = ScriptedSink(fail=fail)
    spool.append(_one_per_row(_lines(3)))
    writer = make_writer(sink)
    assert writer.flush(FLUSH_TIMEOUT_S)
    assert sink.accepted == _lines(3)
    assert metrics.get("storage.writer_errors") == 1
    assert writer.alive


# -- rows no sink can take -------------------------------------------------------------------------


def test_unencodable_rows_are_dead_lettered_with_the_reason_and_the_rest_is_written(
    spool: Spool, metrics: Metrics, make_writer: Callable[..., SinkWriter]
) -> None:
    good = Reading(PROC, T0, {"value": 1.0})
    backslash = Reading(PROC, T0 + 1, {"bad\\": 2.0})  # would escape the separator after it
    nan_field = Reading(PROC, T0 + 2, {"value": float("nan")})
    inf_block = _block(3, samples=np.array([1.0, np.inf, 2.0], np.float32))
    ids = spool.append(
        [
            encode_readings([good]),
            encode_readings([backslash, good]),  # a message is one row: its good reading goes with it
            encode_block(inf_block, store_raw=True),
            encode_readings([nan_field]),
            encode_lines(["after v=1 1"]),
        ]
    )
    sink = ScriptedSink()
    writer = make_writer(sink)
    assert writer.flush(FLUSH_TIMEOUT_S)
    assert sink.accepted == [*reading_lines(good), "after v=1 1"]
    assert spool.caught_up("local")
    dead = spool.dead_letters()
    assert len(dead) == 3
    assert all(reason.startswith("unencodable: ") for _, reason in dead)
    assert "ends with a backslash" in dead[0][1]
    assert "non-finite" in dead[1][1]
    assert "non-finite" in dead[2][1]
    assert dead[0][0] == f"<readings entry {ids[1]}: {len(encode_readings([backslash, good]).body)} bytes, 2 points>"
    assert metrics.get("storage.unencodable", kind="readings") == 2
    assert metrics.get("storage.unencodable", kind="block") == 1
    assert metrics.get("spool.dead_lettered") == 2 + 3 + 1  # the points of the rows
    assert metrics.get("storage.points_written") == 2


def test_an_unknown_entry_kind_is_dead_lettered(
    spool: Spool, metrics: Metrics, make_writer: Callable[..., SinkWriter]
) -> None:
    spool.append([Entry(9, b"from a newer agent", 1), encode_lines(["m v=1 1"])])  # type: ignore[arg-type]
    sink = ScriptedSink()
    assert make_writer(sink).flush(FLUSH_TIMEOUT_S)
    assert sink.accepted == ["m v=1 1"]
    assert metrics.get("storage.unencodable", kind="kind9") == 1
    assert "unknown spool entry kind 9" in spool.dead_letters()[0][1]


# -- raw-data releases; held rows and releases by id of spools written by earlier builds --------


def test_held_blocks_are_not_written_until_a_release_names_them(
    spool: Spool, metrics: Metrics, make_writer: Callable[..., SinkWriter]
) -> None:
    held = [_block(4, k) for k in range(3)]
    ids = spool.append([encode_block(b, store_raw=False, held=True) for b in held])
    sink = ScriptedSink()
    writer = make_writer(sink)
    assert writer.flush(FLUSH_TIMEOUT_S)
    assert sink.accepted == []
    assert spool.caught_up("local")
    spool.compact()
    assert spool.size()[0] == 3  # kept for hold_s although every sink passed them
    spool.append([encode_raw_ref([ids[1], ids[2]])])  # type: ignore[list-item]
    assert writer.flush(FLUSH_TIMEOUT_S)
    assert sink.accepted == block_lines(held[1]) + block_lines(held[2])
    assert metrics.get("storage.raw_released") == 8
    assert metrics.get("storage.raw_missing") == 0
    assert metrics.get("storage.points_written") == 8


def test_a_release_of_held_blocks_the_caps_dropped_counts_them_missing(tmp_path: Path, metrics: Metrics) -> None:
    with Spool(tmp_path / "s.db", max_bytes=10**12, max_points=5, metrics=metrics) as spool:
        cursor = spool.cursor("local")
        gone, kept = _block(4, 0), _block(4, 1)
        gone_id = spool.append([encode_block(gone, store_raw=False, held=True)])[0]
        spool.append(_one_per_row(_lines(5)))
        kept_id = spool.append([encode_block(kept, store_raw=False, held=True)])[0]
        spool.append(_one_per_row(_lines(1, start=5)))  # over the point cap: the oldest rows go
        assert cursor.bodies([gone_id]) == []  # type: ignore[list-item]
        spool.append([encode_raw_ref([gone_id, kept_id])])  # type: ignore[list-item]
        sink = ScriptedSink()
        writer = SinkWriter(cursor, sink, metrics, batch_size=100, flush_interval_s=3600.0)
        writer.start()
        try:
            assert writer.flush(FLUSH_TIMEOUT_S)
        finally:
            writer.stop(FLUSH_TIMEOUT_S)
            cursor.close()
        assert sink.accepted == _lines(5, start=1) + block_lines(kept)
        assert metrics.get("storage.raw_missing") == 1
        assert metrics.get("storage.raw_released") == 4


class TimedSink(ScriptedSink):
    """Also records when each write arrived (monotonic)."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def write(self, lines: list[str]) -> None:
        self.times.append(time.monotonic())
        super().write(lines)


def test_released_raw_blocks_are_written_in_pieces_at_their_pace(
    spool: Spool, metrics: Metrics, make_writer: Callable[..., SinkWriter]
) -> None:
    held = [_block(40, k) for k in range(3)]
    sink = TimedSink()
    make_writer(sink, flush_interval_s=0.0, raw_release_points_s=1000.0)  # batch_size 10
    spool.append([encode_raw_blocks(held)])
    _wait_for(lambda: len(sink.accepted) == 120, "the released blocks written")  # not flush: it hurries
    assert sink.accepted == [line for b in held for line in block_lines(b)]
    assert [len(call) for call in sink.calls] == [10] * 12
    # Each piece waited for the share of the one before: 11 pieces after the first, 10 points each, 1000/s.
    assert sink.times[-1] - sink.times[0] >= 11 * 10 / 1000.0
    assert metrics.get("storage.raw_released") == 120


def test_the_pace_leaves_other_rows_whole_and_a_flush_does_not_wait_for_it(
    spool: Spool, metrics: Metrics, make_writer: Callable[..., SinkWriter]
) -> None:
    spool.append([encode_lines(_lines(25))])  # one row larger than a batch, no raw release: written whole
    held = [_block(40, k) for k in range(2)]
    spool.append([encode_raw_blocks(held)])
    sink = ScriptedSink()
    writer = make_writer(sink, raw_release_points_s=0.001)  # 80 samples would take a day at this pace
    assert writer.flush(FLUSH_TIMEOUT_S)
    assert [len(call) for call in sink.calls] == [25] + [10] * 8
    assert sink.accepted == _lines(25) + [line for b in held for line in block_lines(b)]


# -- sinks, cursors, restarts ------------------------------------------------------------------------


def test_two_sinks_each_get_everything_and_rows_go_once_both_have_them(tmp_path: Path, metrics: Metrics) -> None:
    with Spool(tmp_path / "s.db", 10**12, 10**9, metrics=metrics, sinks=("local", "cloud")) as spool:
        local, cloud = ScriptedSink(), ScriptedSink(fail=lambda lines: RetryableWriteError("away"))
        cursors = [spool.cursor("local"), spool.cursor("cloud")]
        options = {"batch_size": 10, "flush_interval_s": 3600.0, "backoff_min_s": 0.001, "backoff_max_s": 0.01}
        writers = [
            SinkWriter(cursors[0], local, metrics, **options),  # type: ignore[arg-type]
            SinkWriter(cursors[1], cloud, metrics, **options),  # type: ignore[arg-type]
        ]
        for w in writers:
            w.start()
        try:
            spool.append(_one_per_row(_lines(15)))
            assert writers[0].flush(FLUSH_TIMEOUT_S)
            assert local.accepted == _lines(15)
            spool.compact()
            assert spool.size()[0] == 15  # the cloud has none of them
            cloud.fail = None
            assert writers[1].flush(FLUSH_TIMEOUT_S)
            assert cloud.accepted == _lines(15)
            spool.compact()
            assert spool.size() == (0, 0, 0)
        finally:
            for w in writers:
                w.stop(FLUSH_TIMEOUT_S)
            for c in cursors:
                c.close()


def test_a_new_writer_resumes_at_the_cursor(spool: Spool, make_writer: Callable[..., SinkWriter]) -> None:
    first = ScriptedSink()
    writer = make_writer(first)
    spool.append(_one_per_row(_lines(5)))
    assert writer.flush(FLUSH_TIMEOUT_S)
    writer.stop(FLUSH_TIMEOUT_S)
    spool.append(_one_per_row(_lines(3, start=5)))
    second = ScriptedSink()
    assert make_writer(second).flush(FLUSH_TIMEOUT_S)
    assert second.accepted == _lines(3, start=5)  # nothing confirmed is written again


def test_lines_of_a_version_0_2_spool_are_delivered(tmp_path: Path, metrics: Metrics) -> None:
    path = tmp_path / "spool.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(
        """
        CREATE TABLE spool (id INTEGER PRIMARY KEY AUTOINCREMENT, line TEXT NOT NULL, enqueued_ns INTEGER NOT NULL);
        CREATE TABLE dead_letter (
            id INTEGER PRIMARY KEY AUTOINCREMENT, spool_id INTEGER NOT NULL, line TEXT NOT NULL,
            reason TEXT NOT NULL, dead_ns INTEGER NOT NULL
        );
        """
    )
    conn.executemany("INSERT INTO spool (line, enqueued_ns) VALUES (?, 1)", ((line,) for line in _lines(7)))
    conn.close()
    with Spool(path, 10**12, 10**9, metrics=metrics) as spool:
        spool.append(_one_per_row(["new v=1 1"]))
        cursor = spool.cursor("local")
        sink = ScriptedSink()
        writer = SinkWriter(cursor, sink, metrics, batch_size=3, flush_interval_s=3600.0)
        writer.start()
        try:
            assert writer.flush(FLUSH_TIMEOUT_S)
        finally:
            writer.stop(FLUSH_TIMEOUT_S)
            cursor.close()
        assert sink.accepted == [*_lines(7), "new v=1 1"]


# -- stop and flush ------------------------------------------------------------------------------


def test_stop_writes_what_is_left_before_returning(spool: Spool, make_writer: Callable[..., SinkWriter]) -> None:
    sink = ScriptedSink()
    writer = make_writer(sink, batch_size=1000)  # a partial batch and an hour-long interval: not due
    spool.append(_one_per_row(_lines(7)))
    writer.stop(FLUSH_TIMEOUT_S)
    assert sink.accepted == _lines(7)
    assert spool.caught_up("local")


def test_stop_writes_rows_appended_while_an_empty_read_was_in_flight(spool: Spool, metrics: Metrics) -> None:
    """A read that began before rows were appended, and came back empty after ``stop`` was called, does not end
    the writer: it reads once more and writes them (the race a loaded machine once hit in the test above)."""
    cursor = spool.cursor("local")
    real_read = cursor.read_after
    inside, armed = threading.Event(), threading.Event()
    writer: SinkWriter | None = None

    def read_after(*args: Any, **kwargs: Any) -> list[Any]:
        rows = real_read(*args, **kwargs)
        if armed.is_set() and not rows:
            armed.clear()
            inside.set()
            assert writer is not None
            wait_for(writer._stop.is_set, "stop() to be called", FLUSH_TIMEOUT_S)  # the rows are in by then
        return rows

    cursor.read_after = read_after  # type: ignore[method-assign]
    sink = ScriptedSink()
    writer = SinkWriter(cursor, sink, metrics, batch_size=1000, flush_interval_s=3600.0)
    writer.start()
    try:
        armed.set()
        assert inside.wait(FLUSH_TIMEOUT_S)  # the writer's read came back empty and waits for the stop
        spool.append(_one_per_row(_lines(7)))
        writer.stop(FLUSH_TIMEOUT_S)
        assert sink.accepted == _lines(7)
        assert spool.caught_up("local")
    finally:
        writer.stop(1.0)
        cursor.close()


def test_stop_with_the_database_away_leaves_the_rows_spooled(
    spool: Spool, make_writer: Callable[..., SinkWriter]
) -> None:
    sink = ScriptedSink(fail=lambda lines: RetryableWriteError("connection refused"))
    spool.append(_one_per_row(_lines(4)))
    writer = make_writer(sink, batch_size=4, flush_interval_s=0.0, backoff_min_s=3600.0, backoff_max_s=3600.0)
    _wait_for(lambda: bool(sink.calls), "the first write")
    writer.stop(FLUSH_TIMEOUT_S)  # interrupts the hour-long backoff
    assert not writer.alive
    assert spool.cursors() == {"local": 0}
    assert spool.size()[:2] == (4, 4)


def test_stop_is_idempotent_and_harmless_before_start(spool: Spool, make_writer: Callable[..., SinkWriter]) -> None:
    writer = make_writer(ScriptedSink(), start=False)
    writer.stop(1.0)  # never started: nothing to do
    writer.start()
    writer.stop(FLUSH_TIMEOUT_S)
    writer.stop(FLUSH_TIMEOUT_S)
    assert not writer.alive


def test_flush_requires_a_running_writer(spool: Spool, make_writer: Callable[..., SinkWriter]) -> None:
    writer = make_writer(ScriptedSink(), start=False)
    with pytest.raises(RuntimeError, match="not running"):
        writer.flush(1.0)


def test_flush_of_an_empty_spool_returns_at_once(spool: Spool, make_writer: Callable[..., SinkWriter]) -> None:
    sink = ScriptedSink()
    assert make_writer(sink).flush(FLUSH_TIMEOUT_S)
    assert sink.calls == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"backoff_min_s": 0.0}, "backoff"),
        ({"backoff_min_s": 2.0, "backoff_max_s": 1.0}, "backoff"),
        ({"flush_interval_s": -1.0}, "flush_interval_s"),
        ({"raw_release_points_s": 0.0}, "raw_release_points_s"),
    ],
)
def test_bad_settings_are_refused(spool: Spool, metrics: Metrics, kwargs: dict[str, float], message: str) -> None:
    cursor = spool.cursor("local")
    try:
        with pytest.raises(ValueError, match=message):
            SinkWriter(cursor, ScriptedSink(), metrics, **kwargs)  # type: ignore[arg-type]
    finally:
        cursor.close()


def test_a_cursor_that_cannot_be_saved_does_not_stop_delivery_nor_resend_batches(
    spool: Spool, metrics: Metrics, make_writer: Callable[..., SinkWriter], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk: the sink confirmed a batch but its cursor update fails. The writer goes on from memory
    (each line written once) and saves the cursor once it can, without a batch to carry it."""
    disk_full = threading.Event()
    disk_full.set()
    real_advance = SinkCursor.advance

    def advance(self: SinkCursor, last_id: int) -> None:
        if disk_full.is_set():
            raise sqlite3.OperationalError("database or disk is full")
        real_advance(self, last_id)

    monkeypatch.setattr(SinkCursor, "advance", advance)
    sink = ScriptedSink()
    spool.append(_one_per_row(_lines(35)))
    writer = make_writer(sink, flush_interval_s=0.0)
    _wait_for(lambda: len(sink.accepted) == 35, "every line delivered while the cursor cannot be saved")
    _wait_for(lambda: metrics.get("storage.cursor_failures") >= 4, "the failed saves counted")
    assert sink.accepted == _lines(35), "a batch was written again"
    assert writer.cursor.position == 0 and not spool.caught_up("local")
    disk_full.clear()
    _wait_for(lambda: spool.caught_up("local"), "the cursor saved while idle once there is room")
    assert sink.accepted == _lines(35)
