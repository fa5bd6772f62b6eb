"""The writer in a process of its own: delivery, flush, stop, metrics relayed to the parent, restart after a kill.

The sinks here are module-level classes built by a picklable factory (``functools.partial``): the child is
started with ``spawn`` and builds its sink itself. They append to a file, which the test reads back.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest

from agent.child import RelayMetrics
from agent.metrics import Metrics
from agent.spool.codec import encode_lines
from agent.spool.sqlite import Spool
from agent.storage.base import RetryableWriteError
from agent.storage.process import WriterProcess, WriterSettings, apply
from tests.spool_support import wait_for

TIMEOUT_S = 60.0  # a generous bound for waiting (a spawned child imports the agent), never a performance check
SETTINGS = WriterSettings(batch_size=10, flush_interval_s=3600.0, backoff_min_s=0.01, backoff_max_s=0.05)


class FileSink:
    """Appends each batch to ``path``, one line per point; refuses while ``down`` exists (the database away)."""

    def __init__(self, path: str, down: str | None = None) -> None:
        self.path = path
        self.down = down

    def write(self, lines: list[str]) -> None:
        if self.down is not None and os.path.exists(self.down):
            raise RetryableWriteError("connection refused (test)")
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))

    def close(self) -> None:
        pass


def broken_sink() -> FileSink:
    raise OSError("no such sink (test)")


def _lines(n: int, start: int = 0) -> list[str]:
    return [f"m v={i}i {i}" for i in range(start, start + n)]


def _written(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    wait_for(condition, what, TIMEOUT_S)


@pytest.fixture
def make_process(spool: Spool, metrics: Metrics) -> Iterator[Callable[..., WriterProcess]]:
    started: list[WriterProcess] = []

    def make(factory: Callable[[], FileSink], start: bool = True) -> WriterProcess:
        process = WriterProcess(spool, "local", factory, SETTINGS, metrics)
        if start:
            process.start()
            started.append(process)
        return process

    yield make
    for process in started:
        process.stop(10.0)


def test_the_child_delivers_on_flush_and_relays_its_metrics(
    tmp_path: Path, spool: Spool, metrics: Metrics, make_process: Callable[..., WriterProcess]
) -> None:
    out = tmp_path / "sink.txt"
    process = make_process(partial(FileSink, str(out)))
    assert process.alive
    assert metrics.get("storage.writer_process") == 1
    spool.append([encode_lines([line]) for line in _lines(25)])
    assert process.flush(TIMEOUT_S)  # an hour-long flush interval: only the flush sends the partial batch
    assert _written(out) == _lines(25)
    assert spool.caught_up("local")
    assert metrics.get("storage.points_written") == 25  # relayed before flush returned
    assert metrics.get("storage.write_seconds") >= 3
    spool.append([encode_lines(_lines(5, start=25))])
    assert process.flush(TIMEOUT_S)
    assert _written(out) == _lines(30)
    process.stop(TIMEOUT_S)
    assert not process.alive
    assert metrics.get("storage.points_written") == 30  # the last relay arrives before stop returns
    assert metrics.get("storage.writer_process") == 0


def test_stop_writes_what_is_left_and_relays_the_last_metrics(
    tmp_path: Path, spool: Spool, metrics: Metrics, make_process: Callable[..., WriterProcess]
) -> None:
    out = tmp_path / "sink.txt"
    process = make_process(partial(FileSink, str(out)))
    spool.append([encode_lines(_lines(7))])  # a partial batch, not due for an hour
    process.stop(TIMEOUT_S)
    assert _written(out) == _lines(7)
    assert spool.caught_up("local")
    assert metrics.get("storage.points_written") == 7
    assert metrics.get("storage.writer_restarts") == 0


def test_the_childs_failures_are_relayed_and_the_batch_retried(
    tmp_path: Path, spool: Spool, metrics: Metrics, make_process: Callable[..., WriterProcess]
) -> None:
    out, down = tmp_path / "sink.txt", tmp_path / "down"
    down.touch()
    process = make_process(partial(FileSink, str(out), str(down)))
    spool.append([encode_lines(_lines(3))])
    assert not process.flush(0.5)  # a bounded wait while the "database" is away
    _wait_for(lambda: metrics.get("storage.write_failures", kind="retryable") >= 1, "the relayed failure")
    assert spool.cursors() == {"local": 0}
    down.unlink()
    assert process.flush(TIMEOUT_S)
    assert _written(out) == _lines(3)


def test_a_killed_child_is_started_again_and_nothing_is_lost(
    tmp_path: Path, spool: Spool, metrics: Metrics, make_process: Callable[..., WriterProcess]
) -> None:
    out = tmp_path / "sink.txt"
    process = make_process(partial(FileSink, str(out)))
    spool.append([encode_lines([line]) for line in _lines(10)])
    assert process.flush(TIMEOUT_S)
    first = process._process
    assert first is not None and first.pid is not None
    spool.append([encode_lines(_lines(10, start=10 * k)) for k in range(1, 200)])  # 1,990 more
    _wait_for(lambda: len(_written(out)) > 10, "the child to be writing")
    os.kill(first.pid, signal.SIGKILL)  # possibly between a write and its cursor move
    _wait_for(lambda: process.restarts == 1 and process.alive, "the restarted child")
    assert process._process is not first
    assert metrics.get("storage.writer_restarts") == 1
    spool.append([encode_lines(_lines(10, start=2000))])
    assert process.flush(TIMEOUT_S)
    written = _written(out)
    assert set(written) == set(_lines(2010))  # nothing lost ...
    assert written[:10] == _lines(10)  # ... and what was confirmed before the kill is not written again
    assert len(written) - 2010 <= 10  # at most the one batch in flight at the kill, twice
    _wait_for(lambda: metrics.get("storage.writer_process") == 1, "the restarted child's gauge")


def test_a_child_that_cannot_build_its_sink_fails_the_start(
    spool: Spool, make_process: Callable[..., WriterProcess]
) -> None:
    process = make_process(broken_sink, start=False)
    with pytest.raises(RuntimeError, match="failed to start"):
        process.start()
    assert not process.alive


def test_flush_before_start_is_refused(tmp_path: Path, make_process: Callable[..., WriterProcess]) -> None:
    process = make_process(partial(FileSink, str(tmp_path / "sink.txt")), start=False)
    with pytest.raises(RuntimeError, match="not running"):
        process.flush(1.0)
    process.stop(1.0)  # never started: nothing to do


def test_relayed_metric_calls_are_replayed_in_order(metrics: Metrics) -> None:
    relay = RelayMetrics()
    relay.inc("storage.points_written", 3)
    relay.inc("storage.write_failures", kind="retryable")
    relay.set("storage.backoff_s", 2.5)
    relay.observe("storage.write_seconds", 0.1)
    relay.set("storage.backoff_s", 0.0)
    apply(metrics, relay.take())
    assert relay.take() == []
    assert metrics.get("storage.points_written") == 3
    assert metrics.get("storage.write_failures", kind="retryable") == 1
    assert metrics.get("storage.backoff_s") == 0.0  # the last set wins
    assert metrics.get("storage.write_seconds") == 1


def test_the_child_runs_at_the_configured_lower_priority(tmp_path: Path, spool: Spool, metrics: Metrics) -> None:
    """``storage.writer_nice``: the writer process yields the CPU to the agent (its niceness is raised by it)."""
    own = os.getpriority(os.PRIO_PROCESS, 0)
    out = tmp_path / "sink.txt"
    for nice, expected in ((7, min(own + 7, 19)), (0, own)):
        process = WriterProcess(spool, "local", partial(FileSink, str(out)), replace(SETTINGS, nice=nice), metrics)
        process.start()
        try:
            child = process._process
            assert child is not None and child.pid is not None
            assert os.getpriority(os.PRIO_PROCESS, child.pid) == expected
            spool.append([encode_lines(_lines(3, start=nice))])
            assert process.flush(TIMEOUT_S)  # and it still delivers
        finally:
            process.stop(10.0)
    assert _written(out) == _lines(3, start=7) + _lines(3)
