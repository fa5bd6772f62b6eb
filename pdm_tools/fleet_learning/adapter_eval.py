"""``pdm-agent fleet evaluate --dataset cwru --adapters``: one LoRA adapter trained by the machines that meet
a new defect size, on the frozen fleet classifier, against each machine's own adapter.

Protocol (the diameter shift of ``pdm_tools.evaluation.adaptation.cwru``, split like a fleet): the base is
the classifier fitted on every other defect diameter at the training loads (all loads but the last) plus
healthy data, exported to ONNX and frozen. The machines that meet diameter ``d`` are the clients: at each
training load, ``per_load`` clients, each holding its own consecutive stretch of every recording of
diameter ``d`` at that load (and of the load's healthy piece), split by time: of the first 85 % it keeps
only ``windows`` evenly spaced windows per recording (a technician confirmed a few), the rest is its
held-out data. Test: diameter ``d`` at the last load (no client's load, the adaptation protocol's
*shifted* machine) and, for forgetting, the other diameters there (*reference*).

Models, all from the same initial factors (``B = 0``: the base) with the same number of epochs
(``rounds × local_epochs``): *federated* (the factors aggregated by the configured strategy, with DP or
SecAgg+ if asked, in Flower's simulation), *local* (each
client's own adapter), *central* (one adapter on the pooled windows). Only the factors travel: the bytes
per round are Flower's payload bytes, beside what the same round would carry for the whole classifier.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.clientapp.typing import Mod

from agent.adaptation.lora import BaseMlp, LoraWeights
from agent.features.bearing import BearingFeatureSpec
from pdm_tools.datasets.cwru import CLASS_NAMES, NORMAL_TRAIN_HOP, Recording, featurize, normal_parts, stack
from pdm_tools.evaluation.adaptation.cwru import CWRU_LORA
from pdm_tools.evaluation.classification import scores
from pdm_tools.fleet_learning.adapters import (
    AdapterFederation,
    AdapterOutcome,
    build_adapter_client_app,
    build_adapter_server_app,
    layer_parameters,
    train_adapter,
)
from pdm_tools.fleet_learning.data import ClientData, ClientDataError
from pdm_tools.fleet_learning.evaluate import ROBUST_COMPARISON, most_rows, poisoning_mod, run_in_simulation
from pdm_tools.fleet_learning.secagg import SECAGG_MODS
from pdm_tools.fleet_learning.server_app import FederationError, against_poisoned
from pdm_tools.models.defect_mlp import DefectMlp, MlpConfig, export_onnx, fit_mlp
from pdm_tools.training.defect_train import HOLDOUT_FRACTION, split_by_time


def shift_fleet(
    recordings: Sequence[Recording], spec: BearingFeatureSpec, diameter: float, per_load: int, windows: int
) -> tuple[DefectMlp, list[ClientData], tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The base classifier, the clients (module docstring), the test rows of diameter ``diameter`` at the last
    load and the reference rows (other diameters there), each as ``(x, y)``."""
    faults = [r for r in recordings if r.kind != "normal"]
    normals = [r for r in recordings if r.kind == "normal"]
    sizes = sorted({r.diameter_in for r in faults if r.diameter_in is not None})
    if not normals or diameter not in sizes:
        raise ClientDataError(f"--adapter-diameter {diameter}: not one of the CWRU defect diameters {sizes}")
    loads = sorted({r.load_hp for r in faults})
    train_loads, test_load = loads[:-1], loads[-1]
    normal = max(normals, key=lambda r: len(r.samples))
    parts = normal_parts(normal, len(loads))
    base_blocks = [
        (featurize(spec, r, r.samples, spec.hop_samples), r.label)
        for r in faults
        if r.diameter_in != diameter and r.load_hp in train_loads
    ]
    base_blocks += [(featurize(spec, normal, parts[i], NORMAL_TRAIN_HOP), 0) for i in range(len(train_loads))]
    base = fit_mlp(*stack(base_blocks, spec.n_features), CLASS_NAMES, 42, MlpConfig())
    normal_test = (featurize(spec, normal, parts[-1], spec.hop_samples), 0)
    at_test = [r for r in faults if r.load_hp == test_load]
    test = stack(
        [(featurize(spec, r, r.samples, spec.hop_samples), r.label) for r in at_test if r.diameter_in == diameter]
        + [normal_test],
        spec.n_features,
    )
    reference = stack(
        [(featurize(spec, r, r.samples, spec.hop_samples), r.label) for r in at_test if r.diameter_in != diameter]
        + [normal_test],
        spec.n_features,
    )
    clients = []
    for i, load in enumerate(train_loads):
        sources = [(r, r.samples, spec.hop_samples) for r in faults if r.diameter_in == diameter and r.load_hp == load]
        sources.append((normal, parts[i], NORMAL_TRAIN_HOP))
        for j in range(per_load):
            train, held = [], []
            for rec, samples, hop in sources:
                piece = np.array_split(samples, per_load)[j]
                # At least three held-out windows per recording (the healthy pieces are short).
                head, tail = split_by_time(piece, max(HOLDOUT_FRACTION, (spec.window_samples + 2 * hop) / len(piece)))
                rows = featurize(spec, rec, head, hop)
                take = np.unique(np.linspace(0, len(rows) - 1, min(windows, len(rows))).round().astype(int))
                train.append((rows[take], rec.label))
                held.append((featurize(spec, rec, tail, hop), rec.label))
            x, y = stack(train, spec.n_features)
            xh, yh = stack(held, spec.n_features)
            clients.append(ClientData(f"load{load}-{j}", x, y, xh, yh, CLASS_NAMES))
    return base, clients, test, reference


def evaluate_adapter_fleet(
    base_model: DefectMlp,
    clients: Sequence[ClientData],
    test: tuple[np.ndarray, np.ndarray],
    reference: tuple[np.ndarray, np.ndarray],
    config: AdapterFederation,
) -> dict[str, Any]:
    """The JSON object of ``fleet evaluate --adapters`` (module docstring)."""
    k = len(CLASS_NAMES)
    base, outcome = simulate_adapters(base_model, clients, config)
    assert outcome.adapter is not None
    epochs = config.rounds * config.local_epochs

    def fit(xs: np.ndarray, ys: np.ndarray) -> LoraWeights:
        assert outcome.initial is not None
        lr, batch, decay = config.learning_rate, config.batch_size, config.weight_decay
        return train_adapter(base, outcome.initial, xs, ys, epochs, config.seed, lr, batch, decay)[0]

    def f1(lora: LoraWeights | None, rows: tuple[np.ndarray, np.ndarray]) -> float:
        return float(scores(rows[1], base.predict(rows[0], lora), k)["macro_f1"])

    def measure(lora: LoraWeights | None) -> dict[str, Any]:
        return {
            "macro_f1": f1(lora, test),
            "accuracy": scores(test[1], base.predict(test[0], lora), k)["accuracy"],
            "reference_macro_f1": f1(lora, reference),
            "per_client_macro_f1": {c.name: f1(lora, (c.x_held, c.y_held)) for c in clients},
        }

    local = {c.name: fit(c.x, c.y) for c in clients}
    local_scores = {name: measure(lora) for name, lora in local.items()}
    central = fit(np.concatenate([c.x for c in clients]), np.concatenate([c.y for c in clients]))
    training_rounds = [b for r, b in outcome.counters.bytes_per_round.items() if r > 0]
    bytes_per_round = int(np.mean(training_rounds)) if training_rounds else 0
    adapter_parameters = outcome.adapter.n_parameters
    full = layer_parameters(base)
    return {
        "base": measure(None),
        "federated": {
            **measure(outcome.adapter),
            "federated_evaluation": outcome.counters.evaluation.get(config.rounds, {}),
        },
        "central": measure(central),
        "local": {
            "macro_f1": round(float(np.mean([v["macro_f1"] for v in local_scores.values()])), 6),
            "reference_macro_f1": round(float(np.mean([v["reference_macro_f1"] for v in local_scores.values()])), 6),
            "per_model_macro_f1": {name: v["macro_f1"] for name, v in local_scores.items()},
            "own_client_macro_f1": {name: v["per_client_macro_f1"][name] for name, v in local_scores.items()},
        },
        "client_rows": {c.name: len(c.y) for c in clients},
        "test_rows": len(test[1]),
        "adapter_parameters": adapter_parameters,
        "base_parameters": full,
        "bytes_per_round": bytes_per_round,
        # The same round carrying the whole classifier instead: three messages per client hold the arrays (the
        # model to it and back for training, to it for evaluation), each 4 bytes per parameter more.
        "full_model_bytes_per_round_estimate": bytes_per_round + 4 * (full - adapter_parameters) * 3 * len(clients),
        "rounds": config.rounds,
        "clients": len(clients),
        "federation": config.to_dict(),
        **({"privacy": outcome.counters.privacy} if outcome.counters.privacy else {}),
        **({"secagg": outcome.counters.secagg} if outcome.counters.secagg else {}),
    }


def simulate_adapters(
    base_model: DefectMlp, clients: Sequence[ClientData], config: AdapterFederation, mods: Sequence[Mod] = ()
) -> tuple[BaseMlp, AdapterOutcome]:
    """The adapter federation over ``clients`` in Flower's simulation, on ``base_model`` frozen (as ONNX, the
    agents' base); ``mods`` around the clients' handlers (SecAgg+'s are added when ``config.secagg``).
    Returns the base as the clients ran it and the outcome."""
    outcome = AdapterOutcome()
    mods = (*SECAGG_MODS, *mods) if config.secagg else tuple(mods)
    with tempfile.TemporaryDirectory(prefix="pdm-fleet-adapter-") as tmp:
        root = Path(tmp)
        base_path = export_onnx(base_model, root / "base.onnx", {"model_id": "fleet-base", "version": "1"})
        base = BaseMlp.from_onnx(base_path)
        for i, client in enumerate(clients):
            client.save(root / f"client-{i}")
        client_app = build_adapter_client_app(root, base_path, mods)
        run_in_simulation(build_adapter_server_app(config, base, outcome), client_app, len(clients))
    if outcome.adapter is None or outcome.initial is None:
        raise FederationError("the simulation ended without an adapter (see the log above)")
    return base, outcome


def products(lora: LoraWeights) -> np.ndarray:
    """The adapter's effect: ``A @ B`` of every layer (what it adds to the base's weights, up to ``alpha /
    rank``), flattened: the quantity robust aggregation of the factors should protect."""
    return np.concatenate([(a.astype(np.float64) @ b.astype(np.float64)).ravel() for a, b in lora.factors.values()])


def adapter_robustness(
    base_model: DefectMlp,
    clients: Sequence[ClientData],
    test: tuple[np.ndarray, np.ndarray],
    reference: tuple[np.ndarray, np.ndarray],
    config: AdapterFederation,
    poisoned: int = 1,
    strategies: Sequence[str] = ROBUST_COMPARISON,
) -> dict[str, Any]:
    """For each strategy: the fleet adapter with ``poisoned`` clients poisoned (those with the most rows send
    their factors' update reversed and scaled 10x, ``evaluate.poisoning_mod``) against without, each strategy
    sized for that many attackers (``server_app.against_poisoned``).
    ``shift_vs_training``: how far the poisoned adapter's products ``A @ B`` lie from the clean one's, over how
    far training moved the clean one's from the start (``B = 0``: products 0); macro-F1 on the new size at the
    unseen load, clean and poisoned."""
    k = len(CLASS_NAMES)
    sized = against_poisoned(config.aggregation(), poisoned, len(clients))
    config = dataclasses.replace(config, trim_beta=sized.trim_beta, krum_malicious=sized.krum_malicious)
    attackers = most_rows([len(c.y) for c in clients], poisoned)
    out: dict[str, Any] = {
        "clients": len(clients),
        "poisoned_clients": poisoned,
        "rounds": config.rounds,
        "federation": config.to_dict(),
        "trim_beta": config.trim_beta,
        "krum_malicious": config.krum_malicious,
        "poisoning": {},
    }
    for name in strategies:
        run = dataclasses.replace(config, strategy=name)
        base, clean = simulate_adapters(base_model, clients, run)
        _, attacked = simulate_adapters(base_model, clients, run, [poisoning_mod(attackers)])
        assert clean.adapter is not None and attacked.adapter is not None and clean.initial is not None
        moved = float(np.linalg.norm(products(clean.adapter) - products(clean.initial)))
        shift = float(np.linalg.norm(products(attacked.adapter) - products(clean.adapter)))
        out["poisoning"][name] = {
            "shift_vs_training": round(shift / moved, 4),
            "macro_f1_clean": float(scores(test[1], base.predict(test[0], clean.adapter), k)["macro_f1"]),
            "macro_f1_poisoned": float(scores(test[1], base.predict(test[0], attacked.adapter), k)["macro_f1"]),
            "reference_macro_f1_poisoned": float(
                scores(reference[1], base.predict(reference[0], attacked.adapter), k)["macro_f1"]
            ),
        }
    return out


def default_federation(rounds: int, local_epochs: int, clients: int, seed: int) -> AdapterFederation:
    """The adapter's shape of the adaptation measurement (``CWRU_LORA``: rank 2 on the first and last layer)."""
    assert CWRU_LORA.layers is not None
    return AdapterFederation(
        layers=CWRU_LORA.layers,
        rank=CWRU_LORA.rank,
        alpha=CWRU_LORA.alpha,
        rounds=rounds,
        local_epochs=local_epochs,
        learning_rate=CWRU_LORA.learning_rate,
        batch_size=CWRU_LORA.batch_size,
        weight_decay=CWRU_LORA.weight_decay,
        min_clients=clients,
        seed=seed,
    )
