"""The fleet's process autoencoder on real processes: ``pdm-agent fleet serve --model process`` (Flower's
SuperLink and the process ServerApp) and two ``pdm-agent fleet client --agent-config`` agents (SuperNodes
whose ClientApp reads its machine's readings from the agent's local InfluxDB, a real InfluxDB 1.x). The
federation completes its rounds, every round both agents train and evaluate, and the quantization gate's
metrics come back from both. No timing is asserted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.bootstrap import build_sink
from agent.config import load_config
from agent.inference.manifest import Manifest
from agent.inference.registry import ModelRegistry, ModelSlot, default_builders
from agent.metrics import Metrics
from pdm_tools.dev import services as devservices
from pdm_tools.fleet_learning.process import TRAIN_ROWS
from tests.integration import test_fleet_deploy as deploy_test
from tests.integration.agent_process import closed_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

# The deployment test's helpers: agents in their own process groups, stopped after the test.
processes = deploy_test.processes
_pdm_agent = deploy_test._pdm_agent
WAIT_S = deploy_test.WAIT_S

NS = 1_000_000_000
ROWS = 600
FIELDS = ("flow", "pressure", "temperature")


def _store(
    tmp_path: Path,
    url: str,
    database: str,
    machines: dict[str, np.ndarray] | None = None,
    fields: tuple[str, ...] = FIELDS,
) -> Path:
    """An agent config whose local store holds each machine's readings (``(ROWS, 3)``, ``fields``) 1 s apart
    (default: m1 and m2, each at its own operating point)."""
    if machines is None:
        machines = {m: _machine_readings(seed, (30.0, 2.0, 60.0)) for m, seed in (("m1", 1), ("m2", 2))}
    start = (time.time_ns() // NS - 60 - ROWS) * NS
    lines = [
        f"reading,machine={m},sensor=process "
        + ",".join(f"{n}={v:.4f}" for n, v in zip(fields, row, strict=True))
        + f" {start + i * NS}"
        for m, values in machines.items()
        for i, row in enumerate(values)
    ]
    return agent_store(tmp_path, url, database, lines)


def agent_store(tmp_path: Path, url: str, database: str, lines: list[str]) -> Path:
    """An agent config (``tmp_path/agent.yaml``) whose local store (the InfluxDB at ``url``) holds ``lines``."""
    path = tmp_path / "agent.yaml"
    path.write_text(
        json.dumps(
            {"storage": {"url": url, "v1": {"database": database}}, "spool": {"path": str(tmp_path / "spool.db")}}
        )
    )
    sink = build_sink(load_config(path))
    try:
        sink.write(lines)
    finally:
        sink.close()
    return path


def _machine_readings(seed: int, levels: tuple[float, float, float] = (40.0, 3.0, 5.0)) -> np.ndarray:
    """``ROWS`` readings of three channels: the machine's operating point (``levels`` x ``seed``), a common
    slow load wander, noise."""
    rng = np.random.default_rng(seed)
    load = np.cumsum(rng.normal(0.0, 0.05, ROWS))
    return np.array(levels) * seed + np.outer(load, [1.0, -0.2, 0.5]) + rng.normal(0, 0.1, (ROWS, 3))


def federate(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]], serve_args: list[str], clients: dict[str, list[str]]
) -> Path:
    """``fleet serve`` with ``serve_args`` on a free port and one ``fleet client`` per entry of ``clients``
    (its log name: its arguments after ``--superlink``); waits for the federation, returns its ``--out``."""
    port = closed_port()
    out = tmp_path / "out"
    serve_log = tmp_path / "serve.log"
    serve = _pdm_agent(
        "fleet", "serve", *serve_args, "--host", "127.0.0.1", "--port", str(port), "--state", str(tmp_path / "link"),
        "--out", str(out), "--round-timeout-s", "120", "--json", log=serve_log,
    )  # fmt: skip
    processes.append(serve)
    for name, args in clients.items():
        processes.append(
            _pdm_agent("fleet", "client", "--superlink", f"127.0.0.1:{port}", *args,
                       "--runtime-port", str(closed_port()), log=tmp_path / f"agent-{name}.log")
        )  # fmt: skip
    assert serve.wait(timeout=WAIT_S) == 0, serve_log.read_text(errors="replace")[-4000:]
    return out


def fleet_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``pdm-agent fleet ARGS`` (install, rollback) as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "agent", "fleet", *args], capture_output=True, text=True, timeout=300, check=False
    )


def install_over_shipped(
    models: Path, shipped: Path, template: Path, config: Path, machine: str
) -> tuple[ModelRegistry, ModelSlot[Any]]:
    """An agent's ``models`` holding the ``shipped`` version 1.0.0 and its registry tracking it; ``fleet install``
    of the fleet ``template`` is refused without a machine (no baseline to fold in), then installed for
    ``machine`` of the agent at ``config``, and the registry swaps it in. Returns the registry and the slot."""
    model_id = Manifest.load(shipped).model_id
    version = Manifest.load(template).version
    models.mkdir()
    shutil.copytree(shipped, models / f"{model_id}-1.0.0")
    registry = ModelRegistry(models, Metrics(), default_builders(1))
    slot = registry.track(model_id, "anomaly")
    assert registry.active()[model_id][0] == "1.0.0"
    assert fleet_cli("install", str(template), "--models-dir", str(models)).returncode == 2
    done = fleet_cli("install", str(template), "--models-dir", str(models), "--agent-config", str(config),
                     "--machine", machine, "--since", "1h")  # fmt: skip
    assert done.returncode == 0, done.stderr
    registry.refresh()
    assert registry.active()[model_id][0] == version and slot.model.version == version
    assert Path(slot.model.directory).name == f"{model_id}-{version}"
    return registry, slot


def refuse_corrupt_then_roll_back(
    registry: ModelRegistry, models: Path, model_id: str, running: str, later: str
) -> None:
    """A later version ``later`` whose file is not its manifest's arrives in ``models``: the registry refuses it
    (``sha256``) and ``running`` keeps scoring; then ``fleet rollback`` takes ``running`` away and the
    registry runs the version before it."""
    slot = registry.track(model_id, "anomaly")
    bad = models / ".incoming" / f"{model_id}-{later}"
    shutil.copytree(models / f"{model_id}-{running}", bad)
    data = json.loads((bad / "manifest.json").read_text(encoding="utf-8"))
    (bad / "manifest.json").write_text(json.dumps({**data, "version": later}), encoding="utf-8")
    graph = bad / data["file"]
    graph.write_bytes(graph.read_bytes()[:-4] + b"\0\0\0\0")
    bad.rename(models / bad.name)
    registry.refresh()
    assert registry.active()[model_id][0] == running
    assert [e.reason for p, e in registry.refused().items() if p.name == bad.name] == ["sha256"]
    assert slot.model.version == running
    assert slot.model.score(np.zeros((2, slot.model.n_features), np.float32)).shape == (2,)

    rolled = fleet_cli("rollback", "--models-dir", str(models), "--model-id", model_id)
    assert rolled.returncode == 0, rolled.stderr
    registry.refresh()
    assert registry.active()[model_id][0] != running


def test_process_federation_on_agents_reading_their_local_store(
    influxdb_v1: devservices.Service, influx_db_name: str, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    config = _store(tmp_path, influxdb_v1.url, influx_db_name)
    serve_args = ["--model", "process", "--channels", "3", "--quantize", "--rounds", "2", "--min-clients", "2"]
    client = ["--agent-config", str(config), "--since", "1h", "--fields", ",".join(FIELDS)]
    out = federate(tmp_path, processes, serve_args, {m: [*client, "--machine", m] for m in ("m1", "m2")})
    for machine in ("m1", "m2"):
        log = tmp_path / f"agent-{machine}.log"
        assert f"{ROWS} readings of the last 1h (local store)" in log.read_text(errors="replace")
    summary = json.loads((out / "federation.json").read_text(encoding="utf-8"))
    assert summary["complete"] is True and summary["federation"]["model"] == "process autoencoder"
    assert sorted(summary["evaluation"]) == ["1", "2"]
    assert all(len(p) == 2 for p in summary["participants"].values()), summary["participants"]
    assert sorted(summary["client_rows"].values()) == [TRAIN_ROWS - 29] * 2  # each machine's commissioning windows
    # No labels on an agent: every test step of both machines is counted, alarms as false ones.
    last = summary["evaluation"]["2"]
    assert last["tp"] == last["fn"] == 0 and last["fp"] + last["tn"] == 2 * (ROWS - TRAIN_ROWS)
    gate = summary["quantization_gate"]
    assert gate["clients"] == 2 and gate["fp32"]["fp"] + gate["fp32"]["tn"] == 2 * (ROWS - TRAIN_ROWS)
    with np.load(out / "process_model.npz") as model:
        assert model["w0"].shape == (3, 16) and model["w3"].shape == (16, 3)


SHIPPED_PROCESS_MODEL = Path(__file__).resolve().parents[2] / "models" / "process_anomaly"
AGENT_FIELDS = ("temperature", "current", "pressure")  # the shipped process-anomaly's channels


def test_process_federation_ships_a_version_the_agents_registry_scores_with(
    influxdb_v1: devservices.Service, influx_db_name: str, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """``fleet serve --model process --version`` with three agents: the template version comes out with the
    federation's provenance and the gate's verdict; ``fleet install --agent-config --machine`` folds the
    machine's baseline in and the agent's registry swaps it in over the shipped process-anomaly 1.0.0 and
    scores the machine's windows (cut and featurized by the agent's code) with the machine's own threshold;
    a corrupted later version is refused while 2.0.0 keeps scoring; ``fleet rollback`` goes back to 1.0.0."""
    from agent.features.extract import extract_matrix
    from agent.features.windows import Windower
    from agent.records import Reading, Source

    machines = {"m1": 1, "m2": 2, "m3": 3}
    config = _store(
        tmp_path, influxdb_v1.url, influx_db_name, {m: _machine_readings(s) for m, s in machines.items()}, AGENT_FIELDS
    )
    serve_args = ["--model", "process", "--channels", "3", "--fields", ",".join(AGENT_FIELDS), "--version", "2.0.0",
                  "--quantize", "--rounds", "2", "--min-clients", "3", "--local-epochs", "20"]  # fmt: skip
    client = ["--agent-config", str(config), "--since", "1h", "--fields", ",".join(AGENT_FIELDS)]
    out = federate(tmp_path, processes, serve_args, {m: [*client, "--machine", m] for m in machines})

    template = out / "process-anomaly-2.0.0"
    manifest = json.loads((template / "manifest.json").read_text(encoding="utf-8"))
    federation = manifest["training"]["federation"]
    assert federation["rounds_completed"] == 2 and len(federation["clients"]) == 3
    for client in federation["clients"]:  # row counts and data hashes, never data
        assert client["rows"] == TRAIN_ROWS - 29 and client["held-out"] == ROWS - TRAIN_ROWS
        assert len(client["data-sha256"]) == 64 and client["rounds_trained"] == 2
    gate = manifest["quantization"]["gate"]
    assert gate["clients"] == 3
    ships = "int8" if gate["int8_vs_fp32"]["accuracy_rules_passed"] else "fp32"
    assert manifest["training"]["fleet_template"]["install_ships"] == ships

    # Without the machine there is no baseline to fold in: refused; for m1: the registry runs 2.0.0.
    models = tmp_path / "models"
    registry, slot = install_over_shipped(models, SHIPPED_PROCESS_MODEL, template, config, "m1")
    model = slot.model
    installed = json.loads((models / "process-anomaly-2.0.0" / "manifest.json").read_text(encoding="utf-8"))
    assert installed["quantization"]["shipped"] == ships and installed["training"]["machine"]["machine"] == "m1"
    assert installed["threshold"] != manifest["threshold"]

    # The agent's path on m1's readings: its windower cuts windows, its features, the registry's model scores.
    def scores(values: np.ndarray) -> np.ndarray:
        windower = Windower(lambda source: model.spec, Metrics())
        source = Source.of(machine="m1", sensor="process")
        windows = [
            w
            for i, row in enumerate(values[TRAIN_ROWS:])
            for w in windower.add(Reading(source, i * NS, dict(zip(AGENT_FIELDS, map(float, row), strict=True))))
        ]
        return model.score(extract_matrix(model.spec, windows))

    normal = scores(_machine_readings(1))
    # A pressure drop of 3 of m1's long-run deviations (its commissioning baseline's scale) after 60 s.
    faulty_readings = _machine_readings(1)
    faulty_readings[TRAIN_ROWS + 60 :, 2] -= 3 * float(installed["training"]["machine"]["baseline"]["scale"][2])
    faulty = scores(faulty_readings)
    print(f"m1 with fleet 2.0.0 ({ships}): threshold {model.threshold:.4g}, normal windows above "
          f"{(normal > model.threshold).sum()}/{len(normal)}, pressure drop above "
          f"{(faulty[-20:] > model.threshold).sum()}/20")  # fmt: skip
    assert (normal > model.threshold).mean() < 0.05
    assert (faulty[-20:] > model.threshold).all()

    # A later version whose file is not its manifest's: refused, 2.0.0 keeps scoring; rollback: 1.0.0 again.
    refuse_corrupt_then_roll_back(registry, models, "process-anomaly", "2.0.0", "2.1.0")
    assert registry.active()["process-anomaly"][0] == "1.0.0"
