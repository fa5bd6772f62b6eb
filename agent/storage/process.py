"""A sink's writer in a process of its own: the agent's second core makes and sends the line protocol.

Why a process (``docs/dataplane.md``): turning the spool's binary entries into line protocol is pure
Python and numpy string work that holds the GIL; in the agent's process it would compete with paho,
decoding, windowing and scoring. In its own process it runs on the other core. Nothing of the
guarantees moves: the ingest side still acknowledges after its own spool commit, the writer process
reads the same SQLite file (WAL: readers do not block the appender) at its sink's durable cursor and
moves the cursor only after the database confirmed a batch.

The parent (``WriterProcess``) starts the child with ``spawn`` (no fork of a threaded process), and a
supervisor thread applies the metrics the child relays, watches it and starts it again when it dies
(``storage.writer_restarts``; the cursor makes that safe). The child stops when told to, or when the
parent's end of the pipe closes (the agent was killed): it never outlives the agent.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from agent.logs import current_format, setup_logging
from agent.metrics import Metrics
from agent.spool.sqlite import SinkCursor, Spool
from agent.storage.base import Sink
from agent.storage.selection import RowSelector, Selection
from agent.storage.writer import BacklogBudget, MetricsSink, SinkFactory, SinkWriter

logger = logging.getLogger(__name__)

RELAY_INTERVAL_S = 0.2
RESTART_BACKOFF_S = (1.0, 30.0)
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


class RelayMetrics:
    """The child's metrics: every call is recorded and sent to the parent in bulk (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ops: list[tuple[str, str, float, dict[str, str]]] = []

    def inc(self, name: str, n: float = 1, **labels: str) -> None:
        with self._lock:
            self._ops.append(("inc", name, n, labels))

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._ops.append(("set", name, value, labels))

    def observe(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._ops.append(("observe", name, value, labels))

    def take(self) -> list[tuple[str, str, float, dict[str, str]]]:
        with self._lock:
            ops, self._ops = self._ops, []
        return ops


def apply(registry: Metrics, ops: list[tuple[str, str, float, dict[str, str]]]) -> None:
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
    conn: multiprocessing.connection.Connection,
    spool_path: str,
    sink_name: str,
    make_sink: SinkFactory,
    settings: WriterSettings,
    dead_letter_max_rows: int,
    log_level: int,
    log_format: str = "text",
) -> None:
    """The writer process: one ``SinkWriter`` on its own cursor, commands and metrics over ``conn``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the agent decides when its writer stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_logging(log_level, log_format, process=f"writer {sink_name}")  # like the agent's own lines
    _lower_priority(settings.nice)
    relay = RelayMetrics()
    cursor = SinkCursor(spool_path, sink_name, dead_letter_max_rows)
    sink = make_sink()
    writer = settings.writer(cursor, sink, relay)
    writer.start()
    conn.send(("started",))
    stop_timeout = 10.0
    try:
        while True:
            if conn.poll(RELAY_INTERVAL_S):
                command = conn.recv()
                if command[0] == "flush":
                    writer.request_flush(bool(command[1]))
                elif command[0] == "sync":  # the parent wants every count so far before it goes on
                    conn.send(("metrics", relay.take()))
                    conn.send(("synced", command[1]))
                    continue
                elif command[0] == "stop":
                    stop_timeout = float(command[1])
                    break
            ops = relay.take()
            if ops:
                conn.send(("metrics", ops))
    except (EOFError, OSError):
        logger.warning("the agent went away; stopping its writer")
    writer.stop(stop_timeout)
    try:
        conn.send(("metrics", relay.take()))
        conn.send(("stopped", cursor.position))
    except (EOFError, OSError):
        pass
    sink.close()
    cursor.close()


class WriterProcess:
    """``SinkWriter``'s interface (``start``, ``stop``, ``flush``, ``alive``) with the writer in a child process."""

    def __init__(
        self,
        spool: Spool,
        sink_name: str,
        make_sink: SinkFactory,
        settings: WriterSettings,
        metrics: Metrics,
    ) -> None:
        self.spool = spool
        self.sink_name = sink_name
        self.make_sink = make_sink
        self.settings = settings
        self.metrics = metrics
        self._ctx = multiprocessing.get_context("spawn")
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._send_lock = threading.Lock()
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._flushers = 0
        self._synced = threading.Condition()
        self._synced_token = 0
        self._sync_token = 0
        self.restarts = 0

    def _spawn(self) -> None:
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(
            target=_child_main,
            args=(
                child,
                str(self.spool.path),
                self.sink_name,
                self.make_sink,
                self.settings,
                self.spool.dead_letter_max_rows,
                logging.getLogger().getEffectiveLevel(),
                current_format(),
            ),
            name=f"pdm-writer-{self.sink_name}",
            daemon=True,
        )
        process.start()
        child.close()
        if not parent.poll(START_TIMEOUT_S):
            process.kill()
            raise RuntimeError(f"writer process of {self.sink_name} did not start within {START_TIMEOUT_S:.0f} s")
        try:
            message = parent.recv()
        except EOFError as exc:
            process.join(1.0)
            raise RuntimeError(f"writer process of {self.sink_name} failed to start (exit {process.exitcode})") from exc
        if message[0] != "started":
            raise RuntimeError(f"writer process of {self.sink_name} said {message[0]!r} instead of started")
        self._process, self._conn = process, parent
        if self._flushers:
            self._send(("flush", True))
        self._up(1)
        logger.info("writer of %s runs in process %d", self.sink_name, process.pid)

    def _up(self, value: int) -> None:
        if self.settings.local_metrics:
            self.metrics.set("storage.writer_process", value)
        self.metrics.set("sink.writer_process", value, sink=self.sink_name)

    def start(self) -> None:
        if self._supervisor is not None:
            raise RuntimeError("WriterProcess already started")
        self._spawn()
        name = f"{self.sink_name}-writer-supervisor"
        self._supervisor = threading.Thread(target=self._supervise, name=name, daemon=True)
        self._supervisor.start()

    def _send(self, command: tuple[Any, ...]) -> None:
        with self._send_lock:
            if self._conn is not None:
                with contextlib.suppress(OSError, EOFError, ValueError):  # gone: the supervisor starts a new one
                    self._conn.send(command)

    def _supervise(self) -> None:
        failures = 0
        while True:
            conn, process = self._conn, self._process
            assert conn is not None and process is not None
            try:
                if conn.poll(RELAY_INTERVAL_S):
                    message = conn.recv()
                    if message[0] == "metrics":
                        self.metrics.replay(message[1])
                    elif message[0] == "synced":
                        with self._synced:
                            self._synced_token = max(self._synced_token, int(message[1]))
                            self._synced.notify_all()
                    elif message[0] == "stopped":
                        return
                    continue
            except (EOFError, OSError):
                pass
            if process.is_alive():
                failures = 0
                continue
            if self._stopping.is_set():
                return
            self._up(0)
            if self.settings.local_metrics:
                self.metrics.inc("storage.writer_restarts")
            self.metrics.inc("sink.writer_restarts", sink=self.sink_name)
            failures += 1
            delay = min(RESTART_BACKOFF_S[1], RESTART_BACKOFF_S[0] * 2 ** (failures - 1))
            logger.error(
                "writer process of %s died (exit %s); starting it again in %.0f s",
                self.sink_name,
                process.exitcode,
                delay,
            )
            if self._stopping.wait(delay):
                return
            try:
                self._spawn()
                self.restarts += 1
            except Exception:
                logger.exception("could not start the writer process of %s", self.sink_name)

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def flush(self, timeout_s: float) -> bool:
        """Wait until the sink confirmed every row appended so far; False if not within ``timeout_s``."""
        if self._process is None:
            raise RuntimeError("WriterProcess is not running")
        deadline = time.monotonic() + timeout_s
        with self._synced:
            self._flushers += 1
        self._send(("flush", True))
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
                self._send(("flush", False))

    def _sync(self, deadline: float) -> bool:
        """Wait until the child has relayed what it counted so far (a flush returns with the metrics current)."""
        with self._synced:
            self._sync_token += 1
            token = self._sync_token
        self._send(("sync", token))
        with self._synced:
            return self._synced.wait_for(
                lambda: self._synced_token >= token, timeout=max(0.0, deadline - time.monotonic())
            )

    def stop(self, timeout_s: float = 10.0) -> None:
        """Let the child write what it can within ``timeout_s`` and end; the rest stays in the spool."""
        if self._process is None:
            return
        self._stopping.set()
        self._send(("stop", timeout_s))
        if self._supervisor is not None:
            self._supervisor.join(timeout_s + 5.0)
        self._process.join(5.0)
        if self._process.is_alive():
            logger.warning("writer process of %s did not stop; killing it", self.sink_name)
            self._process.kill()
            self._process.join(5.0)
        if self._conn is not None:
            self._conn.close()
        self._up(0)
