"""A sink's writer in a process of its own: the agent's second core makes and sends the line protocol.

Why a process (``docs/dataplane.md``): turning the spool's binary entries into line protocol is pure
Python and numpy string work that holds the GIL; in the agent's process it would compete with paho,
decoding, windowing and scoring. In its own process it runs on the other core. Nothing of the
guarantees moves: the ingest side still acknowledges after its own spool commit, the writer process
reads the same SQLite file (WAL: readers do not block the appender) at its sink's durable cursor and
moves the cursor only after the database confirmed a batch.

``WriterProcess`` is a supervised child (``agent.child``): started with ``spawn``, its metrics relayed, started
again when it dies (``storage.writer_restarts``; the cursor makes that safe), never outliving the agent.
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.child import ChildProcess, MetricOps, Outbox, RelayMetrics, child_setup, log_setup, say_stopped, serve
from agent.metrics import Metrics
from agent.spool.sqlite import SinkCursor, Spool
from agent.storage.base import Sink
from agent.storage.selection import RowSelector, Selection
from agent.storage.writer import BacklogBudget, MetricsSink, SinkFactory, SinkWriter

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0
SYNC_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class WriterSettings:
    """The writer's knobs, as ``SinkWriter`` takes them (picklable, for the child)."""

    batch_size: int = 5000
    flush_interval_s: float = 1.0
    backoff_min_s: float = 0.5
    backoff_max_s: float = 30.0
    selection: Selection | None = None
    """An upstream's selection; None: every entry at full resolution (the local sink)."""
    budget: BacklogBudget | None = None
    rate_points_s: float | None = None
    local_metrics: bool = True
    raw_release_points_s: float | None = None
    """The pace of released raw blocks (``storage.raw_vibration.release_points_s``); None: unpaced."""
    nice: int = 0
    """Added to the writer process's niceness when it starts (``storage.writer_nice``); threads: unused."""

    def writer(self, cursor: SinkCursor, sink: Sink, metrics: MetricsSink) -> SinkWriter:
        return SinkWriter(
            cursor,
            sink,
            metrics,
            batch_size=self.batch_size,
            flush_interval_s=self.flush_interval_s,
            backoff_min_s=self.backoff_min_s,
            backoff_max_s=self.backoff_max_s,
            selector=None if self.selection is None else RowSelector(self.selection),
            budget=self.budget,
            rate_points_s=self.rate_points_s,
            local_metrics=self.local_metrics,
            raw_release_points_s=self.raw_release_points_s,
        )


def apply(registry: Metrics, ops: MetricOps) -> None:
    """Replay relayed metric calls on the parent's registry."""
    registry.replay(ops)


def _lower_priority(nice: int) -> None:
    """Make the writer yield the CPU to the agent's ingest and scoring (``storage.writer_nice``).

    Its work waits durably in the spool and can catch up later; an alert cannot. On a 2-core box a burst of
    raw blocks released by an alert storm kept both cores busy with formatting and the database's ingestion,
    and the agent's threads waited for a core (docs/dataplane.md, "Who gets the CPU"). Called before the
    writer's threads start: they inherit it."""
    if nice <= 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, 0, min(os.getpriority(os.PRIO_PROCESS, 0) + nice, 19))
    except OSError as exc:  # not permitted (a seccomp profile) or not supported: the writer runs as it is
        logger.warning("writer: could not lower its CPU priority by %d: %s", nice, exc)


def _child_main(
    inbox: multiprocessing.connection.Connection,
    outbox_conn: multiprocessing.connection.Connection,
    spool_path: str,
    sink_name: str,
    make_sink: SinkFactory,
    settings: WriterSettings,
    dead_letter_max_rows: int,
    log_level: int,
    log_format: str = "text",
) -> None:
    """The writer process: one ``SinkWriter`` on its own cursor, commands and metrics over the pipes."""
    child_setup(f"writer {sink_name}", log_level, log_format)
    _lower_priority(settings.nice)
    outbox = Outbox(outbox_conn)
    relay = RelayMetrics()
    cursor = SinkCursor(spool_path, sink_name, dead_letter_max_rows)
    sink = make_sink()
    writer = settings.writer(cursor, sink, relay)
    writer.start()
    outbox.send(("started",))

    def handle(command: tuple[Any, ...]) -> None:
        if command[0] == "flush":
            writer.request_flush(bool(command[1]))
        elif command[0] == "sync":  # the parent wants every count so far before it goes on
            outbox.send(("metrics", relay.take()))
            outbox.send(("synced", command[1]))

    writer.stop(serve(inbox, outbox, relay, handle, stop_timeout_s=10.0))
    say_stopped(outbox, relay, cursor.position)
    sink.close()
    cursor.close()


class WriterProcess(ChildProcess):
    """``SinkWriter``'s interface (``start``, ``stop``, ``flush``, ``alive``) with the writer in a child process."""

    def __init__(
        self,
        spool: Spool,
        sink_name: str,
        make_sink: SinkFactory,
        settings: WriterSettings,
        metrics: Metrics,
    ) -> None:
        super().__init__(f"writer process of {sink_name}", f"pdm-writer-{sink_name}", metrics, START_TIMEOUT_S)
        self.spool = spool
        self.sink_name = sink_name
        self.make_sink = make_sink
        self.settings = settings
        self._flushers = 0
        self._synced = threading.Condition()
        self._synced_token = 0
        self._sync_token = 0

    def _target(self) -> tuple[Callable[..., None], tuple[Any, ...]]:
        level, log_format = log_setup()
        args = (
            str(self.spool.path),
            self.sink_name,
            self.make_sink,
            self.settings,
            self.spool.dead_letter_max_rows,
            level,
            log_format,
        )
        return _child_main, args

    def _on_up(self) -> None:
        if self._flushers:
            self.send(("flush", True))
        self._gauge(1)

    def _on_down(self) -> None:
        self._gauge(0)
        if self.settings.local_metrics:
            self.metrics.inc("storage.writer_restarts")
        self.metrics.inc("sink.writer_restarts", sink=self.sink_name)

    def _on_message(self, message: tuple[Any, ...]) -> None:
        if message[0] == "synced":
            with self._synced:
                self._synced_token = max(self._synced_token, int(message[1]))
                self._synced.notify_all()
        else:
            super()._on_message(message)

    def _gauge(self, value: int) -> None:
        if self.settings.local_metrics:
            self.metrics.set("storage.writer_process", value)
        self.metrics.set("sink.writer_process", value, sink=self.sink_name)

    def flush(self, timeout_s: float) -> bool:
        """Wait until the sink confirmed every row appended so far; False if not within ``timeout_s``."""
        if self._process is None:
            raise RuntimeError("WriterProcess is not running")
        deadline = time.monotonic() + timeout_s
        with self._synced:
            self._flushers += 1
        self.send(("flush", True))
        try:
            while not self.spool.caught_up(self.sink_name):
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.01)
            # Delivered. Wait a moment for the counts too, so that a caller reads them current; a child that
            # died right now leaves them behind, not the data.
            self._sync(min(deadline, time.monotonic() + SYNC_TIMEOUT_S))
            return True
        finally:
            with self._synced:
                self._flushers -= 1
                last = not self._flushers
            if last:
                self.send(("flush", False))

    def _sync(self, deadline: float) -> bool:
        """Wait until the child has relayed what it counted so far (a flush returns with the metrics current)."""
        with self._synced:
            self._sync_token += 1
            token = self._sync_token
        self.send(("sync", token))
        with self._synced:
            return self._synced.wait_for(
                lambda: self._synced_token >= token, timeout=max(0.0, deadline - time.monotonic())
            )

    def stop(self, timeout_s: float = 10.0) -> None:
        """Let the child write what it can within ``timeout_s`` and end; the rest stays in the spool."""
        if self._process is None:
            return
        self._stop_child(timeout_s)
        self._gauge(0)
