"""The composition root: the only module that builds concrete objects from the config and wires them.

``build_agent(config)`` reads like the pipeline: MQTT -> ingest -> spool -> InfluxDB writer, and
windows -> features -> inference -> alerts. Models are loaded, verified and warmed up here, before any
connection is made, so a bad model stops the start with a clear error instead of failing later.
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from types import FrameType

from agent import schema
from agent.adaptation.auto import AutoAdapter
from agent.adaptation.lora import LoraConfig
from agent.adaptation.serving import AdapterStore
from agent.alerts.engine import AlertEngine
from agent.alerts.store import AlertStateStore
from agent.commissioning.scorer import CommissioningScorer
from agent.config import Config
from agent.decode.json_v1 import DecodeLimits
from agent.decode.topic import TopicTemplate
from agent.features.windows import Windower
from agent.health.selfmetrics import agent_fields
from agent.health.server import HealthServer, build_health_server
from agent.inference.classifier import OnnxDefectClassifier
from agent.inference.model import OnnxAnomalyModel
from agent.inference.registry import CurrentClassifier, ModelRegistry, default_builders
from agent.inference.router import AnomalyModel, ModelRouter, ModelSlot
from agent.ingest.mqtt import MqttConnection, MqttSettings, MqttTls
from agent.metrics import Metrics
from agent.pipeline import DefectStage, IngestWorker, ScoringWorker, ShaftSpeeds
from agent.records import Message, Reading, Window
from agent.spool.sqlite import Spool
from agent.storage.line_protocol import format_point
from agent.storage.points import RawVibrationPolicy
from agent.storage.sinks import InfluxV1Sink, InfluxV2Sink
from agent.storage.writer import SpoolWriter
from agent.topics import Topics

logger = logging.getLogger(__name__)


@dataclass
class Agent:
    """A built agent. ``start`` connects and starts the threads; ``stop`` drains and flushes them."""

    config: Config
    metrics: Metrics
    topics: Topics
    mqtt: MqttConnection
    spool: Spool
    writer: SpoolWriter
    ingest: IngestWorker
    scoring: ScoringWorker
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
        if self.health is not None:
            self.health.start()  # first: a port in use stops the start before any thread runs
        self.scoring.restore()
        if self.auto_adapter is not None:
            self.auto_adapter.start()
        self.writer.start()
        self.scoring.start()
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
        self.mqtt.stop()
        self.writer.stop(budget)
        self.spool.close()
        if self.health is not None:
            self.health.stop()
        logger.info("agent %s stopped: %s", self.config.agent.id, self.summary())

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
        """Counters on the retained heartbeat topic and as an ``agent`` point in InfluxDB."""
        snap = self.summary()
        now_ns = time.time_ns()
        body = {"v": 1, "agent_id": self.config.agent.id, "time_ns": now_ns, "counters": snap}
        self.mqtt.publish(self.topics.heartbeat, json.dumps(body).encode(), qos=1, retain=True)
        fields = agent_fields(self.metrics.collect())
        if fields and not self.spool.closed:
            self.spool.append([format_point(schema.AGENT, {schema.TAG_AGENT_ID: self.config.agent.id}, fields, now_ns)])

    def _heartbeat_loop(self) -> None:
        while not self._stopped.wait(self.config.agent.heartbeat_s):
            try:
                self.publish_heartbeat()
            except Exception:
                logger.exception("heartbeat failed")


@dataclass(frozen=True)
class Models:
    """The loaded models: the anomaly router, the defect classifier, and the registry that keeps them current."""

    router: ModelRouter
    classifier: OnnxDefectClassifier | CurrentClassifier | None
    registry: ModelRegistry | None


def load_models(config: Config) -> ModelRouter:
    """Load, verify (sha256, feature spec hash) and warm up every configured anomaly model."""
    return build_models(config, Metrics()).router


def build_models(config: Config, metrics: Metrics) -> Models:
    """Load, verify and warm up every configured model: pinned ``path`` entries, and ``model_id`` entries
    through the registry of ``inference.models_dir`` (newest usable version). Raises ``ModelError``."""
    inf = config.inference
    registry = None
    if inf.models_dir is not None:
        registry = ModelRegistry(inf.models_dir, metrics, default_builders(inf.threads))
    routes: list[tuple[tuple[str, ...], AnomalyModel | ModelSlot[AnomalyModel]]] = []
    for entry in inf.models:
        if entry.model_id is not None:
            assert registry is not None  # the config requires models_dir for model_id entries
            routes.append((entry.sensors, registry.track(entry.model_id, "anomaly")))
        else:
            assert entry.path is not None
            model = OnnxAnomalyModel.load(entry.path, threads=inf.threads)
            metrics.set("models.loaded", 1, model=model.model_id, version=model.version)
            routes.append((entry.sensors, model))
    d = inf.defect
    classifier: OnnxDefectClassifier | CurrentClassifier | None = None
    if d.model_id is not None:
        assert registry is not None
        classifier = CurrentClassifier(registry.track(d.model_id, "classifier"))
    elif d.path is not None:
        classifier = OnnxDefectClassifier.load(d.path, threads=inf.threads)
        metrics.set("models.loaded", 1, model=classifier.model_id, version=classifier.version)
    return Models(ModelRouter(routes), classifier, registry)


def build_sink(config: Config) -> InfluxV1Sink | InfluxV2Sink:
    s = config.storage
    if s.api == "v1":
        sink = InfluxV1Sink(
            url=s.url,
            database=s.v1.database,
            retention_policy=s.v1.retention_policy,
            username=s.v1.username,
            password=s.v1.password,
            timeout_s=s.timeout_s,
            create_database=s.v1.create_database,
        )
        if s.v1.create_database:
            try:
                sink.create_database()
            except Exception as exc:
                # The database may be down at start: the spool holds the data, and the sink creates the
                # database when a write finds it missing.
                logger.warning("could not create database %s now (%s); will create it on write", s.v1.database, exc)
        return sink
    return InfluxV2Sink(url=s.url, org=s.v2.org, bucket=s.v2.bucket, token=s.v2.token, timeout_s=s.timeout_s)


def build_adaptation(config: Config, metrics: Metrics) -> tuple[AdapterStore | None, AutoAdapter | None]:
    """The per-machine adapter store and, with ``adaptation.auto``, the trainer that fills it."""
    a = config.adaptation
    if not a.enabled:
        return None, None
    root = a.dir or config.spool.path.parent / "adapters"
    store = AdapterStore(root, metrics, reload_interval_s=a.reload_interval_s, threads=config.inference.threads)
    if not a.auto.enabled:
        return store, None
    lora = LoraConfig(
        rank=a.auto.rank,
        alpha=a.auto.alpha,
        layers=a.auto.layers or None,
        refit_standardization=a.auto.refit_standardization,
    )
    auto = AutoAdapter(store, metrics, a.auto.windows, a.auto.min_anomalous_fraction, lora, a.auto.models)
    return store, auto


def build_agent(config: Config, metrics: Metrics | None = None) -> Agent:
    """Wire the whole agent from a validated config. No connection is made until ``Agent.start``."""
    metrics = metrics or Metrics()
    models = build_models(config, metrics)
    router = models.router
    template = TopicTemplate(config.mqtt.topic_template)
    topics = Topics(config.agent.id, config.mqtt.base_topic)

    messages: queue.Queue[Message] = queue.Queue(maxsize=config.queues.messages_max)
    # Windows for the models and process readings for the commissioning baselines, in arrival order.
    windows: queue.Queue[Window | Reading] = queue.Queue(maxsize=config.queues.windows_max)
    d = config.inference.defect
    speeds = ShaftSpeeds(d.speed_field, d.default_rpm)
    defect = None if models.classifier is None else DefectStage(models.classifier, d.sensors, speeds)
    c = config.commissioning
    baseline = CommissioningScorer(c.to_commissioning_config(), c.sensors, c.channels, metrics) if c.enabled else None

    # Operator commands to the alert engine: few, small, applied by the scoring worker between batches.
    commands: queue.Queue[Message] = queue.Queue(maxsize=1000)

    def enqueue(message: Message) -> None:
        # Runs on paho's network thread: only enqueue. A full queue blocks it, which stops reading from
        # the socket, so the broker holds further messages (backpressure, counted).
        if message.topic == topics.commands:
            commands.put(message)
            return
        if messages.full():
            metrics.inc("ingest.backpressure_waits")
        messages.put(message)

    mqtt = MqttConnection(
        MqttSettings(
            host=config.mqtt.host,
            port=config.mqtt.port,
            client_id=config.mqtt.client_id or f"pdm-agent-{config.agent.id}",
            protocol=config.mqtt.protocol,
            username=config.mqtt.username,
            password=config.mqtt.password,
            tls=MqttTls(
                ca_file=config.mqtt.tls.ca_file,
                cert_file=config.mqtt.tls.cert_file,
                key_file=config.mqtt.tls.key_file,
                insecure_skip_verify=config.mqtt.tls.insecure_skip_verify,
            )
            if config.mqtt.tls.enabled
            else None,
            require_tls=config.mqtt.require_tls,
            keepalive_s=config.mqtt.keepalive_s,
            reconnect_min_s=config.mqtt.reconnect_min_s,
            reconnect_max_s=config.mqtt.reconnect_max_s,
            session_expiry_s=config.mqtt.session_expiry_s,
            subscriptions=(*(config.mqtt.subscriptions or (template.subscription(),)), topics.commands),
            qos=config.mqtt.qos,
            silence_timeout_s=config.mqtt.silence_timeout_s,
            status_topic=topics.status,
            online_payload=topics.status_payload("online"),
            offline_payload=topics.status_payload("offline"),
        ),
        on_message=enqueue,
        metrics=metrics,
        status_payload=topics.status_payload,
    )

    spool = Spool(config.spool.path, config.spool.max_rows, config.spool.drop_policy, metrics)
    writer = SpoolWriter(
        spool,
        build_sink(config),
        metrics,
        batch_size=config.storage.batch_size,
        flush_interval_s=config.storage.flush_interval_s,
        backoff_min_s=config.storage.backoff_min_s,
        backoff_max_s=config.storage.backoff_max_s,
    )
    adapters, auto_adapter = build_adaptation(config, metrics)
    raw = config.storage.raw_vibration
    raw_policy = RawVibrationPolicy(raw.mode, raw.every_n, raw.keep_blocks)
    ingest = IngestWorker(
        messages=messages,
        windows=windows,
        template=template,
        limits=DecodeLimits(max_payload_bytes=config.mqtt.max_payload_bytes, max_future_s=config.mqtt.max_future_s),
        spool=spool,
        raw_policy=raw_policy,
        windower=Windower(router.spec_for, metrics),
        broker=mqtt,
        topics=topics,
        metrics=metrics,
        put_timeout_s=config.queues.put_timeout_s,
        baseline=baseline,
        speeds=speeds,
    )
    scoring = ScoringWorker(
        windows=windows,
        router=router,
        engine=AlertEngine(config.alerts.rulebook(), metrics=metrics),
        commands=commands,
        state_store=AlertStateStore(config.alerts.state_path or config.spool.path.parent / "alert_state.json"),
        top_features=config.alerts.top_features,
        adapters=adapters,
        auto_adapter=auto_adapter,
        spool=spool,
        broker=mqtt,
        topics=topics,
        metrics=metrics,
        max_batch=config.inference.max_batch,
        raw_policy=raw_policy,
        store_raw=ingest.store_raw,
        baseline=baseline,
        defect=defect,
    )
    health = build_health_server(
        config,
        metrics,
        readiness={
            "mqtt": lambda: mqtt.is_connected,
            "models": lambda: len(router.models) == len(config.inference.models),
            "spool": spool.check_writable,
        },
        liveness={"ingest": ingest.is_alive, "scoring": scoring.is_alive, "writer": lambda: writer.alive},
    )
    return Agent(
        config=config,
        metrics=metrics,
        topics=topics,
        mqtt=mqtt,
        spool=spool,
        writer=writer,
        ingest=ingest,
        scoring=scoring,
        router=router,
        registry=models.registry,
        health=health,
        auto_adapter=auto_adapter,
    )
