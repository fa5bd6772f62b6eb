"""The Flower ClientApp an agent runs beside itself: it trains on the rows it holds and sends back only
model parameters and metrics.

The same app runs in the simulation (``pdm-agent fleet evaluate``: one virtual client per data folder under
``data_root``, chosen by Flower's ``partition-id``) and in deployment (``flower-supernode`` with
``--node-config "data-dir='…'"``). Three message types:

``query``    feature count, sum and sum of squares over the training rows (for the fleet's standardization;
             refused below ``MIN_ROWS`` rows, where a sum would reveal a row), and the sha256 of the rows
             file with the held-out row count (the new model's provenance)
``train``    a few local epochs from the fleet's weights; replies the new weights, ``num-examples`` (FedAvg's
             weight) and ``unit-weight`` (the weight with differential privacy, where all count the same)
``evaluate`` the fleet's weights on the client's held-out rows; replies the confusion counts (with
             ``quantize``: the fleet model's FP32 and INT8 graphs' confusion counts, their agreement and the
             INT8 graph's sha256, ``classifier_gate``)

What a reply never holds: a feature row, a window, a reading, a label list.
``tests/unit/test_fleet_learning_simulation`` inspects every reply.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from pdm_tools.fleet_learning.data import MIN_ROWS, ClientData, ClientDataError, data_sha256, load_client_data
from pdm_tools.fleet_learning.params import LocalTraining, from_arrays, local_train, to_arrays
from pdm_tools.fleet_learning.secagg import SECAGG_MODS
from pdm_tools.models.defect_mlp import DefectMlp

_loaded: dict[Path, ClientData] = {}


def build_client_app(data_root: Path | None = None, mods: Sequence[Mod] = ()) -> ClientApp:
    """The ClientApp. ``data_root``: simulation, client ``i`` reads ``data_root/client-{i}``; without it the
    node's ``data-dir`` setting names the folder. ``mods``: Flower mods around every handler (the
    evaluation's poisoned client is one)."""
    app = ClientApp(mods=list(mods))

    @app.query()
    def query(message: Message, context: Context) -> Message:
        data = _data(context, data_root)
        if len(data.x) < MIN_ROWS:
            raise ClientDataError(f"{data.name}: {len(data.x)} training rows; feature sums need {MIN_ROWS}")
        x = data.x.astype(np.float64)
        sums = MetricRecord(
            {"num-examples": len(x), "sum": x.sum(axis=0).tolist(), "sumsq": (x * x).sum(axis=0).tolist()}
        )
        # Provenance of the coming model: which data (by hash) and how much, never the data.
        provenance = ConfigRecord(
            {"data-sha256": data_sha256(_folder(context, data_root)), "held-out": len(data.y_held)}
        )
        return Message(RecordDict({"stats": sums, "provenance": provenance}), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        data = _data(context, data_root)
        config = message.content.config_records["config"]
        model = _model(message, data)
        if model.n_features != data.x.shape[1]:
            raise ClientDataError(f"{data.name}: rows have {data.x.shape[1]} features, the model {model.n_features}")
        training = LocalTraining(
            epochs=int(_number(config, "local-epochs", LocalTraining.epochs)),
            learning_rate=_number(config, "learning-rate", LocalTraining.learning_rate),
            alpha=_number(config, "alpha", LocalTraining.alpha),
            batch_size=int(_number(config, "batch-size", LocalTraining.batch_size)),
            proximal_mu=_number(config, "proximal-mu", 0.0),
        )
        rnd, base_seed = int(_number(config, "server-round", 0)), int(_number(config, "seed", 0))
        seed = zlib.crc32(f"{data.name}/{base_seed}/{rnd}".encode())
        trained, loss = local_train(model, data.x, data.y, training, seed)
        metrics = MetricRecord({"num-examples": len(data.x), "unit-weight": 1, "train-loss": loss})
        return Message(RecordDict({"arrays": to_arrays(trained), "metrics": metrics}), reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        data = _data(context, data_root)
        model = _model(message, data)
        config = message.content.config_records["config"]
        if config.get("quantize") is True:  # the quantization gate after the last round (``classifier_gate``)
            from pdm_tools.fleet_learning.classifier_gate import gate_counts

            counts = gate_counts(model, data.x_held, data.y_held, int(_number(config, "seed", 0)))
            return Message(RecordDict({"gate": ConfigRecord(counts)}), reply_to=message)
        k = len(data.class_names)
        confusion = np.zeros((k, k), dtype=np.int64)
        if len(data.x_held):
            np.add.at(confusion, (data.y_held, model.predict(data.x_held)), 1)
        metrics = MetricRecord(
            {"num-examples": len(data.y_held), "unit-weight": 1, "confusion": confusion.ravel().tolist()}
        )
        return Message(RecordDict({"metrics": metrics}), reply_to=message)

    return app


def _model(message: Message, data: ClientData) -> DefectMlp:
    """The fleet model of a train or evaluate message: its arrays and the run's standardization."""
    config = message.content.config_records["config"]
    mean, scale = config.get("mean"), config.get("scale")
    if not isinstance(mean, list) or not isinstance(scale, list):
        raise ValueError("the round's config lacks the standardization ('mean', 'scale')")
    classes = config.get("class-names")
    if isinstance(classes, list) and tuple(str(c) for c in classes) != data.class_names:
        raise ClientDataError(
            f"{data.name}: the fleet model's classes {[str(c) for c in classes]} are not this client's "
            f"{list(data.class_names)}"
        )
    return from_arrays(message.content.array_records["arrays"], data.class_names, np.array(mean), np.array(scale))


def _number(config: ConfigRecord, key: str, default: float) -> float:
    """A number from the round's config; a value of another type is the server's error, named here."""
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"config {key!r} must be a number, got {value!r}")
    return float(value)


def _data(context: Context, data_root: Path | None) -> ClientData:
    """The client's rows, read once per process (the simulation keeps its ClientApp processes between rounds)."""
    folder = _folder(context, data_root)
    if folder not in _loaded:
        _loaded[folder] = load_client_data(folder)
    return _loaded[folder]


def _folder(context: Context, data_root: Path | None) -> Path:
    """The node's ``data-dir``, or in the simulation ``data_root/client-{partition-id}``."""
    if "data-dir" in context.node_config:
        folder = Path(str(context.node_config["data-dir"]))
    elif data_root is not None and "partition-id" in context.node_config:
        folder = data_root / f"client-{int(context.node_config['partition-id'])}"
    else:
        raise ClientDataError("no data folder: start the supernode with --node-config \"data-dir='DIR'\"")
    return folder


# What ``flwr run`` loads in deployment: the node's ``data-dir`` names the folder. The SecAgg+ mods act only
# on a run with secure aggregation (``fleet serve --secagg``): an agent needs nothing else to join one.
app = build_client_app(mods=SECAGG_MODS)
