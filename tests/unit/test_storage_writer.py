"""The spool writer's delivery logic against a scripted in-test sink: batching, retry, bisect, stop."""

from __future__ import annotations

import doctest
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.metrics import Metrics
from agent.spool.sqlite import Spool
from agent.storage import writer as writer_module
from agent.storage.base import PermanentWriteError, RetryableWriteError, WriteError
from agent.storage.writer import SpoolWriter, backoff_s

FLUSH_TIMEOUT_S = 30.0  # a generous bound for waiting, never a performance assertion


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


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def spool(tmp_path: Path, metrics: Metrics) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool.db", max_rows=100_000, metrics=metrics)
    yield s
    s.close()


@pytest.fixture
def make_writer(spool: Spool, metrics: Metrics) -> Iterator[Callable[..., SpoolWriter]]:
    writers: list[SpoolWriter] = []

    def make(sink: ScriptedSink, **kwargs: float) -> SpoolWriter:
        options = {"batch_size": 10, "flush_interval_s": 3600.0, "backoff_min_s": 0.001, "backoff_max_s": 0.01}
        options.update(kwargs)
        w = SpoolWriter(spool, sink, metrics, rng=random.Random(1), **options)  # type: ignore[arg-type]
        writers.append(w)
        w.start()
        return w

    yield make
    for w in writers:
        w.stop(5.0)


def test_backoff_doctest_passes() -> None:
    assert doctest.testmod(writer_module).failed == 0


def test_backoff_grows_exponentially_with_jitter_and_is_capped() -> None:
    rng = random.Random(3)
    for failures in range(1, 12):
        ceiling = min(4.0, 0.25 * 2 ** (failures - 1))
        for _ in range(20):
            assert ceiling / 2 <= backoff_s(failures, 0.25, 4.0, rng) <= ceiling


def test_lines_are_written_in_batches_acked_and_counted(
    spool: Spool, metrics: Metrics, make_writer: Callable[..., SpoolWriter]
) -> None:
    sink = ScriptedSink()
    spool.append(_lines(25))
    writer = make_writer(sink)
    assert writer.flush(FLUSH_TIMEOUT_S)
    assert sink.accepted == _lines(25)
    assert all(len(call) <= 10 for call in sink.calls)
    assert spool.depth() == 0
    assert metrics.get("storage.points_written") == 25
    # One duration per successful write, in the write latency histogram.
    assert metrics.get("storage.write_seconds") == len(sink.calls) == 3
    assert (metrics.quantile("storage.write_seconds", 0.99) or -1.0) >= 0.0


def test_failed_writes_are_counted_by_kind_and_not_timed(
    spool: Spool, metrics: Metrics, make_writer: Callable[..., SpoolWriter]
) -> None:
    attempts = iter([RetryableWriteError("database away"), None])
    sink = ScriptedSink(lambda _lines: next(attempts))
    spool.append(_lines(3))
    writer = make_writer(sink)
    assert writer.flush(FLUSH_TIMEOUT_S)
    assert metrics.get("storage.write_failures", kind="retryable") == 1
    assert metrics.get("storage.write_seconds") == 1  # only the write that succeeded


def test_alive_follows_the_writer_thread(spool: Spool, metrics: Metrics) -> None:
    writer = SpoolWriter(spool, ScriptedSink(), metrics)
    assert not writer.alive
    writer.start()
    assert writer.alive
    writer.stop(FLUSH_TIMEOUT_S)
    assert not writer.alive


def test_partial_batch_waits_for_the_flush_interval_unless_flushed(
    spool: Spool, make_writer: Callable[..., SpoolWriter]
) -> None:
    sink = ScriptedSink()
    writer = make_writer(sink, batch_size=1000)
    spool.append(_lines(3))
    assert writer.flush(FLUSH_TIMEOUT_S)  # flush() does not wait for the hour-long interval
    assert sink.accepted == _lines(3)


def test_retryable_errors_keep_the_batch_and_retry_until_it_is_delivered(
    spool: Spool, metrics: Metrics, make_writer: Callable[..., SpoolWriter]
) -> None:
    failures = iter([RetryableWriteError("connection refused")] * 3)
    sink = ScriptedSink(fail=lambda lines: next(failures, None))
    spool.append(_lines(5))
    writer = make_writer(sink)
    assert writer.flush(FLUSH_TIMEOUT_S)
    assert sink.accepted == _lines(5)
    assert [len(call) for call in sink.calls] == [5, 5, 5, 5]  # the same batch, whole, each time
    assert metrics.get("storage.write_failures", kind="retryable") == 3
    assert spool.dead_letter_depth() == 0


def test_rejected_lines_are_isolated_and_dead_lettered_while_the_others_are_written(
    spool: Spool, metrics: Metrics, make_writer: Callable[..., SpoolWriter]
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
    spool.append(lines)
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


def test_a_setup_error_keeps_the_data_spooled_instead_of_dead_lettering_it(
    spool: Spool, metrics: Metrics, make_writer: Callable[..., SpoolWriter]
) -> None:
    fixed = threading.Event()

    def fail(lines: list[str]) -> WriteError | None:
        if fixed.is_set():
            return None
        return PermanentWriteError("HTTP 404: database not found", 404, rejects_data=False)

    sink = ScriptedSink(fail=fail)
    spool.append(_lines(5))
    writer = make_writer(sink)
    assert not writer.flush(0.2)  # a bounded wait: the database is "missing"
    assert spool.depth() == 5
    assert spool.dead_letter_depth() == 0
    assert metrics.get("storage.write_failures", kind="config") >= 1
    fixed.set()
    assert writer.flush(FLUSH_TIMEOUT_S)
    assert sink.accepted == _lines(5)


def test_a_retryable_error_during_isolation_keeps_the_rest_for_later(
    spool: Spool, metrics: Metrics, make_writer: Callable[..., SpoolWriter]
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
    spool.append(_lines(10))
    writer = make_writer(sink)
    assert writer.flush(FLUSH_TIMEOUT_S)
    assert sorted(set(sink.accepted)) == sorted(set(_lines(10)) - {"m v=7i 7"})
    assert [line for line, _ in spool.dead_letters()] == ["m v=7i 7"]
    assert metrics.get("storage.write_failures", kind="retryable") == 1


def test_stop_writes_what_is_left_before_returning(spool: Spool, make_writer: Callable[..., SpoolWriter]) -> None:
    sink = ScriptedSink()
    writer = make_writer(sink, batch_size=1000)  # a partial batch and an hour-long interval: not due
    spool.append(_lines(7))
    writer.stop(FLUSH_TIMEOUT_S)
    assert sink.accepted == _lines(7)
    assert spool.depth() == 0


def test_stop_with_the_database_away_leaves_the_lines_spooled(
    spool: Spool, make_writer: Callable[..., SpoolWriter]
) -> None:
    sink = ScriptedSink(fail=lambda lines: RetryableWriteError("connection refused"))
    spool.append(_lines(4))
    writer = make_writer(sink, batch_size=4, backoff_min_s=3600.0, backoff_max_s=3600.0)
    deadline = time.monotonic() + FLUSH_TIMEOUT_S
    while not sink.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sink.calls
    writer.stop(FLUSH_TIMEOUT_S)  # interrupts the hour-long backoff
    assert spool.depth() == 4


def test_flush_requires_a_running_writer(spool: Spool, metrics: Metrics) -> None:
    writer = SpoolWriter(spool, ScriptedSink(), metrics)
    with pytest.raises(RuntimeError, match="not running"):
        writer.flush(1.0)


def test_unexpected_sink_exceptions_do_not_kill_the_thread(
    spool: Spool, metrics: Metrics, make_writer: Callable[..., SpoolWriter]
) -> None:
    errors = iter([KeyError("bug")])

    def fail(lines: list[str]) -> WriteError | None:
        exc = next(errors, None)
        if exc is not None:
            raise exc
        return None

    sink = ScriptedSink(fail=fail)
    spool.append(_lines(3))
    writer = make_writer(sink)
    assert writer.flush(FLUSH_TIMEOUT_S)
    assert sink.accepted == _lines(3)
    assert metrics.get("storage.writer_errors") == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"backoff_min_s": 0.0}, "backoff"),
        ({"backoff_min_s": 2.0, "backoff_max_s": 1.0}, "backoff"),
        ({"flush_interval_s": -1.0}, "flush_interval_s"),
    ],
)
def test_bad_settings_are_refused(spool: Spool, metrics: Metrics, kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SpoolWriter(spool, ScriptedSink(), metrics, **kwargs)  # type: ignore[arg-type]
