"""The fleet's process autoencoder on real processes: ``pdm-agent fleet serve --model process`` (Flower's
SuperLink and the process ServerApp) and two ``pdm-agent fleet client --agent-config`` agents (SuperNodes
whose ClientApp reads its machine's readings from the agent's local InfluxDB, a real InfluxDB 1.x). The
federation completes its rounds, every round both agents train and evaluate, and the quantization gate's
metrics come back from both. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from agent.bootstrap import build_sink
from agent.config import load_config
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


def _store(tmp_path: Path, url: str, database: str) -> Path:
    """An agent config whose local store holds ``ROWS`` readings of machines m1 and m2, 1 s apart."""
    path = tmp_path / "agent.yaml"
    path.write_text(
        json.dumps(
            {"storage": {"url": url, "v1": {"database": database}}, "spool": {"path": str(tmp_path / "spool.db")}}
        )
    )
    start = (time.time_ns() // NS - 60 - ROWS) * NS
    lines = []
    for m, seed in (("m1", 1), ("m2", 2)):
        rng = np.random.default_rng(seed)
        load = np.cumsum(rng.normal(0.0, 0.05, ROWS))
        values = np.array([30.0, 2.0, 60.0]) * seed + np.outer(load, [1.0, -0.2, 0.5]) + rng.normal(0, 0.1, (ROWS, 3))
        lines += [
            f"reading,machine={m},sensor=process "
            + ",".join(f"{n}={v:.4f}" for n, v in zip(FIELDS, row, strict=True))
            + f" {start + i * NS}"
            for i, row in enumerate(values)
        ]
    sink = build_sink(load_config(path))
    try:
        sink.write(lines)
    finally:
        sink.close()
    return path


def test_process_federation_on_agents_reading_their_local_store(
    influxdb_v1: devservices.Service, influx_db_name: str, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    config = _store(tmp_path, influxdb_v1.url, influx_db_name)
    port = closed_port()
    out = tmp_path / "out"
    serve_log = tmp_path / "serve.log"
    serve = _pdm_agent(
        "fleet", "serve", "--model", "process", "--channels", "3", "--quantize", "--host", "127.0.0.1",
        "--port", str(port), "--state", str(tmp_path / "link"), "--out", str(out), "--rounds", "2",
        "--min-clients", "2", "--round-timeout-s", "120", "--json", log=serve_log,
    )  # fmt: skip
    processes.append(serve)
    logs = [tmp_path / f"agent-{m}.log" for m in ("m1", "m2")]
    for machine, log in zip(("m1", "m2"), logs, strict=True):
        processes.append(
            _pdm_agent("fleet", "client", "--superlink", f"127.0.0.1:{port}", "--agent-config", str(config),
                       "--machine", machine, "--since", "1h", "--fields", ",".join(FIELDS),
                       "--runtime-port", str(closed_port()), log=log)
        )  # fmt: skip

    assert serve.wait(timeout=WAIT_S) == 0, serve_log.read_text(errors="replace")[-4000:]
    for log in logs:
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
