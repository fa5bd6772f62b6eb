"""The composition root: the only module that builds concrete objects from the config and wires them.

It reads like the pipeline. ``build_agent(config)`` is the whole agent; its parts have their own builders
so that tests and benchmarks build exactly what the agent runs, replacing only the I/O they do not want
(a sink, the broker, the spool, the clock, the alert engine):

- ``build_models``: the anomaly models and the defect classifier (``inference.models[].type``), loaded,
  verified and warmed up before any connection, so a bad model stops the start with a clear error;
- ``build_stages``: the pure stages both workers share (windower, shaft speeds, baseline, defect stage);
- ``build_decoder``, ``build_inputs`` and ``build_ingest``: MQTT messages -> records -> spool -> windows (and
  camera images -> the image store, ``build_image_store``);
- ``build_scoring``: windows -> features -> models -> alert engine -> MQTT;
- ``build_sink``: the spool's destination (``storage.type``, ``agent.storage.registry``).

Concrete plugins are chosen through the registries of ``agent.decode``, ``agent.storage``,
``agent.features`` and ``agent.inference``; nothing else in the runtime names a concrete class.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import cast

from agent.adaptation.auto import AutoAdapter
from agent.adaptation.lora import LoraConfig
from agent.adaptation.serving import AdapterStore
from agent.alerts.engine import AlertEngine
from agent.alerts.homeassistant import Discovery
from agent.alerts.rules import RuleBook
from agent.alerts.store import AlertStateStore
from agent.commissioning.scorer import CommissioningScorer
from agent.commissioning.store import BaselineStore
from agent.config import Config
from agent.decode.base import Counted, DecodeLimits, Decoder, DecoderContext, HasPresence, Liveness
from agent.decode.fieldkeys import FieldKeys
from agent.decode.image import camera_template
from agent.decode.registry import build_decoder as registered_decoder
from agent.decode.routes import Routes
from agent.decode.topic import TopicTemplate
from agent.features.windows import Windower
from agent.health.server import build_health_server
from agent.images.store import ImageStore
from agent.inference.base import AnomalyModel, DefectClassifier
from agent.inference.kinds import model_class
from agent.inference.registry import ModelRegistry, default_builders
from agent.inference.router import CurrentClassifier, ModelRouter, ModelSlot
from agent.ingest.mqtt import MqttConnection
from agent.ingest.outbound import Outbound
from agent.ingest.settings import MqttSettings, MqttTls
from agent.ingest.shard import Shard, ShardFilter
from agent.metrics import Metrics
from agent.records import Message, Reading, SampleBlock, ScoringItem, Source
from agent.runtime.agent import Agent
from agent.runtime.alerting import AlertOutput, RawReleases
from agent.runtime.batch import BatchScorer
from agent.runtime.defect import DefectStage, ShaftSpeeds
from agent.runtime.ingest import IngestWorker, for_scoring
from agent.runtime.inspection import ImageClassifier, ImageLinks, InspectionStage, PendingImages
from agent.runtime.scoring import ScoringWorker
from agent.runtime.scoring_process import ScoringProcess, ScoringSide
from agent.runtime.worker import GATHER_S, Broker, DeadLetters, EntryLog, LineLog, MessageQueue, ScoringStage
from agent.spool.arrivals import ArrivalLog
from agent.spool.sqlite import Spool
from agent.storage.base import Sink
from agent.storage.points import RawVibrationPolicy
from agent.storage.process import WriterProcess, WriterSettings
from agent.storage.registry import build_sink as registered_sink
from agent.storage.selection import Selection
from agent.storage.sinks import SinkWriters, sinks_check
from agent.storage.writer import BacklogBudget, Writer
from agent.topics import Topics

logger = logging.getLogger(__name__)

COMMANDS_MAX = 1000
"""Operator commands waiting for the scoring worker: few and small."""


@dataclass(frozen=True)
class Models:
    """The loaded models: the anomaly router, the defect classifier, and the registry that keeps them current."""

    router: ModelRouter
    classifier: DefectClassifier | None
    registry: ModelRegistry | None
    images: ImageClassifier | None = None
    """The camera image classifier (``camera.model``), when camera images are taken in and scored."""


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
            routes.append((entry.sensors, registry.track(entry.model_id, entry.type)))
        else:
            assert entry.path is not None
            # The config allows only anomaly kinds here; their classes implement the protocol.
            model = cast(AnomalyModel, model_class(entry.type).load(entry.path, threads=inf.threads))
            metrics.set("models.loaded", 1, model=model.model_id, version=model.version)
            routes.append((entry.sensors, model))
    d = inf.defect
    classifier: DefectClassifier | None = None
    if d.model_id is not None:
        assert registry is not None
        classifier = CurrentClassifier(registry.track(d.model_id, d.type))
    elif d.path is not None:
        loaded = cast(DefectClassifier, model_class(d.type).load(d.path, threads=inf.threads))
        classifier = loaded
        metrics.set("models.loaded", 1, model=loaded.model_id, version=loaded.version)
    images: ImageClassifier | None = None
    cam = config.camera
    if cam.enabled and cam.model.path is not None:
        # Any model kind whose class has the image classifier's methods (agent.runtime.inspection).
        images = cast(ImageClassifier, model_class(cam.model.type).load(cam.model.path, threads=inf.threads))
        metrics.set("models.loaded", 1, model=images.model_id, version=images.version)
    return Models(ModelRouter(routes), classifier, registry, images)


def build_sink(config: Config) -> Sink:
    """The sink of ``storage.type`` (``agent.storage.registry``)."""
    return registered_sink(config.storage.type, config.storage)


FIELD_KEYS_FILE = "field_keys.json"
"""The field names each machine has used (``agent.decode.fieldkeys``), kept beside the spool."""


def build_field_keys(config: Config, path: Path | None = None, deferred: bool = False) -> FieldKeys:
    """The field names known per machine, bounded; kept in ``path`` (the agent's: beside the spool, saved by
    the ingest worker before each commit: ``deferred``) or, without one, in memory only."""
    m = config.mqtt
    return FieldKeys(m.max_field_keys_per_machine, m.max_field_keys, path, deferred=deferred)


def build_decoder(config: Config, field_keys: FieldKeys | None = None) -> Decoder:
    """The payload decoder of ``mqtt.decoder.type`` (``agent.decode.registry``) with ``field_keys`` (default:
    in memory only)."""
    m = config.mqtt
    context = DecoderContext(
        topic_template=TopicTemplate(m.topic_template),
        limits=DecodeLimits(
            max_payload_bytes=m.max_payload_bytes, max_future_s=m.max_future_s, max_fields=m.max_fields_per_message
        ),
        subscriptions=tuple(m.subscriptions),
        field_keys=field_keys or build_field_keys(config),
        outbound_base=Topics(config.agent.id, m.base_topic).base,
        options=m.decoder,
    )
    return registered_decoder(m.decoder.type, context)


def build_inputs(config: Config, main: Decoder) -> Decoder:
    """The main decoder alone, or with camera images taken in: the camera's decoder (``camera.decoder``) for
    the camera topics, then the main one for the rest (``agent.decode.routes``)."""
    cam = config.camera
    if not cam.enabled:
        return main
    m = config.mqtt
    context = DecoderContext(
        topic_template=camera_template(cam.topic_template),
        limits=DecodeLimits(max_payload_bytes=m.max_payload_bytes, max_future_s=m.max_future_s),
        outbound_base=Topics(config.agent.id, m.base_topic).base,
        options=cam,
    )
    return Routes([registered_decoder(cam.decoder, context), main])


def build_image_store(config: Config, metrics: Metrics) -> ImageStore | None:
    """The camera images' content-addressed store (``camera.store``; default: ``images/`` beside the spool)."""
    cam = config.camera
    if not cam.enabled:
        return None
    root = cam.store.dir or config.spool.path.parent / "images"
    return ImageStore(root, cam.store.max_bytes, cam.store.max_age_s, metrics)


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


@dataclass(frozen=True)
class Stages:
    """The pure stages both workers share: the ingest worker feeds them, the scoring worker reads them."""

    models: Models
    windower: Windower
    speeds: ShaftSpeeds
    baseline: CommissioningScorer | None
    defect: DefectStage | None
    raw_policy: RawVibrationPolicy
    inspection: InspectionStage | None = None

    def feed(self, items: Sequence[Reading | SampleBlock]) -> list[ScoringItem]:
        """What the ingest worker queues for scoring for these items (benchmarks drive scoring with it)."""
        out: list[ScoringItem] = []
        for item in items:
            if isinstance(item, Reading):
                self.speeds.observe(item)
            out.extend(for_scoring(item, self.windower, self.baseline))
        return out


def build_stages(config: Config, metrics: Metrics, models: Models | None = None) -> Stages:
    """Windower, shaft speeds, commissioning baseline and defect stage for ``models`` (built if not given)."""
    models = models or build_models(config, metrics)
    d = config.inference.defect
    speeds = ShaftSpeeds(d.speed_field, d.default_rpm)
    defect = None if models.classifier is None else DefectStage(models.classifier, d.sensors, speeds)
    c = config.commissioning
    baseline = None
    if c.enabled:
        store = BaselineStore(c.state_path or config.spool.path.parent / "commissioning_baselines.json")
        baseline = CommissioningScorer(
            c.to_commissioning_config(), c.sensors, c.channels, metrics, store, c.save_interval_s
        )
    raw = config.storage.raw_vibration
    cam = config.camera
    inspection = None
    if cam.enabled:
        host = f"[{config.health.host}]" if ":" in config.health.host else config.health.host
        inspection = InspectionStage(
            models.images,
            alert_type=cam.alert_type,
            min_confidence=cam.min_confidence,
            image_url=ImageLinks(cam.public_url, f"http://{host}:{config.health.port}"),
            pending=PendingImages(cam.max_pending_bytes),
            defect_classes=cam.defect_classes,
        )
    return Stages(
        models=models,
        windower=Windower(models.router.spec_for, metrics),
        speeds=speeds,
        baseline=baseline,
        defect=defect,
        raw_policy=RawVibrationPolicy(raw.mode, raw.every_n, raw.keep_blocks, config.spool.hold_s, raw.hold_max_bytes),
        inspection=inspection,
    )


def rulebook(config: Config) -> RuleBook:
    """The alert rules of ``alerts``; with camera images, their alert type without a rule of its own gets the
    default one without ``no_data`` events: a camera idle between parts is no dropout."""
    rules = config.alerts.rulebook()
    cam = config.camera
    if not cam.enabled or cam.alert_type in rules.by_type:
        return rules
    by_type = {**rules.by_type, cam.alert_type: dataclasses.replace(rules.default, no_data_after_s=0.0)}
    return dataclasses.replace(rules, by_type=by_type)


def build_scoring(
    config: Config,
    stages: Stages,
    metrics: Metrics,
    *,
    spool: LineLog,
    broker: Broker,
    windows: queue.Queue[ScoringItem] | None = None,
    commands: queue.Queue[Message] | None = None,
    store_raw: Callable[[Sequence[SampleBlock]], None] = lambda blocks: None,
    engine: AlertEngine | None = None,
    state_store: AlertStateStore | None = None,
    adaptation: tuple[AdapterStore | None, AutoAdapter | None] = (None, None),
    clock_ns: Callable[[], int] = time.time_ns,
    offline: Callable[[Source], bool] | None = None,
    raw_releases: RawReleases | None = None,
    gather_s: float = GATHER_S,
) -> ScoringWorker:
    """The scoring worker as the agent runs it; ``engine``, ``clock_ns`` and the I/O may be replaced.
    ``offline``: the decoder's word that a source went offline (``agent.decode.base.Liveness``);
    ``raw_releases``: what an alert's raw-data release asks (default: the stages' raw-vibration policy)."""
    adapters, auto_adapter = adaptation
    scorer = BatchScorer(
        metrics,
        defect=stages.defect,
        adapters=adapters,
        auto_adapter=auto_adapter,
        top_features=config.alerts.top_features,
    )
    commands_config = config.alerts.commands
    topics = Topics(config.agent.id, config.mqtt.base_topic)
    ha = config.homeassistant
    alerts = AlertOutput(
        engine=engine
        or AlertEngine(
            rulebook(config),
            metrics=metrics,
            silence_limits=commands_config.silence_limits(),
            offline=offline,
        ),
        broker=broker,
        topics=topics,
        metrics=metrics,
        raw_policy=stages.raw_policy if raw_releases is None else raw_releases,
        store_raw=store_raw,
        state_store=state_store,
        clock_ns=clock_ns,
        auth=commands_config.command_auth(config.agent.id, clock_ns()),
        discovery=Discovery(topics, ha.discovery_prefix, ha.scores_interval_s) if ha.enabled else None,
    )
    return ScoringWorker(
        windows=windows if windows is not None else queue.Queue(maxsize=config.queues.windows_max),
        router=stages.models.router,
        scorer=scorer,
        alerts=alerts,
        spool=spool,
        broker=broker,
        metrics=metrics,
        max_batch=config.inference.max_batch,
        baseline=stages.baseline,
        commands=commands,
        inspection=stages.inspection,
        gather_s=gather_s,
    )


def alert_state_store(config: Config) -> AlertStateStore:
    """Where the alert engine keeps its open events (``alerts.state_path``; default: beside the spool)."""
    return AlertStateStore(config.alerts.state_path or config.spool.path.parent / "alert_state.json")


def build_scoring_side(
    config: Config,
    metrics: Metrics,
    *,
    spool: LineLog,
    broker: Broker,
    raw_releases: RawReleases,
    windows: queue.Queue[ScoringItem],
    commands: queue.Queue[Message],
    offline: Callable[[Source], bool] | None = None,
) -> ScoringSide:
    """The scoring worker of a scoring process, as ``build_agent`` wires the thread: the same models, stages,
    adapters, alert state and baselines, with the agent's side (spool, broker, raw releases, the decoder's
    word on offline sources) over a pipe."""
    stages = build_stages(config, metrics)
    adaptation = build_adaptation(config, metrics)
    worker = build_scoring(
        config,
        stages,
        metrics,
        spool=spool,
        broker=broker,
        windows=windows,
        commands=commands,
        state_store=alert_state_store(config),
        adaptation=adaptation,
        raw_releases=raw_releases,
        offline=offline,
        gather_s=0.0,  # the agent's feeder gathered the batch already
    )
    return ScoringSide(worker, stages.speeds, stages.models.registry, adaptation[1])


def build_ingest(
    config: Config,
    stages: Stages,
    metrics: Metrics,
    *,
    messages: queue.Queue[Message],
    windows: queue.Queue[ScoringItem],
    spool: EntryLog,
    broker: Broker,
    decoder: Decoder | None = None,
    arrivals: ArrivalLog | None = None,
    dead_letters: DeadLetters | None = None,
    images: ImageStore | None = None,
    before_commit: Callable[[], None] | None = None,
) -> IngestWorker:
    """The ingest worker as the agent runs it; ``arrivals``: where redelivered messages without a device
    timestamp find their first arrival time (the spool); ``images``: where camera images are kept;
    ``before_commit``: called before each spool commit (saving the field names the batch brought)."""
    topics = Topics(config.agent.id, config.mqtt.base_topic)
    decoder = decoder or build_inputs(config, build_decoder(config))
    if config.mqtt.shard.count > 1:
        decoder = ShardFilter(decoder, build_shard(config), topics, metrics)
    return IngestWorker(
        messages=messages,
        windows=windows,
        decoder=decoder,
        spool=spool,
        raw_policy=stages.raw_policy,
        windower=stages.windower,
        broker=broker,
        topics=topics,
        metrics=metrics,
        put_timeout_s=config.queues.put_timeout_s,
        baseline=stages.baseline,
        speeds=stages.speeds,
        arrivals=arrivals,
        dead_letters=dead_letters,
        images=images,
        pending_images=stages.inspection.pending if stages.inspection is not None else None,
        before_commit=before_commit,
    )


def build_shard(config: Config) -> Shard:
    """This agent's share of the plant's machines (``mqtt.shard``)."""
    return Shard(config.mqtt.shard.index, config.mqtt.shard.count)


def build_mqtt(
    config: Config,
    topics: Topics,
    subscriptions: Sequence[str],
    on_message: Callable[[Message], None],
    metrics: Metrics,
    decoder: Decoder | None = None,
) -> MqttConnection:
    """The broker connection; a decoder with a ``presence`` (Sparkplug's STATE) gives it its availability
    topic and last will instead of the agent's ``status``."""
    m = config.mqtt
    tls = m.tls
    status_topic, status_payload = topics.status, topics.status_payload
    if isinstance(decoder, HasPresence):
        presence = decoder.presence()
        status_topic, status_payload = presence.topic, presence.payload
    return MqttConnection(
        MqttSettings(
            host=m.host,
            port=m.port,
            client_id=m.client_id or f"pdm-agent-{config.agent.id}",
            protocol=m.protocol,
            username=m.username,
            password=m.password,
            tls=MqttTls(
                ca_file=tls.ca_file,
                cert_file=tls.cert_file,
                key_file=tls.key_file,
                insecure_skip_verify=tls.insecure_skip_verify,
            )
            if tls.enabled
            else None,
            require_tls=m.require_tls,
            keepalive_s=m.keepalive_s,
            reconnect_min_s=m.reconnect_min_s,
            reconnect_max_s=m.reconnect_max_s,
            session_expiry_s=m.session_expiry_s,
            subscriptions=(*subscriptions, topics.commands),
            qos=m.qos,
            # Beside the spool, like the alert state: the agent's state directory.
            subscriptions_file=config.spool.path.parent / SUBSCRIPTIONS_FILE,
            silence_timeout_s=m.silence_timeout_s,
            status_topic=status_topic,
            online_payload=status_payload("online"),
            offline_payload=status_payload("offline"),
        ),
        on_message=on_message,
        metrics=metrics,
        status_payload=status_payload,
    )


SUBSCRIPTIONS_FILE = "mqtt_subscriptions.json"
"""The filters of the persistent MQTT session (``agent.ingest.remembered``), kept beside the spool."""

LOCAL_SINK = "local"
"""The spool cursor of the ``storage`` sink (the agent's own InfluxDB)."""


def build_spool(config: Config, metrics: Metrics) -> Spool:
    spool = config.spool
    return Spool(
        spool.path,
        max_bytes=spool.max_bytes,
        max_points=spool.max_points,
        drop_policy=spool.drop_policy,
        metrics=metrics,
        sinks=(LOCAL_SINK, *(u.name for u in config.storage.upstreams)),
        hold_s=spool.hold_s,
        reserve_bytes=spool.reserve_bytes,
        arrivals_max_age_s=spool.arrivals_max_age_s,
        arrivals_max_rows=spool.arrivals_max_rows,
    )


def build_writer(config: Config, spool: Spool, metrics: Metrics, *, sink: Sink | None = None) -> Writer:
    """The ``storage`` sink's writer: in its own process (``storage.writer_process``) or, with a sink
    object given (tests) or the option off, as threads of the agent."""
    storage = config.storage
    settings = WriterSettings(
        storage.batch_size,
        storage.flush_interval_s,
        storage.backoff_min_s,
        storage.backoff_max_s,
        raw_release_points_s=storage.raw_vibration.release_points_s,
        nice=storage.writer_nice,
    )
    if storage.writer_process and sink is None:
        return WriterProcess(spool, LOCAL_SINK, partial(build_sink, config), settings, metrics)
    return settings.writer(spool.cursor(LOCAL_SINK), sink or build_sink(config), metrics)


def build_upstream_writers(config: Config, spool: Spool, metrics: Metrics) -> dict[str, Writer]:
    """A writer per ``storage.upstreams`` entry, at its own cursor, with its selection, backlog caps and rate."""
    writers: dict[str, Writer] = {}
    for up in config.storage.upstreams:
        if up.max_backlog_bytes >= config.spool.max_bytes:
            logger.warning(
                "upstream %s: max_backlog_bytes %d is not below spool.max_bytes %d: the spool's own cap applies "
                "first and its drops are not counted per sink (docs/edge_cloud.md)",
                up.name,
                up.max_backlog_bytes,
                config.spool.max_bytes,
            )
        readings = up.select.readings
        settings = WriterSettings(
            up.batch_size,
            up.flush_interval_s,
            up.backoff_min_s,
            up.backoff_max_s,
            selection=Selection(
                kinds=frozenset(up.select.kinds),
                readings_interval_s={"none": None, "all": 0.0}.get(readings.mode, readings.interval_s),
                aggregates=tuple(readings.aggregates),
                grace_s=readings.grace_s,
                raw=up.select.raw_vibration,
            ),
            budget=BacklogBudget(up.max_backlog_bytes, up.max_backlog_age_s),
            rate_points_s=up.rate_limit_points_s,
            local_metrics=False,
            nice=up.writer_nice,
        )
        make_sink = partial(registered_sink, up.type, up)
        if up.writer_process:
            writers[up.name] = WriterProcess(spool, up.name, make_sink, settings, metrics)
        else:
            writers[up.name] = settings.writer(spool.cursor(up.name), make_sink(), metrics)
    return writers


def build_agent(config: Config, metrics: Metrics | None = None, *, sink: Sink | None = None) -> Agent:
    """Wire the whole agent from a validated config. No connection is made until ``Agent.start``."""
    metrics = metrics or Metrics()
    stages = build_stages(config, metrics)
    topics = Topics(config.agent.id, config.mqtt.base_topic)
    field_keys = build_field_keys(config, config.spool.path.parent / FIELD_KEYS_FILE, deferred=True)
    main_decoder = build_decoder(config, field_keys)
    decoder = build_inputs(config, main_decoder)  # with camera images: routed by topic
    images = build_image_store(config, metrics)

    messages = MessageQueue(config.queues.messages_max, config.queues.messages_max_bytes)
    # Windows for the models and process readings for the commissioning baselines, in arrival order.
    windows: queue.Queue[ScoringItem] = queue.Queue(maxsize=config.queues.windows_max)
    commands: queue.Queue[Message] = queue.Queue(maxsize=COMMANDS_MAX)

    def enqueue(message: Message) -> None:
        # Runs on paho's network thread: only enqueue. A full queue blocks it, which stops reading from
        # the socket, so the broker holds further messages (backpressure, counted).
        if message.topic == topics.commands:
            commands.put(message)
            return
        if messages.full():
            metrics.inc("ingest.backpressure_waits")
        messages.put(message)

    mqtt = build_mqtt(config, topics, decoder.subscriptions(), enqueue, metrics, main_decoder)
    if isinstance(main_decoder, Counted):
        for event in main_decoder.counts:
            metrics.set_function("decode.events", partial(main_decoder.counts.get, event, 0), event=event)
    # Everything the workers publish goes through the outbound queues (alerts first, dead letters rate-limited).
    outbound = Outbound(mqtt, topics, config.mqtt.outbound, metrics)
    spool = build_spool(config, metrics)
    writer: Writer = build_writer(config, spool, metrics, sink=sink)
    upstreams = build_upstream_writers(config, spool, metrics)
    if upstreams:
        writer = SinkWriters({LOCAL_SINK: writer, **upstreams})
    scoring_process = config.agent.scoring_process
    if scoring_process and config.camera.enabled:
        # What the scoring process cannot take yet is refused, not run half-way (docs/dataplane.md).
        raise ValueError("agent.scoring_process does not work with camera.enabled yet; switch one of them off")
    # The scoring process builds its own adapters (with their trainer); the agent's process then has none.
    adaptation = (None, None) if scoring_process else build_adaptation(config, metrics)
    ingest = build_ingest(
        config,
        stages,
        metrics,
        messages=messages,
        windows=windows,
        spool=spool,
        broker=outbound,
        decoder=decoder,
        arrivals=spool,
        dead_letters=outbound,
        before_commit=field_keys.flush,
        images=images,
    )
    scoring: ScoringStage
    if scoring_process:
        scoring = ScoringProcess(
            config,
            windows=windows,
            commands=commands,
            speeds=stages.speeds,
            sink=ingest,  # the scoring process's points go into the ingest thread's next transaction
            raw=stages.raw_policy,
            broker=outbound,
            metrics=metrics,
            build_side=build_scoring_side,
            liveness=main_decoder if isinstance(main_decoder, Liveness) else None,
        )
    else:
        scoring = build_scoring(
            config,
            stages,
            metrics,
            spool=ingest,  # the scoring thread's points go into the ingest thread's next transaction
            broker=outbound,
            windows=windows,
            commands=commands,
            store_raw=ingest.store_raw,
            state_store=alert_state_store(config),
            adaptation=adaptation,
            offline=main_decoder.offline if isinstance(main_decoder, Liveness) else None,
        )
    router = stages.models.router
    health = build_health_server(
        config,
        metrics,
        readiness={
            "mqtt": lambda: mqtt.is_connected,
            "models": lambda: len(router.models) == len(config.inference.models),
            "spool": spool.check_writable,
            **(
                {"sinks": sinks_check(spool.backlogs, {u.name: u.ready_max_lag_s for u in config.storage.upstreams})}
                if upstreams
                else {}
            ),
        },
        liveness={"ingest": ingest.is_alive, "scoring": scoring.is_alive, "writer": lambda: writer.alive},
        images=images,
    )
    if stages.inspection is not None and isinstance(stages.inspection.image_url, ImageLinks):
        stages.inspection.image_url.server = health  # its bound port, known at start
        if health is None and not config.camera.public_url:
            logger.warning(
                "camera images are stored but not served: health.enabled is false, so the URLs in the alerts "
                "(%s) answer nothing; enable health or set camera.public_url",
                stages.inspection.image_url("{sha256}"),
            )
    return Agent(
        config=config,
        metrics=metrics,
        topics=topics,
        mqtt=mqtt,
        outbound=outbound,
        spool=spool,
        writer=writer,
        ingest=ingest,
        scoring=scoring,
        router=router,
        registry=stages.models.registry,
        health=health,
        auto_adapter=adaptation[1],
    )
