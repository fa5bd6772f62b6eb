"""An upstream sink's writer beside the local one, on one spool: its selection, its own cursor and saved
downsampling state, its backlog caps that never touch the local sink's rows, and its sink-labelled metrics."""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.metrics import Metrics
from agent.records import Reading, Source
from agent.spool.codec import Entry, encode_lines, encode_readings
from agent.spool.sqlite import SinkCursor, Spool
from agent.storage import writer as writer_module
from agent.storage.base import RetryableWriteError
from agent.storage.selection import RowSelector, Selection
from agent.storage.sinks import SinkWriters, sinks_check
from agent.storage.writer import BacklogBudget, SinkWriter
from tests.spool_support import wait_for
from tests.unit.test_storage_writer import ScriptedSink

TIMEOUT_S = 30.0  # a bound for waiting, never a performance assertion
S = 10**9
T0 = 1_732_575_600 * S
M1 = Source.of(machine="m1", sensor="process")
OPTIONS = {"batch_size": 7, "flush_interval_s": 3600.0, "backoff_min_s": 0.001, "backoff_max_s": 0.01}
MINUTE = Selection(readings_interval_s=60, aggregates=("mean", "max"), grace_s=0)


def _reading(t_s: int) -> Entry:
    return encode_readings([Reading(M1, T0 + t_s * S, {"temp": float(t_s % 11)})])


def _score(t_s: int) -> Entry:
    return encode_lines([f"anomaly_score,machine=m1 score={t_s}.5 {T0 + t_s * S}"])


@pytest.fixture
def two_sinks(tmp_path: Path, metrics: Metrics) -> Iterator[tuple[Spool, Callable[..., SinkWriter]]]:
    spool = Spool(tmp_path / "spool.db", 10**12, 10**9, metrics=metrics, sinks=("local", "cloud"))
    writers: list[SinkWriter] = []
    cursors: list[SinkCursor] = []

    def make(name: str, sink: ScriptedSink, **kwargs: object) -> SinkWriter:
        cursor = spool.cursor(name)
        cursors.append(cursor)
        options: dict[str, object] = {**OPTIONS, "local_metrics": name == "local", **kwargs}
        writer = SinkWriter(cursor, sink, metrics, rng=random.Random(1), **options)  # type: ignore[arg-type]
        writers.append(writer)
        writer.start()
        return writer

    yield spool, make
    for w in writers:
        w.stop(5.0)
    for c in cursors:
        c.close()
    spool.close()


def test_the_upstream_gets_its_selection_the_local_sink_everything_and_rows_go_once_both_passed(
    two_sinks: tuple[Spool, Callable[..., SinkWriter]], metrics: Metrics
) -> None:
    spool, make = two_sinks
    local, cloud = ScriptedSink(), ScriptedSink()
    spool.append([_reading(t) for t in range(130)] + [_score(t) for t in range(3)])
    writers = SinkWriters(
        {
            "local": make("local", local),
            "cloud": make("cloud", cloud, selector=RowSelector(Selection(kinds=frozenset(), readings_interval_s=60))),
        }
    )
    assert writers.flush(TIMEOUT_S)
    assert len(local.accepted) == 133
    # Minutes 0 and 1 are complete (a reading of minute 2 arrived); minute 2 stays open; no score selected.
    assert [line.rsplit(" ", 1)[1] for line in cloud.accepted] == [str(T0), str(T0 + 60 * S)]
    spool.compact()
    assert spool.size()[0] == 0  # the upstream passed over what its selection excludes
    assert metrics.get("sink.points_written", sink="cloud") == 2
    assert metrics.get("sink.rows_written", sink="cloud") == 133
    assert metrics.get("sink.points_written", sink="local") == 133
    assert metrics.get("storage.points_written") == 133  # the unlabelled counters stay the local sink's


def test_a_restart_between_the_write_and_the_cursor_rewrites_the_same_points(
    two_sinks: tuple[Spool, Callable[..., SinkWriter]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The open buckets are saved with the cursor: a writer that dies after the upstream confirmed a batch but
    before its cursor moved resumes at the old cursor and state, and writes the very same points again."""
    spool, make = two_sinks
    first = ScriptedSink()
    spool.append([_reading(t) for t in range(200)])
    writer = make("cloud", first, selector=RowSelector(MINUTE))
    assert writer.flush(TIMEOUT_S)
    written = list(first.accepted)
    assert len(written) == 3
    writer.stop(TIMEOUT_S)

    spool.append([_reading(t) for t in range(200, 400)])

    # This writer's cursor saves fail (as if it were killed right after each write): nothing moves.
    def killed(self: SinkCursor, last_id: int, state: bytes | None = None) -> None:
        raise sqlite3.OperationalError("killed")

    monkeypatch.setattr(SinkCursor, "advance", killed)
    lost = ScriptedSink()
    dying = make("cloud", lost, selector=RowSelector(MINUTE))
    dying.request_flush(True)
    wait_for(lambda: len(lost.accepted) >= 3, "the batches written before the kill", TIMEOUT_S)
    dying.stop(TIMEOUT_S)
    monkeypatch.undo()

    again = ScriptedSink()
    assert make("cloud", again, selector=RowSelector(MINUTE)).flush(TIMEOUT_S)
    assert again.accepted == lost.accepted  # the same points: the upstream overwrites them with themselves
    reference = ScriptedSink()
    one_run = SinkWriter(
        spool.cursor("local"),
        reference,
        Metrics(),
        selector=RowSelector(MINUTE),
        **OPTIONS,  # type: ignore[arg-type]
    )
    one_run.start()
    assert one_run.flush(TIMEOUT_S)
    one_run.stop(TIMEOUT_S)
    assert written + again.accepted == reference.accepted  # as if it had never stopped


def test_the_upstreams_byte_cap_moves_only_its_own_cursor_and_is_counted(
    two_sinks: tuple[Spool, Callable[..., SinkWriter]],
    metrics: Metrics,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(writer_module, "BUDGET_CHECK_S", 0.0)
    monkeypatch.setattr(writer_module, "BUDGET_BYTES_CHECK_S", 0.0)
    spool, make = two_sinks
    entries = [_score(t) for t in range(100, 200)]  # of one size
    row_bytes = len(entries[0].body) + 48
    spool.append(entries)
    away = ScriptedSink(fail=lambda lines: RetryableWriteError("upstream away"))
    upstream = make("cloud", away, selector=RowSelector(Selection()), budget=BacklogBudget(10 * row_bytes, 10**9))
    wait_for(lambda: spool.cursors()["cloud"] >= 90, "the upstream to pass over its oldest rows", TIMEOUT_S)
    assert spool.cursors() == {"local": 0, "cloud": 90}  # only the upstream's cursor moved
    spool.compact()
    assert spool.size()[0] == 100  # the local sink has none of them yet: every row stays
    assert metrics.get("sink.backlog_dropped_points", sink="cloud") == 90
    assert metrics.get("sink.backlog_dropped_bytes", sink="cloud") == 90 * row_bytes
    assert "passed over 90 points" in caplog.text

    local = ScriptedSink()
    assert make("local", local).flush(TIMEOUT_S)
    assert len(local.accepted) == 100  # every row, exactly once
    away.fail = None
    assert upstream.flush(TIMEOUT_S)
    # What the cap kept, and at most the rest of a batch that was being retried when the cap cut into it.
    sent = [int(line.split("score=")[1].split(".")[0]) for line in away.accepted]
    assert sent[-10:] == list(range(190, 200))
    assert sent == sorted(set(sent)) and sent[0] > 190 - OPTIONS["batch_size"]


def test_the_upstreams_age_cap_passes_over_what_is_older(
    two_sinks: tuple[Spool, Callable[..., SinkWriter]], metrics: Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_module, "BUDGET_CHECK_S", 0.0)
    spool, make = two_sinks
    spool.append([_score(t) for t in range(20)])
    away = ScriptedSink(fail=lambda lines: RetryableWriteError("upstream away"))
    make("cloud", away, selector=RowSelector(Selection()), budget=BacklogBudget(10**12, 1e-9))
    wait_for(lambda: spool.cursors()["cloud"] == 20, "the upstream to pass over every row", TIMEOUT_S)
    assert metrics.get("sink.backlog_dropped_points", sink="cloud") == 20
    assert spool.cursors()["local"] == 0


def test_readyz_names_the_sink_behind_its_limit_and_shows_every_backlog() -> None:
    backlogs = {"local": (0, 0, 0.0, 0), "cloud": (5, 9, 700.0, 4000)}
    assert sinks_check(lambda: backlogs, {"cloud": None})() == {
        "ok": True,
        "sinks": {
            "local": {"backlog_rows": 0, "backlog_age_s": 0.0},
            "cloud": {"backlog_rows": 5, "backlog_age_s": 700.0},
        },
    }
    with pytest.raises(RuntimeError, match=r"sinks behind: cloud 700 s behind \(limit 600 s\)"):
        sinks_check(lambda: backlogs, {"cloud": 600.0})()


def test_the_rate_limit_charges_confirmed_points_not_the_retries_of_an_outage(
    two_sinks: tuple[Spool, Callable[..., SinkWriter]],
) -> None:
    """Forty failed attempts of a 7-point batch at 7 points/s must not leave a 40 s wait behind them."""
    spool, make = two_sinks
    spool.append([_score(t) for t in range(100, 107)])
    attempts = 0

    def fail_forty(lines: list[str]) -> RetryableWriteError | None:
        nonlocal attempts
        attempts += 1
        return RetryableWriteError("away") if attempts <= 40 else None

    sink = ScriptedSink(fail=fail_forty)
    writer = make("cloud", sink, selector=RowSelector(Selection()), rate_points_s=7.0)
    assert writer.flush(TIMEOUT_S)
    assert attempts == 41 and len(sink.accepted) == 7
    owed_s = writer._send_allowed_at - time.monotonic()
    assert owed_s <= 1.0  # the one confirmed batch's share, not 41 of them
