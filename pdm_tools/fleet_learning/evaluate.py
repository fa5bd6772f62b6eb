"""``pdm-agent fleet evaluate``: the federated defect classifier against one trained centrally on the pooled
rows and against each client's own, on a dataset split like a fleet.

The federation runs in Flower's simulation runtime with the same ClientApp the agents run (one virtual
client per data folder written under a temporary directory). Central and local models are fitted with the
shipped recipe (``fit_mlp``). Every model is scored on every client's held-out rows (the last part of each
recording in time), and, with a load left out, on that load's rows.

``robustness`` measures how far poisoned clients (each sends its update reversed and scaled) move the fleet
model under each strategy, on a fleet of machines at different speeds.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

from pdm_tools.evaluation.classification import scores
from pdm_tools.fleet_learning.client_app import build_client_app
from pdm_tools.fleet_learning.fleets import Fleet
from pdm_tools.fleet_learning.secagg import SECAGG_MODS
from pdm_tools.fleet_learning.server_app import (
    FederationConfig,
    FederationError,
    Outcome,
    against_poisoned,
    build_server_app,
)
from pdm_tools.models.defect_mlp import DefectMlp, MlpConfig, fit_mlp

logger = logging.getLogger(__name__)

# The strategies ``--poisoned`` compares (each against its own clean run).
ROBUST_COMPARISON = ("fedavg", "trimmed", "krum", "multikrum")


def simulate(fleet: Fleet, config: FederationConfig, mods: Sequence[Mod] = (), keep_replies: bool = False) -> Outcome:
    """Run the federation over ``fleet``'s clients in Flower's simulation runtime (Ray, one CPU per client)."""
    outcome = Outcome(keep_replies=keep_replies)
    # With secure aggregation the clients run SecAgg+ (outermost) around the translation of its messages.
    mods = (*SECAGG_MODS, *mods) if config.secagg else tuple(mods)
    with tempfile.TemporaryDirectory(prefix="pdm-fleet-") as tmp:
        root = Path(tmp)
        for i, client in enumerate(fleet.clients):
            client.save(root / f"client-{i}")
        run_in_simulation(build_server_app(config, outcome), build_client_app(root, mods), len(fleet.clients))
    if outcome.model is None:
        raise FederationError("the simulation ended without a model (see the log above)")
    return outcome


def run_in_simulation(server_app: ServerApp, client_app: ClientApp, clients: int) -> None:
    """Flower's simulation runtime: ``clients`` virtual SuperNodes, one CPU each, on at most two CPUs."""
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )


def evaluate_fleet(fleet: Fleet, config: FederationConfig) -> dict[str, Any]:
    """The JSON object of ``fleet evaluate``: ``federated``, ``central``, ``local``, ``bytes_per_round``, ``rounds``."""
    return compare(fleet, config, simulate(fleet, config))


def compare(fleet: Fleet, config: FederationConfig, outcome: Outcome, mlp: MlpConfig | None = None) -> dict[str, Any]:
    """The federation's model (``outcome``) against central and local-only fits, scored on the same rows."""
    mlp = mlp or MlpConfig(hidden=config.hidden, alpha=config.training.alpha)
    k = len(config.class_names)
    x_held, y_held = fleet.held_out()

    def measure(model: DefectMlp) -> dict[str, Any]:
        s = scores(y_held, model.predict(x_held), k)
        out: dict[str, Any] = {"macro_f1": s["macro_f1"], "accuracy": s["accuracy"]}
        out["per_client_macro_f1"] = {
            c.name: scores(c.y_held, model.predict(c.x_held), k)["macro_f1"] for c in fleet.clients
        }
        if len(fleet.unseen_y):
            out["unseen_macro_f1"] = scores(fleet.unseen_y, model.predict(fleet.unseen_x), k)["macro_f1"]
        return out

    assert outcome.model is not None
    x_all = np.concatenate([c.x for c in fleet.clients])
    y_all = np.concatenate([c.y for c in fleet.clients])
    central = fit_mlp(x_all, y_all, config.class_names, config.seed, mlp)
    local_models = {c.name: fit_mlp(c.x, c.y, config.class_names, config.seed, mlp) for c in fleet.clients}
    local = {name: measure(model) for name, model in local_models.items()}
    training_rounds = [b for r, b in outcome.bytes_per_round.items() if r > 0]
    rows = {c.name: len(c.y) for c in fleet.clients}
    fewest = min(rows, key=lambda name: rows[name])
    federated = measure(outcome.model)
    centrally = measure(central)
    result: dict[str, Any] = {
        "federated": {**federated, "federated_evaluation": outcome.evaluation.get(config.rounds, {})},
        "central": centrally,
        "local": {
            "macro_f1": round(float(np.mean([v["macro_f1"] for v in local.values()])), 6),
            "own_client_macro_f1": {name: v["per_client_macro_f1"][name] for name, v in local.items()},
            "per_model_macro_f1": {name: v["macro_f1"] for name, v in local.items()},
            **(
                {"unseen_macro_f1": round(float(np.mean([v["unseen_macro_f1"] for v in local.values()])), 6)}
                if len(fleet.unseen_y)
                else {}
            ),
        },
        "client_with_fewest_rows": {
            "client": fewest,
            "rows": rows[fewest],
            "federated_macro_f1": federated["per_client_macro_f1"][fewest],
            "local_macro_f1": local[fewest]["per_client_macro_f1"][fewest],
        },
        **(
            {"least_data_clients": least_data_entries(fleet, rows, federated, centrally, local)}
            if fleet.least_data
            else {}
        ),
        # The quantization gate on every client's held-out rows (``config.quantize``), as ``fleet serve`` runs it.
        **({"quantization_gate": outcome.gate} if outcome.gate else {}),
        "bytes_per_round": int(np.mean(training_rounds)) if training_rounds else 0,
        "rounds": config.rounds,
        "clients": len(fleet.clients),
        "client_rows": rows,
        "federation": config.to_dict(),
        **({"privacy": outcome.privacy} if outcome.privacy else {}),
    }
    if fleet.unseen_name:
        result["unseen"] = fleet.unseen_name
    return result


def least_data_entries(
    fleet: Fleet,
    rows: dict[str, int],
    federated: dict[str, Any],
    central: dict[str, Any],
    local: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Per least-data client: its training rows, and the macro-F1 on its own held-out rows of the fleet model,
    the central one and its own local-only model; then their means over those clients."""
    per_client = {
        name: {
            "rows": rows[name],
            "held_out_rows": len(next(c for c in fleet.clients if c.name == name).y_held),
            "federated_macro_f1": federated["per_client_macro_f1"][name],
            "central_macro_f1": central["per_client_macro_f1"][name],
            "local_macro_f1": local[name]["per_client_macro_f1"][name],
        }
        for name in fleet.least_data
    }
    mean = {
        key: round(float(np.mean([v[key] for v in per_client.values()])), 6)
        for key in ("federated_macro_f1", "central_macro_f1", "local_macro_f1")
    }
    return {"clients": per_client, "mean": mean}


def poisoning_mod(poisoned: frozenset[int], boost: float = 10.0) -> Mod:
    """A Flower mod that makes the clients with these partition ids send their update reversed and scaled
    by ``boost`` (a model-replacement attack, or a client with a badly broken sensor pipeline)."""

    def mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(message, context)
        if message.metadata.message_type != MessageType.TRAIN or reply.has_error():
            return reply
        if int(context.node_config.get("partition-id", -1)) not in poisoned:
            return reply
        start = message.content.array_records["arrays"]
        trained = reply.content.array_records["arrays"]
        reply.content["arrays"] = ArrayRecord(
            {
                name: Array((s - boost * (t - s)).astype(np.float32))
                for name in trained
                for s, t in [(start[name].numpy(), trained[name].numpy())]
            }
        )
        return reply

    return mod


def relative_shift(model: DefectMlp, reference: DefectMlp) -> float:
    """``||theta - theta_ref|| / ||theta_ref||`` over the weights and biases: how far ``model`` moved.

    >>> from pdm_tools.fleet_learning.params import init_mlp
    >>> m = init_mlp(np.zeros(2), np.ones(2), (3,), ("a", "b"), seed=0)
    >>> relative_shift(m, m)
    0.0
    """
    theta = np.concatenate([p.ravel() for p in reference.weights + reference.biases]).astype(np.float64)
    other = np.concatenate([p.ravel() for p in model.weights + model.biases]).astype(np.float64)
    return float(np.linalg.norm(other - theta) / np.linalg.norm(theta))


def robustness(
    fleet: Fleet,
    config: FederationConfig,
    poisoned: int = 1,
    strategies: Sequence[str] = ROBUST_COMPARISON,
) -> dict[str, Any]:
    """For each strategy: the fleet model with ``poisoned`` clients poisoned vs without (each strategy sized for
    that many attackers, ``server_app.against_poisoned``, in both runs). The poisoned clients are those with the
    most rows (FedAvg weighs updates by row count, so that is the attack that moves it most).
    ``shift_vs_training``: the distance between the two over the distance the clean run's training moved the
    model from its start
    (1.0: the poisoned clients displaced the model as far as all of training did); ``relative_shift``: the
    same distance over the clean model's norm; macro-F1 on every client's held-out rows."""
    k = len(config.class_names)
    x_held, y_held = fleet.held_out()
    n = len(fleet.clients)
    sized = against_poisoned(config, poisoned, n)
    out: dict[str, Any] = {"clients": n, "poisoned_clients": poisoned, "rounds": config.rounds}
    out |= {"trim_beta": sized.trim_beta, "krum_malicious": sized.krum_malicious}
    attackers = most_rows([len(c.y) for c in fleet.clients], poisoned)
    for name in strategies:
        run = dataclasses.replace(sized, strategy=name)
        clean_run = simulate(fleet, run)
        clean, start = clean_run.model, clean_run.initial
        poisoned_model = simulate(fleet, run, mods=[poisoning_mod(attackers)]).model
        assert clean is not None and poisoned_model is not None and start is not None
        moved = relative_shift(clean, start) * _norm(start)
        out[name] = {
            "shift_vs_training": round(relative_shift(poisoned_model, clean) * _norm(clean) / moved, 4),
            "relative_shift": round(relative_shift(poisoned_model, clean), 4),
            "macro_f1_clean": scores(y_held, clean.predict(x_held), k)["macro_f1"],
            "macro_f1_poisoned": scores(y_held, poisoned_model.predict(x_held), k)["macro_f1"],
        }
    return out


def most_rows(rows: Sequence[int], count: int) -> frozenset[int]:
    """The partition ids of the ``count`` clients with the most rows (ties: the lower id).

    >>> sorted(most_rows([5, 9, 9, 1], 2))
    [1, 2]
    """
    return frozenset(sorted(range(len(rows)), key=lambda i: (-rows[i], i))[:count])


def _norm(model: DefectMlp) -> float:
    return float(np.linalg.norm(np.concatenate([p.ravel() for p in model.weights + model.biases]).astype(np.float64)))
