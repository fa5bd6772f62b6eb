"""The two pipeline workers that move records between the stages.

```
MQTT thread --Message--> [messages queue] --> IngestWorker: topic -> decode -> spool (durable) -> ack
                                                   |                      (dead letter on bad input)
                                                   +--Window--> [windows queue] --> ScoringWorker:
                                                        features -> model (one batch) -> alert engine
                                                        -> MQTT alert; features, scores, alerts -> spool
MQTT thread --operator command--> [commands queue] --> ScoringWorker: alert engine -> reply, state file
spool --> SpoolWriter thread --> InfluxDB
```
Each worker is one thread that owns the pure, non-thread-safe objects it uses (windower, alert engine).
Queues are bounded; waits and drops are counted.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, cast

import numpy as np

from agent.adaptation.auto import AutoAdapter
from agent.adaptation.serving import AdaptableModel, AdapterStore, adapter_id
from agent.alerts.engine import AlertEngine, CommandError
from agent.alerts.payload import alert_payload, machine_state_payload
from agent.alerts.store import AlertStateStore
from agent.commissioning.scorer import CommissioningScorer
from agent.decode.errors import DecodeError
from agent.decode.json_v1 import DecodeLimits, decode
from agent.decode.topic import TopicTemplate
from agent.features.bearing import extract_bearing_matrix
from agent.features.extract import extract_matrix
from agent.features.windows import Windower
from agent.inference.classifier import DefectPrediction
from agent.inference.router import AnomalyModel, ModelRouter
from agent.metrics import Metrics
from agent.records import Alert, FeatureVector, Message, Reading, SampleBlock, Score, Source, Window
from agent.spool.sqlite import Spool
from agent.storage.points import (
    RawVibrationPolicy,
    alert_lines,
    block_lines,
    command_lines,
    defect_lines,
    feature_lines,
    reading_lines,
    score_lines,
)
from agent.topics import Topics

logger = logging.getLogger(__name__)

_POLL_S = 0.2
T = TypeVar("T")


class Broker(Protocol):
    """The MQTT side the workers need; ``agent.ingest.mqtt.MqttConnection`` provides it (thread-safe)."""

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> object: ...

    def ack(self, mid: int, qos: int) -> None: ...


def to_lines(encode: Callable[[T], list[str]], record: T, metrics: Metrics) -> list[str]:
    """Line-protocol lines of one record; a record InfluxDB cannot hold is counted and logged, not raised."""
    try:
        return encode(record)
    except ValueError as exc:
        metrics.inc("storage.unencodable", kind=type(record).__name__)
        logger.warning("%s not stored: %s", type(record).__name__, exc)
        return []


def drain(q: queue.Queue, first_timeout_s: float, limit: int) -> list:
    """Wait up to ``first_timeout_s`` for one item, then take whatever else is ready, up to ``limit``."""
    try:
        items = [q.get(timeout=first_timeout_s)]
    except queue.Empty:
        return []
    while len(items) < limit:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            break
    return items


class ShaftSpeeds:
    """Latest shaft speed per machine, from a field of its process readings (the defect classifier needs it).

    Written by the ingest worker, read by the scoring worker: single dict assignments and lookups are
    atomic in CPython, and a reader seeing the previous speed for one window is harmless.
    """

    def __init__(self, speed_field: str, default_rpm: float | None) -> None:
        self._field = speed_field
        self._default = default_rpm
        self._rpm: dict[str, float] = {}

    def observe(self, reading: Reading) -> None:
        value = reading.fields.get(self._field)
        if value is not None and value > 0:
            self._rpm[reading.source.machine] = float(value)

    def rpm(self, machine: str) -> float | None:
        return self._rpm.get(machine, self._default)


class DefectClassifier(Protocol):
    """``agent.inference.classifier.OnnxDefectClassifier``; called from the scoring worker only."""

    @property
    def model_id(self) -> str: ...

    @property
    def version(self) -> str: ...

    def classify(self, windows: Sequence[Window], rpm: Sequence[float]) -> list[DefectPrediction]: ...


@dataclass(frozen=True)
class DefectStage:
    """Which anomalous windows get a defect class, and with what speed."""

    classifier: DefectClassifier
    sensors: tuple[str, ...]
    speeds: ShaftSpeeds

    def handles(self, source: Source) -> bool:
        return any(fnmatch.fnmatchcase(source.sensor, p) for p in self.sensors)


class _Worker(threading.Thread):
    """A daemon thread that runs ``step`` until stopped, then ``finish`` to drain its input."""

    def __init__(self, name: str, metrics: Metrics) -> None:
        super().__init__(name=name, daemon=True)
        self._stop_event = threading.Event()
        self._metrics = metrics

    def stop(self, timeout_s: float) -> None:
        self._stop_event.set()
        self.join(timeout_s)
        if self.is_alive():
            logger.warning("%s did not stop within %.1f s", self.name, timeout_s)

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.step()
            except Exception:
                # A bug in one batch must not kill the pipeline; the batch is lost to processing only,
                # never to storage (unacknowledged messages are redelivered by the broker).
                self._metrics.inc("pipeline.errors", worker=self.name)
                logger.exception("%s: unexpected error; continuing", self.name)
                time.sleep(_POLL_S)
        try:
            self.finish()
        except Exception:
            logger.exception("%s: error while draining at stop", self.name)

    def step(self) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Process what is still queued (called once, after stop)."""


class IngestWorker(_Worker):
    """Decodes messages, makes their readings durable in the spool, acknowledges, and builds windows."""

    def __init__(
        self,
        messages: queue.Queue[Message],
        windows: queue.Queue[Window | Reading],
        template: TopicTemplate,
        limits: DecodeLimits,
        spool: Spool,
        raw_policy: RawVibrationPolicy,
        windower: Windower,
        broker: Broker,
        topics: Topics,
        metrics: Metrics,
        put_timeout_s: float,
        baseline: CommissioningScorer | None = None,
        speeds: ShaftSpeeds | None = None,
        batch_max: int = 500,
    ) -> None:
        super().__init__("ingest", metrics)
        self._baseline = baseline
        self._speeds = speeds
        self._raw_released: deque[SampleBlock] = deque()
        self._messages = messages
        self._windows = windows
        self._template = template
        self._limits = limits
        self._spool = spool
        self._raw = raw_policy
        self._windower = windower
        self._broker = broker
        self._topics = topics
        self._metrics = metrics
        self._put_timeout_s = put_timeout_s
        self._batch_max = batch_max

    def store_raw(self, blocks: Sequence[SampleBlock]) -> None:
        """Raw blocks released by an alert (called from the scoring thread; stored with the next batch).

        Formatting thousands of sample lines would delay the next alerts if the scoring thread did it.
        """
        self._raw_released.extend(blocks)

    def step(self) -> None:
        batch = drain(self._messages, _POLL_S, self._batch_max)
        if batch or self._raw_released:
            self.process(batch)

    def finish(self) -> None:
        while batch := drain(self._messages, 0, self._batch_max):
            self.process(batch)
        if self._raw_released:
            self.process([])

    def process(self, batch: Sequence[Message]) -> None:
        lines: list[str] = []
        decoded: list[Reading | SampleBlock] = []
        for msg in batch:
            self._metrics.inc("ingest.messages")
            try:
                source = self._template.match(msg.topic)
                items = decode(source, msg.payload, msg.received_ns, self._limits)
            except DecodeError as exc:
                self._reject(msg, exc)
                continue
            for item in items:
                if isinstance(item, Reading):
                    lines.extend(to_lines(reading_lines, item, self._metrics))
                    self._metrics.inc("ingest.readings")
                    if self._speeds is not None:
                        self._speeds.observe(item)
                else:
                    self._metrics.inc("ingest.blocks")
                    self._metrics.inc("ingest.samples", len(item.samples))
                    for block in self._raw.decide(item):
                        lines.extend(to_lines(block_lines, block, self._metrics))
            decoded.extend(items)
        # Windows go to scoring before the spool commit: alerts do not wait for the disk, and scoring a
        # reading that is not yet durable is harmless (the acknowledgement below still waits for it).
        # Once the scoring queue has stayed full for put_timeout_s, the rest of this batch does not wait again.
        wait_s = self._put_timeout_s
        for item in decoded:
            for window in self._windower.add(item):
                wait_s = self._put(window, wait_s)
            if self._baseline is not None and isinstance(item, Reading) and self._baseline.handles(item.source):
                wait_s = self._put(item, wait_s)
        while self._raw_released:
            lines.extend(to_lines(block_lines, self._raw_released.popleft(), self._metrics))
        if lines:
            self._append_durably(lines)
        # Acknowledge only now: every reading of these messages is on disk (or the message was rejected
        # and reported on the dead-letter topic).
        for msg in batch:
            if msg.qos > 0:
                self._broker.ack(msg.mid, msg.qos)

    def _append_durably(self, lines: list[str]) -> None:
        delay = _POLL_S
        while True:
            try:
                self._spool.append(lines)
                return
            except Exception:
                # Disk full or locked: do not acknowledge, keep trying; the broker keeps the messages.
                self._metrics.inc("spool.append_failures")
                logger.exception("spool append failed; retrying in %.1f s", delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)

    def _reject(self, msg: Message, exc: DecodeError) -> None:
        self._metrics.inc("decode.errors", reason=exc.code)
        logger.warning("rejected message on %s: %s (%s)", msg.topic, exc.detail, exc.code)
        payload = self._topics.deadletter_payload(msg.topic, exc.code, exc.detail, msg.payload)
        self._broker.publish(self._topics.deadletter, payload, qos=1, retain=False)

    def _put(self, item: Window | Reading, wait_s: float) -> float:
        """Queue an item for scoring; returns how long the next put of this batch may wait."""
        try:
            self._windows.put(item, timeout=wait_s) if wait_s > 0 else self._windows.put_nowait(item)
            self._metrics.inc("windows.queued")
            return wait_s
        except queue.Full:
            # Explicit, counted drop: scoring is behind; the readings themselves are stored.
            self._metrics.inc("windows.dropped", reason="queue_full")
            logger.warning("scoring queue full; %s of %s dropped", type(item).__name__, item.source)
            return 0.0


class ScoringWorker(_Worker):
    """Scores the windows that are ready together, one model run per model, and runs the alert engine.

    Process readings in the queue go to the per-machine commissioning baselines (one step each). Operator
    commands (acknowledge, silence) arrive on their own queue and are applied between batches; the engine's
    state is saved after every step that changed it, before the commands are acknowledged to the broker.
    """

    def __init__(
        self,
        windows: queue.Queue[Window | Reading],
        router: ModelRouter,
        engine: AlertEngine,
        spool: Spool,
        broker: Broker,
        topics: Topics,
        metrics: Metrics,
        max_batch: int,
        raw_policy: RawVibrationPolicy,
        store_raw: Callable[[Sequence[SampleBlock]], None],
        baseline: CommissioningScorer | None = None,
        defect: DefectStage | None = None,
        commands: queue.Queue[Message] | None = None,
        state_store: AlertStateStore | None = None,
        top_features: int = 5,
        adapters: AdapterStore | None = None,
        auto_adapter: AutoAdapter | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        super().__init__("scoring", metrics)
        self._baseline = baseline
        self._defect = defect
        self._windows = windows
        self._router = router
        self._engine = engine
        self._commands = commands
        self._state_store = state_store
        self._top_features = top_features
        self._adapters = adapters
        self._auto = auto_adapter
        self._spool = spool
        self._broker = broker
        self._topics = topics
        self._metrics = metrics
        self._max_batch = max_batch
        self._raw = raw_policy
        self._store_raw = store_raw
        self._clock_ns = clock_ns

    def restore(self) -> int:
        """Continue the open alert events of the previous run (call before ``start``); returns how many."""
        if self._state_store is None:
            return 0
        state = self._state_store.load()
        if state is None:
            return 0
        try:
            restored = self._engine.restore(state, self._clock_ns())
        except (ValueError, KeyError, TypeError) as exc:
            logger.error("alert state %s not restored: %s", self._state_store.path, exc)
            self._metrics.inc("alerts.state_errors", reason="restore")
            return 0
        self._publish_machine_states()
        logger.info("restored %d open alert event(s) from %s", restored, self._state_store.path)
        return restored

    def step(self) -> None:
        batch = drain(self._windows, _POLL_S, self._max_batch)
        self.process(batch)

    def finish(self) -> None:
        while batch := drain(self._windows, 0, self._max_batch):
            self.process(batch)
        self.process([])

    def process(self, batch: Sequence[Window | Reading]) -> None:
        commands = drain(self._commands, 0, 100) if self._commands is not None else []
        lines: list[str] = []
        for msg in commands:
            lines.extend(self._command(msg))
        groups: dict[int, tuple[AnomalyModel, list[Window]]] = {}
        for window in batch:
            if isinstance(window, Reading):
                lines.extend(self._score_step(window))
                continue
            model = self._router.model_for(window.source)
            if model is None:
                self._metrics.inc("windows.unassigned")
                continue
            groups.setdefault(id(model), (model, []))[1].append(window)
        for model, windows in groups.values():
            lines.extend(self._score(model, windows))
        for alert in self._engine.tick(self._clock_ns()):
            lines.extend(self._handle_alert(alert))
        if lines:
            self._spool.append(lines)
        self._publish_machine_states()
        self._save_state()
        for msg in commands:
            if msg.qos > 0:
                self._broker.ack(msg.mid, msg.qos)

    def _score(self, model: AnomalyModel, windows: list[Window]) -> list[str]:
        x = extract_matrix(model.spec, windows)
        finite = np.isfinite(x).all(axis=1)
        if not finite.all():
            self._metrics.inc("windows.rejected", int((~finite).sum()), reason="non_finite_features")
            windows = [w for w, ok in zip(windows, finite, strict=True) if ok]
            x = x[finite]
        if not windows:
            return []
        t0 = time.perf_counter()
        scores, thresholds, adapters = self._run_model(model, windows, x)
        elapsed = time.perf_counter() - t0
        self._metrics.inc("inference.runs", model=model.model_id)
        self._metrics.inc("windows.scored", len(windows), model=model.model_id)
        self._metrics.set("inference.last_batch_ms", elapsed * 1e3, model=model.model_id)
        self._metrics.set("inference.last_batch_size", len(windows), model=model.model_id)
        self._metrics.observe("inference.seconds", elapsed, model=model.model_id)
        self._metrics.observe("inference.window_seconds", elapsed / len(windows), model=model.model_id)
        names = model.spec.feature_names()
        spec_hash = model.spec.spec_hash()
        lines: list[str] = []
        now_ns = self._clock_ns()
        defects = self._classify(windows, scores, thresholds)
        explained = self._explain(model, names, x, scores, [a is None for a in adapters])
        for i, (window, row, value) in enumerate(zip(windows, x, scores, strict=True)):
            score = Score(
                source=window.source,
                start_ns=window.start_ns,
                end_ns=window.end_ns,
                model_id=model.model_id,
                model_version=model.version,
                score=float(value),
                threshold=float(thresholds[i]),
                adapter=adapters[i],
            )
            fv = FeatureVector(window=window, names=names, values=row, spec_hash=spec_hash)
            lines.extend(to_lines(lambda f: feature_lines(f, model.model_id, model.version), fv, self._metrics))
            defect = defects.get(i)
            if defect is not None:
                lines.extend(self._defect_lines(window, defect))
            lines.extend(self._decide(score, now_ns, defect, explained.get(i, ())))
        return lines

    def _run_model(
        self, model: AnomalyModel, windows: Sequence[Window], x: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        """Scores, thresholds and adapter of each window: the model itself for machines without an adapter
        (unchanged, in one run), each adapted machine's adapter and threshold for the others."""
        n = len(windows)
        thresholds = np.full(n, model.threshold, dtype=np.float64)
        adapters: list[str | None] = [None] * n
        store = self._adapters
        if store is None or getattr(model, "directory", None) is None:
            return model.score(x), thresholds, adapters
        adaptable = cast(AdaptableModel, model)
        store.refresh(adaptable)
        by_machine: dict[str, list[int]] = {}
        for i, window in enumerate(windows):
            by_machine.setdefault(window.source.machine, []).append(i)
        plain = [i for m, rows in by_machine.items() if store.adapter_for(adaptable, m) is None for i in rows]
        if len(plain) == n:
            scores = model.score(x)
        else:
            scores = np.empty(n, dtype=np.float32)
            if plain:
                scores[plain] = model.score(x[plain])
            for machine, rows in by_machine.items():
                manifest = store.adapter_for(adaptable, machine)
                if manifest is None:
                    continue
                try:
                    scores[rows] = store.score(adaptable, machine, x[rows])
                except Exception:
                    # A broken adapter costs its machine the adaptation, not the batch: the base scores it.
                    self._metrics.inc("adapters.errors", model=model.model_id)
                    logger.exception("adapter of machine %s failed; scored by the base model", machine)
                    scores[rows] = model.score(x[rows])
                    continue
                if manifest.threshold is not None:
                    thresholds[rows] = manifest.threshold
                name = adapter_id(manifest)
                for i in rows:
                    adapters[i] = name
        if self._auto is not None:
            for machine, rows in by_machine.items():
                if adapters[rows[0]] is None:
                    self._auto.observe(adaptable, machine, x[rows], scores[rows] > model.threshold)
        return scores, thresholds, adapters

    def _explain(
        self,
        model: AnomalyModel,
        names: Sequence[str],
        x: np.ndarray,
        scores: np.ndarray,
        explainable: Sequence[bool],
    ) -> dict[int, tuple[tuple[str, float], ...]]:
        """Top contributing features of the anomalous windows scored by the base model (``explain``)."""
        explain = getattr(model, "explain", None)
        hot = np.flatnonzero((scores > model.threshold) & np.asarray(explainable, dtype=bool))
        if explain is None or not len(hot) or not self._top_features:
            return {}
        try:
            contributions = np.asarray(explain(x[hot]), dtype=np.float64)
        except ValueError as exc:
            self._metrics.inc("alerts.unexplained", model=model.model_id)
            logger.debug("no top features for %s: %s", model.model_id, exc)
            return {}
        out: dict[int, tuple[tuple[str, float], ...]] = {}
        for i, row in zip(hot.tolist(), contributions, strict=True):
            top = np.argsort(-row, kind="stable")[: self._top_features]
            out[i] = tuple((names[k], round(float(row[k]), 4)) for k in top)
        return out

    def _classify(
        self, windows: list[Window], scores: np.ndarray, thresholds: np.ndarray
    ) -> dict[int, DefectPrediction]:
        """Defect class of each anomalous window of a classified sensor whose machine speed is known."""
        stage = self._defect
        if stage is None:
            return {}
        chosen: list[int] = []
        rpms: list[float] = []
        for i, (window, score, threshold) in enumerate(zip(windows, scores, thresholds, strict=True)):
            if score <= threshold or not stage.handles(window.source):
                continue
            rpm = stage.speeds.rpm(window.source.machine)
            if rpm is None:
                self._metrics.inc("defect.skipped", reason="unknown_speed")
                continue
            chosen.append(i)
            rpms.append(rpm)
        if not chosen:
            return {}
        try:
            predictions = self._predict(stage.classifier, [windows[i] for i in chosen], rpms)
        except ValueError as exc:
            # E.g. a sampling rate too low for the classifier's bands: the anomaly still alerts, unclassified.
            self._metrics.inc("defect.skipped", len(chosen), reason="unusable_window")
            logger.warning("defect classification skipped: %s", exc)
            return {}
        self._metrics.inc("defect.classified", len(chosen))
        return dict(zip(chosen, predictions, strict=True))

    def _predict(
        self, classifier: DefectClassifier, windows: list[Window], rpms: list[float]
    ) -> list[DefectPrediction]:
        """The classifier's verdicts: through a machine's classifier adapter where it has one."""
        store = self._adapters
        current = getattr(classifier, "current", None)
        if store is None or current is None:
            return classifier.classify(windows, rpms)
        model = current()
        store.refresh(model)
        adapted: dict[str, list[int]] = {}
        for i, window in enumerate(windows):
            if store.adapter_for(model, window.source.machine) is not None:
                adapted.setdefault(window.source.machine, []).append(i)
        if not adapted:
            return model.classify(windows, rpms)
        out: list[DefectPrediction | None] = [None] * len(windows)
        plain = [i for i, window in enumerate(windows) if window.source.machine not in adapted]
        if plain:
            predictions = model.classify([windows[i] for i in plain], [rpms[i] for i in plain])
            for i, prediction in zip(plain, predictions, strict=True):
                out[i] = prediction
        names = model.class_names
        for machine, rows in adapted.items():
            x = extract_bearing_matrix(model.spec, [windows[i] for i in rows], [rpms[i] for i in rows])
            for i, p in zip(rows, store.run(model, machine, x, "probabilities"), strict=True):
                out[i] = DefectPrediction(names[int(p.argmax())], float(p.max()), names, p.copy())
        return [p for p in out if p is not None]

    def _defect_lines(self, window: Window, prediction: DefectPrediction) -> list[str]:
        assert self._defect is not None
        clf = self._defect.classifier
        probabilities = prediction.as_dict()["probabilities"]
        return to_lines(
            lambda w: defect_lines(w, clf.model_id, clf.version, prediction.class_name, probabilities),
            window,
            self._metrics,
        )

    def _score_step(self, reading: Reading) -> list[str]:
        if self._baseline is None:
            return []
        score = self._baseline.score(reading)
        return [] if score is None else self._decide(score, self._clock_ns())

    def _decide(
        self,
        score: Score,
        now_ns: int,
        defect: DefectPrediction | None = None,
        top_features: Sequence[tuple[str, float]] = (),
    ) -> list[str]:
        """Store the score, run the alert engine, publish what it decides; returns the lines to spool."""
        lines = to_lines(score_lines, score, self._metrics)
        verdict = defect.as_dict() if defect is not None else None
        for alert in self._engine.observe(score, now_ns, verdict, top_features):
            lines.extend(self._handle_alert(alert))
        return lines

    def _handle_alert(self, alert: Alert) -> list[str]:
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

    def _command(self, msg: Message) -> list[str]:
        """Apply one operator command; reply on the result topic and record it (accepted or not)."""
        now_ns = self._clock_ns()
        body: object = None
        try:
            body = json.loads(msg.payload)
            outcome = self._engine.command(body, now_ns)
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
            lines.extend(self._handle_alert(alert))
        return lines

    def _reply(self, command: str, by: str, accepted: bool, detail: str, now_ns: int) -> None:
        payload = self._topics.command_result_payload(command, by, accepted, detail, now_ns)
        self._broker.publish(self._topics.command_result, payload, qos=1, retain=False)

    def _publish_machine_states(self) -> None:
        changed = self._engine.changed_machines
        if not changed:
            return
        now_ns = self._clock_ns()
        for machine in sorted(changed):
            state = self._engine.machine_state(machine, now_ns)
            payload = machine_state_payload(state, self._topics.agent_id, now_ns)
            self._broker.publish(self._topics.state(machine), payload, qos=1, retain=True)
        changed.clear()

    def _save_state(self) -> None:
        if self._state_store is None or not self._engine.dirty:
            return
        try:
            self._state_store.save(self._engine.to_state())
        except OSError as exc:
            # The engine keeps running from memory; the next step tries again (dirty stays set).
            self._engine.dirty = True
            self._metrics.inc("alerts.state_errors", reason="save")
            logger.error("alert state not saved to %s: %s", self._state_store.path, exc)
