"""Flower apps of the fleet's process autoencoder (``pdm_tools.fleet_learning.process``).

A client holds one or more machines' readings (SKAB: one file per machine run) in ``process.npz``
(``values`` the readings concatenated, ``lengths`` each machine's row count, ``labels`` the ``anomaly``
column where known, else empty). Each machine's commissioning baseline and threshold are fitted on the
client; two message types reach it:

``train``    a few local epochs of the fleet autoencoder on its machines' commissioning windows; replies the
             weights and ``num-examples``
``evaluate`` its machines' test steps scored by the fleet autoencoder, each against its own label-free
             threshold; replies the confusion counts ``tp``/``fp``/``fn``/``tn`` (without labels: all zero
             but ``fp + tn``, so ``fp`` is the alarm count) and the largest of its machines' thresholds
             (``threshold-rms-max``, one number on the z scale)
``query``    only when the federation ships a version (``fleet serve --version``): the provenance, the sha256
             of its readings and how many commissioning windows and later steps it has (no feature sums:
             each machine standardizes itself)

The same apps federate the vibration autoencoder (``signal`` ``vibration``, ``fleet serve --model vibration``):
a client then holds one machine's stored vibration feature vectors (one row per window, the
``vibration-anomaly`` model's features in the agent's local store), each row standardized by the machine's
commissioning baseline without smoothing (``smoothing_steps`` 1: the agent's vibration model scores one window
at a time), and its ``evaluate`` reply adds ``ratio-hist``: how many of its held-out windows fall in each bin of
score / its machine's largest commissioning score, from which the coordinator derives the fleet's threshold
factor (``process_gate.heldout_factor``).

What a reply never holds: a reading, a feature vector, a z vector, a label, a machine's baseline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.serverapp import Grid, ServerApp

from agent.commissioning.detector import DetectorConfig
from agent.features.spec import FeatureSpec
from pdm_tools.fleet_learning.ae_kinds import AE_KINDS, DEFAULT_STRATEGY, AeKind, ae_kind
from pdm_tools.fleet_learning.client_app import _folder, _number
from pdm_tools.fleet_learning.data import ClientDataError
from pdm_tools.fleet_learning.process import (
    PROCESS_HIDDEN,
    TRAIN_ROWS,
    AeTraining,
    Series,
    confusion,
    from_arrays,
    init_autoencoder,
    machine_threshold,
    smoothed_z,
    to_arrays,
    train_autoencoder,
)
from pdm_tools.fleet_learning.process_gate import gate_counts, gate_report, quantile_edge, ratio_histogram
from pdm_tools.fleet_learning.secagg import SECAGG_MODS
from pdm_tools.fleet_learning.server_app import (
    CountingGrid,
    FederationConfig,
    FederationError,
    Outcome,
    query_clients,
    run_rounds,
)
from pdm_tools.models.autoencoder import Autoencoder

PROCESS_FILE = "process.npz"
COUNTS = ("tp", "fp", "fn", "tn")
THRESHOLD_KEY = "threshold-rms-max"
HIST_KEY = "ratio-hist"
EDGES_KEY = "ratio-edges"  # the aggregate's: each client's ``process_gate.quantile_edge`` of its histogram
SIGNALS = tuple(AE_KINDS)
# A vibration machine stores a feature row every window (0.2 s): a client reads at most this many, oldest first.
VIBRATION_MAX_WINDOWS = 4000


def vibration_spec() -> FeatureSpec:
    """The feature spec of the agent's vibration model (``models/vibration_anomaly``): what the fleet's
    vibration clients read from the store and what its version declares."""
    spec = AE_KINDS["vibration"].feature_spec
    assert spec is not None
    return spec()


def detector_for(signal: str, detector: DetectorConfig | None = None) -> DetectorConfig:
    """The commissioning settings of a ``signal``'s machines: vibration rows are not smoothed (one window's
    features are one row of the agent's model)."""
    return ae_kind(signal).detector(detector)


@dataclass(frozen=True)
class ProcessClient:
    """One client's machines: ``values[i]`` ``(n_i, C)`` readings, ``labels[i]`` ``(n_i,)`` bool or ``None``."""

    name: str
    values: tuple[np.ndarray, ...]
    labels: tuple[np.ndarray | None, ...]

    @property
    def n_channels(self) -> int:
        return int(self.values[0].shape[1])

    def data_sha256(self) -> str:
        """sha256 of the machines' readings (float64, C order, with each machine's row count): names the data
        in the provenance without revealing it."""
        digest = hashlib.sha256(np.array([len(v) for v in self.values], np.int64).tobytes())
        for v in self.values:
            digest.update(np.ascontiguousarray(v, dtype=np.float64).tobytes())
        return digest.hexdigest()

    def series(self, config: DetectorConfig | None = None) -> list[Series]:
        return [smoothed_z(v, y, config) for v, y in zip(self.values, self.labels, strict=True)]

    def save(self, folder: Path) -> Path:
        """Write ``folder/process.npz``; returns the folder."""
        folder.mkdir(parents=True, exist_ok=True)
        labelled = all(y is not None for y in self.labels)
        np.savez(
            folder / PROCESS_FILE,
            values=np.concatenate(self.values),
            lengths=np.array([len(v) for v in self.values], np.int64),
            labels=np.concatenate([y for y in self.labels if y is not None]) if labelled else np.zeros(0, bool),
            name=np.array(self.name),
        )
        return folder


def load_process_client(folder: Path) -> ProcessClient:
    """The machines in ``folder/process.npz``; ``ClientDataError`` names what is wrong."""
    path = Path(folder) / PROCESS_FILE
    try:
        with np.load(path, allow_pickle=False) as npz:
            values = np.asarray(npz["values"], np.float64)
            lengths = np.asarray(npz["lengths"], np.int64)
            labels = np.asarray(npz["labels"], bool)
            name = str(npz["name"]) if "name" in npz.files else Path(folder).name
    except (OSError, ValueError, KeyError) as exc:
        raise ClientDataError(f"{path}: cannot read: {exc}") from exc
    if values.ndim != 2 or int(lengths.sum()) != len(values) or (len(labels) and len(labels) != len(values)):
        raise ClientDataError(
            f"{path}: values {values.shape}, lengths summing to {int(lengths.sum())} and {len(labels)} labels differ"
        )
    if not np.isfinite(values).all():
        raise ClientDataError(f"{path}: readings contain NaN or infinity")
    cuts = np.cumsum(lengths)[:-1]
    parts = tuple(np.split(values, cuts))
    return ProcessClient(name, parts, tuple(np.split(labels, cuts)) if len(labels) else (None,) * len(parts))


@dataclass(frozen=True)
class ProcessFederation:
    """What the coordinator runs for the process model: the common options (``FederationConfig``; its
    ``class_names`` are unused) and the autoencoder's shape. ``version``: also ship the fleet model as that
    version of ``process-anomaly`` (``process_ship``), with the clients' provenance asked before round 1;
    ``fields``: the channels' names in the fleet's order (the version's feature spec), ``hop``: its hop."""

    federation: FederationConfig
    n_channels: int
    hidden: tuple[int, ...] = PROCESS_HIDDEN
    training: AeTraining = field(default_factory=AeTraining)
    quantize: bool = False
    version: str = ""
    fields: tuple[str, ...] = ()
    hop: int = 5
    signal: str = "process"

    @property
    def kind(self) -> AeKind:
        return ae_kind(self.signal)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.federation.to_dict().items() if k not in ("alpha", "hidden", "learning_rate")}
        return {
            **out,
            "model": f"{self.signal} autoencoder",
            "hidden": list(self.hidden),
            "local_epochs": self.training.epochs,
            "learning_rate": self.training.learning_rate,
            "batch_size": self.training.batch_size,
            "quantization_gate": self.quantize,
            **({"fields": list(self.fields), "hop": self.hop} if self.fields else {}),
        }


@dataclass
class ProcessOutcome:
    """The fleet autoencoder, the initial one, and the run's counters (bytes, rows, federated evaluation)."""

    model: Autoencoder | None = None
    initial: Autoencoder | None = None
    counters: Outcome = field(default_factory=Outcome)
    gate: dict[str, Any] = field(default_factory=dict)
    threshold_rms_max: float = math.nan  # the largest machine threshold the clients reported in the last round
    heldout_hist: list[int] = field(default_factory=list)  # vibration: the clients' ratio histograms, last round
    heldout_edges: list[float] = field(default_factory=list)  # and each client's quantile edge of its own


def sum_counts(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Federated evaluation: the clients' confusion counts summed (F1/FAR/MAR are computed from the sum), the
    largest machine threshold any client reported, and their ratio histograms summed with each one's quantile
    edge (vibration)."""
    total = dict.fromkeys(COUNTS, 0)
    thresholds = []
    hist = np.zeros(0, np.int64)
    edges: list[float] = []
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        for key in COUNTS:
            total[key] += int(metrics[key])  # type: ignore[arg-type]
        if THRESHOLD_KEY in metrics:
            thresholds.append(float(metrics[THRESHOLD_KEY]))  # type: ignore[arg-type]
        if HIST_KEY in metrics:
            counts = np.asarray(metrics[HIST_KEY], np.int64)
            hist = counts + hist if len(hist) else counts
            edges.append(quantile_edge(counts.tolist()))
    return MetricRecord(
        {
            **total,
            **({THRESHOLD_KEY: max(thresholds)} if thresholds else {}),
            **({HIST_KEY: hist.tolist(), EDGES_KEY: edges} if len(hist) else {}),
        }
    )


def build_process_server_app(config: ProcessFederation, outcome: ProcessOutcome) -> ServerApp:
    """The ServerApp; when it returns, ``outcome`` holds the fleet autoencoder."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        federate_process(grid, config, outcome, context)

    return app


def federate_process(
    grid: Grid, config: ProcessFederation, outcome: ProcessOutcome, context: Context | None = None
) -> None:
    """``rounds`` rounds of the strategy on the autoencoder, federated evaluation every round
    (``server_app.run_rounds``: with ``secagg`` SecAgg+, which needs the run's ``context``)."""
    fed = config.federation
    model = init_autoencoder(config.n_channels, config.hidden, fed.seed)
    outcome.initial = model
    train_config = ConfigRecord(
        {
            "local-epochs": config.training.epochs,
            "learning-rate": config.training.learning_rate,
            "batch-size": config.training.batch_size,
            "seed": fed.seed,
            "channels": config.n_channels,
        }
    )
    counted = CountingGrid(grid, outcome.counters)
    if config.version or fed.secagg:  # who trains, by the hash of their readings; SecAgg+ needs the row counts
        query_clients(counted, fed.min_clients, fed.wait_for_clients_s, fed.round_timeout_s, outcome.counters)
    hist = {HIST_KEY: True} if config.kind.heldout_threshold else {}
    evaluate_config = ConfigRecord({"channels": config.n_channels, **hist})
    arrays, evaluation = run_rounds(
        counted, fed, outcome.counters, to_arrays(model), train_config, evaluate_config, sum_counts, context
    )
    outcome.model = from_arrays(arrays, config.n_channels)
    for rnd, metrics in evaluation.items():
        outcome.counters.evaluation[rnd] = {k: int(metrics[k]) for k in COUNTS if k in metrics}  # type: ignore[arg-type]
        if THRESHOLD_KEY in metrics:
            outcome.threshold_rms_max = float(metrics[THRESHOLD_KEY])  # type: ignore[arg-type]
        if HIST_KEY in metrics:
            outcome.heldout_hist = [int(v) for v in metrics[HIST_KEY]]  # type: ignore[union-attr]
            outcome.heldout_edges = [float(v) for v in metrics[EDGES_KEY]]  # type: ignore[union-attr]
    if config.quantize:
        outcome.gate = quantization_gate(counted, config, arrays)


def quantization_gate(grid: Grid, config: ProcessFederation, arrays: ArrayRecord) -> dict[str, Any]:
    """The fleet model's INT8 against its FP32 on every client's machines (``process_gate``): one more
    evaluate message with ``quantize`` set, to every connected client; their counts summed."""
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"channels": config.n_channels, "quantize": True})})
    messages = [Message(content, dst_node_id=node, message_type=MessageType.EVALUATE) for node in grid.get_node_ids()]
    replies = [r for r in grid.send_and_receive(messages, timeout=config.federation.round_timeout_s)]
    answered = [r.content.metric_records["metrics"] for r in replies if not r.has_error()]
    if not answered:
        raise FederationError("no client answered the quantization gate's evaluation")
    totals: dict[str, Any] = {}
    for metrics in answered:
        for key, value in metrics.items():
            if isinstance(value, list):
                totals[key] = (np.asarray(totals[key]) + np.asarray(value)).tolist() if key in totals else value
            else:
                totals[key] = totals.get(key, 0) + value
    return {"clients": len(answered), **gate_report(totals)}


# Per ClientApp process: a folder, or (agent config, machine, since, fields) of the local store.
_loaded: dict[Path | tuple[str, ...], tuple[ProcessClient, list[Series]]] = {}


def build_process_client_app(
    data_root: Path | None = None, detector: DetectorConfig | None = None, mods: Sequence[Mod] = ()
) -> ClientApp:
    """The ClientApp. ``data_root``: simulation, client ``i`` reads ``data_root/client-{i}``; without it the
    node's ``data-dir`` setting names the folder. ``detector``: the machines' commissioning settings.
    ``mods``: Flower mods around every handler (``secagg.SECAGG_MODS`` for secure aggregation)."""
    app = ClientApp(mods=list(mods))
    det = detector or DetectorConfig()

    @app.query()
    def query(message: Message, context: Context) -> Message:
        client, series = _data(context, data_root, det)
        windows = sum(len(s.train) for s in series)
        provenance = ConfigRecord(
            {"data-sha256": client.data_sha256(), "held-out": sum(len(s.test) for s in series), "machines": len(series)}
        )
        stats = MetricRecord({"num-examples": windows})
        return Message(RecordDict({"stats": stats, "provenance": provenance}), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        client, series = _data(context, data_root, det)
        config = message.content.config_records["config"]
        model = _model(message, client)
        training = AeTraining(
            epochs=int(_number(config, "local-epochs", AeTraining.epochs)),
            learning_rate=_number(config, "learning-rate", AeTraining.learning_rate),
            batch_size=int(_number(config, "batch-size", AeTraining.batch_size)),
            proximal_mu=_number(config, "proximal-mu", 0.0),  # sent by FedProx only
        )
        rnd, base_seed = int(_number(config, "server-round", 0)), int(_number(config, "seed", 0))
        rows = np.concatenate([s.train for s in series])
        trained, loss = train_autoencoder(
            model, rows, training, zlib.crc32(f"{client.name}/{base_seed}/{rnd}".encode())
        )
        metrics = MetricRecord({"num-examples": len(rows), "unit-weight": 1, "train-mse": loss})
        return Message(RecordDict({"arrays": to_arrays(trained), "metrics": metrics}), reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        client, series = _data(context, data_root, det)
        model = _model(message, client)
        counts = confusion(model, series, det.threshold_factor)
        steps = sum(len(s.test) for s in series)
        threshold = max(machine_threshold(model, s, det.threshold_factor) for s in series)
        metrics = MetricRecord({"num-examples": steps, "unit-weight": 1, **counts, THRESHOLD_KEY: threshold})
        if message.content.config_records["config"].get(HIST_KEY) is True:
            metrics[HIST_KEY] = ratio_histogram(model, series)
        if message.content.config_records["config"].get("quantize") is True:
            metrics.update(gate_counts(model, series, det.threshold_factor))
        return Message(RecordDict({"metrics": metrics}), reply_to=message)

    return app


def _model(message: Message, client: ProcessClient) -> Autoencoder:
    channels = message.content.config_records["config"].get("channels")
    if channels != client.n_channels:
        raise ClientDataError(
            f"{client.name}: the fleet model has {channels!r} channels, this client's readings {client.n_channels}"
        )
    return from_arrays(message.content.array_records["arrays"], client.n_channels)


def store_client(
    agent_config: Path,
    machine: str,
    since: str,
    fields: Sequence[str] | None = None,
    now_ns: int | None = None,
    signal: str = "process",
) -> ProcessClient:
    """A client holding one machine's process readings of the last ``since`` (``30d``, ``12h``), read from the
    agent's local store (``agent.storage.query.LocalStore``: the local InfluxDB of ``agent_config``, even with
    every upstream unreachable) instead of a data folder. ``fields``: the channels, in the fleet's order
    (default: every numeric field the machine has, sorted). Only rows with every channel count; the first
    ``TRAIN_ROWS`` of them are the machine's commissioning. No labels: evaluation counts alarms.
    ``signal`` ``vibration``: instead the first ``VIBRATION_MAX_WINDOWS`` feature vectors the agent stored for
    its ``vibration-anomaly`` model on the machine in that time (``fields`` unused: the model's features)."""
    from agent.bootstrap import build_sink
    from agent.config import load_config
    from agent.storage.query import LocalStore, since_ns

    kind = ae_kind(signal)
    config = load_config(agent_config)
    sink = build_sink(config)
    try:
        store, start = LocalStore(sink), since_ns(since, now_ns)
        if kind.feature_spec is not None and kind.stored_features:
            names = kind.feature_spec().feature_names()
            found = store.features(machine, kind.model_id, names, start, limit=VIBRATION_MAX_WINDOWS).complete()
        else:
            found = store.readings(machine, start, fields=fields).complete()
    finally:
        sink.close()
    if len(found) < TRAIN_ROWS:
        channels = ", ".join(found.columns) or "any field"
        raise ClientDataError(
            f"machine {machine}: {len(found)} complete {kind.rows} ({channels}) in the last {since} in the local "
            f"store; the {signal} model needs at least {TRAIN_ROWS}"
        )
    return ProcessClient(machine, (found.values,), (None,))


def _data(context: Context, data_root: Path | None, det: DetectorConfig) -> tuple[ProcessClient, list[Series]]:
    """The client's machines and their smoothed z vectors, computed once per process: from the local store
    when the node names ``agent-config`` and ``machine`` (and ``since``, ``fields``), else from its folder."""
    node = context.node_config
    if "agent-config" in node:
        key = tuple(str(node.get(k, "")) for k in ("agent-config", "machine", "since", "fields", "signal"))
        if key not in _loaded:
            config, machine, since, fields, signal = key
            signal = signal or "process"
            client = store_client(
                Path(config), machine, since or "30d", [f for f in fields.split(",") if f] or None, signal=signal
            )
            _loaded[key] = (client, client.series(detector_for(signal, det)))
        return _loaded[key]
    folder = _folder(context, data_root)
    if folder not in _loaded:
        client = load_process_client(folder)
        _loaded[folder] = (client, client.series(det))
    return _loaded[folder]


PROCESS_MODEL_FILE = "process_model.npz"


def config_from_run(run_config: dict[str, Any]) -> ProcessFederation:
    """The process federation's settings from a submitted run's config (``deploy.RUN_CONFIG`` plus
    ``channels`` and ``quantize``); ``ValueError`` names what is wrong."""
    from pdm_tools.fleet_learning import deploy

    # A run that names no strategy gets the autoencoders' default, as ``fleet serve --model process`` does.
    shared = {"strategy": DEFAULT_STRATEGY, **{k: v for k, v in run_config.items() if k in deploy.RUN_CONFIG}}
    federation = deploy.config_from_run(shared)
    signal = str(run_config.get("signal") or "process")
    kind = ae_kind(signal)
    channels = int(run_config.get("channels", 0))
    fields = tuple(f for f in str(run_config.get("fields") or "").split(",") if f)
    if kind.feature_spec is not None:  # the features of the agent's model, in its order
        fields = kind.feature_spec().feature_names()
        channels = channels or len(fields)
    if channels < 1:
        raise ValueError(f"the process model needs its channel count (run config 'channels'), got {channels}")
    training = AeTraining(epochs=federation.training.epochs, learning_rate=federation.training.learning_rate)
    version = str(run_config.get("version") or "")
    if version and len(fields) != channels:
        raise ValueError(f"a process version needs the {channels} channels' names (run config 'fields'), got {fields}")
    return ProcessFederation(
        federation,
        channels,
        training=training,
        quantize=bool(run_config.get("quantize")),
        version=version,
        fields=fields,
        hop=int(run_config.get("hop", 5)),
        signal=signal,
    )


def _deployed_main(grid: Grid, context: Context) -> None:
    """The ServerApp of a submitted process or vibration run: the federation, then ``out-dir/process_model.npz``
    (the autoencoder's arrays), with ``version`` the template version ``process-anomaly-<version>/`` or
    ``vibration-anomaly-<version>/`` (``process_ship.write_template``; vibration: its threshold factor derived
    from the clients' held-out windows, ``process_gate.heldout_factor``), and ``federation.json`` (with the
    quantization gate's report when asked)."""
    from pdm_tools.fleet_learning import deploy, process_ship
    from pdm_tools.fleet_learning.process_gate import heldout_factor

    run_config = dict(context.run_config)
    out_dir = Path(str(run_config.get("out-dir") or "."))
    config = config_from_run(run_config)
    outcome = ProcessOutcome()
    federate_process(grid, config, outcome, context)
    out_dir.mkdir(parents=True, exist_ok=True)
    shipped: dict[str, str] = {}
    threshold: dict[str, Any] = {}
    if outcome.model is not None:
        arrays: dict[str, Any] = {name: a.numpy() for name, a in to_arrays(outcome.model).items()}
        np.savez(out_dir / PROCESS_MODEL_FILE, **arrays)
        if config.version:
            try:
                kind = config.kind
                detector = kind.detector()
                if kind.heldout_threshold:
                    threshold = heldout_factor(outcome.heldout_hist, outcome.heldout_edges, detector.threshold_factor)
                    detector = dataclasses.replace(detector, threshold_factor=threshold["factor"])
                spec = kind.feature_spec() if kind.feature_spec else process_ship.fleet_spec(config.fields, config.hop)
                version_dir = process_ship.write_template(
                    out_dir,
                    config.to_dict(),
                    outcome.counters,
                    outcome.model,
                    outcome.gate,
                    outcome.threshold_rms_max,
                    config.version,
                    spec,
                    detector,
                    threshold,
                )
                shipped = {"version_dir": str(version_dir)}
            except (ValueError, RuntimeError, OSError) as exc:  # the federation ran; the version did not come out
                shipped = {"version_error": str(exc)}
    head = {
        "federation": config.to_dict(),
        "complete": outcome.model is not None and "version_error" not in shipped,
        **shipped,
        **({"threshold_factor": threshold} if threshold else {}),
    }
    deploy.write_summary(
        out_dir, {**head, **({"quantization_gate": outcome.gate} if outcome.gate else {})}, outcome.counters
    )


# What ``flwr run`` loads for ``fleet serve --model process``: the node's settings name the data. The SecAgg+
# mods act only on a run with secure aggregation (``fleet serve --model process --secagg``).
app = build_process_client_app(mods=SECAGG_MODS)
SERVER_APP = ServerApp()
SERVER_APP.main()(_deployed_main)
