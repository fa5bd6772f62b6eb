"""Fleet learning's pure parts: the model as Flower arrays, the client's training step, its data folder."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from agent.features.bearing import BearingFeatureSpec
from agent.inference.classifier import OnnxDefectClassifier
from agent.inference.errors import ModelError
from agent.inference.registry import ModelRegistry, default_builders
from agent.metrics import Metrics
from pdm_tools.datasets.cwru import CLASS_NAMES
from pdm_tools.fleet_learning import cli as fleet_cli
from pdm_tools.fleet_learning.data import (
    ROWS_FILE,
    ClientDataError,
    data_sha256,
    load_client_data,
)
from pdm_tools.fleet_learning.distribute import install, rollback
from pdm_tools.fleet_learning.fleets import simulator_fleet, synthetic_fleet
from pdm_tools.fleet_learning.params import LocalTraining, from_arrays, init_mlp, local_train, to_arrays
from pdm_tools.fleet_learning.server_app import FederationConfig, Outcome
from pdm_tools.fleet_learning.ship import write_version
from pdm_tools.models.defect_mlp import DefectMlp


def _model(n_features: int = 8, seed: int = 0) -> DefectMlp:
    return init_mlp(np.zeros(n_features), np.ones(n_features), (16, 8), CLASS_NAMES, seed)


def _loss(model: DefectMlp, x: np.ndarray, y: np.ndarray) -> float:
    p = model.predict_proba(x)
    return float(-np.mean(np.log(np.maximum(p[np.arange(len(y)), y], 1e-12))))


def test_model_survives_the_trip_through_flower_arrays() -> None:
    model = _model()
    back = from_arrays(to_arrays(model), CLASS_NAMES, model.mean, model.scale)
    x = np.random.default_rng(1).normal(size=(5, 8)).astype(np.float32)
    np.testing.assert_array_equal(back.logits(x), model.logits(x))
    assert list(to_arrays(model).keys()) == ["w0", "b0", "w1", "b1", "w2", "b2"]


def test_arrays_that_are_not_the_model_are_a_clear_error() -> None:
    model = _model()
    record = to_arrays(model)
    with pytest.raises(ValueError, match="not an MLP from 8 features to 3 classes"):
        from_arrays(record, CLASS_NAMES[:3], model.mean, model.scale)
    with pytest.raises(ValueError, match="not an MLP from 5 features"):
        from_arrays(record, CLASS_NAMES, model.mean[:5], model.scale[:5])
    del record["b1"]
    with pytest.raises(ValueError, match="lack 'b1'"):
        from_arrays(record, CLASS_NAMES, model.mean, model.scale)
    bad = to_arrays(model)
    bad["w1"] = Array(np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="not an MLP"):
        from_arrays(bad, CLASS_NAMES, model.mean, model.scale)


def test_local_training_lowers_the_loss_and_keeps_the_fleet_standardization() -> None:
    client = synthetic_fleet(1, 400, seed=3).clients[0]
    start = init_mlp(client.x.mean(axis=0), client.x.std(axis=0), (16, 8), CLASS_NAMES, 0)
    trained, _ = local_train(start, client.x, client.y, LocalTraining(epochs=40, learning_rate=1e-2), seed=1)
    assert _loss(trained, client.x, client.y) < 0.5 * _loss(start, client.x, client.y)
    np.testing.assert_array_equal(trained.mean, start.mean)
    np.testing.assert_array_equal(trained.scale, start.scale)


def test_proximal_term_keeps_a_client_near_the_round_start() -> None:
    client = synthetic_fleet(1, 400, seed=4).clients[0]
    start = init_mlp(client.x.mean(axis=0), client.x.std(axis=0), (16, 8), CLASS_NAMES, 0)

    def moved(mu: float) -> float:
        trained, _ = local_train(start, client.x, client.y, LocalTraining(epochs=5, proximal_mu=mu), seed=1)
        return float(sum(np.linalg.norm(a - b) for a, b in zip(trained.weights, start.weights, strict=True)))

    assert moved(10.0) < 0.8 * moved(0.0)


def test_local_training_is_deterministic_for_a_seed() -> None:
    client = synthetic_fleet(1, 200, seed=5).clients[0]
    start = init_mlp(client.x.mean(axis=0), client.x.std(axis=0), (16, 8), CLASS_NAMES, 0)
    a, _ = local_train(start, client.x, client.y, LocalTraining(epochs=2), seed=7)
    b, _ = local_train(start, client.x, client.y, LocalTraining(epochs=2), seed=7)
    for wa, wb in zip(a.weights, b.weights, strict=True):
        np.testing.assert_array_equal(wa, wb)


def test_client_folder_round_trip_and_hash(tmp_path: Path) -> None:
    client = synthetic_fleet(2, 100, seed=6).clients[1]
    folder = client.save(tmp_path / "c")
    back = load_client_data(folder)
    np.testing.assert_array_equal(back.x, client.x)
    np.testing.assert_array_equal(back.y_held, client.y_held)
    assert back.class_names == CLASS_NAMES and back.name == client.name
    assert len(data_sha256(folder)) == 64


def test_bad_client_folders_are_named_errors(tmp_path: Path) -> None:
    with pytest.raises(ClientDataError, match="cannot read"):
        load_client_data(tmp_path / "absent")
    client = synthetic_fleet(1, 100, seed=6).clients[0]
    np.savez(tmp_path / ROWS_FILE, x=client.x, y=client.y + 10, x_held=client.x_held, y_held=client.y_held,
             class_names=np.array(CLASS_NAMES))  # fmt: skip
    with pytest.raises(ClientDataError, match=r"labels outside 0\.\.3"):
        load_client_data(tmp_path)
    x = client.x.copy()
    x[0, 0] = np.nan
    np.savez(tmp_path / ROWS_FILE, x=x, y=client.y, x_held=client.x_held, y_held=client.y_held,
             class_names=np.array(CLASS_NAMES))  # fmt: skip
    with pytest.raises(ClientDataError, match="finite rows"):
        load_client_data(tmp_path)
    np.savez(tmp_path / ROWS_FILE, x=client.x, y=client.y)
    with pytest.raises(ClientDataError, match=r"missing arrays \['x_held', 'y_held', 'class_names'\]"):
        load_client_data(tmp_path)


def test_synthetic_fleet_is_non_iid_and_uneven() -> None:
    fleet = synthetic_fleet(4, 300, seed=1)
    rows = [len(c.y) for c in fleet.clients]
    assert rows == sorted(rows) and rows[0] < rows[-1]
    centres = [c.x.mean(axis=0) for c in fleet.clients]
    assert np.linalg.norm(centres[0] - centres[-1]) > 1.0


def test_simulator_fleet_runs_machines_at_different_speeds_with_every_class_held_out_later() -> None:
    fleet = simulator_fleet(3, 2.0, seed=2)
    assert [c.name for c in fleet.clients] == ["m01-900rpm", "m02-1500rpm", "m03-2100rpm"]
    rows = [len(c.y) for c in fleet.clients]
    assert rows == sorted(rows) and rows[0] < rows[-1]
    spec = BearingFeatureSpec()
    for c in fleet.clients:
        assert c.x.shape[1] == spec.n_features and np.isfinite(c.x).all()
        assert set(c.y.tolist()) == set(c.y_held.tolist()) == set(range(len(CLASS_NAMES)))
    # Speed moves the shaft-order features: the same class looks different on the slowest and fastest machine.
    healthy = [c.x[c.y == 0].mean(axis=0) for c in fleet.clients]
    assert not np.allclose(healthy[0], healthy[-1], rtol=0.05)


def test_empty_array_record_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"model arrays \{\} are not an MLP"):
        from_arrays(ArrayRecord(), CLASS_NAMES, np.zeros(8), np.ones(8))


def test_fleet_version_loads_like_a_shipped_model_and_a_tampered_one_is_refused(tmp_path: Path) -> None:
    spec = BearingFeatureSpec()
    client = synthetic_fleet(1, 300, seed=8, n_features=spec.n_features).clients[0]
    start = init_mlp(client.x.mean(axis=0), client.x.std(axis=0), (16, 8), CLASS_NAMES, 0)
    model, _ = local_train(start, client.x, client.y, LocalTraining(epochs=3), seed=1)
    outcome = Outcome(
        model=model,
        evaluation={1: {"accuracy": 0.5, "macro-f1": 0.4}, 2: {"accuracy": 0.9, "macro-f1": 0.88}},
        participants={1: [7, 9], 2: [7]},
        provenance={7: {"rows": 120, "data-sha256": "ab" * 32, "held-out": 20}, 9: {"rows": 80}},
    )
    config = FederationConfig(class_names=CLASS_NAMES, rounds=2, strategy="trimmed", hidden=(16, 8))
    folder = write_version(tmp_path, config, outcome, "1.1.0")
    assert folder.name == "bearing-defect-classifier-1.1.0"
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    federation = manifest["training"]["federation"]
    assert federation["strategy"] == "trimmed" and federation["rounds_completed"] == 2
    assert federation["clients"] == [
        {"node": "7", "rows": 120, "data-sha256": "ab" * 32, "held-out": 20, "rounds_trained": 2},
        {"node": "9", "rows": 80, "rounds_trained": 1},
    ]
    assert manifest["metrics"]["final"] == {"accuracy": 0.9, "macro-f1": 0.88}
    assert "trimmed" in (folder / "MODEL_CARD.md").read_text(encoding="utf-8")
    loaded = OnnxDefectClassifier.load(folder)
    np.testing.assert_allclose(loaded.predict_proba(client.x_held), model.predict_proba(client.x_held), atol=1e-5)

    onnx_file = folder / manifest["file"]
    data = bytearray(onnx_file.read_bytes())
    data[-1] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        OnnxDefectClassifier.load(folder)


def test_a_model_that_does_not_fit_the_feature_spec_is_not_shipped(tmp_path: Path) -> None:
    outcome = Outcome(model=_model(8))
    with pytest.raises(ValueError, match="8 inputs, the feature spec 48"):
        write_version(tmp_path, FederationConfig(class_names=CLASS_NAMES), outcome, "1.1.0")


def _fleet_version(out: Path, version: str, seed: int) -> Path:
    spec = BearingFeatureSpec()
    client = synthetic_fleet(1, 200, seed=seed, n_features=spec.n_features).clients[0]
    model = init_mlp(client.x.mean(axis=0), client.x.std(axis=0), (16, 8), CLASS_NAMES, seed)
    outcome = Outcome(model=model, evaluation={1: {"accuracy": 0.5}}, provenance={1: {"rows": len(client.y)}})
    return write_version(out, FederationConfig(class_names=CLASS_NAMES, rounds=1, hidden=(16, 8)), outcome, version)


def test_fleet_version_is_installed_hot_swapped_refused_when_bad_and_rolled_back(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    built = tmp_path / "built"
    install(_fleet_version(built, "1.1.0", 1), models)
    reg = ModelRegistry(models, Metrics(), default_builders(1))
    slot = reg.track("bearing-defect-classifier", "classifier")
    assert reg.active()["bearing-defect-classifier"][0] == "1.1.0"

    install(_fleet_version(built, "1.2.0", 2), models)
    reg.refresh()
    assert reg.active()["bearing-defect-classifier"][0] == "1.2.0"
    assert slot.model.manifest.version == "1.2.0"  # the slot the scoring thread reads was swapped

    # A bad version is refused by install, and by the agent's registry when it arrives some other way.
    bad = _fleet_version(built, "1.3.0", 3)
    onnx_file = bad / "model.fp32.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ModelError, match="sha256"):
        install(bad, models)
    assert not (models / bad.name).exists()
    shutil.copytree(bad, models / bad.name)
    reg.refresh()
    assert reg.active()["bearing-defect-classifier"][0] == "1.2.0"
    assert [e.reason for e in reg.refused().values()] == ["sha256"]

    version, moved = rollback(models, "bearing-defect-classifier")
    assert version == "1.2.0" and moved.parent.name == ".rolled-back"
    reg.refresh()
    assert reg.active()["bearing-defect-classifier"][0] == "1.1.0"
    with pytest.raises(LookupError, match="nothing to roll back to"):
        rollback(models, "bearing-defect-classifier")


def _fleet_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    fleet_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_fleet_evaluate_refuses_what_cannot_run_before_simulating(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fleet_cli.main(_fleet_args("evaluate", "--dataset", "synthetic", "--clients", "1")) == 2
    assert "--clients >= 2" in capsys.readouterr().err
    args = _fleet_args("evaluate", "--dataset", "synthetic", "--strategy", "krum", "--dp-noise", "1", "--dp-clip", "1")
    assert fleet_cli.main(args) == 2
    assert "averaging only (fedavg, fedprox), not krum" in capsys.readouterr().err
    assert fleet_cli.main(_fleet_args("evaluate", "--dataset", "cwru", "--data", str(tmp_path))) == 2
    assert "index.json not found" in capsys.readouterr().err
    args = _fleet_args("evaluate", "--dataset", "synthetic", "--strategy", "trimmed", "--secagg")
    assert fleet_cli.main(args) == 2
    assert "SecAgg+ shows the coordinator only the sum" in capsys.readouterr().err
    serve = ("serve", "--state", str(tmp_path / "s"), "--out", str(tmp_path / "o"), "--secagg")
    assert fleet_cli.main(_fleet_args(*serve, "--strategy", "krum")) == 2
    assert "--strategy krum: SecAgg+" in capsys.readouterr().err
    process = ("--model", "process", "--channels", "3")
    assert fleet_cli.main(_fleet_args(*serve, *process, "--dp-noise", "1", "--dp-clip", "1")) == 2
    assert "clips each client's update, which SecAgg+ hides" in capsys.readouterr().err


def test_fleet_evaluate_text_names_each_model_and_the_budget() -> None:
    result = {
        "dataset": "cwru",
        "clients": 2,
        "rounds": 20,
        "unseen": "load 0",
        "federated": {"macro_f1": 1.0, "unseen_macro_f1": 0.996753},
        "central": {"macro_f1": 1.0, "unseen_macro_f1": 0.99915},
        "local": {"macro_f1": 0.99, "unseen_macro_f1": 0.985501},
        "bytes_per_round": 136854,
        "privacy": {"epsilon": 31.46, "delta": 1e-05},
    }
    assert fleet_cli.render_text(result).splitlines() == [
        "cwru: 2 clients, 20 rounds, macro-F1 on held-out rows",
        "  federated 1.000  on load 0: 0.997",
        "  central   1.000  on load 0: 0.999",
        "  local     0.990  on load 0: 0.986",
        "  bytes per round 136,854",
        "  privacy: epsilon 31.46 at delta 1e-05",
    ]
