"""Federated LoRA adapters on real processes: ``pdm-agent fleet serve --model adapters`` (Flower's SuperLink and
the adapter ServerApp) and three ``pdm-agent fleet client --base-model`` agents (SuperNodes, each with its own
data folder). Two agents run the fleet's base classifier; the third runs another version of it and must be
refused (an adapter only fits its exact base) without stalling the federation. The rounds run under SecAgg+
(``--secagg``): the coordinator gets only the sum of the agents' factors, and the refusing agent drops out of
the protocol without stalling it. The adapter that comes out is installed with ``pdm-agent fleet
install-adapter`` for two machines of the type, and the agent's ``AdapterStore`` loads it and scores with it.
Each agent's optimizer continues between rounds: the Adam step count its round-2 train reply reports is its
round 1's, not 0 (the moments live in the SuperNode's ``Context.state``).
No timing is asserted (one pair of runs on the loaded machine: 214 s with SecAgg+, 254 s without)."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.adaptation.adapter import load_adapter
from agent.adaptation.serving import AdapterStore
from agent.features.bearing import BearingFeatureSpec
from agent.inference.classifier import OnnxDefectClassifier
from agent.metrics import Metrics
from pdm_tools.datasets.cwru import CLASS_NAMES
from pdm_tools.fleet_learning.adapter_ship import read_base
from pdm_tools.fleet_learning.adapters import ADAM_STEP_START
from pdm_tools.fleet_learning.data import ClientData
from pdm_tools.fleet_learning.fleets import synthetic_fleet
from pdm_tools.fleet_learning.params import LocalTraining, init_mlp, local_train
from pdm_tools.fleet_learning.server_app import FederationConfig, Outcome
from pdm_tools.fleet_learning.ship import write_version
from tests.integration import test_fleet_deploy as deploy_test
from tests.integration.agent_process import closed_port

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.timeout(900)]

processes = deploy_test.processes
_pdm_agent = deploy_test._pdm_agent
WAIT_S = deploy_test.WAIT_S
# The machines of the new type show two defects with each other's signature: the base confuses them.
SWAP = np.array([0, 2, 1, 3])


def _base_version(out: Path, version: str, seed: int) -> Path:
    """A classifier version directory (as the agents run it) trained on the fleet's ordinary machines."""
    n = BearingFeatureSpec().n_features
    fleet = synthetic_fleet(2, 200, seed=seed, n_features=n)
    x, y = np.concatenate([c.x for c in fleet.clients]), np.concatenate([c.y for c in fleet.clients])
    start = init_mlp(x.mean(axis=0), x.std(axis=0), (16, 8), CLASS_NAMES, seed)
    model, _ = local_train(start, x, y, LocalTraining(epochs=30), seed=seed)
    config = FederationConfig(class_names=CLASS_NAMES, rounds=1, hidden=(16, 8))
    return write_version(out, config, Outcome(model=model, provenance={1: {"rows": len(y)}}), version)


def _new_type(seed: int) -> list[ClientData]:
    fleet = synthetic_fleet(3, 200, seed=seed, n_features=BearingFeatureSpec().n_features)
    return [dataclasses.replace(c, y=SWAP[c.y], y_held=SWAP[c.y_held]) for c in fleet.clients]


def test_adapter_federation_on_agents_ships_an_adapter_the_store_serves(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    base_dir = _base_version(tmp_path / "models", "1.0.0", seed=4)
    other_base = _base_version(tmp_path / "other-models", "1.0.0", seed=5)  # same id and version, other bytes
    clients = _new_type(seed=6)
    port = closed_port()
    out, serve_log = tmp_path / "out", tmp_path / "serve.log"
    serve = _pdm_agent(
        "fleet", "serve", "--model", "adapters", "--base-model", str(base_dir), "--machine-type", "pump-x",
        "--host", "127.0.0.1", "--port", str(port), "--state", str(tmp_path / "link"), "--out", str(out),
        "--rounds", "2", "--min-clients", "2", "--round-timeout-s", "120", "--secagg", "--json", log=serve_log,
    )  # fmt: skip
    processes.append(serve)
    logs = [tmp_path / f"agent-{i}.log" for i in range(3)]
    for i, (client, log) in enumerate(zip(clients, logs, strict=True)):
        folder = client.save(tmp_path / f"agent-{i}")
        its_base = other_base if i == 2 else base_dir
        processes.append(
            _pdm_agent("fleet", "client", "--superlink", f"127.0.0.1:{port}", "--data", str(folder),
                       "--base-model", str(its_base), "--runtime-port", str(closed_port()), log=log)
        )  # fmt: skip

    assert serve.wait(timeout=WAIT_S) == 0, serve_log.read_text(errors="replace")[-4000:]
    summary = json.loads((out / "federation.json").read_text(encoding="utf-8"))
    assert summary["complete"] is True and sorted(summary["evaluation"]) == ["1", "2"]
    # The agent on another base never trained: every round is the two agents on the fleet's base.
    assert all(len(p) == 2 for p in summary["participants"].values()), summary["participants"]
    assert "an adapter only fits the exact base" in logs[2].read_text(errors="replace")
    identity, base = read_base(base_dir)
    adapter_dir = Path(summary["adapter"]["path"])
    assert adapter_dir == out / "adapters" / identity.model_id / "pump-x"
    manifest, weights = load_adapter(adapter_dir, identity, base)
    federation = manifest.training["federation"]
    assert federation["rounds_completed"] == 2
    assert sorted(c["rows"] for c in federation["clients"]) == sorted(len(c.y) for c in clients[:2])
    assert all(len(c["data-sha256"]) == 64 and c["rounds_trained"] == 2 for c in federation["clients"])
    assert manifest.data["count"] == sum(len(c.y) for c in clients[:2])
    # SecAgg+ ran the rounds: its settings are in the provenance, the weight shares scaled by the largest
    # agent's rows; each round carries at least the factors to and from each agent and to it for evaluation
    # (the masked vector, keys and shares come on top: no client's factors in the clear).
    assert federation["strategy"] == "fedavg" and federation["secagg"]["clipping_range"] == 8.0
    assert federation["secagg_settings"]["max_weight"] == max(len(c.y) for c in clients[:2])
    adapter_bytes = 4 * weights.n_parameters
    for rnd in ("1", "2"):
        assert 6 * adapter_bytes <= summary["bytes_per_round"][rnd], summary["bytes_per_round"]
    # Each agent's Adam continued in round 2 from its own round 1 (the moments kept in its SuperNode's
    # Context.state between the run's messages, never sent): the step count each train reply says it started
    # from is 0 in round 1 and, in round 2, all of round 1's steps (epochs x batches of its rows).
    assert federation["keep_optimizer_state"] is True
    reported = summary["train_metrics"]
    assert sorted(reported) == ["1", "2"] and all(sorted(reported[r]) == summary["participants"][r] for r in reported)
    assert [m[ADAM_STEP_START] for m in reported["1"].values()] == [0, 0], reported
    for m in reported["2"].values():
        steps = federation["local_epochs"] * math.ceil(m["num-examples"] / federation["batch_size"])
        assert m[ADAM_STEP_START] == steps > 0, reported

    # Installed for two machines of the type on an agent; a copy on a foreign base is refused.
    adapters = tmp_path / "adaptation"
    install = [sys.executable, "-m", "agent", "fleet", "install-adapter", str(adapter_dir), "--adapters-dir",
               str(adapters), "--machines", "pump-1,pump-2"]  # fmt: skip
    refused = subprocess.run([*install, "--base-model", str(other_base)], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "sha256" in refused.stderr and not adapters.exists()
    done = subprocess.run([*install, "--base-model", str(base_dir)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

    metrics = Metrics()
    store = AdapterStore(adapters, metrics, reload_interval_s=0)
    model = OnnxDefectClassifier.load(base_dir)
    store.refresh(model)
    test_x = np.concatenate([c.x_held for c in clients]).astype(np.float32)
    test_y = np.concatenate([c.y_held for c in clients])
    for machine in ("pump-1", "pump-2"):
        served = store.adapter_for(model, machine)
        assert served is not None and served.sha256 == manifest.sha256
        probabilities = store.run(model, machine, test_x, "probabilities")
        np.testing.assert_allclose(probabilities, base.predict_proba(test_x, weights), atol=1e-4)
    adapted = np.argmax(store.run(model, "pump-1", test_x, "probabilities"), axis=1)
    plain = np.argmax(model.predict_proba(test_x), axis=1)
    # The machines of the new type: the fleet adapter corrects what the base confuses (all three agents' data).
    assert np.mean(adapted == test_y) > np.mean(plain == test_y)
