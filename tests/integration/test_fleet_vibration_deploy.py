"""The fleet's vibration autoencoder on real processes: ``pdm-agent fleet serve --model vibration --version``
(Flower's SuperLink and the autoencoder's ServerApp) and three ``pdm-agent fleet client --model vibration``
agents whose ClientApp reads its machine's vibration feature vectors from the agent's local InfluxDB (a real
InfluxDB 1.x, the points written by the agent's own writer code), the round under secure aggregation
(``--secagg``: Flower's SecAgg+ between real processes, the held-out histograms and the gate's replies through
its legacy workflow). The version comes out with the
federation's provenance, the quantization gate and the threshold factor derived from the clients' held-out
windows; ``fleet install --agent-config --machine`` folds the machine's baseline in, the agent's registry
swaps it in over the shipped vibration-anomaly 1.0.0 and scores healthy and faulty windows (cut and
featurized by the serving path's code); a corrupted later version is refused while the fleet version keeps
scoring; ``fleet rollback`` goes back to 1.0.0. No timing is asserted."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from agent.records import Source
from agent.spool.codec import FeatureRows
from agent.storage.points import feature_rows_lines
from pdm_tools.dev import services as devservices
from pdm_tools.fleet_learning.process import TRAIN_ROWS
from pdm_tools.fleet_learning.process_app import vibration_spec
from pdm_tools.fleet_learning.process_ship import MODEL_IDS
from pdm_tools.simulator.machine import Fault, SimulatedMachine, fleet_profile
from pdm_tools.training.simdata import vibration_rows
from tests.integration import test_fleet_deploy as deploy_test
from tests.integration.test_fleet_process_deploy import (
    agent_store,
    federate,
    install_over_shipped,
    refuse_corrupt_then_roll_back,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

processes = deploy_test.processes

NS = 1_000_000_000
ROWS = 600  # stored windows per machine: TRAIN_ROWS of commissioning, the rest held out
SEED = 7
MACHINES = ("m1", "m2", "m3")
SHIPPED_VIBRATION_MODEL = Path(__file__).resolve().parents[2] / "models" / "vibration_anomaly"


def _machine(index: int, faults: list[Fault] | None = None) -> SimulatedMachine:
    """Pump ``index`` of one type, at 0.6x, 1x and 1.4x of 1,500 rpm (its own vibration levels and spectrum)."""
    profile = dataclasses.replace(fleet_profile(index, SEED), rpm=1500.0 * (0.6 + 0.4 * index))
    return SimulatedMachine(profile, faults or [], SEED)


def _window_s(machine: SimulatedMachine) -> tuple[float, float]:
    spec = vibration_spec()
    return spec.hop_samples / machine.profile.rate_hz, spec.window_samples / machine.profile.rate_hz


def _store(tmp_path: Path, url: str, database: str) -> Path:
    """An agent config whose local store holds each machine's first ``ROWS`` vibration feature vectors, as the
    agent's writer formats a ``FEATURES`` spool entry of the shipped vibration-anomaly 1.0.0."""
    spec = vibration_spec()
    lines: list[str] = []
    for i, name in enumerate(MACHINES):
        machine = _machine(i)
        hop_s, window_s = _window_s(machine)
        rows = vibration_rows(machine, (ROWS - 1) * hop_s + window_s + 0.01, spec)[:ROWS]
        assert len(rows) == ROWS
        start = (time.time_ns() // NS - 600) * NS
        ends = start + np.round((np.arange(ROWS) * hop_s + window_s) * NS).astype(np.int64)
        source = Source.of(machine=name, sensor="vibration")
        names = list(spec.feature_names())
        entry = FeatureRows(MODEL_IDS["vibration"], "1.0.0", names, [source], [0] * ROWS, ends, rows)
        lines += feature_rows_lines(entry)
    return agent_store(tmp_path, url, database, lines)


def test_vibration_federation_ships_a_version_the_agents_registry_scores_with(
    influxdb_v1: devservices.Service, influx_db_name: str, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    config = _store(tmp_path, influxdb_v1.url, influx_db_name)
    serve_args = ["--model", "vibration", "--version", "2.0.0", "--quantize", "--rounds", "1", "--min-clients", "3",
                  "--local-epochs", "40", "--secagg"]  # fmt: skip
    client = ["--agent-config", str(config), "--model", "vibration", "--since", "1h"]
    out = federate(tmp_path, processes, serve_args, {m: [*client, "--machine", m] for m in MACHINES})
    for machine in MACHINES:
        log = (tmp_path / f"agent-{machine}.log").read_text(errors="replace")
        assert f"{ROWS} vibration feature vectors of the last 1h (local store)" in log
        # SecAgg+'s four stages of the one round (keys, shares, masked vector, unmasking) reached every agent.
        assert log.count("Receiving: train message") == 4, log[-3000:]

    summary = json.loads((out / "federation.json").read_text(encoding="utf-8"))
    assert summary["complete"] is True and summary["federation"]["model"] == "vibration autoencoder"
    # SecAgg+ ran: its settings recorded, and each agent's masked reply (the legacy workflow's) counted.
    assert summary["federation"]["secagg"]["clipping_range"] > 0 and len(summary["participants"]["1"]) == 3
    assert sorted(summary["evaluation"]) == ["1"]
    last = summary["evaluation"]["1"]  # no labels on an agent: every held-out window counted, alarms as false
    assert last["tp"] == last["fn"] == 0 and last["fp"] + last["tn"] == 3 * (ROWS - TRAIN_ROWS)
    template = out / "vibration-anomaly-2.0.0"
    manifest = json.loads((template / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["model_id"] == "vibration-anomaly"
    assert (
        manifest["feature_spec_hash"]
        == json.loads((SHIPPED_VIBRATION_MODEL / "manifest.json").read_text())["feature_spec_hash"]
    )
    federation = manifest["training"]["federation"]
    assert federation["rounds_completed"] == 1 and len(federation["clients"]) == 3
    for client in federation["clients"]:  # row counts and data hashes, never data
        assert client["rows"] == TRAIN_ROWS and client["held-out"] == ROWS - TRAIN_ROWS
        assert len(client["data-sha256"]) == 64 and client["rounds_trained"] == 1
    facts = manifest["training"]["fleet_template"]
    heldout = facts["threshold_factor_from_heldout"]
    assert heldout["heldout_steps"] == 3 * (ROWS - TRAIN_ROWS) and heldout["factor"] >= 2.4
    assert facts["detector"]["threshold_factor"] == heldout["factor"] and facts["detector"]["smoothing_steps"] == 1
    gate = manifest["quantization"]["gate"]
    assert gate["clients"] == 3
    ships = "int8" if gate["int8_vs_fp32"]["accuracy_rules_passed"] else "fp32"
    assert facts["install_ships"] == ships

    models = tmp_path / "models"
    registry, slot = install_over_shipped(models, SHIPPED_VIBRATION_MODEL, template, config, "m1")
    model = slot.model
    installed = json.loads((models / "vibration-anomaly-2.0.0" / "manifest.json").read_text(encoding="utf-8"))
    assert installed["quantization"]["shipped"] == ships and installed["training"]["machine"]["machine"] == "m1"

    # m1's windows the store does not hold (after its first ROWS), healthy, and with an outer-race defect at
    # the simulator's severity 0.25 from 130 s on: features by the serving path (windows, extraction).
    spec = vibration_spec()
    healthy = vibration_rows(_machine(0), 150.0, spec)[ROWS:]
    fault = Fault(_machine(0).profile.name, "bearing_outer", 130.0, severity=0.25, ramp_s=0.0)
    faulty = vibration_rows(_machine(0, [fault]), 150.0, spec)[-40:]
    normal_above = int((model.score(healthy) > model.threshold).sum())
    faulty_above = int((model.score(faulty) > model.threshold).sum())
    print(
        f"m1 with fleet vibration 2.0.0 ({ships}, factor {heldout['factor']:.3g}): threshold {model.threshold:.4g}, "
        f"healthy windows above {normal_above}/{len(healthy)}, outer-race defect above {faulty_above}/{len(faulty)}; "
        f"bytes per round {summary['bytes_per_round']}; federated evaluation {summary['evaluation']}; held-out "
        f"{heldout}; gate {gate['int8_vs_fp32']}; m1 {installed['metrics']['machine']}"
    )
    assert normal_above <= 0.05 * len(healthy)
    assert faulty_above >= 0.9 * len(faulty)

    # A later version whose file is not its manifest's: refused, 2.0.0 keeps scoring; rollback: 1.0.0 again.
    refuse_corrupt_then_roll_back(registry, models, "vibration-anomaly", "2.0.0", "2.1.0")
    assert registry.active()["vibration-anomaly"][0] == "1.0.0"
