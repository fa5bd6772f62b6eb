"""The Flower ServerApp that coordinates a federation: the fleet's standardization, then the chosen strategy.

Before round 1 every client answers a ``query`` with its feature count, sum and sum of squares; their totals
give the fleet-wide ``mean``/``scale`` (exactly those of the pooled rows, which no one ever pools). Then
Flower's strategy runs ``rounds`` of train + federated evaluation. Strategies (``STRATEGIES``): ``fedavg``,
``fedprox`` (proximal term in each client's loss), ``trimmed`` (coordinate-wise trimmed mean, drops the
``trim_beta`` share of the highest and lowest values), ``krum`` (keeps the update closest to its neighbours),
``multikrum`` (averages the ``n - krum_malicious`` updates Krum ranks best); ``krum_malicious`` is the number
of malicious clients they tolerate (``fleet serve --byzantine``, checked by ``check_byzantine``).

Every message's payload is counted (``Outcome.bytes_per_round``: Flower ``Record.count_bytes`` of both
directions, without gRPC framing) through a ``Grid`` that wraps the runtime's.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from pdm_tools.evaluation.classification import scores_from_confusion
from pdm_tools.fleet_learning.params import LocalTraining, from_arrays, init_mlp, standardization, to_arrays
from pdm_tools.fleet_learning.secagg import SecAggSettings, check_secagg, federate_secagg
from pdm_tools.models.defect_mlp import DefectMlp, MlpConfig

logger = logging.getLogger(__name__)

STRATEGIES = ("fedavg", "fedprox", "trimmed", "krum", "multikrum")


class FederationError(Exception):
    """The federation could not start or finish (too few clients answered)."""


@dataclass(frozen=True)
class FederationConfig:
    """What the coordinator runs (recorded in the resulting model's provenance)."""

    class_names: tuple[str, ...]
    rounds: int = 20
    strategy: str = "fedavg"
    min_clients: int = 2
    training: LocalTraining = field(default_factory=LocalTraining)
    hidden: tuple[int, ...] = MlpConfig.hidden
    proximal_mu: float = 0.1
    trim_beta: float = 0.2
    krum_malicious: int = 1
    dp_noise: float = 0.0
    dp_clip: float = 0.0
    dp_delta: float = 1e-5
    seed: int = 42
    round_timeout_s: float = 600.0
    wait_for_clients_s: float = 600.0
    # Secure aggregation (SecAgg+, ``secagg.py``): the coordinator sees only the sum of the updates.
    secagg: bool = False
    secagg_settings: SecAggSettings = field(default_factory=SecAggSettings)
    # After the last round, the quantization gate on every client's held-out rows (``classifier_gate``).
    quantize: bool = False

    @property
    def dp(self) -> bool:
        """Differential privacy on: each client's update clipped to ``dp_clip``, Gaussian noise on the mean."""
        return self.dp_noise > 0 and self.dp_clip > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "rounds": self.rounds,
            "min_clients": self.min_clients,
            "local_epochs": self.training.epochs,
            "learning_rate": self.training.learning_rate,
            "alpha": self.training.alpha,
            "batch_size": self.training.batch_size,
            "hidden": list(self.hidden),
            **({"proximal_mu": self.proximal_mu} if self.strategy == "fedprox" else {}),
            **({"trim_beta": self.trim_beta} if self.strategy == "trimmed" else {}),
            **({"krum_malicious": self.krum_malicious} if self.strategy in ("krum", "multikrum") else {}),
            **(
                {"dp_noise_multiplier": self.dp_noise, "dp_clipping_norm": self.dp_clip, "dp_delta": self.dp_delta}
                if self.dp
                else {}
            ),
            **({"secagg": self.secagg_settings.to_dict()} if self.secagg else {}),
            **({"quantization_gate": True} if self.quantize else {}),
            "seed": self.seed,
        }


@dataclass
class Outcome:
    """What a finished federation leaves: the model, per-round payload bytes and federated evaluation, per
    client (by node id) the training row count it reported, the nodes whose update each round used, and the
    scalar metrics each node's train reply reported each round (``train_metrics[round][node]``: row count,
    loss, the adapters' Adam step count; numbers only, no rows). ``kept``: with a strategy that keeps whole
    updates and drops the rest (Krum, Multi-Krum), the nodes whose update each round's aggregate used; a
    node among ``participants`` but not ``kept`` was rejected that round."""

    model: DefectMlp | None = None
    initial: DefectMlp | None = None
    bytes_per_round: dict[int, int] = field(default_factory=dict)
    evaluation: dict[int, dict[str, Any]] = field(default_factory=dict)
    client_rows: dict[int, int] = field(default_factory=dict)
    participants: dict[int, list[int]] = field(default_factory=dict)
    train_metrics: dict[int, dict[int, dict[str, float]]] = field(default_factory=dict)
    kept: dict[int, list[int]] = field(default_factory=dict)
    provenance: dict[int, dict[str, Any]] = field(default_factory=dict)
    privacy: dict[str, Any] = field(default_factory=dict)
    replies: list[tuple[str, RecordDict]] = field(default_factory=list)
    keep_replies: bool = False
    secagg: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)


def make_strategy(
    config: FederationConfig,
    evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
    counted: CountingGrid | None = None,
) -> Strategy:
    """The Flower strategy named by ``config.strategy``; every client trains and evaluates each round.
    ``evaluate_metrics_aggr_fn``: how the clients' evaluation metrics add up (default: the classifier's
    confusion matrices, ``sum_confusions``). With ``counted`` (the run's grid), Krum and Multi-Krum record in
    its outcome which nodes' updates each round kept (``Outcome.kept``)."""
    common: dict[str, Any] = {
        # With DP every update weighs the same (the noise is calibrated to one client's clipped share).
        "weighted_by_key": "unit-weight" if config.dp else "num-examples",
        "min_train_nodes": config.min_clients,
        "min_evaluate_nodes": config.min_clients,
        "min_available_nodes": config.min_clients,
        "evaluate_metrics_aggr_fn": evaluate_metrics_aggr_fn or sum_confusions,
    }
    if config.secagg:
        check_secagg(config.strategy, config.dp)
    strategy: Strategy
    if config.strategy == "fedavg":
        strategy = FedAvg(**common)
    elif config.strategy == "fedprox":
        strategy = FedProx(proximal_mu=config.proximal_mu, **common)
    elif config.strategy == "trimmed":
        strategy = FedTrimmedAvg(beta=config.trim_beta, **common)
    elif config.strategy in ("krum", "multikrum"):
        if counted is not None:
            # Flower aggregates the metrics of exactly the replies Krum selected: that is where we see them.
            common["train_metrics_aggr_fn"] = counted.recording_kept(aggregate_metricrecords)
        if config.strategy == "krum":
            strategy = Krum(num_malicious_nodes=config.krum_malicious, **common)
        else:
            keep = max(1, config.min_clients - config.krum_malicious)
            strategy = MultiKrum(num_malicious_nodes=config.krum_malicious, num_nodes_to_select=keep, **common)
    else:
        raise ValueError(f"strategy {config.strategy!r} is not one of {list(STRATEGIES)}")
    if not config.dp:
        return strategy
    if config.strategy not in ("fedavg", "fedprox"):
        raise ValueError(
            f"differential privacy is accounted for averaging only (fedavg, fedprox), not {config.strategy}"
        )
    # Flower's server-side fixed clipping: every update clipped to dp_clip, then N(0, (noise * clip / m)^2)
    # on the aggregate, m = the clients a round needs (with more clients the noise is more than needed).
    return DifferentialPrivacyServerSideFixedClipping(strategy, config.dp_noise, config.dp_clip, config.min_clients)


def check_byzantine(strategy: str, byzantine: int, clients: int) -> None:
    """``ValueError`` when ``strategy`` cannot tolerate ``byzantine`` malicious clients among ``clients`` updates a
    round. Krum scores each update by its distances to its ``n - f - 2`` nearest others and is Byzantine-resilient
    for ``n > 2f + 2`` (Blanchard et al., 2017): with fewer updates an honest one's nearest others can all be
    attackers (Flower then still runs, on at least one neighbour, without that guarantee). Multi-Krum ranks the
    same way and averages the ``n - f`` best. The other strategies do not take the number (``byzantine >= 0``
    only). ``clients``: the updates a round is sure to have (``--min-clients``).

    >>> check_byzantine("krum", 1, 5)
    >>> check_byzantine("krum", 2, 6)
    Traceback (most recent call last):
    ValueError: --byzantine 2 with --strategy krum needs --min-clients >= 7 (Krum's guarantee: n > 2f + 2), got 6
    """
    if byzantine < 0:
        raise ValueError(f"--byzantine {byzantine}: the number of malicious clients to tolerate is >= 0")
    if strategy in ("krum", "multikrum") and clients <= 2 * byzantine + 2:
        raise ValueError(
            f"--byzantine {byzantine} with --strategy {strategy} needs --min-clients >= {2 * byzantine + 3} "
            f"(Krum's guarantee: n > 2f + 2), got {clients}"
        )


def against_poisoned(config: FederationConfig, poisoned: int, clients: int) -> FederationConfig:
    """``config`` with its robust rule sized for ``poisoned`` of ``clients`` attackers (what an operator who
    assumes that bound sets): Krum and Multi-Krum's ``krum_malicious = poisoned``, the trimmed mean cutting at
    least ``poisoned`` updates at each end (``trim_beta``, never below the configured share; Flower's trimmed
    mean cuts ``int(beta * clients)``). ``ValueError`` when no trimmed mean can (``poisoned >= clients / 2``).

    >>> c = against_poisoned(FederationConfig(class_names=()), 3, 10)
    >>> c.krum_malicious, int(c.trim_beta * 10)
    (3, 3)
    >>> int(against_poisoned(FederationConfig(class_names=()), 1, 10).trim_beta * 10)
    2
    >>> against_poisoned(FederationConfig(class_names=()), 3, 6)
    Traceback (most recent call last):
    ValueError: --poisoned 3 of 6 clients: need 1 <= poisoned < clients / 2 - 0.5
    """
    beta = max(config.trim_beta, (poisoned + 0.5) / clients)
    if poisoned < 1 or beta >= 0.5:
        raise ValueError(f"--poisoned {poisoned} of {clients} clients: need 1 <= poisoned < clients / 2 - 0.5")
    return dataclasses.replace(config, krum_malicious=poisoned, trim_beta=round(beta, 4))


def privacy_budget(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon of ``rounds`` Gaussian releases with noise ``noise_multiplier`` times the sensitivity, every
    client in every round (no sampling amplification), at ``delta``: Renyi DP of the Gaussian mechanism
    (``alpha / (2 sigma^2)`` per release, adding up over releases) converted with
    ``eps = rdp + log(1 / delta) / (alpha - 1)`` at the best order (Mironov 2017). Per client: what one
    client's data can change in the released models.

    >>> round(privacy_budget(1.0, 1, 1e-5), 2)
    5.3
    >>> privacy_budget(2.0, 20, 1e-5) > privacy_budget(2.0, 10, 1e-5)
    True
    """
    alphas = np.concatenate([np.linspace(1.01, 10, 900), np.linspace(10, 1024, 2000)])
    eps = rounds * alphas / (2 * noise_multiplier**2) + np.log(1 / delta) / (alphas - 1)
    return float(eps.min())


def sum_confusions(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Federated evaluation: the clients' confusion counts summed, and the scores of the sum."""
    total: np.ndarray | None = None
    for record in records:
        counts = np.asarray(next(iter(record.metric_records.values()))["confusion"], dtype=np.int64)
        total = counts if total is None else total + counts
    if total is None:
        return MetricRecord()
    k = round(np.sqrt(len(total)))
    s = scores_from_confusion(total.reshape(k, k))
    return MetricRecord({"accuracy": s["accuracy"], "macro-f1": s["macro_f1"], "confusion": total.tolist()})


def build_server_app(config: FederationConfig, outcome: Outcome) -> ServerApp:
    """The ServerApp; when it returns, ``outcome`` holds the result (the simulation reads it in-process)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        federate(grid, config, outcome, context)

    return app


def federate(grid: Grid, config: FederationConfig, outcome: Outcome, context: Context | None = None) -> None:
    """The coordinator's work in one run: the fleet's standardization, then ``config.rounds`` rounds of the
    strategy (``run_rounds``), then the quantization gate if asked; fills ``outcome``. With ``config.secagg``
    the rounds are Flower's SecAgg+ workflow, which needs the run's ``context``."""
    counted = CountingGrid(grid, outcome)
    mean, scale = fleet_standardization(counted, config, outcome)
    model = init_mlp(mean, scale, config.hidden, config.class_names, config.seed)
    outcome.initial = model
    training = config.training
    train_config = ConfigRecord(
        {
            "local-epochs": training.epochs,
            "learning-rate": training.learning_rate,
            "alpha": training.alpha,
            "batch-size": training.batch_size,
            "seed": config.seed,
            "class-names": list(config.class_names),
            **standardization(model),
        }
    )
    evaluate_config = ConfigRecord({"class-names": list(config.class_names), **standardization(model)})
    arrays, evaluation = run_rounds(
        counted, config, outcome, to_arrays(model), train_config, evaluate_config, sum_confusions, context
    )
    outcome.model = from_arrays(arrays, config.class_names, model.mean, model.scale)
    for rnd, metrics in evaluation.items():
        outcome.evaluation[rnd] = {k: v for k, v in metrics.items() if k != "confusion"}
    if config.quantize:
        from pdm_tools.fleet_learning.classifier_gate import federated_gate

        outcome.gate = federated_gate(counted, outcome.model, config.seed, config.round_timeout_s)


def run_rounds(
    counted: CountingGrid,
    config: FederationConfig,
    outcome: Outcome,
    initial: ArrayRecord,
    train_config: ConfigRecord,
    evaluate_config: ConfigRecord,
    evaluate_aggr: Callable[[list[RecordDict], str], MetricRecord],
    context: Context | None = None,
) -> tuple[ArrayRecord, dict[int, MetricRecord]]:
    """``config.rounds`` rounds of train + federated evaluation of any fleet model (the classifier, the
    autoencoders, the LoRA factors: ``initial``'s named arrays) with the strategy of ``config``: Flower's
    message-API strategy (``make_strategy``; with DP wrapped in server-side clipping and noise, the budget then
    in ``outcome.privacy``) or, with ``config.secagg``, the SecAgg+ workflow (``secagg.federate_secagg``: needs
    the run's ``context`` and the clients' row counts in ``outcome.provenance``). Returns the final arrays and
    each round's aggregated evaluation metrics (``evaluate_aggr`` of the clients' replies)."""
    if config.secagg:
        if context is None:
            raise FederationError("secure aggregation needs the ServerApp's context (Flower's legacy workflow)")
        arrays, evaluation = federate_secagg(
            counted, context, config, outcome, initial, train_config, evaluate_config, evaluate_aggr
        )
    else:
        result = make_strategy(config, evaluate_aggr, counted).start(
            grid=counted,
            initial_arrays=initial,
            num_rounds=config.rounds,
            timeout=config.round_timeout_s,
            train_config=train_config,
            evaluate_config=evaluate_config,
        )
        arrays, evaluation = result.arrays, dict(result.evaluate_metrics_clientapp)
    if config.dp:
        outcome.privacy = privacy_report(config, len(evaluation) or config.rounds)
    return arrays, evaluation


def privacy_report(config: FederationConfig, released: int) -> dict[str, Any]:
    """The client-level privacy budget of a DP federation that released ``released`` models."""
    return {
        "epsilon": round(privacy_budget(config.dp_noise, released, config.dp_delta), 4),
        "delta": config.dp_delta,
        "rounds": released,
        "noise_multiplier": config.dp_noise,
        "clipping_norm": config.dp_clip,
        "unit": "one client's data (client-level DP, add/remove one client)",
        "accounting": "Renyi DP of the Gaussian mechanism, no sampling amplification",
    }


def fleet_standardization(
    grid: Grid, config: FederationConfig, outcome: Outcome | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of the pooled training rows, from each client's count, sum and sum of
    squares (a ``query`` to every connected client once ``min_clients`` are there); their provenance
    (data hash, row counts) goes into ``outcome``."""
    replies = query_clients(grid, config.min_clients, config.wait_for_clients_s, config.round_timeout_s, outcome)
    n = 0.0
    s = ss = np.zeros(0)
    for reply in replies:
        stats = reply.content.metric_records["stats"]
        n += float(stats["num-examples"])  # type: ignore[arg-type]
        s = s + np.asarray(stats["sum"], np.float64) if len(s) else np.asarray(stats["sum"], np.float64)
        ss = ss + np.asarray(stats["sumsq"], np.float64) if len(ss) else np.asarray(stats["sumsq"], np.float64)
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean**2, 0.0))
    return mean, np.where(std > 1e-12, std, 1.0)


def query_clients(
    grid: Grid,
    min_clients: int,
    wait_s: float,
    timeout_s: float,
    outcome: Outcome | None = None,
    config: ConfigRecord | None = None,
) -> list[Message]:
    """A ``query`` (with ``config``, if given, as its ``config`` record) to every connected client once
    ``min_clients`` are there (waiting up to ``wait_s``); the replies (``stats`` with ``num-examples``,
    ``provenance``: data hash, held-out rows) that came within ``timeout_s``, their provenance recorded in
    ``outcome``. ``FederationError`` below ``min_clients``."""
    deadline = time.monotonic() + wait_s
    while len(nodes := list(grid.get_node_ids())) < min_clients:
        if time.monotonic() > deadline:
            raise FederationError(f"{len(nodes)} clients connected after {wait_s} s")
        time.sleep(1.0)
    messages = [
        Message(
            RecordDict({"config": config} if config is not None else {}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
        )
        for node in nodes
    ]
    replies = [r for r in grid.send_and_receive(messages, timeout=timeout_s) if not r.has_error()]
    if len(replies) < min_clients:
        raise FederationError(f"{len(replies)} of {len(nodes)} clients answered the query; need {min_clients}")
    for reply in replies:
        stats = reply.content.metric_records["stats"]
        provenance = reply.content.config_records.get("provenance")
        if outcome is not None:
            outcome.provenance[reply.metadata.src_node_id] = {
                "rows": int(stats["num-examples"]),  # type: ignore[arg-type]
                **({k: v for k, v in provenance.items()} if provenance is not None else {}),
            }
    return replies


class CountingGrid(Grid):
    """The runtime's grid, counting each round's payload bytes and the training rows each client reports
    (and keeping the replies when ``outcome.keep_replies``, for tests that inspect what clients send)."""

    def __init__(self, inner: Grid, outcome: Outcome) -> None:
        self._inner = inner
        self._outcome = outcome
        # The last training round's replies: their content (by identity) -> the node that sent it.
        self._train_round = 0
        self._train_senders: dict[int, int] = {}

    def recording_kept(
        self, aggregate: Callable[[list[RecordDict], str], MetricRecord]
    ) -> Callable[[list[RecordDict], str], MetricRecord]:
        """``aggregate`` (a strategy's train metrics aggregation), first recording in ``Outcome.kept`` the nodes
        whose replies it is given: for Krum and Multi-Krum, the updates they selected."""

        def record(contents: list[RecordDict], weight_key: str) -> MetricRecord:
            nodes = [self._train_senders[id(c)] for c in contents if id(c) in self._train_senders]
            self._outcome.kept[self._train_round] = sorted(nodes)
            return aggregate(contents, weight_key)

        return record

    def set_run(self, run: Any) -> None:
        self._inner.set_run(run)

    @property
    def run(self) -> Any:
        return self._inner.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self._inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        sent = list(messages)
        replies = list(self._inner.send_and_receive(sent, timeout=timeout))
        rnd = 0
        for m in sent:
            config = m.content.config_records.get("config")
            if config is not None:
                rnd = int(config.get("server-round", 0))  # type: ignore[arg-type]
            elif m.metadata.group_id.isdigit():  # Flower's legacy workflows (SecAgg+) name the round here
                rnd = int(m.metadata.group_id)
        total = sum(_payload_bytes(m) for m in sent) + sum(_payload_bytes(r) for r in replies)
        if any(m.metadata.message_type == MessageType.TRAIN for m in sent):
            self._train_round, self._train_senders = rnd, {}
        self._outcome.bytes_per_round[rnd] = self._outcome.bytes_per_round.get(rnd, 0) + total
        for reply in replies:
            if reply.has_error():
                logger.warning("client %s failed: %s", reply.metadata.src_node_id, reply.error.reason)
                continue
            if self._outcome.keep_replies:
                self._outcome.replies.append((reply.metadata.message_type, reply.content))
            metrics = reply.content.metric_records.get("metrics")
            legacy = reply.content.metric_records.get("fitres.num_examples")  # SecAgg+'s masked-vector reply
            if reply.metadata.message_type == MessageType.TRAIN and (metrics or legacy) is not None:
                node = reply.metadata.src_node_id
                rows = metrics["num-examples"] if metrics is not None else legacy["num_examples"]  # type: ignore[index]
                self._outcome.client_rows[node] = int(rows)  # type: ignore[arg-type]
                self._outcome.participants.setdefault(rnd, []).append(node)
                self._train_senders[id(reply.content)] = node
                # SecAgg+'s masked-vector reply keeps the client's metrics (flattened) in ``fitres.metrics``.
                reported = metrics if metrics is not None else reply.content.config_records.get("fitres.metrics")
                self._outcome.train_metrics.setdefault(rnd, {})[node] = _scalars(reported or {})
        return replies


def _scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a train reply's metrics (lists, strings and flags left out).

    >>> _scalars({"num-examples": 3, "train-loss": 0.5, "confusion": [1, 2], "ok": True, "note": "x"})
    {'num-examples': 3, 'train-loss': 0.5}
    """
    return {k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _payload_bytes(message: Message) -> int:
    if not message.has_content():
        return 0
    return sum(
        _config_bytes(record) if isinstance(record, ConfigRecord) else record.count_bytes()
        for record in message.content.values()
    )


def _config_bytes(record: ConfigRecord) -> int:
    """``ConfigRecord.count_bytes`` (keys, 8 per number, 1 per bool, the length of a str or bytes) without its
    refusal of an empty string or list, which the legacy and SecAgg+ messages carry.

    >>> _config_bytes(ConfigRecord({"a": "", "bb": [1, 2], "c": [b"xyz", b""], "d": True}))
    25
    """

    def size(value: Any) -> int:
        if isinstance(value, bool):
            return 1
        return len(value) if isinstance(value, str | bytes) else 8

    return sum(len(k) + (sum(size(x) for x in v) if isinstance(v, list) else size(v)) for k, v in record.items())
