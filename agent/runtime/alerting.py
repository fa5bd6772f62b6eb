"""The alert side of scoring: the engine's decisions published over MQTT, stored, and its state saved.

Owned by the scoring worker (one thread): the alert engine is pure and not thread-safe. Operator commands
are applied here too, between batches, and replied on the command result topic.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from agent.alerts.commands import CommandAuth
from agent.alerts.engine import AlertEngine, CommandError
from agent.alerts.homeassistant import Discovery
from agent.alerts.payload import IMAGE_KEY, alert_payload, machine_state_payload
from agent.alerts.store import AlertStateStore
from agent.metrics import Metrics
from agent.records import Alert, Message, SampleBlock, Source
from agent.runtime.batch import Verdict
from agent.runtime.worker import Broker, to_lines
from agent.statefile import StateStore
from agent.storage.points import alert_lines, command_lines, score_lines
from agent.topics import Topics

logger = logging.getLogger(__name__)

SAVE_WAIT_S = 10.0
TICK_INTERVAL_S = 0.5


class RawReleases(Protocol):
    """The raw-vibration policy's side an alert needs (``agent.storage.points.RawVibrationPolicy``, or a
    scoring process's relay to it: ``agent.runtime.scoring_process``): the held blocks to store for it."""

    def on_alert(self, source: Source) -> list[SampleBlock]: ...


class AlertOutput:
    """Runs the alert engine on verdicts and commands; publishes, and returns the lines to store."""

    def __init__(
        self,
        engine: AlertEngine,
        broker: Broker,
        topics: Topics,
        metrics: Metrics,
        raw_policy: RawReleases,
        store_raw: Callable[[Sequence[SampleBlock]], None],
        state_store: AlertStateStore | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
        auth: CommandAuth | None = None,
        discovery: Discovery | None = None,
    ) -> None:
        self.engine = engine
        self._discovery = discovery  # Home Assistant: a machine's entities announced before its first state
        self._auth = auth  # None: unsigned commands, no check (tests of the engine's side only)
        self._broker = broker
        self._topics = topics
        self._metrics = metrics
        self._raw = raw_policy
        self._store_raw = store_raw
        self._state_store = state_store
        self._saver: StateSaver | None = None
        self._last_tick_ns = -(2**63)
        self.clock_ns = clock_ns

    def restore(self) -> int:
        """Continue the open alert events of the previous run (before the worker starts); returns how many."""
        if self._state_store is None:
            return 0
        state = self._state_store.load()
        if state is None:
            return 0
        try:
            restored = self.engine.restore(state, self.clock_ns())
        except (ValueError, KeyError, TypeError) as exc:
            logger.error("alert state %s not restored: %s", self._state_store.path, exc)
            self._metrics.inc("alerts.state_errors", reason="restore")
            return 0
        self.publish_machine_states()
        logger.info("restored %d open alert event(s) from %s", restored, self._state_store.path)
        return restored

    def decide(self, verdict: Verdict, now_ns: int) -> list[str]:
        """Store the score, run the alert engine, publish what it decides; returns the lines to spool."""
        lines = to_lines(score_lines, verdict.score, self._metrics)
        if self._discovery is not None:  # Home Assistant's score sensors
            self._publish_retained(self._discovery.on_score(verdict.score, now_ns))
        defect = verdict.defect.as_dict() if verdict.defect is not None else None
        if defect is not None and verdict.evidence is not None:
            # Kept with the verdict the event shows, so that the alert names the image of its class.
            defect[IMAGE_KEY] = dict(verdict.evidence)
        for alert in self.engine.observe(
            verdict.score, now_ns, defect, verdict.top_features, alert_type=verdict.alert_type
        ):
            lines.extend(self.handle(alert))
        return lines

    def tick(self, now_ns: int) -> list[str]:
        """Time-driven decisions (stale sources, no data, re-notifications), at most every ``TICK_INTERVAL_S``:
        the engine's tick visits every tracked source, and batches of windows come far more often."""
        if now_ns - self._last_tick_ns < TICK_INTERVAL_S * 1e9:
            return []
        self._last_tick_ns = now_ns
        if self._discovery is not None:  # the last score of a machine that went quiet within the interval
            self._publish_retained(self._discovery.due(now_ns))
        lines: list[str] = []
        for alert in self.engine.tick(now_ns):
            lines.extend(self.handle(alert))
        return lines

    def handle(self, alert: Alert) -> list[str]:
        """Publish (unless silenced) and store one lifecycle message; a new event also releases raw vibration."""
        logger.info(
            "alert %s (%s) %s %s/%s %s: score %.3g, threshold %.3g (%s %s)%s",
            alert.state,
            alert.reason,
            alert.event_id[:8],
            alert.source.machine,
            alert.source.sensor,
            alert.severity,
            alert.score,
            alert.threshold,
            alert.model_id,
            alert.model_version,
            " [silenced]" if alert.silenced else "",
        )
        if alert.silenced:
            self._metrics.inc("alerts.silenced", state=alert.state)
        else:
            self._metrics.inc("alerts.published", state=alert.state)
            topic = self._topics.alerts(alert.source.machine, alert.source.sensor)
            self._broker.publish(topic, alert_payload(alert, self._topics.agent_id), qos=1, retain=False)
        if alert.state == "new" and alert.reason == "raised":
            # Raw vibration around the alert (storage.raw_vibration.mode = around_alerts).
            self._store_raw(self._raw.on_alert(alert.source))
        return to_lines(alert_lines, alert, self._metrics)

    def command(self, msg: Message) -> list[str]:
        """Apply one operator command; reply on the result topic and record it (accepted or not).

        Every command, whichever stage handles it (``extra_commands`` of the engine too), first passes
        ``CommandAuth.open``: the signature, the operator's allow-list and the replay window."""
        now_ns = self.clock_ns()
        body: object = None
        try:
            body = self._auth.open(msg.payload, now_ns) if self._auth is not None else json.loads(msg.payload)
            outcome = self.engine.command(body, now_ns)
        except (ValueError, CommandError) as exc:
            code, detail = (exc.code, exc.detail) if isinstance(exc, CommandError) else ("bad_json", str(exc))
            fields = body if isinstance(body, dict) else {}
            command, by = str(fields.get("command", ""))[:64], str(fields.get("by", ""))[:200]
            self._metrics.inc("commands.rejected", reason=code)
            logger.warning("operator command refused (%s): %s", code, detail)
            self._reply(command, by, False, f"{code}: {detail}", now_ns)
            # Tags only from what exists: a refused command must not create series (names it made up).
            machine = fields.get("machine")
            return command_lines(
                command if command in self.engine.command_names() else "",
                False,
                by,
                f"{code}: {detail}",
                machine if isinstance(machine, str) and machine in self.engine.machines else None,
                now_ns,
            )
        self._metrics.inc("commands.accepted", command=outcome.command)
        logger.info("operator command %s by %s: %s", outcome.command, outcome.by, outcome.detail)
        self._reply(outcome.command, outcome.by, True, outcome.detail, now_ns)
        machine = body.get("machine") if isinstance(body, dict) else None
        if outcome.alerts:
            machine = outcome.alerts[0].source.machine
        lines = command_lines(outcome.command, True, outcome.by, outcome.detail, machine, now_ns)
        for alert in outcome.alerts:
            lines.extend(self.handle(alert))
        return lines

    def _reply(self, command: str, by: str, accepted: bool, detail: str, now_ns: int) -> None:
        payload = self._topics.command_result_payload(command, by, accepted, detail, now_ns)
        self._broker.publish(self._topics.command_result, payload, qos=1, retain=False)

    def publish_machine_states(self) -> None:
        """The retained state of every machine whose alert state changed since the last call."""
        changed = self.engine.changed_machines
        if not changed:
            return
        now_ns = self.clock_ns()
        for machine in sorted(changed):
            if self._discovery is not None:
                self._publish_retained(self._discovery.for_machine(machine))
            state = self.engine.machine_state(machine, now_ns)
            payload = machine_state_payload(state, self._topics.agent_id, now_ns)
            self._broker.publish(self._topics.state(machine), payload, qos=1, retain=True)
        changed.clear()

    def _publish_retained(self, messages: Sequence[tuple[str, bytes]]) -> None:
        for topic, payload in messages:
            self._broker.publish(topic, payload, qos=1, retain=True)

    def save_state(self, wait: bool = False) -> None:
        """Save the engine's state if it changed: snapshot here, written (with its fsyncs) by a saver thread,
        so that the next batch of windows does not wait for the disk. ``wait``: return only once it is on
        disk (before operator commands are acknowledged to the broker, and at stop)."""
        if self._state_store is None:
            return
        if self.engine.dirty:
            self.engine.dirty = False
            if self._saver is None:
                self._saver = StateSaver(self._state_store, self._metrics)
            self._saver.submit(self.engine.to_state())
        if wait and self._saver is not None and not self._saver.flush(SAVE_WAIT_S):
            self.engine.dirty = True  # not on disk: submitted again with the next batch
            logger.error("alert state not saved to %s within %.0f s", self._state_store.path, SAVE_WAIT_S)

    def close(self) -> None:
        """Publish the scores still waiting for their interval, write the last state and end the saver thread
        (after the scoring worker stopped)."""
        if self._discovery is not None:
            self._publish_retained(self._discovery.due(self.clock_ns(), final=True))
        if self._saver is not None:
            self._saver.close(SAVE_WAIT_S)


class StateSaver:
    """Writes the latest submitted state from a thread of its own; older unwritten ones are skipped.

    Used for the alert state and for the commissioning baselines: ``count_failure`` counts a failed write
    (default: ``alerts.state_errors``), ``what`` names the state in the log."""

    def __init__(
        self,
        store: StateStore,
        metrics: Metrics,
        count_failure: Callable[[], None] | None = None,
        what: str = "alert state",
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._count_failure = count_failure or (lambda: metrics.inc("alerts.state_errors", reason="save"))
        self._what = what
        self._cond = threading.Condition()
        self._pending: dict[str, Any] | None = None
        self._submitted = 0
        self._saved = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"{what.replace(' ', '-')}-saver", daemon=True)
        self._thread.start()

    def submit(self, state: dict[str, Any]) -> None:
        with self._cond:
            self._pending = state
            self._submitted += 1
            self._cond.notify_all()

    def flush(self, timeout_s: float) -> bool:
        """Wait until everything submitted so far is on disk; False if not within ``timeout_s``."""
        with self._cond:
            target = self._submitted
            return self._cond.wait_for(lambda: self._saved >= target, timeout=timeout_s)

    def close(self, timeout_s: float) -> None:
        self.flush(timeout_s)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        delay = 0.0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                state, self._pending = self._pending, None
                number = self._submitted
            try:
                self._store.save(state)
            except OSError as exc:
                # The engine runs on from memory; this state is tried again unless a newer one arrives.
                self._count_failure()
                if delay == 0.0:  # logged when saving starts failing (a full disk), not at every retry
                    logger.error("%s not saved to %s, retrying: %s", self._what, self._store.path, exc)
                delay = min(max(delay * 2, 0.5), 30.0)
                with self._cond:
                    if self._pending is None:
                        self._pending = state
                    if self._cond.wait_for(lambda: self._closed, timeout=delay):
                        return
                continue
            if delay:
                logger.warning("%s saved to %s again", self._what, self._store.path)
            delay = 0.0
            with self._cond:
                self._saved = max(self._saved, number)
                self._cond.notify_all()
