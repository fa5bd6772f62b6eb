"""A built agent's lifecycle: start the threads in order, stop them in pipeline order, heartbeat.

``agent.bootstrap.build_agent`` builds it; ``pdm-agent run`` calls ``run_until_signal``.
"""

from __future__ import annotations

import gc
import logging
import signal
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass, field
from types import FrameType

from threadpoolctl import threadpool_limits

from agent import schema
from agent.adaptation.auto import AutoAdapter
from agent.config import Config
from agent.health.selfmetrics import agent_fields
from agent.health.server import HealthServer
from agent.inference.registry import ModelRegistry
from agent.inference.router import ModelRouter
from agent.ingest.mqtt import MqttConnection
from agent.ingest.outbound import Outbound
from agent.logs import counters_line
from agent.metrics import Metrics
from agent.runtime.ingest import IngestWorker
from agent.runtime.worker import ScoringStage
from agent.spool.sqlite import Spool, SpoolNotWritable
from agent.storage.line_protocol import format_point
from agent.storage.writer import Writer
from agent.topics import Topics

logger = logging.getLogger(__name__)


@dataclass
class Agent:
    """A built agent. ``start`` connects and starts the threads; ``stop`` drains and flushes them."""

    config: Config
    metrics: Metrics
    topics: Topics
    mqtt: MqttConnection
    outbound: Outbound
    """What the workers and the heartbeat publish: priority queues in front of ``mqtt``."""
    spool: Spool
    writer: Writer
    ingest: IngestWorker
    scoring: ScoringStage
    """The scoring thread, or the scoring process (``agent.scoring_process``)."""
    router: ModelRouter
    _stopped: threading.Event = field(default_factory=threading.Event)
    _stop_requested: threading.Event = field(default_factory=threading.Event)
    _heartbeat: threading.Thread | None = None
    registry: ModelRegistry | None = None
    """The model registry (``inference.models_dir``), whose watcher swaps in new model versions."""
    health: HealthServer | None = None
    """HTTP ``/healthz``, ``/readyz`` and ``/metrics`` (``health`` section)."""
    auto_adapter: AutoAdapter | None = None
    """Trains per-machine adapters at the end of commissioning (``adaptation.auto``), on its own thread."""

    def start(self) -> None:
        sys.setswitchinterval(self.config.agent.switch_interval_ms / 1000)  # process-wide; see its description
        if self.health is not None:
            self.health.start()  # first: a port in use stops the start before any thread runs
        self.scoring.restore()
        if self.auto_adapter is not None:
            self.auto_adapter.start()
        # What is built by now (modules, config, models, restored state) lives as long as the agent: out of the
        # cyclic collector's sight, so that its full collections, which stop every thread, scan only what the
        # running agent makes (docs/dataplane.md, "Who gets the CPU"); ``stop`` hands them back.
        gc.freeze()
        # numpy's matrix products here are small (a batch of windows); OpenBLAS would run them on a second
        # thread, which takes CPU that ingest and scoring wait for when the box is busy (docs/dataplane.md).
        threadpool_limits(1, user_api="blas")
        self.spool.start()
        self.writer.start()
        self.scoring.start()
        self.outbound.start()
        self.ingest.start()
        self.mqtt.start()
        if self.registry is not None:
            self.registry.start(self.config.inference.reload_interval_s)
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._heartbeat.start()
        logger.info(
            "agent %s started: models %s",
            self.config.agent.id,
            ", ".join(f"{m.model_id} {m.version}" for m in self.router.models) or "none",
        )

    def request_stop(self) -> None:
        """Ask ``run_until_signal`` to return (thread-safe)."""
        self._stop_requested.set()

    def stop(self) -> None:
        """Stop in pipeline order so that whatever was accepted is stored before the process exits."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        budget = self.config.agent.shutdown_timeout_s
        self.ingest.stop(budget)
        self.scoring.stop(budget)
        if self.registry is not None:
            self.registry.stop(budget)
        if self.auto_adapter is not None:
            self.auto_adapter.stop(budget)
        if self._heartbeat is not None:
            self._heartbeat.join(budget)
        self.publish_heartbeat()
        self.outbound.stop(budget)  # the final heartbeat and what else is waiting, confirmed by the broker
        self.mqtt.stop()
        self.writer.stop(budget)
        self.spool.close()
        if self.health is not None:
            self.health.stop()
        gc.unfreeze()  # what this agent built can be collected again (a process may build another one: tests)
        logger.info("agent %s stopped: %s", self.config.agent.id, counters_line(self.summary()))

    def run_until_signal(self) -> None:
        """Run until SIGINT or SIGTERM, then stop gracefully."""

        def handler(signum: int, _frame: FrameType | None) -> None:
            logger.info("received %s, stopping", signal.Signals(signum).name)
            self._stop_requested.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        self.start()
        self._stop_requested.wait()
        self.stop()

    def summary(self) -> dict[str, float]:
        snap = self.metrics.snapshot()
        snap["spool.depth"] = self.spool.depth()
        return snap

    def publish_heartbeat(self) -> None:
        """Counters on the retained heartbeat topic and as an ``agent`` point in InfluxDB.

        Both carry the same flat snake_case ``fields`` (``decode_errors``, ``decode_errors_reason_json``,
        ``spool_depth``). Heartbeat version 1 also had ``counters``, the same values keyed
        ``decode.errors{reason=json}`` (``agent.health.selfmetrics.series_field`` maps such a key to its
        field; docs/contracts.md)."""
        now_ns = time.time_ns()
        fields = agent_fields(self.metrics.collect())
        self.outbound.publish(self.topics.heartbeat, self.topics.heartbeat_payload(fields, now_ns), qos=1, retain=True)
        if fields and not self.spool.closed:
            tags = {schema.TAG_AGENT_ID: self.config.agent.id}
            try:
                self.spool.append_lines([format_point(schema.AGENT, tags, fields, now_ns)])
            except (SpoolNotWritable, sqlite3.Error, OSError):
                # A full disk: the spool said so once; this sample of the agent's own metrics is skipped.
                self.metrics.inc("spool.append_failures")

    def _heartbeat_loop(self) -> None:
        while not self._stopped.wait(self.config.agent.heartbeat_s):
            try:
                self.publish_heartbeat()
            except Exception:
                logger.exception("heartbeat failed")
