"""The scoring worker in a process of its own (``agent.scoring_process``): the agent's second interpreter.

Why (``docs/dataplane.md``, "The second core"): paho's thread, the ingest thread and the scoring thread
take turns on one interpreter lock, and the scoring thread (features, models, the alert engine) held about
a third of it under the benchmark's vibration mix. In a process of its own it has a lock of its own: ingest
and paho get that third back, and an alert is no longer decided behind a batch of ingest.

What moves and what stays. The child builds, from the same config, exactly the scoring side the thread
runs (``agent.bootstrap.build_scoring_side``): the models and their registry, the commissioning
baselines, the defect stage, the adapters, the alert engine with its state file. It restores the open
events and baselines itself before it says it started. The agent keeps the decoder, the windower, the
spool and the broker connection: ingest cuts the windows as before and a feeder thread hands them to the
child in batches; the child's publications, acknowledgements of operator commands, produced points and
raw-data releases come back to a relay thread, which hands them to the outbound queues, the ingest
worker's next transaction and the raw-vibration policy (whose held blocks live on the ingest side). So the
guarantees do not move: readings are acknowledged after the ingest side's commit; a command is
acknowledged after the child saved the state it changed; what the child produces is spooled by the ingest
thread. Backpressure is the pipe's: a child behind stops the feeder, the windows queue fills, and ingest
drops windows from scoring (counted), never readings from storage.

A child that dies is started again with a backoff (``scoring.process_restarts``); it restores the alert
state and baselines from their files. Windows handed over while it was down are counted as dropped.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import multiprocessing.connection
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from agent.adaptation.auto import AutoAdapter
from agent.config import Config
from agent.inference.registry import ModelRegistry
from agent.logs import current_format, setup_logging
from agent.metrics import Metrics
from agent.records import Message, ScoringItem, Source
from agent.runtime.alerting import RawReleases
from agent.runtime.defect import ShaftSpeeds
from agent.runtime.scoring import ScoringWorker
from agent.runtime.worker import POLL_S, Broker, drain
from agent.spool.codec import Entry, encode_lines
from agent.storage.process import RelayMetrics

logger = logging.getLogger(__name__)

RELAY_INTERVAL_S = 0.2
SPEEDS_INTERVAL_S = 1.0
"""How often the shaft speeds the ingest side observed are sent to the child, when they changed (a window
scored with a speed a second old is harmless: ``agent.runtime.defect.ShaftSpeeds``)."""
START_TIMEOUT_S = 120.0
"""Loading and warming up the models and restoring the state can take a while on a small box."""
RESTART_BACKOFF_S = (1.0, 30.0)
CHILD_QUEUE_BATCHES = 2
"""Batches the child holds beyond the one it scores: the backlog stays in the agent's bounded queue."""


class ScoringSink(Protocol):
    """Where the child's products go on the agent's side (``agent.runtime.ingest.IngestWorker``)."""

    def append_entries(self, entries: Sequence[Entry]) -> object: ...

    def store_raw(self, spool_ids: Sequence[int]) -> None: ...


@dataclass(frozen=True)
class ScoringSide:
    """What the child runs (``agent.bootstrap.build_scoring_side`` builds it): the worker and what it keeps."""

    worker: ScoringWorker
    speeds: ShaftSpeeds
    registry: ModelRegistry | None
    auto_adapter: AutoAdapter | None


SideBuilder = Callable[..., ScoringSide]
"""``agent.bootstrap.build_scoring_side``, handed in by the composition root (a module-level function: the child
gets it by reference), so that this module does not import the composition root."""


class RelayedMetrics(Metrics):
    """The child's metrics: every update is recorded and relayed to the agent's registry, which serves them."""

    def __init__(self) -> None:
        super().__init__()
        self.relay = RelayMetrics()

    def inc(self, name: str, n: float = 1, **labels: str) -> None:
        self.relay.inc(name, n, **labels)

    def set(self, name: str, value: float, **labels: str) -> None:
        self.relay.set(name, value, **labels)

    def observe(self, name: str, value: float, **labels: str) -> None:
        self.relay.observe(name, value, **labels)


class _Outbox:
    """The child's end towards the agent, shared by its threads."""

    def __init__(self, conn: multiprocessing.connection.Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def send(self, message: tuple[Any, ...]) -> None:
        with self._lock:
            self._conn.send(message)


class RemoteBroker:
    """The child's broker: what the alert side publishes and acknowledges goes to the agent's connection."""

    def __init__(self, outbox: _Outbox) -> None:
        self._outbox = outbox

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self._outbox.send(("publish", topic, payload, qos, retain))

    def ack(self, mid: int, qos: int) -> None:
        self._outbox.send(("ack", mid, qos))

    def ack_batch(self, acks: Sequence[tuple[int, int]]) -> None:
        for mid, qos in acks:
            self.ack(mid, qos)


class RemoteLog:
    """The child's line log: the points it produces go to the ingest worker's next transaction."""

    def __init__(self, outbox: _Outbox) -> None:
        self._outbox = outbox

    def append_lines(self, lines: Sequence[str]) -> None:
        if lines:
            self._outbox.send(("entries", [encode_lines(lines)]))

    def append_entries(self, entries: Sequence[Entry]) -> None:
        if entries:
            self._outbox.send(("entries", list(entries)))


class RemoteRawReleases:
    """An alert's raw-data release, resolved on the agent's side, where the held blocks' spool ids are."""

    def __init__(self, outbox: _Outbox) -> None:
        self._outbox = outbox

    def on_alert(self, source: Source) -> list[int]:
        self._outbox.send(("raw", source))
        return []  # nothing to store from here: the agent's relay releases them


def _child_main(
    inbox: multiprocessing.connection.Connection,
    outbox_conn: multiprocessing.connection.Connection,
    config: Config,
    build_side: SideBuilder,
    log_level: int,
    log_format: str,
) -> None:
    """The scoring process: the scoring worker as a thread, fed from ``inbox``; everything else to ``outbox``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the agent decides when scoring stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_logging(log_level, log_format, process="scoring")
    sys.setswitchinterval(config.agent.switch_interval_ms / 1000)
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")  # as the agent's process (agent.runtime.agent)
    outbox = _Outbox(outbox_conn)
    metrics = RelayedMetrics()
    windows: queue.Queue[ScoringItem] = queue.Queue(maxsize=CHILD_QUEUE_BATCHES * config.inference.max_batch)
    commands: queue.Queue[Message] = queue.Queue()
    try:
        side = build_side(
            config,
            metrics,
            spool=RemoteLog(outbox),
            broker=RemoteBroker(outbox),
            raw_releases=RemoteRawReleases(outbox),
            windows=windows,
            commands=commands,
        )
        restored = side.worker.restore()
    except Exception as exc:
        logger.exception("scoring process could not start")
        outbox.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    if side.registry is not None:
        side.registry.start(config.inference.reload_interval_s)
    if side.auto_adapter is not None:
        side.auto_adapter.start()
    gc.freeze()  # what was built lives as long as the process (agent.runtime.agent says why)
    side.worker.start()
    outbox.send(("metrics", metrics.relay.take()))
    outbox.send(("started", restored))
    stop_timeout = config.agent.shutdown_timeout_s
    try:
        while True:
            if inbox.poll(RELAY_INTERVAL_S):
                message = inbox.recv()
                kind = message[0]
                if kind == "items":
                    for item in message[1]:
                        windows.put(item)  # blocks while the worker is behind: the pipe fills, the feeder waits
                elif kind == "command":
                    commands.put(message[1])
                elif kind == "speeds":
                    side.speeds.replace(message[1])
                elif kind == "stop":
                    stop_timeout = float(message[1])
                    break
            ops = metrics.relay.take()
            if ops:
                outbox.send(("metrics", ops))
    except (EOFError, OSError):
        logger.warning("the agent went away; stopping scoring")
    side.worker.stop(stop_timeout)
    if side.registry is not None:
        side.registry.stop(stop_timeout)
    if side.auto_adapter is not None:
        side.auto_adapter.stop(stop_timeout)
    with contextlib.suppress(EOFError, OSError):
        outbox.send(("metrics", metrics.relay.take()))
        outbox.send(("stopped",))


class ScoringProcess:
    """The scoring worker's interface (``restore``, ``start``, ``stop``, ``is_alive``) with the worker in a
    child process; see the module docstring."""

    def __init__(
        self,
        config: Config,
        windows: queue.Queue[ScoringItem],
        commands: queue.Queue[Message],
        speeds: ShaftSpeeds,
        sink: ScoringSink,
        raw: RawReleases,
        broker: Broker,
        metrics: Metrics,
        build_side: SideBuilder,
    ) -> None:
        self.config = config
        self._build_side = build_side
        self._windows = windows
        self._commands = commands
        self._speeds = speeds
        self._sink = sink
        self._raw = raw
        self._broker = broker
        self._metrics = metrics
        self._max_batch = config.inference.max_batch
        self._ctx = multiprocessing.get_context("spawn")
        self._process: multiprocessing.process.BaseProcess | None = None
        self._to_child: multiprocessing.connection.Connection | None = None
        self._from_child: multiprocessing.connection.Connection | None = None
        self._stopping = threading.Event()
        self._feeder: threading.Thread | None = None
        self._relay: threading.Thread | None = None
        self._sent_speeds: dict[str, float] = {}
        self._speeds_at = 0.0
        self.restarts = 0
        self.restored = 0

    def restore(self) -> int:
        """The child restores the open alert events and baselines itself, as it starts (``start``)."""
        return 0

    def _spawn(self) -> None:
        to_child_read, to_child = self._ctx.Pipe(duplex=False)
        from_child, from_child_write = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(
            target=_child_main,
            args=(
                to_child_read,
                from_child_write,
                self.config,
                self._build_side,
                logging.getLogger().getEffectiveLevel(),
                current_format(),
            ),
            name="pdm-scoring",
            daemon=True,
        )
        process.start()
        to_child_read.close()
        from_child_write.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if not from_child.poll(max(0.0, deadline - time.monotonic())):
                process.kill()
                raise RuntimeError(f"scoring process did not start within {START_TIMEOUT_S:.0f} s")
            try:
                message = from_child.recv()
            except EOFError as exc:
                process.join(1.0)
                raise RuntimeError(f"scoring process failed to start (exit {process.exitcode})") from exc
            if message[0] == "metrics":
                self._metrics.replay(message[1])
            elif message[0] == "started":
                self.restored = int(message[1])
                break
            elif message[0] == "failed":
                process.join(5.0)
                raise RuntimeError(f"scoring process failed to start: {message[1]}")
            else:
                self._handle(message)  # the restored events' machine states, published at restore
        for old in (self._to_child, self._from_child):  # a dead child's ends
            if old is not None:
                old.close()
        self._process, self._to_child, self._from_child = process, to_child, from_child
        self._sent_speeds = {}
        self._metrics.set("scoring.process", 1)
        logger.info("scoring runs in process %d (%d open alert event(s) restored)", process.pid, self.restored)

    def start(self) -> None:
        if self._relay is not None:
            raise RuntimeError("ScoringProcess already started")
        self._spawn()
        self._relay = threading.Thread(target=self._supervise, name="scoring-relay", daemon=True)
        self._feeder = threading.Thread(target=self._feed, name="scoring-feeder", daemon=True)
        self._relay.start()
        self._feeder.start()

    def is_alive(self) -> bool:
        feeding = self._feeder is not None and self._feeder.is_alive()
        return feeding and self._process is not None and self._process.is_alive()

    # -- agent -> child ------------------------------------------------------------------------------

    def _send(self, message: tuple[Any, ...]) -> bool:
        conn = self._to_child
        if conn is None:
            return False
        try:
            conn.send(message)
            return True
        except (OSError, EOFError, ValueError):  # the child is gone: the relay thread starts a new one
            return False

    def _feed_once(self, first_timeout_s: float) -> bool:
        """Hand the child what is queued (speeds first, then windows, then commands); False: nothing was."""
        now = time.monotonic()
        if now - self._speeds_at >= SPEEDS_INTERVAL_S:
            self._speeds_at = now
            speeds = self._speeds.snapshot()
            if speeds != self._sent_speeds and self._send(("speeds", speeds)):
                self._sent_speeds = speeds
        items = drain(self._windows, first_timeout_s, self._max_batch)
        if items and not self._send(("items", items)):
            self._metrics.inc("windows.dropped", len(items), reason="scoring_down")
        commands = drain(self._commands, 0, 100)
        for command in commands:
            if not self._send(("command", command)):
                # Not acknowledged: the broker sends it again after the agent reconnects; counted meanwhile.
                self._metrics.inc("commands.lost", reason="scoring_down")
        return bool(items or commands)

    def _feed(self) -> None:
        while not self._stopping.is_set():
            try:
                self._feed_once(POLL_S)
            except Exception:
                self._metrics.inc("pipeline.errors", worker="scoring-feeder")
                logger.exception("scoring feeder: unexpected error; continuing")
                time.sleep(POLL_S)
        with contextlib.suppress(Exception):
            while self._feed_once(0):
                pass

    # -- child -> agent ------------------------------------------------------------------------------

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "metrics":
            self._metrics.replay(message[1])
        elif kind == "publish":
            _, topic, payload, qos, retain = message
            self._broker.publish(topic, payload, qos=qos, retain=retain)
        elif kind == "ack":
            self._broker.ack(message[1], message[2])
        elif kind == "entries":
            self._sink.append_entries(message[1])
        elif kind == "raw":
            self._sink.store_raw(self._raw.on_alert(message[1]))
        else:
            logger.warning("scoring process said %r; ignored", kind)

    def _supervise(self) -> None:
        failures = 0
        while True:
            conn, process = self._from_child, self._process
            assert conn is not None and process is not None
            try:
                if conn.poll(RELAY_INTERVAL_S):
                    message = conn.recv()
                    if message[0] == "stopped":
                        return
                    self._handle(message)
                    continue
            except (EOFError, OSError):
                # The child's end is gone: it died or is dying. Give it a moment, not a busy loop.
                process.join(RELAY_INTERVAL_S)
            except Exception:
                self._metrics.inc("pipeline.errors", worker="scoring-relay")
                logger.exception("scoring relay: unexpected error; continuing")
                continue
            if process.is_alive():
                failures = 0
                continue
            if self._stopping.is_set():
                return
            self._metrics.set("scoring.process", 0)
            self._metrics.inc("scoring.process_restarts")
            failures += 1
            delay = min(RESTART_BACKOFF_S[1], RESTART_BACKOFF_S[0] * 2 ** (failures - 1))
            logger.error("scoring process died (exit %s); starting it again in %.0f s", process.exitcode, delay)
            if self._stopping.wait(delay):
                return
            try:
                self._spawn()
                self.restarts += 1
            except Exception:
                logger.exception("could not start the scoring process")

    def stop(self, timeout_s: float) -> None:
        """Hand over what is queued, let the child score it, save its state and end within ``timeout_s``."""
        if self._process is None:
            return
        deadline = time.monotonic() + timeout_s
        self._stopping.set()
        if self._feeder is not None:
            self._feeder.join(timeout_s)
        self._send(("stop", max(0.0, deadline - time.monotonic())))
        if self._relay is not None:
            self._relay.join(max(0.0, deadline - time.monotonic()) + 5.0)
        self._process.join(5.0)
        if self._process.is_alive():
            logger.warning("scoring process did not stop; killing it")
            self._process.kill()
            self._process.join(5.0)
        for conn in (self._to_child, self._from_child):
            if conn is not None:
                conn.close()
        self._metrics.set("scoring.process", 0)
