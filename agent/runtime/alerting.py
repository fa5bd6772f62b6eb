"""The alert side of scoring: the engine's decisions published over MQTT, stored, and its state saved.

Owned by the scoring worker (one thread): the alert engine is pure and not thread-safe. Operator commands
are applied here too, between batches, and replied on the command result topic.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence

from agent.alerts.engine import AlertEngine, CommandError
from agent.alerts.payload import alert_payload, machine_state_payload
from agent.alerts.store import AlertStateStore
from agent.metrics import Metrics
from agent.records import Alert, Message
from agent.runtime.batch import Verdict
from agent.runtime.worker import Broker, to_lines
from agent.storage.points import RawVibrationPolicy, alert_lines, command_lines, score_lines
from agent.topics import Topics

logger = logging.getLogger(__name__)


class AlertOutput:
    """Runs the alert engine on verdicts and commands; publishes, and returns the lines to store."""

    def __init__(
        self,
        engine: AlertEngine,
        broker: Broker,
        topics: Topics,
        metrics: Metrics,
        raw_policy: RawVibrationPolicy,
        store_raw: Callable[[Sequence[int]], None],
        state_store: AlertStateStore | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.engine = engine
        self._broker = broker
        self._topics = topics
        self._metrics = metrics
        self._raw = raw_policy
        self._store_raw = store_raw
        self._state_store = state_store
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
        defect = verdict.defect.as_dict() if verdict.defect is not None else None
        for alert in self.engine.observe(verdict.score, now_ns, defect, verdict.top_features):
            lines.extend(self.handle(alert))
        return lines

    def tick(self, now_ns: int) -> list[str]:
        """Time-driven decisions (stale sources, no data, re-notifications)."""
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
        """Apply one operator command; reply on the result topic and record it (accepted or not)."""
        now_ns = self.clock_ns()
        body: object = None
        try:
            body = json.loads(msg.payload)
            outcome = self.engine.command(body, now_ns)
        except (ValueError, CommandError) as exc:
            code, detail = (exc.code, exc.detail) if isinstance(exc, CommandError) else ("bad_json", str(exc))
            fields = body if isinstance(body, dict) else {}
            command, by = str(fields.get("command", "")), str(fields.get("by", ""))
            self._metrics.inc("commands.rejected", reason=code)
            logger.warning("operator command refused (%s): %s", code, detail)
            self._reply(command, by, False, f"{code}: {detail}", now_ns)
            machine = fields.get("machine")
            return command_lines(
                command, False, by, f"{code}: {detail}", machine if isinstance(machine, str) else None, now_ns
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
            state = self.engine.machine_state(machine, now_ns)
            payload = machine_state_payload(state, self._topics.agent_id, now_ns)
            self._broker.publish(self._topics.state(machine), payload, qos=1, retain=True)
        changed.clear()

    def save_state(self) -> None:
        """Save the engine's state if it changed (before commands are acknowledged to the broker)."""
        if self._state_store is None or not self.engine.dirty:
            return
        try:
            self._state_store.save(self.engine.to_state())
        except OSError as exc:
            # The engine keeps running from memory; the next step tries again (dirty stays set).
            self.engine.dirty = True
            self._metrics.inc("alerts.state_errors", reason="save")
            logger.error("alert state not saved to %s: %s", self._state_store.path, exc)
