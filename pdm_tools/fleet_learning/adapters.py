"""Federated LoRA adapters: machines of one type train one adapter together on the frozen fleet base, and only
the adapter's low-rank factors travel.

The base is the shipped classifier's graph (``agent.adaptation.lora.BaseMlp``: frozen, FP32 here); an adapter
is ``A_i``, ``B_i`` per adapted layer (``agent.adaptation.lora.LoraWeights``). A round: every client starts
from the fleet's factors, runs a few epochs of Adam on its own labelled windows with the adapter's own
objective (``loss_and_gradients``: class-balanced cross-entropy through base plus branches), and returns its
factors. Its Adam continues from its own moments of the previous round (``AdamMoments``, kept in the node's
``Context.state`` for the run; never sent): restarting Adam every round made each round's first steps
full-size sign steps, and that, not the clients' different loads nor averaging the factors, put the fleet
adapter below central on CWRU (``docs/fleet.md``). The strategy aggregates ``A`` and ``B`` as arrays of their
own (any of ``server_app.STRATEGIES``, with DP or SecAgg+ if asked: ``AdapterFederation.aggregation``). The
average of the products ``A_i B_i`` is not the product of the averages, so the fleet adapter is not exactly
what any client computed; but every client starts the round from the same factors and moves them a little, so
``(A + dA_i)(B + dB_i)`` is
``AB + dA_i B + A dB_i`` up to the small ``dA_i dB_i``, linear in each client's update: averaging (or
trimming coordinate-wise) the factors' updates is, to that order, averaging (trimming) the products' updates.
Krum keeps one client's whole update, ``A`` and ``B`` together: exactly that client's product. The federated
evaluation measures what the aggregated adapter does (``docs/fleet.md``, "Robust aggregation, DP and SecAgg+
for the adapters").

Messages: ``query`` (once, in deployment) replies the provenance: training rows, the sha256 of the rows file,
held-out rows; ``train`` gets the factors (``<layer>.A``, ``<layer>.B``) and the round's settings, replies the
trained factors, ``num-examples``, the loss and the Adam step count it continued from (``ADAM_STEP_START``);
``evaluate`` replies the confusion counts of base plus the
fleet adapter on the client's held-out rows. A client's rows are a ``rows.npz`` folder (``data.ClientData``);
the base graph is read from the path in the node config ``base-model``: the agent's installed model version
directory (its manifest's sha256 verified) or, in the simulation, a temporary ONNX copy. When the coordinator
names its base's sha256 (``base-sha256``), a client on another base refuses the round: its factors would
adapt a different model.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, ConfigRecordValues, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.serverapp import Grid, ServerApp

from agent.adaptation.adapter import AdapterError, BaseIdentity, sha256_path
from agent.adaptation.lora import BaseMlp, LoraWeights, _class_weights, loss_and_gradients
from pdm_tools.fleet_learning.client_app import _data, _folder, _number
from pdm_tools.fleet_learning.data import data_sha256
from pdm_tools.fleet_learning.secagg import SECAGG_MODS
from pdm_tools.fleet_learning.server_app import (
    CountingGrid,
    FederationConfig,
    FederationError,
    Outcome,
    query_clients,
    run_rounds,
    sum_confusions,
)

_bases: dict[Path, tuple[BaseMlp, str]] = {}
# Where a client keeps its Adam moments between rounds (``Context.state``: the node's, for this run only).
_MOMENTS = "adapter-adam-moments"
# The train reply's metric: the Adam step count the client's training continued from (0 in round 1, and in
# every round when the optimizer restarts).
ADAM_STEP_START = "adam-step-start"


@dataclass(frozen=True)
class AdapterFederation:
    """What the coordinator runs: the adapter's shape (rank, alpha, layers) and the rounds' training."""

    layers: tuple[str, ...]
    rank: int = 2
    alpha: float = 4.0
    rounds: int = 10
    local_epochs: int = 5
    learning_rate: float = 5e-3
    batch_size: int = 32
    weight_decay: float = 1e-4
    # Each client's Adam continues from its own moments of the previous round instead of restarting
    # (docs/fleet.md, "Why the federated adapter was below central").
    keep_optimizer_state: bool = True
    min_clients: int = 2
    seed: int = 42
    round_timeout_s: float = 600.0
    wait_for_clients_s: float = 600.0
    # How the factors are aggregated: any of ``server_app.STRATEGIES``, DP, SecAgg+ (``aggregation``).
    strategy: str = "fedavg"
    proximal_mu: float = 0.1
    trim_beta: float = 0.2
    krum_malicious: int = 1
    dp_noise: float = 0.0
    dp_clip: float = 0.0
    secagg: bool = False

    def aggregation(self) -> FederationConfig:
        """The federation settings ``server_app.run_rounds`` aggregates the factors with (the strategy, DP,
        SecAgg+; its classifier fields unused)."""
        return FederationConfig(
            class_names=(),
            rounds=self.rounds,
            strategy=self.strategy,
            min_clients=self.min_clients,
            proximal_mu=self.proximal_mu,
            trim_beta=self.trim_beta,
            krum_malicious=self.krum_malicious,
            dp_noise=self.dp_noise,
            dp_clip=self.dp_clip,
            secagg=self.secagg,
            seed=self.seed,
            round_timeout_s=self.round_timeout_s,
            wait_for_clients_s=self.wait_for_clients_s,
        )

    def to_dict(self) -> dict[str, Any]:
        switches = (
            "strategy",
            "proximal_mu",
            "trim_beta",
            "krum_malicious",
            "dp_noise_multiplier",
            "dp_clipping_norm",
            "dp_delta",
        )
        aggregation = {k: v for k, v in self.aggregation().to_dict().items() if k in (*switches, "secagg")}
        return {
            "model": "LoRA adapter on the frozen classifier",
            **aggregation,
            "factors": "A and B of each layer aggregated as arrays of their own, coordinate by coordinate "
            "(FedAvg, trimmed mean) or one client's whole update (Krum)",
            "layers": list(self.layers),
            "rank": self.rank,
            "alpha": self.alpha,
            "rounds": self.rounds,
            "local_epochs": self.local_epochs,
            "learning_rate": self.learning_rate,
            "batch_size": self.batch_size,
            "weight_decay": self.weight_decay,
            "keep_optimizer_state": self.keep_optimizer_state,
            "seed": self.seed,
        }


@dataclass
class AdapterOutcome:
    """The fleet adapter, the one it started from, and the run's counters (bytes, rows, evaluation)."""

    adapter: LoraWeights | None = None
    initial: LoraWeights | None = None
    counters: Outcome = field(default_factory=Outcome)


def adapter_to_arrays(lora: LoraWeights) -> ArrayRecord:
    """The factors as Flower arrays ``<layer>.A`` ``(fan_in, r)``, ``<layer>.B`` ``(r, fan_out)``, float32."""
    out = {}
    for layer, (a, b) in lora.factors.items():
        out[f"{layer}.A"], out[f"{layer}.B"] = a, b
    return ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in out.items()})


def adapter_from_arrays(record: ArrayRecord, base: BaseMlp, rank: int, alpha: float) -> LoraWeights:
    """The inverse of :func:`adapter_to_arrays`; ``ValueError`` when the arrays are not a rank-``rank``
    adapter of ``base``'s layers."""
    keys = sorted(record)
    names = {k.rsplit(".", 1)[0] for k in keys}
    layers = [n for n in base.layer_names if n in names]
    if not layers or len(layers) != len(names) or any(f"{n}.{f}" not in record for n in layers for f in "AB"):
        raise ValueError(f"adapter arrays {keys} are not A/B factors of {list(base.layer_names)}")
    factors = {}
    for name in layers:
        layer = base.layer(name)
        a = np.asarray(record[f"{name}.A"].numpy(), np.float32)
        b = np.asarray(record[f"{name}.B"].numpy(), np.float32)
        if a.shape != (layer.fan_in, rank) or b.shape != (rank, layer.fan_out):
            raise ValueError(
                f"{name}: factors {a.shape} and {b.shape} are not "
                f"({layer.fan_in}, {rank}) and ({rank}, {layer.fan_out})"
            )
        factors[name] = (a, b)
    return LoraWeights(rank=rank, alpha=alpha, factors=factors)


@dataclass
class AdamMoments:
    """Adam's running moments of every factor (in ``LoraWeights.layers`` order, ``A`` then ``B``) and its step
    count: what a client keeps between rounds so that its optimizer continues instead of restarting."""

    m: list[np.ndarray]
    v: list[np.ndarray]
    step: int = 0

    @classmethod
    def zeros(cls, lora: LoraWeights) -> AdamMoments:
        shapes = [p.shape for name in lora.layers for p in lora.factors[name]]
        return cls([np.zeros(s) for s in shapes], [np.zeros(s) for s in shapes], 0)

    def fits(self, lora: LoraWeights) -> bool:
        """Whether these moments are of ``lora``'s factors (same layers, same shapes)."""
        shapes = [p.shape for name in lora.layers for p in lora.factors[name]]
        return [m.shape for m in self.m] == shapes and [v.shape for v in self.v] == shapes

    def to_record(self) -> ArrayRecord:
        arrays = {f"m{i}": m for i, m in enumerate(self.m)} | {f"v{i}": v for i, v in enumerate(self.v)}
        arrays["step"] = np.array([self.step], np.int64)
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})

    @classmethod
    def from_record(cls, record: ArrayRecord) -> AdamMoments:
        n = sum(1 for k in record if k.startswith("m"))
        return cls(
            [np.asarray(record[f"m{i}"].numpy(), np.float64) for i in range(n)],
            [np.asarray(record[f"v{i}"].numpy(), np.float64) for i in range(n)],
            int(record["step"].numpy()[0]),
        )


def train_adapter(
    base: BaseMlp,
    start: LoraWeights,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    seed: int,
    learning_rate: float = 5e-3,
    batch_size: int = 32,
    weight_decay: float = 1e-4,
    moments: AdamMoments | None = None,
    proximal_mu: float = 0.0,
) -> tuple[LoraWeights, float]:
    """``epochs`` epochs of Adam on the factors from ``start`` (the base stays frozen), on raw feature rows ``x``
    with class indices ``y``; returns the new factors and the last epoch's mean loss. The same step as
    ``agent.adaptation.lora.train_lora``, but from given factors and without early stopping (a round's
    budget is fixed by the coordinator). ``moments``: Adam's state to continue from, updated in place (else a
    fresh optimizer: zero moments, step 0). ``proximal_mu > 0`` (FedProx): the loss gains
    ``mu / 2 * ||factors - start||^2``."""
    rng = np.random.default_rng(seed)
    z = base.standardize(x, start)
    y = np.asarray(y, np.int64)
    class_weight = _class_weights(y, base.layers[-1].fan_out)
    layers = start.layers
    params = [p.astype(np.float64) for name in layers for p in start.factors[name]]
    origin = [p.copy() for p in params]
    state = moments if moments is not None and moments.fits(start) else AdamMoments.zeros(start)
    m, v = state.m, state.v
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    loss = 0.0

    def as_weights(ps: list[np.ndarray]) -> LoraWeights:
        factors = {n: (ps[2 * i], ps[2 * i + 1]) for i, n in enumerate(layers)}
        return LoraWeights(rank=start.rank, alpha=start.alpha, factors=factors, standardization=start.standardization)

    for _ in range(epochs):
        order = rng.permutation(len(z))
        losses = []
        for lo in range(0, len(z), batch_size):
            rows = order[lo : lo + batch_size]
            value, grads = loss_and_gradients(base, as_weights(params), z[rows], y[rows], class_weight)
            losses.append(value)
            state.step += 1
            step = state.step
            for i, (p, g, p0) in enumerate(zip(params, grads, origin, strict=True)):
                g = g + weight_decay * p
                if proximal_mu > 0:
                    g = g + proximal_mu * (p - p0)
                m[i] = beta1 * m[i] + (1 - beta1) * g
                v[i] = beta2 * v[i] + (1 - beta2) * g * g
                p -= learning_rate * (m[i] / (1 - beta1**step)) / (np.sqrt(v[i] / (1 - beta2**step)) + eps)
        loss = float(np.mean(losses)) if losses else 0.0
    if moments is not None and state is not moments:
        moments.m, moments.v, moments.step = state.m, state.v, state.step
    out = as_weights([p.astype(np.float32) for p in params])
    return out, loss


def build_adapter_client_app(
    data_root: Path | None = None, base_model: Path | None = None, mods: Sequence[Mod] = ()
) -> ClientApp:
    """The adapter's ClientApp. ``data_root``: simulation (client ``i`` reads ``data_root/client-{i}``);
    ``base_model``: the base graph (else the node config's ``base-model``); ``mods``: Flower mods around every
    handler (``secagg.SECAGG_MODS``)."""
    app = ClientApp(mods=list(mods))

    @app.query()
    def query(message: Message, context: Context) -> Message:
        data = _data(context, data_root)
        _base(context, base_model, message)  # a node without the coordinator's base refuses here, before round 1
        stats = MetricRecord({"num-examples": len(data.x)})
        provenance = ConfigRecord(
            {"data-sha256": data_sha256(_folder(context, data_root)), "held-out": len(data.y_held)}
        )
        return Message(RecordDict({"stats": stats, "provenance": provenance}), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        data = _data(context, data_root)
        base = _base(context, base_model, message)
        config = message.content.config_records["config"]
        start = _adapter(message, base)
        rnd, seed = int(_number(config, "server-round", 0)), int(_number(config, "seed", 0))
        # The client's Adam continues from its moments of the previous round (kept in the node's context for
        # this run) when the coordinator asks; restarting it every round cost the fleet adapter ~7 points.
        keep = bool(config.get("keep-optimizer-state", False))
        kept = context.state.array_records.get(_MOMENTS) if keep else None
        moments = AdamMoments.from_record(kept) if kept is not None else AdamMoments.zeros(start)
        # The step count Adam continues from (0: a fresh optimizer): a count, reported so that the coordinator
        # can tell a client that continued from one that restarted (the deployment test asserts it).
        continued = moments.step if moments.fits(start) else 0
        trained, loss = train_adapter(
            base,
            start,
            data.x,
            data.y,
            int(_number(config, "local-epochs", 5)),
            zlib.crc32(f"{data.name}/{seed}/{rnd}".encode()),
            _number(config, "learning-rate", 5e-3),
            int(_number(config, "batch-size", 32)),
            _number(config, "weight-decay", 1e-4),
            moments,
            _number(config, "proximal-mu", 0.0),  # sent by FedProx only
        )
        if keep:
            context.state[_MOMENTS] = moments.to_record()
        metrics = MetricRecord(
            {"num-examples": len(data.x), "unit-weight": 1, "train-loss": loss, ADAM_STEP_START: continued}
        )
        return Message(RecordDict({"arrays": adapter_to_arrays(trained), "metrics": metrics}), reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        data = _data(context, data_root)
        base = _base(context, base_model, message)
        lora = _adapter(message, base)
        k = len(data.class_names)
        confusion = np.zeros((k, k), dtype=np.int64)
        if len(data.x_held):
            np.add.at(confusion, (data.y_held, base.predict(data.x_held, lora)), 1)
        metrics = MetricRecord(
            {"num-examples": len(data.y_held), "unit-weight": 1, "confusion": confusion.ravel().tolist()}
        )
        return Message(RecordDict({"metrics": metrics}), reply_to=message)

    return app


def _adapter(message: Message, base: BaseMlp) -> LoraWeights:
    config = message.content.config_records["config"]
    rank, alpha = int(_number(config, "rank", 0)), _number(config, "alpha", 0.0)
    return adapter_from_arrays(message.content.array_records["arrays"], base, rank, alpha)


def _base(context: Context, base_model: Path | None, message: Message | None = None) -> BaseMlp:
    """The frozen base graph, read once per process: an ONNX file, or a model version directory (the file its
    manifest names, whose sha256 must be the manifest's). With ``message``, refuses a round whose
    ``base-sha256`` is not this base's."""
    path = base_model or Path(str(context.node_config.get("base-model", "")))
    if path not in _bases:
        if path.is_dir():
            try:
                identity = BaseIdentity.from_model_dir(path)
            except AdapterError as exc:
                raise FederationError(str(exc)) from exc
            file = path / json.loads((path / "manifest.json").read_text(encoding="utf-8"))["file"]
            _bases[path] = (BaseMlp.from_onnx(file), identity.sha256)
        elif path.is_file():
            _bases[path] = (BaseMlp.from_onnx(path), sha256_path(path))
        else:
            raise FederationError(f"no base model at {path!s}: start the client with --base-model MODEL_DIR")
    base, sha256 = _bases[path]
    config = None if message is None else message.content.config_records.get("config")
    wanted = "" if config is None else str(config.get("base-sha256", ""))
    if wanted and wanted != sha256:
        raise FederationError(
            f"the coordinator's base has sha256 {wanted[:12]}…, this agent's ({path}) {sha256[:12]}…: an adapter "
            "only fits the exact base it is trained on; install the fleet's base version first"
        )
    return base


def build_adapter_server_app(config: AdapterFederation, base: BaseMlp, outcome: AdapterOutcome) -> ServerApp:
    """The simulation's ServerApp (:func:`federate_adapters`); fills ``outcome``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        federate_adapters(grid, config, base, outcome, context=context)

    return app


def federate_adapters(
    grid: Grid,
    config: AdapterFederation,
    base: BaseMlp,
    outcome: AdapterOutcome,
    base_sha256: str = "",
    context: Context | None = None,
) -> None:
    """The configured strategy over the factors (``server_app.run_rounds``: FedAvg, FedProx, trimmed mean, Krum,
    DP, SecAgg+, whichever ``config.aggregation()`` names) from ``LoraWeights.initial`` (``B = 0``: the fleet
    starts at the base), with federated evaluation each round; fills ``outcome``. ``base_sha256``
    (deployment): first a ``query`` to the connected clients for the provenance (rows, data hash), and every
    round names the base, so a client on another base refuses it. SecAgg+ needs the run's ``context``."""
    counted = CountingGrid(grid, outcome.counters)
    fed = config.aggregation()
    if base_sha256 or fed.secagg:
        # A client on another base refuses here and is left out of the provenance (and of every round); SecAgg+
        # needs every client's row count.
        query_clients(
            counted,
            config.min_clients,
            config.wait_for_clients_s,
            config.round_timeout_s,
            outcome.counters,
            ConfigRecord({"base-sha256": base_sha256}) if base_sha256 else None,
        )
    initial = LoraWeights.initial(base, config.layers, config.rank, config.alpha, config.seed)
    outcome.initial = initial
    shape: dict[str, ConfigRecordValues] = {"rank": config.rank, "alpha": config.alpha, "seed": config.seed}
    if base_sha256:
        shape["base-sha256"] = base_sha256
    train_config = ConfigRecord(
        {
            **shape,
            "local-epochs": config.local_epochs,
            "learning-rate": config.learning_rate,
            "batch-size": config.batch_size,
            "weight-decay": config.weight_decay,
            "keep-optimizer-state": config.keep_optimizer_state,
        }
    )
    arrays, evaluation = run_rounds(
        counted,
        fed,
        outcome.counters,
        adapter_to_arrays(initial),
        train_config,
        ConfigRecord(shape),
        sum_confusions,
        context,
    )
    outcome.adapter = adapter_from_arrays(arrays, base, config.rank, config.alpha)
    for rnd, metrics in evaluation.items():
        outcome.counters.evaluation[rnd] = {k: v for k, v in metrics.items() if k != "confusion"}


def layer_parameters(base: BaseMlp, layers: Sequence[str] | None = None) -> int:
    """Weights and biases of ``base`` (of ``layers`` only, if given): what a full-model round would carry."""
    return sum(layer.weight.size + layer.bias.size for layer in base.layers if layers is None or layer.name in layers)


# What ``flwr run`` loads in deployment (``fleet serve --model adapters``): the node's ``data-dir`` names the
# rows, its ``base-model`` the agent's installed classifier version. The SecAgg+ mods act only on a run with
# secure aggregation.
app = build_adapter_client_app(mods=SECAGG_MODS)
