"""The fleet adapter as the agents take it: written with the federation's provenance in the agents' adapter
format, installed for the machines of one type after checking it against the agent's base, and refused on
another base or for a name the adapter store cannot read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.adaptation.adapter import AdapterError, load_adapter, read_manifest
from agent.adaptation.lora import LoraWeights
from agent.adaptation.serving import AdapterStore
from agent.features.bearing import BearingFeatureSpec
from agent.inference.classifier import OnnxDefectClassifier
from agent.metrics import Metrics
from pdm_tools.datasets.cwru import CLASS_NAMES
from pdm_tools.fleet_learning.adapter_ship import config_from_run, read_base, write_fleet_adapter
from pdm_tools.fleet_learning.adapters import AdapterOutcome
from pdm_tools.fleet_learning.distribute import install_adapter
from pdm_tools.fleet_learning.fleets import synthetic_fleet
from pdm_tools.fleet_learning.params import init_mlp
from pdm_tools.fleet_learning.server_app import FederationConfig, Outcome
from pdm_tools.fleet_learning.ship import write_version


def _version(out: Path, seed: int) -> Path:
    client = synthetic_fleet(1, 100, seed=seed, n_features=BearingFeatureSpec().n_features).clients[0]
    model = init_mlp(client.x.mean(axis=0), client.x.std(axis=0), (16, 8), CLASS_NAMES, seed)
    config = FederationConfig(class_names=CLASS_NAMES, rounds=1, hidden=(16, 8))
    return write_version(out, config, Outcome(model=model, provenance={1: {"rows": len(client.y)}}), "1.0.0")


def _adapter(tmp_path: Path) -> tuple[Path, Path, LoraWeights]:
    base_dir = _version(tmp_path / "models", seed=1)
    _, base = read_base(base_dir)
    config = config_from_run({"rounds": 2, "min-clients": 2}, base)
    assert config.layers == ("layer0_matmul", "layer2_matmul")  # the base's first and last
    start = LoraWeights.initial(base, config.layers, config.rank, config.alpha, seed=3)
    rng = np.random.default_rng(0)
    factors = {n: (a, rng.normal(0, 0.5, b.shape).astype(np.float32)) for n, (a, b) in start.factors.items()}
    trained = LoraWeights(config.rank, config.alpha, factors)
    outcome = AdapterOutcome(adapter=trained, initial=start)
    counters = outcome.counters
    counters.provenance = {11: {"rows": 120, "data-sha256": "ab" * 32, "held-out": 30}, 12: {"rows": 80}}
    counters.participants = {1: [11, 12], 2: [11]}
    counters.evaluation = {1: {"macro-f1": 0.5}, 2: {"macro-f1": 0.9}}
    counters.bytes_per_round = {0: 300, 1: 9000, 2: 9000}
    folder = write_fleet_adapter(tmp_path / "out", base_dir, "pump-x", config, outcome)
    return base_dir, folder, trained


def test_fleet_adapter_carries_the_federation_and_loads_on_its_base(tmp_path: Path) -> None:
    base_dir, folder, trained = _adapter(tmp_path)
    identity, base = read_base(base_dir)
    assert folder == tmp_path / "out" / "adapters" / identity.model_id / "pump-x"
    manifest, weights = load_adapter(folder, identity, base)
    assert manifest.machine == "pump-x" and manifest.data["count"] == 200 and len(manifest.data["sha256"]) == 64
    federation = manifest.training["federation"]
    assert federation["rounds_completed"] == 2 and federation["bytes_per_round"] == {"0": 300, "1": 9000, "2": 9000}
    assert federation["clients"] == [
        {"node": "11", "rows": 120, "data-sha256": "ab" * 32, "held-out": 30, "rounds_trained": 2},
        {"node": "12", "rows": 80, "rounds_trained": 1},
    ]
    assert manifest.metrics["after"] == {"macro-f1": 0.9}
    assert all(np.allclose(weights.factors[n][1], trained.factors[n][1], atol=1e-6) for n in trained.layers)


def test_installed_for_each_machine_the_store_serves_it_and_a_foreign_base_is_refused(tmp_path: Path) -> None:
    base_dir, folder, trained = _adapter(tmp_path)
    root = tmp_path / "adaptation"
    other = _version(tmp_path / "other", seed=2)  # same id and version, other weights
    with pytest.raises(AdapterError, match="different sha256"):
        install_adapter(folder, other, root, ["pump-1"])
    with pytest.raises(ValueError, match=r"\['.hidden'\]"):
        install_adapter(folder, base_dir, root, ["pump-1", ".hidden"])
    assert not root.exists()
    targets = install_adapter(folder, base_dir, root, ["pump-1", "pump-2"])
    assert [read_manifest(t).machine for t in targets] == ["pump-1", "pump-2"]
    assert {read_manifest(t).sha256 for t in targets} == {read_manifest(folder).sha256}
    with pytest.raises(FileExistsError, match="pump-1"):
        install_adapter(folder, base_dir, root, ["pump-1"])

    metrics = Metrics()
    store = AdapterStore(root, metrics, reload_interval_s=0)
    model = OnnxDefectClassifier.load(base_dir)
    store.refresh(model)
    _, base = read_base(base_dir)
    x = synthetic_fleet(1, 50, seed=9, n_features=base.n_features).clients[0].x.astype(np.float32)
    for machine in ("pump-1", "pump-2"):
        assert store.adapter_for(model, machine) is not None
        np.testing.assert_allclose(
            store.run(model, machine, x, "probabilities"), base.predict_proba(x, trained), atol=1e-4
        )
    # The adapter changes what the machines of the type get, and only theirs.
    assert not np.allclose(store.run(model, "pump-1", x, "probabilities"), model.predict_proba(x), atol=1e-3)
    assert store.adapter_for(model, "pump-3") is None


def test_unknown_layer_is_refused_before_a_run(tmp_path: Path) -> None:
    _, base = read_base(_version(tmp_path, seed=1))
    with pytest.raises(KeyError, match="no dense layer 'nope'"):
        config_from_run({"adapter-layers": "layer0_matmul,nope"}, base)
