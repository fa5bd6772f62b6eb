"""Secure aggregation (Flower's SecAgg+) for every fleet model (the defect classifier, the process and vibration
autoencoders, the LoRA adapters' factors): the coordinator learns the weighted average of the clients' models
and nothing about any single one.

How Flower 1.42 runs it. SecAgg+ is a workflow of Flower's legacy server API
(``flwr.server.workflow.SecAggPlusWorkflow`` inside ``DefaultWorkflow``, driving a legacy ``FedAvg``), and a
client mod (``flwr.client.mod.secaggplus_mod``) that runs the protocol's four stages (keys, key shares,
masked vector, unmasking) around the client's train handler. The message-API strategies the rest of the
fleet uses (``flwr.serverapp.strategy``) have no secure-aggregation variant. So with ``--secagg`` the
coordinator runs its query before round 1 as always (it gives every client's row count: SecAgg+'s
``max_weight``), then the legacy workflow (``federate_secagg``, called by ``server_app.run_rounds`` for every
model); on the client, ``legacy_adapter_mod`` translates the legacy messages (``fitins.*``,
``evaluateins.*``) to the ClientApp's own (``arrays`` named by the round's ``array-names``, ``config``) and
its replies back (``fitres.*``, ``evaluateres.*``, list metrics flattened to scalars). The ClientApps' train
and evaluate handlers are unchanged. Messages outside the workflow (the quantization gate after the last
round) are the message API's and pass the mods untouched.

What changes on the wire. A client's train reply holds no model: ``secaggplus_mod`` multiplies the
client's weights by its share of the weight (``rows / max_weight``), clips them to ``±clipping_range``,
quantizes them to ``quantization_range`` integer levels and adds pairwise and private masks modulo
``modulus_range``; only that masked vector leaves the client. The coordinator can unmask the sum only.
The price is the quantization: every weight is rounded to a step of ``2 · clipping_range /
quantization_range`` times the client's weight share, so the aggregate differs slightly from plain FedAvg's
(``secagg_error_bound``; measured in ``docs/fleet.md``).

What it excludes. Robust aggregation (trimmed mean, Krum) ranks or compares the individual updates, which
SecAgg+ hides by design; server-side differential privacy clips each individual update, which the
coordinator no longer sees. Both combinations are refused with that reason (``check_secagg``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.serverapp import Grid

if TYPE_CHECKING:  # server_app imports this module; the types only, one way at run time
    from pdm_tools.fleet_learning.server_app import FederationConfig, Outcome


@dataclass(frozen=True)
class SecAggSettings:
    """SecAgg+'s parameters (Flower's defaults but the share fractions, chosen for small plant fleets)."""

    clipping_range: float = 8.0
    quantization_range: int = 2**22
    modulus_range: int = 2**32
    # Each client's secret is split among this share of the round's clients, and this share of the shares
    # rebuilds it: with 3 clients, each shares with all 3 and any 2 can unmask a client that dropped out.
    shares: float = 1.0
    threshold: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        return {
            "clipping_range": self.clipping_range,
            "quantization_range": self.quantization_range,
            "modulus_range": self.modulus_range,
            "shares": self.shares,
            "reconstruction_threshold": self.threshold,
        }


def check_secagg(strategy: str, dp: bool) -> None:
    """``ValueError`` naming why secure aggregation cannot run with ``strategy`` or with DP."""
    if strategy not in ("fedavg", "fedprox"):
        raise ValueError(
            f"secure aggregation cannot run with --strategy {strategy}: SecAgg+ shows the coordinator only the sum "
            "of the clients' updates, and a robust aggregation (trimmed mean, krum) must see each update to rank "
            "or compare them; use fedavg or fedprox with --secagg, or a robust strategy without it"
        )
    if dp:
        raise ValueError(
            "secure aggregation cannot run with --dp-noise/--dp-clip: the server-side clipping clips each "
            "client's update, which SecAgg+ hides from the coordinator"
        )


def secagg_error_bound(settings: SecAggSettings, weights: list[float]) -> float:
    """Largest difference, per weight, between SecAgg+'s aggregate and the exact weighted mean of the same
    client models (``weights``: their row counts), when no weight is clipped. Each client's ``share · w``
    (``share = rows / max rows``) is rounded stochastically to a step of ``2 · clipping_range /
    quantization_range`` (less than one step off) and its share to ``1 / quantization_range`` (half a level
    off, times at most ``2 · clipping_range`` between a weight and the mean); the sum is divided by the total
    share.

    >>> round(secagg_error_bound(SecAggSettings(), [500.0, 500.0]) * 1e6, 3)
    5.722
    """
    step = 2 * settings.clipping_range / settings.quantization_range
    largest = max(weights)
    total_share = sum(w / largest for w in weights)
    per_client = step + settings.clipping_range / settings.quantization_range
    return len(weights) * per_client / total_share


def _mlp_names(count: int) -> list[str]:
    """The classifier's array names in Flower's legacy order (``to_arrays``: w0, b0, w1, b1, ...), for a round
    whose config names none (``ARRAY_NAMES``).

    >>> _mlp_names(4)
    ['w0', 'b0', 'w1', 'b1']
    """
    return [f"{'wb'[i % 2]}{i // 2}" for i in range(count)]


# The round's config names the model's arrays in the legacy parameters' order: any fleet model (classifier,
# autoencoder, LoRA factors) travels as Flower's unnamed legacy tensors and is named back on both sides.
ARRAY_NAMES = "array-names"


def _names(config: Any, count: int) -> list[str]:
    names = config.get(ARRAY_NAMES) if config is not None else None
    return [str(n) for n in names] if isinstance(names, list) else _mlp_names(count)


def named_arrays(record: ArrayRecord, names: list[str] | None = None) -> ArrayRecord:
    """A legacy parameters record (arrays keyed ``0``, ``1``, … in the model's order) as the model's named
    arrays (``names``; default the classifier's, ``params.from_arrays`` reads them)."""
    tensors = parameters_to_ndarrays(compat.arrayrecord_to_parameters(record, keep_input=True))
    names = names or _mlp_names(len(tensors))
    return ArrayRecord({name: Array(np.asarray(t, np.float32)) for name, t in zip(names, tensors, strict=True)})


LegacyMetrics = dict[str, bool | bytes | float | int | str]


def flatten_metrics(metrics: Mapping[str, Any]) -> LegacyMetrics:
    """A ``MetricRecord``'s items as the legacy API's scalars: a list ``key`` becomes ``key[0]``, ``key[1]``, …
    (``unflatten_metrics`` reverses it).

    >>> flatten_metrics({"tp": 3, "hist": [1, 0]})
    {'tp': 3, 'hist[0]': 1, 'hist[1]': 0}
    """
    out: LegacyMetrics = {}
    for key, value in metrics.items():
        if isinstance(value, list):
            out.update({f"{key}[{i}]": v for i, v in enumerate(value)})
        else:
            out[key] = value
    return out


def unflatten_metrics(flat: Mapping[str, Any]) -> MetricRecord:
    """The inverse of ``flatten_metrics`` (numbers only: what a ``MetricRecord`` holds).

    >>> dict(unflatten_metrics({"tp": 3, "hist[1]": 0, "hist[0]": 1}))
    {'tp': 3, 'hist': [1, 0]}
    """
    scalars: dict[str, Any] = {}
    lists: dict[str, dict[int, Any]] = {}
    for key, value in flat.items():
        name, _, index = key.partition("[")
        if index.endswith("]") and index[:-1].isdigit():
            lists.setdefault(name, {})[int(index[:-1])] = value
        elif isinstance(value, int | float) and not isinstance(value, bool):
            scalars[key] = value
    return MetricRecord({**scalars, **{k: [v[i] for i in sorted(v)] for k, v in lists.items()}})


def legacy_adapter_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A client mod: the legacy workflow's train and evaluate messages as the ClientApp's own (arrays named by
    the round's ``ARRAY_NAMES``), and its replies as the legacy ones (the arrays in that order, the metrics
    flattened, ``flatten_metrics``); every other message passes unchanged (so a client with this mod joins any
    run, and the quantization gate's evaluate message after the last SecAgg+ round reaches the app as sent)."""
    content = message.content
    for kind in ("fitins", "evaluateins"):
        if f"{kind}.parameters" in content.array_records:
            break
    else:
        return call_next(message, context)
    config = content.config_records[f"{kind}.config"]
    parameters = content.array_records[f"{kind}.parameters"]
    arrays = named_arrays(parameters, _names(config, len(parameters)))
    message.content = RecordDict({"arrays": arrays, "config": config})
    reply = call_next(message, context)
    if reply.has_error():
        return reply
    metrics = reply.content.metric_records["metrics"]
    rows = int(cast(int, metrics["num-examples"]))
    ok = Status(code=Code.OK, message="")
    flat = flatten_metrics(metrics)
    if kind == "fitins":
        trained = reply.content.array_records["arrays"]
        names = _names(config, len(trained))
        tensors = ndarrays_to_parameters([trained[name].numpy() for name in names])
        reply.content = compat.fitres_to_recorddict(FitRes(ok, tensors, rows, flat), False)
    else:
        loss = float(cast(float, metrics.get("loss", 0.0)))
        reply.content = compat.evaluateres_to_recorddict(EvaluateRes(ok, loss, rows, flat))
    return reply


def optional_secagg_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """``secaggplus_mod`` for the messages of a SecAgg+ round (they carry its configs), nothing otherwise: the
    agents' one ClientApp serves runs with and without secure aggregation."""
    if message.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in message.content.config_records:
        return secaggplus_mod(message, context, call_next)
    return call_next(message, context)


# The mods a ClientApp needs for secure aggregation, outermost first.
SECAGG_MODS = (optional_secagg_mod, legacy_adapter_mod)


def federate_secagg(
    counted: Grid,
    context: Context,
    config: FederationConfig,
    outcome: Outcome,
    initial: ArrayRecord,
    fit_config: ConfigRecord,
    evaluate_config: ConfigRecord,
    evaluate_aggr: Callable[[list[RecordDict], str], MetricRecord],
) -> tuple[ArrayRecord, dict[int, MetricRecord]]:
    """``config.rounds`` rounds of the legacy FedAvg whose fit step is the SecAgg+ workflow, on ``counted`` (the
    run's grid, counting what travels), from the model ``initial`` (any fleet model's named arrays), with the
    round's ``fit_config`` and ``evaluate_config``; ``evaluate_aggr``: how the clients' evaluation metrics add
    up (the message API's ``sum_confusions``, ``process_app.sum_counts``: the legacy metrics are unflattened
    for it). Returns the final arrays and each round's aggregated evaluation metrics. Needs every client's
    row count in ``outcome.provenance`` (the query before round 1): the largest is SecAgg+'s ``max_weight``.
    The server's pieces come in as arguments: server_app imports this module, never the other way."""
    check_secagg(config.strategy, config.dp)
    if not outcome.provenance:
        raise ValueError("secure aggregation needs the clients' row counts (a query before round 1)")
    names = list(initial.keys())
    common = {**dict(evaluate_config), ARRAY_NAMES: names}
    fit = {
        **dict(fit_config),
        ARRAY_NAMES: names,
        **({"proximal-mu": config.proximal_mu} if config.strategy == "fedprox" else {}),
    }

    def on_fit(rnd: int) -> dict[str, Any]:
        return {**fit, "server-round": rnd}

    def on_evaluate(rnd: int) -> dict[str, Any]:
        return {**common, "server-round": rnd}

    def aggregate(results: list[tuple[int, dict[str, Any]]]) -> LegacyMetrics:
        records = [RecordDict({"metrics": unflatten_metrics(m)}) for _, m in results]
        return flatten_metrics(evaluate_aggr(records, "num-examples")) if records else {}

    strategy = LegacyFedAvg(
        min_fit_clients=config.min_clients,
        min_evaluate_clients=config.min_clients,
        min_available_clients=config.min_clients,
        # Lists travel in the config records (``ConfigRecord`` takes them) though the legacy type says scalars.
        on_fit_config_fn=cast(Callable[[int], dict[str, Any]], on_fit),
        on_evaluate_config_fn=cast(Callable[[int], dict[str, Any]], on_evaluate),
        initial_parameters=ndarrays_to_parameters([initial[name].numpy() for name in names]),
        evaluate_metrics_aggregation_fn=aggregate,
    )
    settings = config.secagg_settings
    # Weight shares are rows / max_weight, at most 1 (beyond it SecAgg+ may overflow): the largest client.
    max_weight = float(max(int(p["rows"]) for p in outcome.provenance.values()))
    workflow = SecAggPlusWorkflow(
        num_shares=settings.shares,
        reconstruction_threshold=settings.threshold,
        max_weight=max_weight,
        clipping_range=settings.clipping_range,
        quantization_range=settings.quantization_range,
        modulus_range=settings.modulus_range,
        timeout=config.round_timeout_s,
    )
    legacy = LegacyContext(
        context, config=ServerConfig(num_rounds=config.rounds, round_timeout=config.round_timeout_s), strategy=strategy
    )
    DefaultWorkflow(fit_workflow=workflow)(counted, legacy)
    arrays = named_arrays(legacy.state.array_records[MAIN_PARAMS_RECORD], names)
    per_round: dict[int, dict[str, Any]] = {}
    for key, values in legacy.history.metrics_distributed.items():
        for rnd, value in values:
            per_round.setdefault(rnd, {})[key] = value
    outcome.secagg = {**settings.to_dict(), "max_weight": max_weight}
    return arrays, {rnd: unflatten_metrics(flat) for rnd, flat in per_round.items()}
