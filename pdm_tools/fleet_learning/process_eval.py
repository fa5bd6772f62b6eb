"""``pdm-agent fleet evaluate --dataset skab``: the fleet's process autoencoder trained federatedly, centrally
and by each client alone, scored with SKAB's outlier-detection protocol.

Fleet: clients are SKAB's testbed groups (the folder a file is in: ``valve1``, ``valve2``, ``other``); with
more clients than groups, a group's files are dealt round-robin to several clients (the group with the most
files per client gets the next one). Every file is one machine run: its first ``TRAIN_ROWS`` rows are its
commissioning (label-free training), the rest its test steps, as in ``pdm_tools.evaluation.skab``.

The three models (``pdm_tools.fleet_learning.process``) start from the same weights and run the same number
of epochs (``rounds × local_epochs``): *federated* in Flower's simulation runtime (each client trains on its
own machines' commissioning windows, the strategy averages), *central* on all clients' commissioning
windows pooled, *local* one per client on its own only. Every machine's threshold is its own label-free
``threshold_factor × max commissioning score``; confusion counts are pooled over files with
F1 = TP / (TP + (FP + FN) / 2), FAR = FP / (FP + TN) %, MAR = FN / (FN + TP) %. Federated and central are
scored on every file; a local model on its own client's files (it is that client's model).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.commissioning.detector import DetectorConfig
from pdm_tools.evaluation.skab import Confusion, SkabFile
from pdm_tools.fleet_learning.data import ClientDataError
from pdm_tools.fleet_learning.evaluate import run_in_simulation
from pdm_tools.fleet_learning.process import TRAIN_ROWS, AeTraining, Series, confusion, train_autoencoder
from pdm_tools.fleet_learning.process_app import (
    ProcessClient,
    ProcessFederation,
    ProcessOutcome,
    build_process_client_app,
    build_process_server_app,
    detector_for,
)
from pdm_tools.fleet_learning.process_gate import heldout_factor
from pdm_tools.fleet_learning.secagg import SECAGG_MODS
from pdm_tools.fleet_learning.server_app import FederationError, Outcome
from pdm_tools.models.autoencoder import Autoencoder


def skab_fleet(files: Sequence[SkabFile], clients: int | None = None) -> list[ProcessClient]:
    """``clients`` clients (default: one per testbed group) holding the files of their group."""
    return uneven_skab_fleet(files, clients)[0]


def uneven_skab_fleet(
    files: Sequence[SkabFile], clients: int | None = None, least_data: int = 0, fraction: float = 1.0
) -> tuple[list[ProcessClient], list[str]]:
    """``skab_fleet`` where ``least_data`` clients (``least_data_names``) keep only the first ``fraction`` of
    their files (at least one): a site with fewer machine runs of that kind, so less anomaly-free
    commissioning data. The files they drop are in no client (that site never had them). Returns the
    clients and the least-data clients' names."""
    groups: dict[str, list[SkabFile]] = {}
    for f in files:
        groups.setdefault(f.name.split("/")[0] if "/" in f.name else "root", []).append(f)
    n = len(groups) if clients is None else clients
    if not len(groups) <= n <= len(files):
        raise ClientDataError(
            f"--clients {n}: SKAB gives each testbed group ({', '.join(sorted(groups))}) at least one client and "
            f"each client at least one file ({len(groups)}..{len(files)})"
        )
    per_group = dict.fromkeys(groups, 1)
    for _ in range(n - len(groups)):
        spare = [g for g in groups if per_group[g] < len(groups[g])]
        per_group[max(spare, key=lambda g: len(groups[g]) / per_group[g])] += 1
    if least_data and not 0 < fraction < 1:
        raise ClientDataError(f"--least-data-fraction {fraction}: must be between 0 and 1 (exclusive)")
    small = least_data_names(per_group, least_data)
    out = []
    for group in sorted(groups):
        k = per_group[group]
        for j in range(k):
            mine = groups[group][j::k]
            name = group if k == 1 else f"{group}-{j}"
            if name in small:
                mine = mine[: max(1, round(len(mine) * fraction))]
            out.append(ProcessClient(name, tuple(f.values for f in mine), tuple(f.labels for f in mine)))
    return out, small


# The simulated vibration fleet: each machine's run is its commissioning (``TRAIN_ROWS`` windows, healthy),
# then healthy test windows, then a fault that grows over ``_FAULT_RAMP_S`` to ``_FAULT_SEVERITY``.
_VIBRATION_FAULTS = ("bearing_inner", "bearing_outer", "bearing_ball", "imbalance")
_HEALTHY_TEST_S = 40.0
_FAULT_S = 60.0
_FAULT_SEVERITY = 0.25
_FAULT_RAMP_S = 10.0


def simulator_vibration_fleet(clients: int, seed: int) -> list[ProcessClient]:
    """The vibration autoencoder's fleet: ``clients`` simulated pumps of one type at 0.6x to 1.4x of
    1,500 rpm, one per client, each a run of the agent's vibration feature rows
    (``pdm_tools.training.simdata.vibration_rows``: the serving path's windows and features) of
    ``TRAIN_ROWS`` commissioning windows, ``_HEALTHY_TEST_S`` more healthy seconds, then a fault (bearing
    inner, outer, ball or imbalance, machine by machine) growing to severity 0.25; a window is anomalous
    when it ends after the fault started. The autoencoder federation of ``--dataset skab`` runs on it."""
    import dataclasses

    from pdm_tools.simulator.machine import Fault, SimulatedMachine, fleet_profile
    from pdm_tools.training.simdata import VIBRATION_SPEC, vibration_rows

    spec = VIBRATION_SPEC
    out = []
    for c in range(clients):
        base = fleet_profile(c, seed)
        profile = dataclasses.replace(base, rpm=1500.0 * (0.6 + 0.8 * c / max(1, clients - 1)))
        hop_s, window_s = spec.hop_samples / profile.rate_hz, spec.window_samples / profile.rate_hz
        start_s = (TRAIN_ROWS - 1) * hop_s + window_s + _HEALTHY_TEST_S
        kind = _VIBRATION_FAULTS[c % len(_VIBRATION_FAULTS)]
        fault = Fault(profile.name, kind, start_s, severity=_FAULT_SEVERITY, ramp_s=_FAULT_RAMP_S)
        rows = vibration_rows(SimulatedMachine(profile, [fault], seed), start_s + _FAULT_S, spec)
        ends = np.arange(len(rows)) * hop_s + window_s
        out.append(ProcessClient(f"{profile.name}-{kind}", (rows.astype(np.float64),), (ends > start_s,)))
    return out


def least_data_names(per_group: dict[str, int], count: int) -> list[str]:
    """Names of the ``count`` clients that keep little data: one testbed group after the other (sorted), each
    group's last client first.

    >>> least_data_names({"valve1": 2, "other": 1}, 2)
    ['other', 'valve1-1']
    """
    total = sum(per_group.values())
    if not 0 <= count < total:
        raise ClientDataError(
            f"--least-data-clients {count}: must leave at least one of the {total} clients with all its data"
        )
    order: list[str] = []
    groups = sorted(per_group)
    for turn in range(max(per_group.values())):
        for g in groups:
            j = per_group[g] - 1 - turn
            if j >= 0:
                order.append(g if per_group[g] == 1 else f"{g}-{j}")
    return order[:count]


def simulate_process(
    clients: Sequence[ProcessClient], config: ProcessFederation, keep_replies: bool = False
) -> ProcessOutcome:
    """The federation over ``clients`` in Flower's simulation runtime, with the agents' process ClientApp;
    ``keep_replies``: the outcome keeps what every client sent (for tests that inspect it)."""
    outcome = ProcessOutcome(counters=Outcome(keep_replies=keep_replies))
    with tempfile.TemporaryDirectory(prefix="pdm-fleet-process-") as tmp:
        root = Path(tmp)
        for i, client in enumerate(clients):
            client.save(root / f"client-{i}")
        mods = SECAGG_MODS if config.federation.secagg else ()
        client_app = build_process_client_app(root, detector_for(config.signal), mods)
        run_in_simulation(build_process_server_app(config, outcome), client_app, len(clients))
    if outcome.model is None:
        raise FederationError("the simulation ended without a model (see the log above)")
    return outcome


def evaluate_process_fleet(
    clients: Sequence[ProcessClient], config: ProcessFederation, least_data: Sequence[str] = ()
) -> dict[str, Any]:
    """The JSON object of ``fleet evaluate --dataset skab``; ``least_data``: clients reported one by one."""
    outcome = simulate_process(clients, config)
    return compare_process(clients, config, outcome, detector_for(config.signal), least_data=least_data)


def compare_process(
    clients: Sequence[ProcessClient],
    config: ProcessFederation,
    outcome: ProcessOutcome,
    detector: DetectorConfig | None = None,
    least_data: Sequence[str] = (),
) -> dict[str, Any]:
    """The federation's autoencoder (``outcome``) against central and local-only fits from the same start;
    ``least_data``: clients whose F1/FAR/MAR under each model are reported one by one."""
    assert outcome.model is not None and outcome.initial is not None
    det = detector or DetectorConfig()
    series = {c.name: c.series(det) for c in clients}
    epochs = config.federation.rounds * config.training.epochs
    budget = AeTraining(epochs, config.training.learning_rate, config.training.batch_size)
    seed = config.federation.seed

    def train(rows: Sequence[Series]) -> Autoencoder:
        return train_autoencoder(outcome.initial, np.concatenate([s.train for s in rows]), budget, seed)[0]  # type: ignore[arg-type]

    def counts(model: Autoencoder, rows: Sequence[Series]) -> Confusion:
        return Confusion(**confusion(model, rows, det.threshold_factor))

    def measure(model: Autoencoder) -> dict[str, Any]:
        per_client = {name: counts(model, s) for name, s in series.items()}
        total = sum(per_client.values(), Confusion())
        return {**total.to_dict(), "per_client_f1": {name: round(c.f1, 4) for name, c in per_client.items()}}

    central = train([s for rows in series.values() for s in rows])
    own = {name: counts(train(rows), rows) for name, rows in series.items()}
    least = {
        name: {
            "rows": int(sum(len(s.train) for s in series[name])),
            "files": len(series[name]),
            "federated": counts(outcome.model, series[name]).to_dict(),
            "central": counts(central, series[name]).to_dict(),
            "local": own[name].to_dict(),
        }
        for name in least_data
    }
    rows = {name: int(sum(len(s.train) for s in rows)) for name, rows in series.items()}
    fewest = min(rows, key=lambda name: rows[name])
    federated = measure(outcome.model)
    evaluation = outcome.counters.evaluation.get(config.federation.rounds, {})
    training_rounds = [b for r, b in outcome.counters.bytes_per_round.items() if r > 0]
    return {
        "federated": {
            **federated,
            **({"federated_evaluation": Confusion(**evaluation).to_dict()} if evaluation else {}),
        },
        "central": measure(central),
        "local": {
            **sum(own.values(), Confusion()).to_dict(),
            "own_client_f1": {name: round(c.f1, 4) for name, c in own.items()},
        },
        "client_with_fewest_rows": {
            "client": fewest,
            "rows": rows[fewest],
            "federated_f1": federated["per_client_f1"][fewest],
            "local_f1": round(own[fewest].f1, 4),
        },
        **({"least_data_clients": {"clients": least, "pooled": _pooled(least)}} if least else {}),
        **({"quantization_gate": outcome.gate} if outcome.gate else {}),
        **({"privacy": outcome.counters.privacy} if outcome.counters.privacy else {}),
        **({"secagg": outcome.counters.secagg} if outcome.counters.secagg else {}),
        **(
            {
                "threshold_factor_from_heldout": heldout_factor(
                    outcome.heldout_hist, outcome.heldout_edges, det.threshold_factor
                )
            }
            if outcome.heldout_hist
            else {}
        ),
        "bytes_per_round": int(np.mean(training_rounds)) if training_rounds else 0,
        "rounds": config.federation.rounds,
        "clients": len(clients),
        "client_rows": rows,
        "client_files": {c.name: len(c.values) for c in clients},
        "federation": config.to_dict(),
        "detector": det.to_dict(),
        "protocol": (
            "SKAB outlier detection per file: first 400 rows = the machine's commissioning (its baseline's "
            "standardization, the autoencoder's training rows, its threshold = factor x max commissioning score; "
            "no label read), rest = test, point-wise on 'anomaly', confusion pooled over files"
        ),
    }


def _pooled(least: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each model's confusion pooled over the least-data clients (the protocol pools over files)."""
    counts = ("tp", "fp", "fn", "tn")
    return {
        model: Confusion(**{k: sum(v[model][k] for v in least.values()) for k in counts}).to_dict()
        for model in ("federated", "central", "local")
    }
