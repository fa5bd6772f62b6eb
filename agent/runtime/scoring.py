"""The scoring worker: windows ready together are scored in one run per model, then alerts are decided.

Process readings in the queue go to the per-machine commissioning baselines (one step each). Operator
commands (acknowledge, silence, rebaseline) arrive on their own queue and are applied between batches; the
engine's state is saved after every step that changed it, and the baselines after each phase change and
every ``commissioning.save_interval_s`` (by saver threads: the next batch does not wait for the disk), both
on disk before the commands are acknowledged to the broker.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from agent.alerts.engine import CommandError, CommandOutcome
from agent.commissioning.scorer import CommissioningScorer
from agent.inference.base import AnomalyModel
from agent.inference.router import ModelRouter
from agent.metrics import Metrics
from agent.records import ImageFrame, Message, Reading, ScoringItem, Window
from agent.runtime.alerting import SAVE_WAIT_S, AlertOutput, StateSaver
from agent.runtime.batch import BatchScorer, Verdict
from agent.runtime.inspection import InspectionStage
from agent.runtime.worker import GATHER_S, POLL_S, Broker, LineLog, Worker, drain, drain_gathered
from agent.spool.codec import Entry, encode_lines

logger = logging.getLogger(__name__)

DECIDE_CHUNK = 32
"""Windows of one model scored per model run before their alerts are decided (ONNX's per-run overhead is
small at this size: ``docs/benchmarks.md``, batch 1 vs 32)."""
IMAGE_CHUNK = 16
"""Camera images classified per model run before their alerts are decided: a convolution over 16 frames
already amortises the run's overhead, and the image model is warmed up at this batch size."""


class ScoringWorker(Worker):
    """See the module docstring. ``restore`` before ``start`` continues the previous run's open events."""

    def __init__(
        self,
        windows: queue.Queue[ScoringItem],
        router: ModelRouter,
        scorer: BatchScorer,
        alerts: AlertOutput,
        spool: LineLog,
        broker: Broker,
        metrics: Metrics,
        max_batch: int,
        baseline: CommissioningScorer | None = None,
        commands: queue.Queue[Message] | None = None,
        inspection: InspectionStage | None = None,
        gather_s: float = GATHER_S,
    ) -> None:
        super().__init__("scoring", metrics)
        self._gather_s = gather_s
        self._inspection = inspection
        self._windows = windows
        self._router = router
        self._scorer = scorer
        self.alerts = alerts
        self._spool = spool
        self._broker = broker
        self._max_batch = max_batch
        self._baseline = baseline
        self._commands = commands
        self._baseline_saver: StateSaver | None = None
        self.on_processed: Callable[[int], None] | None = None
        """Called with the size of each batch once it is scored and its products handed on (the scoring
        process reports it to the agent: ``agent.runtime.scoring_process``)."""
        if baseline is not None:
            alerts.engine.extra_commands["rebaseline"] = self._rebaseline

    def restore(self) -> int:
        """Continue the previous run's baselines and open alert events; returns the number of events."""
        if self._baseline is not None:
            self._baseline.restore()
        return self.alerts.restore()

    def step(self) -> None:
        # Windows gather for ``gather_s`` when fewer than a batch are queued (``agent.runtime.worker.GATHER_S``).
        self.process(drain_gathered(self._windows, POLL_S, self._max_batch, self._gather_s))

    def finish(self) -> None:
        while batch := drain(self._windows, 0, self._max_batch):
            self.process(batch)
        self.process([])
        self.alerts.save_state(wait=True)
        self.alerts.close()
        self._save_baselines(wait=True, force=True)
        if self._baseline_saver is not None:
            self._baseline_saver.close(SAVE_WAIT_S)

    def process(self, batch: Sequence[ScoringItem]) -> None:
        commands = drain(self._commands, 0, 100) if self._commands is not None else []
        lines: list[str] = []
        entries: list[Entry] = []
        for msg in commands:
            lines.extend(self.alerts.command(msg))
        groups: dict[int, tuple[AnomalyModel, list[Window]]] = {}
        frames: list[ImageFrame] = []
        for item in batch:
            if isinstance(item, ImageFrame):
                frames.append(item)
                continue
            if isinstance(item, Reading):
                lines.extend(self._baseline_step(item))
                continue
            model = self._router.model_for(item.source)
            if model is None:
                self._metrics.inc("windows.unassigned")
                continue
            groups.setdefault(id(model), (model, []))[1].append(item)
        for model, windows in groups.values():
            # In chunks: an alert is decided (and published) after its chunk, not after a whole backlog.
            for start in range(0, len(windows), DECIDE_CHUNK):
                scored = self._scorer.score(model, windows[start : start + DECIDE_CHUNK])
                lines.extend(scored.lines)
                entries.extend(scored.entries)
                now_ns = self.alerts.clock_ns()
                for verdict in scored.verdicts:
                    lines.extend(self.alerts.decide(verdict, now_ns))
        lines.extend(self._inspect(frames))
        lines.extend(self.alerts.tick(self.alerts.clock_ns()))
        if lines:
            entries.append(encode_lines(lines))
        if entries:
            self._spool.append_entries(entries)
        self.alerts.publish_machine_states()
        self.alerts.save_state(wait=bool(commands))
        self._save_baselines(wait=bool(commands), force=bool(commands))  # a rebaseline: on disk before its ack
        for msg in commands:
            if msg.qos > 0:
                self._broker.ack(msg.mid, msg.qos)
        if batch and self.on_processed is not None:
            self.on_processed(len(batch))

    def _inspect(self, frames: Sequence[ImageFrame]) -> list[str]:
        """Camera images through the inspection stage, in chunks like the windows, then the alert engine."""
        if not frames:
            return []
        if self._inspection is None:
            self._metrics.inc("images.unscored", len(frames), reason="no_model")
            return []
        lines: list[str] = []
        for start in range(0, len(frames), IMAGE_CHUNK):
            chunk = frames[start : start + IMAGE_CHUNK]
            try:
                verdicts, inspected = self._inspection.inspect(chunk, self._metrics)
            finally:
                self._inspection.pending.give_back(sum(f.gray.nbytes for f in chunk))
            lines.extend(inspected)
            now_ns = self.alerts.clock_ns()
            for verdict in verdicts:
                lines.extend(self.alerts.decide(verdict, now_ns))
        return lines

    def _baseline_step(self, reading: Reading) -> list[str]:
        if self._baseline is None:
            return []
        score = self._baseline.score(reading)
        return [] if score is None else self.alerts.decide(Verdict(score), self.alerts.clock_ns())

    def _save_baselines(self, wait: bool, force: bool = False) -> None:
        """Hand the baselines to their saver thread when a save is due; ``wait``: until they are on disk."""
        if self._baseline is None or self._baseline.store is None:
            return
        document = self._baseline.snapshot(force=force)
        if document is not None:
            if self._baseline_saver is None:
                metrics = self._metrics
                self._baseline_saver = StateSaver(
                    self._baseline.store,
                    metrics,
                    count_failure=lambda: metrics.inc("commissioning.state_errors", reason="save"),
                    what="commissioning baselines",
                )
            self._baseline_saver.submit(document)
        if wait and self._baseline_saver is not None and not self._baseline_saver.flush(SAVE_WAIT_S):
            logger.error(
                "commissioning baselines not saved to %s within %.0f s", self._baseline.store.path, SAVE_WAIT_S
            )

    def _rebaseline(self, body: Mapping[str, Any], by: str, now_ns: int) -> CommandOutcome:
        """``{"command": "rebaseline", "machine": ..., ["sensor": ...,] "by": ...}``: the operator's explicit
        order to discard a machine's commissioning baseline and learn its normal again from its next readings
        (the only way a fitted baseline is ever replaced)."""
        assert self._baseline is not None
        machine, sensor = body.get("machine"), body.get("sensor")
        if not isinstance(machine, str) or not machine:
            raise CommandError(
                "missing_field" if machine is None else "bad_value", "machine must be a non-empty string"
            )
        if sensor is not None and (not isinstance(sensor, str) or not sensor):
            raise CommandError("bad_value", "sensor must be a non-empty string")
        reset = self._baseline.rebaseline(machine, sensor)
        scope = machine if sensor is None else f"{machine}/{sensor}"
        if not reset:
            raise CommandError("unknown_machine", f"no commissioning baseline for {scope}")
        logger.warning("commissioning baseline(s) of %s discarded by %s; commissioning anew", scope, by)
        sensors = ", ".join(sorted(source.sensor for source in reset))
        return CommandOutcome("rebaseline", by, f"baseline of {scope} ({sensors}) discarded; commissioning anew")
