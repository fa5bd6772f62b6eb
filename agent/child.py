"""A stage of the agent in a spawned child process, supervised: what the writer processes
(``agent.storage.process``) and the scoring process (``agent.runtime.scoring_process``) share.

The parent side (``ChildProcess``) starts the child with ``spawn`` (no fork of a threaded process) and two
one-way pipes, waits for it to say it started, and then runs a supervisor thread that hands each message
the child sends to the stage, replays the metrics the child relays on the agent's registry, and starts the
child again with a backoff when it dies. ``stop`` asks the child to finish within a time, then kills it.

The child side (``child_setup``, ``serve``) ignores SIGINT/SIGTERM (the agent decides when its children
stop), logs like the agent with its own name in every line, and serves the agent's commands until told to
stop or until the agent's end of the pipe closes (the agent was killed): a child never outlives its agent.

The conversation, child to parent: ``("started", payload)`` once ready, or ``("failed", reason)``; then
``("metrics", ops)`` and the stage's own messages; ``("stopped", payload)`` last. Parent to child: the
stage's commands and ``("stop", timeout_s)``.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.logs import current_format, setup_logging
from agent.metrics import Metrics

logger = logging.getLogger(__name__)

RELAY_INTERVAL_S = 0.2
"""How often a child relays its metrics, and how often the supervisor looks at whether it is alive."""
RESTART_BACKOFF_S = (1.0, 30.0)
"""The first and the longest wait before a dead child is started again (doubling in between)."""

MetricOps = list[tuple[str, str, float, dict[str, str]]]


class RelayMetrics:
    """A child's metrics: every call is recorded and sent to the parent in bulk (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ops: MetricOps = []

    def inc(self, name: str, n: float = 1, **labels: str) -> None:
        with self._lock:
            self._ops.append(("inc", name, n, labels))

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._ops.append(("set", name, value, labels))

    def observe(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._ops.append(("observe", name, value, labels))

    def take(self) -> MetricOps:
        with self._lock:
            ops, self._ops = self._ops, []
        return ops


class Outbox:
    """A child's end towards the agent, shared by its threads."""

    def __init__(self, conn: multiprocessing.connection.Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def send(self, message: tuple[Any, ...]) -> None:
        with self._lock:
            self._conn.send(message)


def child_setup(process: str, log_level: int, log_format: str) -> None:
    """First thing in a child: the agent's signals are the agent's, and the log lines name the child."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_logging(log_level, log_format, process=process)


def serve(
    inbox: multiprocessing.connection.Connection,
    outbox: Outbox,
    relay: RelayMetrics,
    handle: Callable[[tuple[Any, ...]], None],
    stop_timeout_s: float,
) -> float:
    """A child's main loop: the agent's commands to ``handle``, the metrics relayed every ``RELAY_INTERVAL_S``,
    until ``("stop", timeout_s)`` (returns its timeout) or the agent's end closes (returns ``stop_timeout_s``)."""
    try:
        while True:
            if inbox.poll(RELAY_INTERVAL_S):
                command = inbox.recv()
                if command[0] == "stop":
                    return float(command[1])
                handle(command)
            ops = relay.take()
            if ops:
                outbox.send(("metrics", ops))
    except (EOFError, OSError):
        logger.warning("the agent went away; stopping")
        return stop_timeout_s


def say_stopped(outbox: Outbox, relay: RelayMetrics, *payload: Any) -> None:
    """A child's last words: the metrics counted since the last relay, then ``stopped``."""
    with contextlib.suppress(EOFError, OSError):
        outbox.send(("metrics", relay.take()))
        outbox.send(("stopped", *payload))


class ChildProcess:
    """The parent's side of one supervised child (see the module docstring). A stage subclasses it and says
    what the child runs (``_target``), what to do with its messages (``_on_message``) and what its being up
    or down means (``_on_up``, ``_on_down``)."""

    def __init__(self, label: str, process_name: str, metrics: Metrics, start_timeout_s: float) -> None:
        self.label = label
        """How the logs name the child, e.g. ``scoring process``."""
        self.metrics = metrics
        self._process_name = process_name
        self._start_timeout_s = start_timeout_s
        self._ctx = multiprocessing.get_context("spawn")
        self._process: multiprocessing.process.BaseProcess | None = None
        self._to_child: multiprocessing.connection.Connection | None = None
        self._from_child: multiprocessing.connection.Connection | None = None
        self._send_lock = threading.Lock()
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self.restarts = 0

    # -- what a stage says -----------------------------------------------------------------------------

    def _target(self) -> tuple[Callable[..., None], tuple[Any, ...]]:
        """The child's entry point and its arguments after its two pipe ends (inbox, outbox)."""
        raise NotImplementedError

    def _on_started(self, payload: tuple[Any, ...]) -> None:
        """The child said it started, with ``payload``; called before the child is reachable by ``send``."""

    def _on_up(self) -> None:
        """The child runs and ``send`` reaches it (after a restart too)."""

    def _on_down(self) -> None:
        """The child died: everything it sent has been handled; it is started again after a backoff."""

    def _on_message(self, message: tuple[Any, ...]) -> None:
        logger.warning("%s said %r; ignored", self.label, message[0])

    # -- the parent's machinery ------------------------------------------------------------------------

    def _spawn(self) -> None:
        to_child_read, to_child = self._ctx.Pipe(duplex=False)
        from_child, from_child_write = self._ctx.Pipe(duplex=False)
        target, args = self._target()
        process = self._ctx.Process(
            target=target,
            args=(to_child_read, from_child_write, *args),
            name=self._process_name,
            daemon=True,
        )
        process.start()
        to_child_read.close()
        from_child_write.close()
        deadline = time.monotonic() + self._start_timeout_s
        try:
            while True:
                if not from_child.poll(max(0.0, deadline - time.monotonic())):
                    process.kill()
                    raise RuntimeError(f"{self.label} did not start within {self._start_timeout_s:.0f} s")
                try:
                    message = from_child.recv()
                except EOFError as exc:
                    process.join(1.0)
                    raise RuntimeError(f"{self.label} failed to start (exit {process.exitcode})") from exc
                if message[0] == "metrics":
                    self.metrics.replay(message[1])
                elif message[0] == "started":
                    self._on_started(message[1:])
                    break
                elif message[0] == "failed":
                    process.join(5.0)
                    raise RuntimeError(f"{self.label} failed to start: {message[1]}")
                else:
                    self._on_message(message)
        except BaseException:
            to_child.close()
            from_child.close()
            raise
        with self._send_lock:
            for old in (self._to_child, self._from_child):  # a dead child's ends
                if old is not None:
                    old.close()
            self._process, self._to_child, self._from_child = process, to_child, from_child
        self._on_up()
        logger.info("%s runs in process %d", self.label, process.pid)

    def start(self) -> None:
        """Start the child and wait until it says it started; raises ``RuntimeError`` if it does not."""
        if self._supervisor is not None:
            raise RuntimeError(f"{self.label} already started")
        self._spawn()
        self._supervisor = threading.Thread(target=self._supervise, name=f"{self._process_name}-relay", daemon=True)
        self._supervisor.start()

    def send(self, message: tuple[Any, ...]) -> bool:
        """Hand the child a command; False when it is gone (the supervisor starts a new one)."""
        with self._send_lock:
            return self._send_locked(message)

    def _send_locked(self, message: tuple[Any, ...]) -> bool:
        """``send`` with ``_send_lock`` held by the caller (who accounts for what it sent under the same lock)."""
        conn = self._to_child
        if conn is None:
            return False
        try:
            conn.send(message)
            return True
        except (OSError, EOFError, ValueError):
            return False

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

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
                    if message[0] == "metrics":
                        self.metrics.replay(message[1])
                    else:
                        self._on_message(message)
                    continue
            except (EOFError, OSError):
                # Everything the child sent has been read: it died or is dying. Give it a moment, not a busy loop.
                process.join(RELAY_INTERVAL_S)
            except Exception:
                self.metrics.inc("pipeline.errors", worker=f"{self._process_name}-relay")
                logger.exception("%s: unexpected error relaying its message; continuing", self.label)
                continue
            if process.is_alive():
                failures = 0
                continue
            if self._stopping.is_set():
                return
            self._on_down()
            failures += 1
            delay = min(RESTART_BACKOFF_S[1], RESTART_BACKOFF_S[0] * 2 ** (failures - 1))
            logger.error("%s died (exit %s); starting it again in %.0f s", self.label, process.exitcode, delay)
            if self._stopping.wait(delay):
                return
            try:
                self._spawn()
                self.restarts += 1
            except Exception:
                logger.exception("could not start the %s again", self.label)

    def _stop_child(self, timeout_s: float) -> None:
        """Ask the child to end within ``timeout_s``, wait for its last words, kill it if it does not end."""
        if self._process is None:
            return
        self._stopping.set()
        self.send(("stop", timeout_s))
        if self._supervisor is not None:
            self._supervisor.join(timeout_s + 5.0)
        self._process.join(5.0)
        if self._process.is_alive():
            logger.warning("%s did not stop; killing it", self.label)
            self._process.kill()
            self._process.join(5.0)
        with self._send_lock:
            for conn in (self._to_child, self._from_child):
                if conn is not None:
                    conn.close()
            self._to_child = None


def log_setup() -> tuple[int, str]:
    """The agent's log level and format, for a child to log like it (``child_setup``)."""
    return logging.getLogger().getEffectiveLevel(), current_format()
