"""A federation in Flower's simulation runtime (Ray), with the agents' ClientApp, on a small synthetic fleet.

What is checked: the federated model is as good as one fitted on the pooled rows; clients send only model
parameters, feature sums and counts (every reply is inspected); a trimmed mean keeps a poisoned client from
moving the fleet model where FedAvg follows it; differential privacy reports its budget; with secure
aggregation the coordinator gets FedAvg's model within SecAgg+'s quantization error and no client's
weights. Five simulations of five clients, a few rounds each (SecAgg+: one).
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from pdm_tools.datasets.cwru import CLASS_NAMES
from pdm_tools.fleet_learning.evaluate import compare, poisoning_mod, relative_shift, simulate
from pdm_tools.fleet_learning.fleets import Fleet, synthetic_fleet
from pdm_tools.fleet_learning.params import LocalTraining, local_train
from pdm_tools.fleet_learning.secagg import secagg_error_bound
from pdm_tools.fleet_learning.server_app import FederationConfig, Outcome, make_strategy, privacy_budget
from pdm_tools.models.defect_mlp import DefectMlp

# Ray starts real processes (a local cluster and one worker per CPU) for each simulation.
pytestmark = pytest.mark.integration

FITRES = ("metrics", "num_examples", "parameters", "status")
# What each kind of reply may hold: record name -> the keys allowed in it.
ALLOWED = {
    "query": {"stats": {"num-examples", "sum", "sumsq"}, "provenance": {"data-sha256", "held-out"}},
    "train": {
        "arrays": {"mean", "scale", "w0", "b0", "w1", "b1", "w2", "b2"},
        "metrics": {"num-examples", "unit-weight", "train-loss"},
    },
    "evaluate": {"metrics": {"num-examples", "unit-weight", "confusion"}},
}


@pytest.fixture(scope="module")
def federation() -> tuple[Fleet, FederationConfig, Outcome]:
    fleet = synthetic_fleet(5, 240, seed=11)
    config = FederationConfig(
        class_names=CLASS_NAMES,
        rounds=6,
        min_clients=5,
        hidden=(16, 12),
        training=LocalTraining(epochs=5, learning_rate=1e-2),
    )
    return fleet, config, simulate(fleet, config, keep_replies=True)


def raw_rows_in(content: RecordDict, fleet: Fleet) -> list[str]:
    """Names of the vectors in ``content`` that equal a raw feature row of some client (train or held-out),
    and of any array shaped like a block of rows."""
    rows = np.concatenate([np.concatenate([c.x, c.x_held]) for c in fleet.clients]).astype(np.float64)
    n_features = rows.shape[1]
    found = []
    vectors: list[tuple[str, np.ndarray]] = []
    for name, record in content.array_records.items():
        for key, array in record.items():
            a = np.asarray(array.numpy(), np.float64)
            if a.ndim == 2 and a.shape[1] == n_features:
                found.append(f"{name}.{key} shaped like rows {a.shape}")
            vectors += [(f"{name}.{key}", v) for v in a.reshape(-1, a.shape[-1])] if a.ndim else []
    for name, metrics in content.metric_records.items():
        for key, value in metrics.items():
            if isinstance(value, list):
                vectors.append((f"{name}.{key}", np.asarray(value, np.float64)))
    for label, v in vectors:
        if len(v) == n_features and np.isclose(rows, v, rtol=1e-5, atol=1e-6).all(axis=1).any():
            found.append(f"{label} equals a raw row")
    return found


def test_leak_check_sees_a_row_in_arrays_or_metrics() -> None:
    fleet = synthetic_fleet(2, 60, seed=1)
    row = fleet.clients[1].x_held[3]
    assert raw_rows_in(RecordDict({"arrays": ArrayRecord({"w9": Array(row.copy())})}), fleet) == [
        "arrays.w9 equals a raw row"
    ]
    assert raw_rows_in(RecordDict({"metrics": MetricRecord({"sum": row.astype(float).tolist()})}), fleet) == [
        "metrics.sum equals a raw row"
    ]
    block = fleet.clients[0].x[:4].copy()
    assert "arrays.w0 shaped like rows (4, 8)" in raw_rows_in(
        RecordDict({"arrays": ArrayRecord({"w0": Array(block)})}), fleet
    )


def test_clients_send_only_parameters_sums_and_counts(federation: tuple[Fleet, FederationConfig, Outcome]) -> None:
    fleet, config, outcome = federation
    kinds = [kind for kind, _ in outcome.replies]
    assert kinds.count("query") == 5 and kinds.count("train") == 5 * config.rounds
    assert kinds.count("evaluate") == 5 * config.rounds
    for kind, content in outcome.replies:
        allowed = ALLOWED[kind]
        assert set(content.keys()) == set(allowed), kind
        for name, record in content.items():
            assert set(record.keys()) <= allowed[name], (kind, name)
        assert raw_rows_in(content, fleet) == [], kind
    # The training rows each client reported are its row counts, nothing else about them.
    assert sorted(outcome.client_rows.values()) == sorted(len(c.y) for c in fleet.clients)


def test_federated_model_is_within_two_points_of_central(federation: tuple[Fleet, FederationConfig, Outcome]) -> None:
    fleet, config, outcome = federation
    result = compare(fleet, config, outcome)
    assert result["federated"]["macro_f1"] >= result["central"]["macro_f1"] - 0.02
    # Federated evaluation (confusion counts summed over clients) agrees with scoring the pooled rows.
    assert result["federated"]["federated_evaluation"]["macro-f1"] == result["federated"]["macro_f1"]
    model_bytes = sum(p.nbytes for p in outcome.model.weights + outcome.model.biases) if outcome.model else 0
    assert result["bytes_per_round"] >= 2 * 5 * model_bytes  # the model to and from every client


def test_trimmed_mean_keeps_one_poisoned_client_from_moving_the_model(
    federation: tuple[Fleet, FederationConfig, Outcome],
) -> None:
    fleet, config, outcome = federation
    assert outcome.model is not None
    poison = [poisoning_mod(frozenset({0}))]
    fedavg = simulate(fleet, config, mods=poison).model
    trimmed = simulate(fleet, dataclasses.replace(config, strategy="trimmed"), mods=poison).model
    assert fedavg is not None and trimmed is not None
    assert relative_shift(trimmed, outcome.model) < 0.5 * relative_shift(fedavg, outcome.model)


def test_differential_privacy_clips_noises_and_reports_the_budget(
    federation: tuple[Fleet, FederationConfig, Outcome],
) -> None:
    fleet, config, outcome = federation
    dp = dataclasses.replace(config, rounds=2, dp_noise=1.0, dp_clip=0.5)
    private = simulate(fleet, dp)
    assert private.privacy["epsilon"] == round(privacy_budget(1.0, 2, 1e-5), 4)
    assert private.privacy["rounds"] == 2 and private.privacy["clipping_norm"] == 0.5
    assert private.model is not None and outcome.model is not None
    assert relative_shift(private.model, outcome.model) > 0
    with pytest.raises(ValueError, match="averaging only"):
        make_strategy(dataclasses.replace(dp, strategy="krum"))


def _params(model: DefectMlp) -> np.ndarray:
    return np.concatenate([p.ravel() for p in model.weights + model.biases]).astype(np.float64)


def test_secure_aggregation_gives_fedavg_within_its_quantization_and_hides_each_update(
    federation: tuple[Fleet, FederationConfig, Outcome],
) -> None:
    fleet, config, _ = federation
    secure = dataclasses.replace(config, rounds=1, secagg=True)
    outcome = simulate(fleet, secure, keep_replies=True)
    assert outcome.model is not None and outcome.initial is not None
    # Plain FedAvg of round 1, computed here: each client's local training from the same start with the seed
    # its ClientApp uses, averaged by row count.
    rows = np.array([len(c.y) for c in fleet.clients], np.float64)
    trained = [
        _params(
            local_train(outcome.initial, c.x, c.y, config.training, zlib.crc32(f"{c.name}/{config.seed}/1".encode()))[0]
        )
        for c in fleet.clients
    ]
    fedavg = np.average(np.stack(trained), axis=0, weights=rows)
    error = np.abs(_params(outcome.model) - fedavg).max()
    assert 0 < error <= secagg_error_bound(secure.secagg_settings, rows.tolist())
    # What reached the coordinator in the training round: keys, key shares and masked integer vectors, never
    # a client's weights (the legacy reply's parameters are empty) nor a raw row.
    train_replies = [content for kind, content in outcome.replies if kind == "train"]
    assert len(train_replies) == 4 * 5  # setup, share keys, masked vector, unmask: each client each stage
    for content in train_replies:
        assert set(content.keys()) <= {"secaggplus_configs", *(f"fitres.{k}" for k in FITRES)}
        assert all(len(record) == 0 for record in content.array_records.values())
        assert raw_rows_in(content, fleet) == []
    assert outcome.evaluation[1]["macro-f1"] > 0 and outcome.secagg["max_weight"] == rows.max()


def test_secure_aggregation_refuses_what_would_need_each_update() -> None:
    config = FederationConfig(class_names=CLASS_NAMES, secagg=True)
    for robust in ("trimmed", "krum"):
        with pytest.raises(ValueError, match=f"--strategy {robust}: SecAgg\\+ shows the coordinator only the sum"):
            make_strategy(dataclasses.replace(config, strategy=robust))
    with pytest.raises(ValueError, match="clips each client's update, which SecAgg\\+ hides"):
        make_strategy(dataclasses.replace(config, dp_noise=1.0, dp_clip=1.0))
    make_strategy(dataclasses.replace(config, strategy="fedprox"))
