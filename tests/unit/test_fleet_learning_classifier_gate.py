"""The quantization gate of the fleet's defect classifier as federated evaluation: every client measures the
same INT8 graph against FP32 on its held-out rows, and INT8 ships only if every client passes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.features.bearing import BearingFeatureSpec
from agent.inference.classifier import OnnxDefectClassifier
from pdm_tools.datasets.cwru import CLASS_NAMES
from pdm_tools.fleet_learning.classifier_gate import INT8_FILE, calibration_rows, gate_counts, gate_report
from pdm_tools.fleet_learning.fleets import synthetic_fleet
from pdm_tools.fleet_learning.params import LocalTraining, init_mlp, local_train
from pdm_tools.fleet_learning.server_app import FederationConfig, Outcome
from pdm_tools.fleet_learning.ship import write_version


def _counts(fp32: list[list[int]], int8: list[list[int]], agree: int, sha: str = "a" * 64) -> dict[str, object]:
    rows = int(np.sum(fp32))
    return {
        "fp32-confusion": np.ravel(fp32).tolist(),
        "int8-confusion": np.ravel(int8).tolist(),
        "agree": agree,
        "rows": rows,
        "int8-sha256": sha,
    }


GOOD = _counts([[50, 0], [0, 50]], [[50, 0], [0, 50]], 100)
# INT8 labels 10 of this client's 100 rows otherwise: fine for the fleet's sum, not for this client.
BAD = _counts([[50, 0], [0, 50]], [[45, 5], [5, 45]], 90)


def test_int8_ships_only_when_every_client_passes() -> None:
    passing = gate_report({1: GOOD, 2: GOOD}, "a" * 64)
    assert passing["ship"] == "int8" and passing["failed_clients"] == []
    assert passing["fleet"]["int8_vs_fp32"]["agreement"] == 1.0 and passing["fleet"]["rows"] == 200

    many = {i: GOOD for i in range(1, 40)} | {40: BAD}
    one_bad = gate_report(many, "a" * 64)
    assert one_bad["ship"] == "fp32" and one_bad["failed_clients"] == ["40"]
    assert one_bad["clients"]["40"]["int8_vs_fp32"]["accuracy_delta_points"] == -10.0
    assert any("agrees with FP32 on 90.00%" in r for r in one_bad["clients"]["40"]["reasons"])
    # Pooled, the fleet would pass (agreement 99.75 %, accuracy -0.25 points): the per-client rule is what stops it.
    assert one_bad["fleet"]["passed"] is True

    other_graph = gate_report({1: GOOD, 2: _counts([[50, 0], [0, 50]], [[50, 0], [0, 50]], 100, "b" * 64)}, "a" * 64)
    assert other_graph["ship"] == "fp32" and other_graph["failed_clients"] == ["2"]
    assert gate_report({}, "a" * 64)["ship"] == "fp32"


def test_clients_measure_one_graph_built_from_the_fleet_standardization(tmp_path: Path) -> None:
    n = BearingFeatureSpec().n_features
    client = synthetic_fleet(1, 200, seed=3, n_features=n).clients[0]
    start = init_mlp(client.x.mean(axis=0), client.x.std(axis=0), (16, 8), CLASS_NAMES, 0)
    model, _ = local_train(start, client.x, client.y, LocalTraining(epochs=20), seed=1)
    rows = calibration_rows(model, seed=42)
    assert rows.shape == (512, n) and not any((rows == r).all(axis=1).any() for r in client.x)
    a = gate_counts(model, client.x_held, client.y_held, seed=42)
    b = gate_counts(model, client.x_held[:5], client.y_held[:5], seed=42)
    assert a["int8-sha256"] == b["int8-sha256"], "another client's data must not change the INT8 graph"
    assert a["rows"] == len(client.y_held) and sum(a["fp32-confusion"]) == len(client.y_held)  # type: ignore[arg-type]

    report = gate_report({1: a}, str(a["int8-sha256"]))
    assert report["ship"] == ("int8" if report["clients"]["1"]["passed"] else "fp32")
    config = FederationConfig(class_names=CLASS_NAMES, rounds=1, hidden=(16, 8), quantize=True)
    outcome = Outcome(model=model, provenance={1: {"rows": len(client.y)}}, gate=report | {"ship": "int8"})
    folder = write_version(tmp_path, config, outcome, "1.2.0")
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["file"] == INT8_FILE and manifest["quantization"]["shipped"] == "int8"
    assert manifest["quantization"]["gate"]["int8_sha256"] == a["int8-sha256"]
    loaded = OnnxDefectClassifier.load(folder)
    agree = np.mean(loaded.predict_proba(client.x_held).argmax(axis=1) == model.predict(client.x_held))
    assert agree >= 0.9

    # A report naming another graph than the one the version would ship is refused, not shipped.
    with pytest.raises(RuntimeError, match="not the one the clients' gate measured"):
        write_version(
            tmp_path / "x", config, Outcome(model=model, gate={"ship": "int8", "int8_sha256": "0" * 64}), "1.3.0"
        )


@pytest.mark.integration
def test_gate_runs_as_federated_evaluation_in_flower_and_replies_only_counts() -> None:
    """Three clients in Flower's simulation: after the round each replies its gate counts (no row), all on the
    coordinator's INT8 graph; the verdict covers every client. The round runs under SecAgg+ (``--secagg
    --quantize``): the gate's message after it is the message API's and passes the SecAgg+ mods untouched."""
    from pdm_tools.fleet_learning.evaluate import simulate

    fleet = synthetic_fleet(3, 150, seed=5, n_features=BearingFeatureSpec().n_features)
    config = FederationConfig(
        class_names=CLASS_NAMES, rounds=1, hidden=(16, 8), min_clients=3, quantize=True, secagg=True
    )
    outcome = simulate(fleet, config, keep_replies=True)
    gate = outcome.gate
    assert len(gate["clients"]) == 3 and gate["fleet"]["rows"] == sum(len(c.y_held) for c in fleet.clients)
    assert sorted(v["rows"] for v in gate["clients"].values()) == sorted(len(c.y_held) for c in fleet.clients)
    assert gate["ship"] == ("int8" if not gate["failed_clients"] and gate["fleet"]["passed"] else "fp32")
    replies = [content for _, content in outcome.replies if "gate" in content.config_records]
    assert len(replies) == 3
    for content in replies:
        record = content.config_records["gate"]
        assert set(record) == {"fp32-confusion", "int8-confusion", "agree", "rows", "int8-sha256"}
        assert record["int8-sha256"] == gate["int8_sha256"] and not content.array_records
    assert outcome.secagg and outcome.evaluation[1]["macro-f1"] > 0  # the round itself was SecAgg+'s
