"""A federation on real processes: ``pdm-agent fleet serve`` (Flower's SuperLink and the ServerApp) and three
``pdm-agent fleet client`` agents (Flower SuperNodes, each with its own data folder).

One client is killed (its whole process group: SuperNode and ClientApp) as soon as it receives the first
training message, and started again on the same folder. The federation must not stall on it: the round
aggregates what came within ``--round-timeout-s`` (``--min-clients 2``), every round completes, and the
restarted agent (a new SuperNode id) trains in a later round. The federation's model comes out as a
registry version (``--version``), INT8 if the quantization gate (``--quantize``) passed on every agent's
held-out rows, that ``pdm-agent fleet install`` puts on an agent, whose registry runs it.
No timing is asserted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from agent.features.bearing import BearingFeatureSpec
from agent.inference.registry import ModelRegistry, default_builders
from agent.metrics import Metrics
from pdm_tools.fleet_learning.data import ClientData
from pdm_tools.fleet_learning.fleets import synthetic_fleet
from tests.integration.agent_process import closed_port

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.timeout(900)]

WAIT_S = 600.0


def _pdm_agent(*args: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "agent", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # one group per agent: killing it kills its SuperNode and ClientApp
        )


def _wait_for_text(log: Path, text: str, *watched: tuple[subprocess.Popen[bytes], Path]) -> None:
    """Until ``text`` is in ``log``; fails with the log of a watched process that exits first."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if log.is_file() and text in log.read_text(encoding="utf-8", errors="replace"):
            return
        for process, its_log in watched:
            if process.poll() is not None:
                pytest.fail(f"exited with {process.returncode}:\n{its_log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"no {text!r} in {log}:\n{log.read_text(errors='replace')[-3000:]}")


def _kill_group(process: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    if process.poll() is None:
        os.killpg(process.pid, sig)
        process.wait(timeout=60)


def _start_clients(clients: Sequence[ClientData], port: int, tmp_path: Path) -> list[subprocess.Popen[bytes]]:
    """One ``fleet client`` agent per client, each on its own data folder ``tmp_path/agent-<i>``."""
    started = []
    for i, client in enumerate(clients):
        folder = client.save(tmp_path / f"agent-{i}")
        started.append(
            _pdm_agent("fleet", "client", "--superlink", f"127.0.0.1:{port}", "--data", str(folder),
                       "--runtime-port", str(closed_port()), log=tmp_path / f"agent-{i}.log")
        )  # fmt: skip
    return started


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for process in started:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_killed_client_does_not_stall_the_federation_and_rejoins(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    fleet = synthetic_fleet(3, 200, seed=2, n_features=BearingFeatureSpec().n_features)
    folders = [client.save(tmp_path / f"agent-{i}") for i, client in enumerate(fleet.clients)]
    port = closed_port()
    superlink = f"127.0.0.1:{port}"
    out = tmp_path / "out"
    serve_log = tmp_path / "serve.log"
    serve = _pdm_agent(
        "fleet", "serve", "--host", "127.0.0.1", "--port", str(port), "--state", str(tmp_path / "link"),
        "--out", str(out), "--rounds", "3", "--min-clients", "2", "--round-timeout-s", "60",
        "--version", "1.1.0", "--quantize", "--json", log=serve_log,
    )  # fmt: skip
    processes.append(serve)
    logs = [tmp_path / f"agent-{i}.log" for i in range(3)]
    clients = [
        _pdm_agent("fleet", "client", "--superlink", superlink, "--data", str(folder),
                   "--runtime-port", str(closed_port()), log=log)
        for folder, log in zip(folders, logs, strict=True)
    ]  # fmt: skip
    processes.extend(clients)

    # The third agent dies the moment its first training message arrives (mid-round 1) ...
    _wait_for_text(logs[2], "Receiving: train message", (clients[2], logs[2]), (serve, serve_log))
    _kill_group(clients[2])
    # ... and comes back on the same folder: a new SuperNode.
    rejoined_log = tmp_path / "agent-2-again.log"
    rejoined = _pdm_agent("fleet", "client", "--superlink", superlink, "--data", str(folders[2]),
                          "--runtime-port", str(closed_port()), log=rejoined_log)  # fmt: skip
    processes.append(rejoined)

    assert serve.wait(timeout=WAIT_S) == 0, serve_log.read_text(errors="replace")[-4000:]
    summary = json.loads((out / "federation.json").read_text(encoding="utf-8"))
    assert summary["complete"] is True
    assert sorted(summary["evaluation"]) == ["1", "2", "3"]
    participants = summary["participants"]
    assert len(participants["1"]) == 2, "the killed agent's round-1 update cannot be there"
    later = set(participants["2"]) | set(participants["3"])
    newcomers = later - set(participants["1"])
    assert newcomers, f"the restarted agent never trained again: {participants}"
    assert "Receiving: train message" in rejoined_log.read_text(errors="replace")
    assert (out / "model.npz").is_file()

    # The round's result ships: installed on an agent, its registry verifies and runs it.
    version_dir = out / "bearing-defect-classifier-1.1.0"
    manifest = json.loads((version_dir / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["training"]["federation"]["rounds_completed"] == 3
    assert len(manifest["training"]["federation"]["clients"]) >= 2  # those connected when round 0 asked
    # The quantization gate ran on the agents' held-out rows; the version ships what it decided.
    gate = manifest["quantization"]["gate"]
    assert len(gate["clients"]) >= 2 and gate == summary["quantization_gate"]
    assert manifest["quantization"]["shipped"] == gate["ship"]
    assert manifest["file"] == ("model.int8.onnx" if gate["ship"] == "int8" else "model.fp32.onnx")
    models = tmp_path / "models"
    models.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "agent", "fleet", "install", str(version_dir), "--models-dir", str(models)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    registry = ModelRegistry(models, Metrics(), default_builders(1))
    registry.track("bearing-defect-classifier", "classifier")
    assert registry.active()["bearing-defect-classifier"][0] == "1.1.0"


def test_secure_aggregation_runs_on_real_processes(tmp_path: Path, processes: list[subprocess.Popen[bytes]]) -> None:
    """``fleet serve --secagg`` with three unchanged ``fleet client`` agents: every round completes with all
    three (SecAgg+ needs each one's masked vector and enough key shares), with federated evaluation."""
    fleet = synthetic_fleet(3, 200, seed=3, n_features=BearingFeatureSpec().n_features)
    port = closed_port()
    out, serve_log = tmp_path / "out", tmp_path / "serve.log"
    serve = _pdm_agent(
        "fleet", "serve", "--host", "127.0.0.1", "--port", str(port), "--state", str(tmp_path / "link"),
        "--out", str(out), "--rounds", "2", "--min-clients", "3", "--round-timeout-s", "120", "--secagg",
        "--json", log=serve_log,
    )  # fmt: skip
    processes.append(serve)
    processes.extend(_start_clients(fleet.clients, port, tmp_path))

    assert serve.wait(timeout=WAIT_S) == 0, serve_log.read_text(errors="replace")[-4000:]
    summary = json.loads((out / "federation.json").read_text(encoding="utf-8"))
    assert summary["complete"] is True and "secagg" in summary["federation"]
    assert sorted(summary["evaluation"]) == ["1", "2"]
    assert all(len(nodes) == 3 for nodes in summary["participants"].values()), summary["participants"]


def test_multikrum_rejects_an_agent_with_broken_labels_on_real_processes(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """``fleet serve --strategy multikrum --byzantine 1`` with five agents, one of which labels every row one
    class off (a misconfigured class list: its updates pull the model elsewhere). Multi-Krum must leave that
    agent's update out of every round's aggregate and say so (``kept`` in ``federation.json``, ``rounds_kept``
    per client in the shipped version's provenance), and average the four others."""
    fleet = synthetic_fleet(5, 200, seed=2, n_features=BearingFeatureSpec().n_features)
    k = len(fleet.clients[0].class_names)
    broken = fleet.clients[-1]  # the most rows: the one FedAvg would follow most
    broken = dataclasses.replace(broken, y=(broken.y + 1) % k, y_held=(broken.y_held + 1) % k)
    clients = (*fleet.clients[:-1], broken)
    assert len({len(c.y) for c in clients}) == 5, "row counts identify the agents in federation.json"
    port = closed_port()
    out, serve_log = tmp_path / "out", tmp_path / "serve.log"
    serve = _pdm_agent(
        "fleet", "serve", "--host", "127.0.0.1", "--port", str(port), "--state", str(tmp_path / "link"),
        "--out", str(out), "--rounds", "2", "--min-clients", "5", "--round-timeout-s", "120",
        "--strategy", "multikrum", "--byzantine", "1", "--version", "1.2.0", "--json", log=serve_log,
    )  # fmt: skip
    processes.append(serve)
    processes.extend(_start_clients(clients, port, tmp_path))

    assert serve.wait(timeout=WAIT_S) == 0, serve_log.read_text(errors="replace")[-4000:]
    summary = json.loads((out / "federation.json").read_text(encoding="utf-8"))
    assert summary["complete"] is True
    assert summary["federation"]["strategy"] == "multikrum" and summary["federation"]["krum_malicious"] == 1
    broken_node = next(node for node, rows in summary["client_rows"].items() if rows == len(broken.y))
    assert sorted(summary["kept"]) == ["1", "2"]
    for rnd, kept in summary["kept"].items():
        assert len(summary["participants"][rnd]) == 5, summary["participants"]
        assert len(kept) == 4 and broken_node not in kept, f"round {rnd} kept {kept}; broken agent {broken_node}"

    manifest = json.loads((out / "bearing-defect-classifier-1.2.0" / "manifest.json").read_text(encoding="utf-8"))
    kept_rounds = {c["node"]: c["rounds_kept"] for c in manifest["training"]["federation"]["clients"]}
    assert kept_rounds == {node: (0 if node == broken_node else 2) for node in summary["client_rows"]}
