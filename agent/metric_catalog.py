"""Every metric of the agent, declared once: dotted name, kind, help text, labels, base units.

``agent.metrics.Metrics`` builds one prometheus_client object per entry; a new metric is a new line in
``CATALOG``, next to the others of its stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeAlias

Kind: TypeAlias = Literal["counter", "gauge", "histogram"]

PREFIX = "pdm_"

LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""Upper bounds (seconds) of the histogram buckets: from 10 µs (one window through a tiny model) to a
minute (an InfluxDB write that ends in a timeout)."""


def prometheus_name(dotted: str) -> str:
    """The Prometheus name of a dotted metric name, without the ``_total`` the library adds to counters.

    >>> prometheus_name("spool.oldest_age_s"), prometheus_name("decode.errors")
    ('pdm_spool_oldest_age_seconds', 'pdm_decode_errors')
    """
    name = PREFIX + dotted.replace(".", "_")
    return name[: -len("_s")] + "_seconds" if name.endswith("_s") else name


@dataclass(frozen=True)
class MetricSpec:
    """One declared metric: what the stages call it, what Prometheus calls it, and what it means."""

    name: str
    """Dotted, as the stages call it; units in the name (``_s``, ``_seconds``, ``_bytes``)."""
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    initial: float = 0.0
    """Value of an unlabelled gauge from the start, before anything sets it."""
    buckets: tuple[float, ...] = LATENCY_BUCKETS_S
    """Upper bounds of a histogram's buckets."""

    def __post_init__(self) -> None:
        if self.name.endswith(("_ms", "_milliseconds", "_us", "_kb", "_mb")):
            raise ValueError(f"metric {self.name}: declare it in base units (seconds, bytes)")
        if not self.help.strip():
            raise ValueError(f"metric {self.name}: no help text")
        if list(self.buckets) != sorted(set(self.buckets)) or not self.buckets:
            raise ValueError(f"metric {self.name}: buckets must be strictly increasing and not empty")

    @property
    def prometheus_name(self) -> str:
        """The family name on ``/metrics``: ``pdm_decode_errors_total``, ``pdm_inference_seconds``."""
        base = prometheus_name(self.name)
        return base + "_total" if self.kind == "counter" else base


def _counter(name: str, help: str, *labels: str) -> MetricSpec:
    return MetricSpec(name, "counter", help, labels)


def _gauge(name: str, help: str, *labels: str, initial: float = 0.0) -> MetricSpec:
    return MetricSpec(name, "gauge", help, labels, initial=initial)


def _histogram(name: str, help: str, *labels: str) -> MetricSpec:
    return MetricSpec(name, "histogram", help, labels)


CATALOG: tuple[MetricSpec, ...] = (
    # ingest and decoding
    _counter("ingest.messages", "MQTT messages taken by the ingest worker."),
    _counter("ingest.readings", "Readings decoded from accepted messages."),
    _counter(
        "ingest.not_owned",
        "Readings and blocks left to another agent of the fleet (mqtt.shard): machines this agent does not own.",
    ),
    _counter("ingest.blocks", "Sample blocks (vibration) decoded from accepted messages."),
    _counter("ingest.samples", "Samples in the decoded blocks."),
    _counter("ingest.backpressure_waits", "Times the MQTT thread waited on a full message queue (backpressure)."),
    _counter("ingest.redelivered", "Messages the broker redelivered (MQTT DUP flag), e.g. after a restart."),
    _counter(
        "ingest.arrival_restored",
        "Redelivered messages without a device timestamp decoded with their first arrival time (not a second point).",
    ),
    _counter(
        "decode.errors",
        "Rejected messages, by reason (each one goes to the dead-letter topic, alone or in a summary).",
        "reason",
    ),
    _gauge(
        "decode.events",
        "Protocol events a stateful decoder counted since start (Sparkplug B: births, node_deaths, "
        "device_deaths, stale_deaths, seq_gaps, seq_late, rebirths_requested, nulls, transient, metrics_rejected, "
        "state_restored).",
        "event",
    ),
    # spool
    _counter("spool.appended", "Points stored durably in the local spool (readings, samples, features, scores ...)."),
    _counter("spool.acked", "Spooled points every sink has confirmed, removed from the spool."),
    _counter(
        "spool.dropped",
        "Points dropped because the spool was full (its caps in points or bytes), by drop policy.",
        "policy",
    ),
    _counter(
        "spool.dropped_bytes", "Bytes of spool rows dropped because the spool was full, by drop policy.", "policy"
    ),
    _counter("spool.dead_lettered", "Points a sink rejected, moved to the spool's dead-letter table."),
    _counter("spool.dead_letter_trimmed", "Oldest dead letters removed because the dead-letter table was full."),
    _counter("spool.arrivals_pruned", "Arrival records of messages without a device timestamp pruned (age, count)."),
    _counter("spool.append_failures", "Spool appends that failed (the MQTT messages were not acknowledged)."),
    _gauge("spool.disk_full", "1 while the spool's disk is full and new messages are not acknowledged, else 0."),
    _counter("spool.disk_full_events", "Times the spool's disk was found full (a write failed for lack of space)."),
    _gauge("spool.reserve_bytes", "Size of the spool's reserve file (released when the disk is full; 0 without)."),
    _gauge("spool.depth", "Points the slowest sink has not confirmed yet (sampled)."),
    _gauge("spool.oldest_age_s", "Age of the oldest row the slowest sink waits for (0 when none, NaN once closed)."),
    _histogram("spool.append_seconds", "Duration of spool appends (one transaction each; the ack waits for it)."),
    _histogram("spool.checkpoint_seconds", "Duration of the WAL checkpoints of the spool's maintenance thread."),
    _gauge("spool.rows", "Rows in the spool (messages' readings, blocks, produced points, held blocks)."),
    _gauge("spool.points", "Points in the spool, counted against spool.max_points."),
    _gauge("spool.bytes", "Bytes in the spool, counted against spool.max_bytes."),
    _gauge("spool.backlog_points", "Points a sink has not confirmed yet (sampled), by sink.", "sink"),
    _gauge("spool.backlog_age_s", "Age of the oldest row a sink waits for (sampled), by sink.", "sink"),
    _gauge(
        "spool.backlog_rows", "Rows a sink has not confirmed yet (sampled; held blocks not counted), by sink.", "sink"
    ),
    _gauge("spool.backlog_bytes", "Bytes of the rows a sink has not confirmed yet (sampled), by sink.", "sink"),
    # every sink's writer, by sink (the local sink's also as the unlabelled storage.* below)
    _counter("sink.points_written", "Points a sink's database confirmed, by sink.", "sink"),
    _counter(
        "sink.rows_written", "Spool rows a sink has passed (written or excluded by its selection), by sink.", "sink"
    ),
    _counter("sink.write_failures", "Failed writes, by sink and kind (retryable, rejected, config).", "sink", "kind"),
    _counter("sink.retries", "Batches a sink's writer will try again after a failure, by sink.", "sink"),
    _counter("sink.writer_errors", "Unexpected errors of a sink's writer, by sink.", "sink"),
    _counter("sink.cursor_failures", "Failed saves of a sink's durable cursor (a full disk), by sink.", "sink"),
    _gauge("sink.backoff_s", "Current backoff of a sink's writer (0 when writes succeed), by sink.", "sink"),
    _histogram("sink.write_seconds", "Duration of successful writes (one batch each), by sink.", "sink"),
    _counter(
        "sink.dead_lettered",
        "Points a sink dead-lettered, by sink and reason (rejected by the database, unencodable).",
        "sink",
        "reason",
    ),
    _counter(
        "sink.backlog_dropped_points",
        "Points of rows a sink passed over because its backlog exceeded its byte or age cap, by sink.",
        "sink",
    ),
    _counter(
        "sink.backlog_dropped_bytes", "Bytes of the rows a sink passed over for its backlog caps, by sink.", "sink"
    ),
    _counter("sink.unencodable", "Spool rows a sink could not encode (dead-lettered), by kind.", "sink", "kind"),
    _counter("sink.raw_released", "Raw vibration points a sink wrote because an alert released them.", "sink"),
    _counter("sink.raw_missing", "Released held blocks a sink found gone from the spool (its caps), by sink.", "sink"),
    _counter("sink.late_readings", "Readings for a downsampling bucket already written (not sent), by sink.", "sink"),
    _gauge("sink.writer_process", "1 while a sink's writer process is alive, by sink.", "sink"),
    _counter("sink.writer_restarts", "Times a sink's writer process died and was started again, by sink.", "sink"),
    _gauge("sink.points_per_s", "Points a sink's database confirmed per second over the last writes, by sink.", "sink"),
    # InfluxDB writer
    _counter("storage.points_written", "Points InfluxDB confirmed."),
    _counter("storage.write_failures", "Failed InfluxDB writes, by kind (retryable, rejected, config).", "kind"),
    _counter("storage.writer_errors", "Unexpected errors of the InfluxDB writer thread."),
    _counter(
        "storage.cursor_failures",
        "Failed saves of the writer's durable cursor (a full disk); delivery goes on and the save is retried.",
    ),
    _gauge("storage.backoff_s", "Current backoff of the InfluxDB writer (0 when writes succeed)."),
    _histogram("storage.write_seconds", "Duration of successful InfluxDB writes (one batch each)."),
    _counter(
        "storage.unencodable", "Spool rows that could not be encoded as line protocol (dead-lettered), by kind.", "kind"
    ),
    _counter("storage.raw_released", "Raw vibration points of held blocks written because an alert released them."),
    _counter(
        "storage.raw_missing",
        "Held rows (spools of earlier builds) an alert released that its caps had dropped meanwhile.",
    ),
    _gauge(
        "storage.raw_held_blocks",
        "Raw vibration blocks held in memory for a possible alert (raw_vibration around_alerts), sampled each second.",
    ),
    _gauge("storage.raw_held_bytes", "The samples' bytes of the blocks held in memory for a possible alert."),
    _counter(
        "storage.raw_hold_evicted",
        "Held blocks given up to stay within storage.raw_vibration.hold_max_bytes (those held longest first).",
    ),
    _gauge("storage.writer_process", "1 while the writer runs in its own process and is alive, 0 otherwise."),
    _counter("storage.writer_restarts", "Times the writer process died and was started again."),
    # MQTT
    _gauge("mqtt.connected", "1 while connected to the MQTT broker, 0 before the first connection and after a loss."),
    _counter("mqtt.messages", "MQTT messages received."),
    _counter("mqtt.connects", "Successful connections to the broker."),
    _counter("mqtt.disconnects", "Lost connections to the broker, by reason.", "reason"),
    _counter("mqtt.connect_failures", "Failed connection attempts, by reason.", "reason"),
    _counter("mqtt.subscribe_failures", "Subscriptions the broker refused, by reason code.", "reason"),
    _counter(
        "mqtt.stale_unsubscribed",
        "Topic filters of an earlier configuration removed from the persistent session (they doubled deliveries).",
    ),
    _counter("mqtt.acks", "QoS 1 messages acknowledged after their readings were stored."),
    _counter("mqtt.acks_stale", "Acknowledgements skipped because the message came on an earlier connection."),
    _counter("mqtt.ack_errors", "Acknowledgements the MQTT client could not send, by error.", "reason"),
    _counter("mqtt.published", "Messages published (status, heartbeat, alerts, dead letters)."),
    _counter("mqtt.publish_queued_offline", "QoS 1 messages published while disconnected, sent after reconnecting."),
    _counter("mqtt.publish_errors", "Failed publishes, by reason.", "reason"),
    _counter("mqtt.callback_errors", "Messages the MQTT callback could not hand over (not acknowledged, redelivered)."),
    _counter("mqtt.watchdog_reconnects", "Reconnects forced by the silence watchdog."),
    _gauge(
        "mqtt.outbound_queued",
        "Messages waiting in the outbound queue of a kind (alert, control, status, deadletter).",
        "kind",
    ),
    _gauge(
        "mqtt.outbound_inflight", "Outbound messages handed to the MQTT client and not yet confirmed by the broker."
    ),
    _counter(
        "mqtt.outbound_dropped",
        "Outbound messages dropped, by kind and reason (queue_full, client_error, stopped).",
        "kind",
        "reason",
    ),
    _counter(
        "mqtt.outbound_superseded",
        "Retained outbound messages replaced by a newer one of the same topic before they were sent.",
        "kind",
    ),
    _counter("mqtt.deadletters", "Rejected messages reported one by one on the dead-letter topic."),
    _counter(
        "mqtt.deadletters_summarised",
        "Rejected messages beyond the dead-letter rate, counted in a summary instead, by reason.",
        "reason",
    ),
    _counter("mqtt.deadletter_summaries", "Summaries of rejected messages published on the dead-letter topic."),
    # windows
    _counter("windows.emitted", "Windows cut from the streams, by kind (vibration, process).", "kind"),
    _counter("windows.unassigned", "Readings or blocks of a source that no feature spec or model covers."),
    _counter("windows.skipped", "Window inputs skipped, by reason (e.g. duplicate block, wrong shape).", "reason"),
    _counter("windows.gaps", "Discontinuities in a vibration stream that restarted its window, by kind.", "reason"),
    _counter("windows.queued", "Windows queued for scoring."),
    _counter("windows.dropped", "Windows dropped before scoring, by reason.", "reason"),
    _gauge("scoring.process", "1 while scoring runs in its own process and it is alive (agent.scoring_process)."),
    _counter("scoring.process_restarts", "Times the scoring process died and was started again."),
    _counter("windows.scored", "Windows scored, by model.", "model"),
    _counter("windows.rejected", "Windows not scored, by reason.", "reason"),
    # inference and models
    _counter("inference.runs", "Model runs (one per batch), by model.", "model"),
    _histogram("inference.seconds", "Duration of one model run on a batch of windows, by model.", "model"),
    _histogram(
        "inference.window_seconds",
        "Model run duration divided by the batch size: the cost of one window, by model.",
        "model",
    ),
    _gauge("inference.last_batch_s", "Duration of the last model run, by model.", "model"),
    _gauge("inference.last_batch_size", "Windows in the last batch scored, by model.", "model"),
    _gauge("models.loaded", "1 for each loaded model version, 0 for one replaced by a newer one.", "model", "version"),
    _counter("models.swaps", "Hot swaps to another version of a model, by model.", "model"),
    _counter("models.refused", "Model directories the registry refused, by reason.", "reason"),
    _counter("models.reload_errors", "Unexpected errors while rescanning the model directory."),
    # camera images
    _counter("images.received", "Camera images decoded and accepted (stored by reference in the spool)."),
    _counter("images.stored", "Images written to the image store (a repeated image is stored once)."),
    _counter("images.store_errors", "Images that could not be written to the image store (disk full, permissions)."),
    _counter("images.evicted", "Images deleted from the image store, by reason (size, age).", "reason"),
    _gauge("images.store_bytes", "Bytes of the image files in the store, counted against camera.store.max_bytes."),
    _gauge("images.store_files", "Images in the image store."),
    _counter("images.scored", "Images classified, by model.", "model"),
    _counter("images.unscored", "Images not classified, by reason (no_model, bad_input, backlog).", "reason"),
    _counter("images.defects", "Images classified as a defect class with enough confidence, by class.", "class"),
    _counter("images.fetched", "GET /images/{sha256} requests, by result (ok, not_found, bad_request).", "result"),
    _counter("defect.classified", "Anomalous vibration windows given a defect class."),
    _counter("defect.skipped", "Anomalous windows left unclassified, by reason.", "reason"),
    _counter("commissioning.steps", "Readings scored by the commissioning baseline, by phase.", "phase"),
    _counter("commissioning.skipped", "Readings the commissioning baseline could not use, by reason.", "reason"),
    _gauge("commissioning.baselines", "Commissioning baselines, by phase (commissioning, monitoring).", "phase"),
    _counter(
        "commissioning.state_errors",
        "Baselines file not saved or not loaded (moved aside), by reason (save, unreadable, format, version, "
        "spec_mismatch, invalid_baseline).",
        "reason",
    ),
    # adaptation (per-machine LoRA adapters)
    _gauge("adapters.loaded", "Machine adapters loaded, by model.", "model"),
    _counter("adapters.swaps", "Adapters activated (new or changed files), by model.", "model"),
    _counter("adapters.refused", "Adapters refused (the machine keeps its previous one), by model.", "model"),
    _counter("adapters.unsupported", "Models found unable to carry adapters, by model.", "model"),
    _counter("adapters.errors", "Adapter runs that failed (the base model scored the machine), by model.", "model"),
    _counter("adapters.trained", "Adapters trained automatically after commissioning, by model.", "model"),
    _counter("adapters.not_needed", "Machines the base model fits well enough (no adapter), by model.", "model"),
    _counter("adapters.training_failures", "Automatic adapter trainings that failed, by model.", "model"),
    # alerts and operator commands
    _counter("alerts.decided", "Alert engine decisions, by state (new, update, clear) and reason.", "state", "reason"),
    _counter(
        "alerts.suppressed",
        "Alerts held back, by reason (cooldown, flapping, source_offline: a no_data of a source its "
        "publisher declared offline, e.g. a Sparkplug death) and type.",
        "reason",
        "alert_type",
    ),
    _counter("alerts.published", "Alert events published, by state.", "state"),
    _counter("alerts.silenced", "Alert events not published because their machine is silenced, by state.", "state"),
    _counter("alerts.unexplained", "Anomalous windows without top features (explaining failed), by model.", "model"),
    _counter("alerts.state_errors", "Failures to save or restore the alert state, by operation.", "reason"),
    _counter("commands.accepted", "Operator commands applied, by command.", "command"),
    _counter("commands.rejected", "Operator commands refused, by reason.", "reason"),
    _counter(
        "commands.lost",
        "Operator commands not applied because the scoring process was down (not acknowledged: the broker "
        "sends them again), by reason.",
        "reason",
    ),
    _counter("pipeline.errors", "Unexpected errors in a pipeline worker, by worker.", "worker"),
)
"""Every metric of the agent. A new metric is a new line here, next to the others of its stage."""

SPECS: dict[str, MetricSpec] = {spec.name: spec for spec in CATALOG}
if len(SPECS) != len(CATALOG):
    raise ValueError("CATALOG declares a metric twice")
