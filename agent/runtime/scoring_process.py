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
child in batches, with the shaft speeds and, from a decoder that knows them (Sparkplug B), which sources
their publisher declared offline; the child's publications, acknowledgements of operator commands, produced points and
raw-data releases come back to a relay thread, which hands them to the outbound queues, the ingest
worker's next transaction and the raw-vibration policy (whose held blocks live on the ingest side). So the
guarantees do not move: readings are acknowledged after the ingest side's commit; a command is
acknowledged after the child saved the state it changed; what the child produces is spooled by the ingest
thread. Backpressure is the pipe's: a child behind stops the feeder, the windows queue fills, and ingest
drops windows from scoring (counted), never readings from storage.

A child that dies is started again with a backoff (``scoring.process_restarts``); it restores the alert
state and baselines from their files. The windows it had been handed and not scored (it reports each batch
it scored) and those handed over while it was down are counted as dropped (``windows.dropped``,
``reason=scoring_down``): every window is either scored or counted.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing.connection
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from agent.adaptation.auto import AutoAdapter
from agent.child import ChildProcess, Outbox, RelayMetrics, child_setup, log_setup, say_stopped, serve
from agent.config import Config
from agent.decode.base import Liveness, OfflineView
from agent.inference.registry import ModelRegistry
from agent.metrics import Metrics
from agent.records import Message, SampleBlock, ScoringItem, Source
from agent.runtime.alerting import RawReleases
from agent.runtime.defect import ShaftSpeeds
from agent.runtime.scoring import ScoringWorker
from agent.runtime.worker import GATHER_S, POLL_S, Broker, drain, drain_gathered
from agent.spool.codec import Entry, encode_lines

logger = logging.getLogger(__name__)

SPEEDS_INTERVAL_S = 1.0
"""How often the shaft speeds the ingest side observed are sent to the child, when they changed (a window
scored with a speed a second old is harmless: ``agent.runtime.defect.ShaftSpeeds``)."""
START_TIMEOUT_S = 120.0
"""Loading and warming up the models and restoring the state can take a while on a small box."""
CHILD_QUEUE_BATCHES = 2
"""Batches the child holds beyond the one it scores: the backlog stays in the agent's bounded queue."""


T = TypeVar("T")


class BatchQueue(queue.Queue[T]):
    """The child's queue of windows: a batch from the agent goes in at once, so that the scoring worker,
    woken by it, finds the whole batch, not its first item.

    >>> q = BatchQueue(maxsize=4)
    >>> q.put_many([1, 2, 3]); q.qsize()
    3
    """

    def put_many(self, items: Sequence[T]) -> None:
        """Queue every item, waiting while they do not fit (an empty queue takes any batch)."""
        with self.not_full:
            while 0 < self.maxsize < self._qsize() + len(items) and self._qsize() > 0:
                self.not_full.wait()
            for item in items:
                self._put(item)
            self.unfinished_tasks += len(items)
            self.not_empty.notify()


class ScoringSink(Protocol):
    """Where the child's products go on the agent's side (``agent.runtime.ingest.IngestWorker``)."""

    def append_entries(self, entries: Sequence[Entry]) -> object: ...

    def store_raw(self, blocks: Sequence[SampleBlock]) -> None: ...


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


class RemoteBroker:
    """The child's broker: what the alert side publishes and acknowledges goes to the agent's connection."""

    def __init__(self, outbox: Outbox) -> None:
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

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox

    def append_lines(self, lines: Sequence[str]) -> None:
        if lines:
            self._outbox.send(("entries", [encode_lines(lines)]))

    def append_entries(self, entries: Sequence[Entry]) -> None:
        if entries:
            self._outbox.send(("entries", list(entries)))


class RemoteRawReleases:
    """An alert's raw-data release, resolved on the agent's side, where the held blocks are."""

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox

    def on_alert(self, source: Source) -> list[SampleBlock]:
        self._outbox.send(("raw", source))
        return []  # nothing to store from here: the agent's relay releases them


class RemoteOffline:
    """The child's word on which sources their publisher declared offline: the agent's decoder's latest view
    (``agent.decode.base.Liveness``), sent whenever it changed; nothing is offline before the first."""

    def __init__(self) -> None:
        self.view: OfflineView | None = None

    def offline(self, source: Source) -> bool:
        view = self.view
        return view is not None and view.offline(source)


def _child_main(
    inbox: multiprocessing.connection.Connection,
    outbox_conn: multiprocessing.connection.Connection,
    config: Config,
    build_side: SideBuilder,
    log_level: int,
    log_format: str,
) -> None:
    """The scoring process: the scoring worker as a thread, fed from ``inbox``; everything else to ``outbox``."""
    child_setup("scoring", log_level, log_format)
    sys.setswitchinterval(config.agent.switch_interval_ms / 1000)
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")  # as the agent's process (agent.runtime.agent)
    outbox = Outbox(outbox_conn)
    metrics = RelayedMetrics()
    windows: BatchQueue[ScoringItem] = BatchQueue(maxsize=CHILD_QUEUE_BATCHES * config.inference.max_batch)
    commands: queue.Queue[Message] = queue.Queue()
    liveness = RemoteOffline()
    try:
        side = build_side(
            config,
            metrics,
            spool=RemoteLog(outbox),
            broker=RemoteBroker(outbox),
            raw_releases=RemoteRawReleases(outbox),
            windows=windows,
            commands=commands,
            offline=liveness.offline,
        )
        restored = side.worker.restore()
    except Exception as exc:
        logger.exception("scoring process could not start")
        outbox.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    # After each batch, its products sent, with the counts so far: a child that dies leaves the agent's counts
    # current to its last batch, and the agent counts the windows it took with it (ScoringProcess._on_down).
    side.worker.on_processed = lambda n: outbox.send(("scored", n, metrics.relay.take()))
    if side.registry is not None:
        side.registry.start(config.inference.reload_interval_s)
    if side.auto_adapter is not None:
        side.auto_adapter.start()
    gc.freeze()  # what was built lives as long as the process (agent.runtime.agent says why)
    side.worker.start()
    outbox.send(("metrics", metrics.relay.take()))
    outbox.send(("started", restored))

    def handle(message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "items":
            windows.put_many(message[1])  # waits while the worker is behind: the pipe fills, the feeder waits
        elif kind == "command":
            commands.put(message[1])
        elif kind == "speeds":
            side.speeds.replace(message[1])
        elif kind == "offline":
            liveness.view = message[1]

    stop_timeout = serve(inbox, outbox, metrics.relay, handle, config.agent.shutdown_timeout_s)
    side.worker.stop(stop_timeout)
    if side.registry is not None:
        side.registry.stop(stop_timeout)
    if side.auto_adapter is not None:
        side.auto_adapter.stop(stop_timeout)
    say_stopped(outbox, metrics.relay)


class ScoringProcess(ChildProcess):
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
        liveness: Liveness | None = None,
    ) -> None:
        super().__init__("scoring process", "pdm-scoring", metrics, START_TIMEOUT_S)
        self._liveness = liveness
        self._sent_liveness = -1
        """The ``liveness_version`` of the view the running child has; -1: none yet."""
        self.config = config
        self._build_side = build_side
        self._windows = windows
        self._commands = commands
        self._speeds = speeds
        self._sink = sink
        self._raw = raw
        self._broker = broker
        self._max_batch = config.inference.max_batch
        self._feeder: threading.Thread | None = None
        self._sent_speeds: dict[str, float] = {}
        self._speeds_at = 0.0
        self._count_lock = threading.Lock()
        self._in_child = 0
        """Items handed to the running child and not yet reported scored (guarded by ``_count_lock``)."""
        self.restored = 0

    def restore(self) -> int:
        """The child restores the open alert events and baselines itself, as it starts (``start``)."""
        return 0

    # -- the child's life ----------------------------------------------------------------------------

    def _target(self) -> tuple[Callable[..., None], tuple[Any, ...]]:
        return _child_main, (self.config, self._build_side, *log_setup())

    def _on_started(self, payload: tuple[Any, ...]) -> None:
        self.restored = int(payload[0])
        self._sent_speeds = {}
        self._sent_liveness = -1
        logger.info("scoring process: %d open alert event(s) restored", self.restored)

    def _on_up(self) -> None:
        self.metrics.set("scoring.process", 1)

    def _on_down(self) -> None:
        self.metrics.set("scoring.process", 0)
        self.metrics.inc("scoring.process_restarts")
        with self._send_lock, self._count_lock:  # no send is under way: the child's end is closed
            lost, self._in_child = self._in_child, 0
        if lost:
            self.metrics.inc("windows.dropped", lost, reason="scoring_down")
            logger.error("scoring process died with %d window(s) it had not scored", lost)

    def start(self) -> None:
        super().start()
        self._feeder = threading.Thread(target=self._feed, name="scoring-feeder", daemon=True)
        self._feeder.start()

    def is_alive(self) -> bool:
        return self._feeder is not None and self._feeder.is_alive() and self.alive

    # -- agent -> child ------------------------------------------------------------------------------

    def _send_items(self, items: list[ScoringItem]) -> bool:
        with self._send_lock:
            if not self._send_locked(("items", items)):
                return False
            with self._count_lock:
                self._in_child += len(items)
        return True

    def _feed_once(self, first_timeout_s: float) -> bool:
        """Hand the child what is queued (liveness and speeds first, then windows, then commands); False:
        nothing was."""
        if self._liveness is not None and self._liveness.liveness_version != self._sent_liveness:
            version = self._liveness.liveness_version  # before the copy: a change during it is sent next time
            if self.send(("offline", self._liveness.offline_view())):
                self._sent_liveness = version
        now = time.monotonic()
        if now - self._speeds_at >= SPEEDS_INTERVAL_S:
            self._speeds_at = now
            speeds = self._speeds.snapshot()
            if speeds != self._sent_speeds and self.send(("speeds", speeds)):
                self._sent_speeds = speeds
        # The feeder gathers (``GATHER_S``), as the scoring thread does; the child's worker then does not.
        items = drain_gathered(self._windows, first_timeout_s, self._max_batch, GATHER_S)
        if items and not self._send_items(items):
            self.metrics.inc("windows.dropped", len(items), reason="scoring_down")
        commands = drain(self._commands, 0, 100)
        for command in commands:
            if not self.send(("command", command)):
                # Not acknowledged: the broker sends it again after the agent reconnects; counted meanwhile.
                self.metrics.inc("commands.lost", reason="scoring_down")
        return bool(items or commands)

    def _feed(self) -> None:
        while not self._stopping.is_set():
            try:
                self._feed_once(POLL_S)
            except Exception:
                self.metrics.inc("pipeline.errors", worker="scoring-feeder")
                logger.exception("scoring feeder: unexpected error; continuing")
                time.sleep(POLL_S)
        with contextlib.suppress(Exception):
            while self._feed_once(0):
                pass

    # -- child -> agent ------------------------------------------------------------------------------

    def _on_message(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "scored":
            self.metrics.replay(message[2])
            with self._count_lock:
                self._in_child -= int(message[1])
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
            super()._on_message(message)

    def stop(self, timeout_s: float) -> None:
        """Hand over what is queued, let the child score it, save its state and end within ``timeout_s``."""
        if self._process is None:
            return
        deadline = time.monotonic() + timeout_s
        self._stopping.set()
        if self._feeder is not None:
            self._feeder.join(timeout_s)
        self._stop_child(max(0.0, deadline - time.monotonic()))
        self.metrics.set("scoring.process", 0)
