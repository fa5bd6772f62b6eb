"""A federation on real machines: Flower's SuperLink (coordinator), one SuperNode per agent, and the Flower
App that ``flwr run`` submits to the SuperLink.

Flower's deployment runtime runs *apps*: a folder with a ``pyproject.toml`` that names the ServerApp and
ClientApp (``module:attribute``) and the run's settings. The code of both lives in this package, installed
beside the agent (``pip install 'pdm-agent[fleet]'``); the app folder written here only points at it, so the
FAB that travels to the SuperNodes holds no code and no data. Processes (all Flower's own commands):

- ``flower-superlink --insecure --host H --port P``: the coordinator; it starts the ServerApp of a submitted
  run in a subprocess (``SERVER_APP`` below, which reads the run config and writes the result to ``out-dir``)
- ``flower-supernode --insecure --superlink H:P --node-config "data-dir='DIR'"``: one per agent; it starts
  the ClientApp (``client_app.app``) in a subprocess that reads only ``DIR``
- ``flwr run APP CONNECTION --run-config …``: submits the app (``FLWR_HOME`` names the connection file)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from pdm_tools.fleet_learning.params import LocalTraining
from pdm_tools.fleet_learning.server_app import FederationConfig, Outcome, check_byzantine, federate, make_strategy
from pdm_tools.models.defect_mlp import DefectMlp

logger = logging.getLogger(__name__)

APP_NAME = "pdm-fleet"
RESULT_FILE = "federation.json"
MODEL_FILE = "model.npz"
CONNECTION = "pdm-fleet"

# The run settings ``flwr run --run-config`` may override, with their defaults (the app's pyproject).
RUN_CONFIG: dict[str, Any] = {
    "strategy": "fedavg",
    # Krum and Multi-Krum: the malicious clients they tolerate (``fleet serve --byzantine``).
    "byzantine": 1,
    "rounds": 10,
    "min-clients": 2,
    "local-epochs": LocalTraining.epochs,
    "learning-rate": LocalTraining.learning_rate,
    "class-names": "normal,inner_race,outer_race,ball",
    "seed": 42,
    "round-timeout-s": 120.0,
    "dp-noise": 0.0,
    "dp-clip": 0.0,
    "secagg": False,
    "quantize": False,
    "out-dir": "",
    "version": "",
}


def config_from_run(run_config: dict[str, Any]) -> FederationConfig:
    """The federation's settings from the run config of a submitted app. ``ValueError`` names a bad key, a
    combination no strategy runs (``server_app.make_strategy``: a robust rule with SecAgg+ or DP, ...), or then a
    ``byzantine`` count the strategy cannot tolerate with ``min-clients`` (``server_app.check_byzantine``)."""
    merged = {**RUN_CONFIG, **run_config}
    unknown = sorted(set(run_config) - set(RUN_CONFIG))
    if unknown:
        raise ValueError(f"unknown run-config keys {unknown}; known: {sorted(RUN_CONFIG)}")
    config = FederationConfig(
        class_names=tuple(str(merged["class-names"]).split(",")),
        rounds=int(merged["rounds"]),
        strategy=str(merged["strategy"]),
        min_clients=int(merged["min-clients"]),
        krum_malicious=int(merged["byzantine"]),
        training=LocalTraining(epochs=int(merged["local-epochs"]), learning_rate=float(merged["learning-rate"])),
        dp_noise=float(merged["dp-noise"]),
        dp_clip=float(merged["dp-clip"]),
        secagg=bool(merged["secagg"]),
        quantize=bool(merged["quantize"]),
        seed=int(merged["seed"]),
        round_timeout_s=float(merged["round-timeout-s"]),
    )
    make_strategy(config)
    check_byzantine(config.strategy, config.krum_malicious, config.min_clients)
    return config


def _deployed_main(grid: Grid, context: Context) -> None:
    """The ServerApp of a submitted run: the federation, then its result written to ``out-dir`` (with
    ``version``, also the model version directory the agents' registry takes, ``ship.write_version``)."""
    run_config = dict(context.run_config)
    out_dir = Path(str(run_config.get("out-dir") or "."))
    config = config_from_run(run_config)
    outcome = Outcome()
    federate(grid, config, outcome, context)
    version = str(run_config.get("version") or "")
    if version and outcome.model is not None:
        from pdm_tools.fleet_learning.ship import write_version

        write_version(out_dir, config, outcome, version)
    write_result(out_dir, config, outcome)


def write_result(out_dir: Path, config: FederationConfig, outcome: Outcome) -> Path:
    """``out_dir/model.npz`` (the fleet model's arrays) and ``out_dir/federation.json`` (settings, per-round
    bytes and federated evaluation, per-client row counts)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model = outcome.model
    if model is not None:
        save_model(model, out_dir / MODEL_FILE)
    head = {"federation": config.to_dict(), "complete": model is not None}
    return write_summary(out_dir, {**head, **({"quantization_gate": outcome.gate} if outcome.gate else {})}, outcome)


def write_summary(out_dir: Path, head: dict[str, Any], outcome: Outcome) -> Path:
    """``out_dir/federation.json``: ``head`` (settings, whether a model came out), then the run's counters
    (bytes, evaluation, rows, participants and train metrics per round)."""
    summary = {
        **head,
        "bytes_per_round": {str(k): v for k, v in sorted(outcome.bytes_per_round.items())},
        "evaluation": {str(k): v for k, v in sorted(outcome.evaluation.items())},
        "client_rows": {str(k): v for k, v in sorted(outcome.client_rows.items())},
        "participants": {str(k): sorted(str(n) for n in v) for k, v in sorted(outcome.participants.items())},
        # Krum / Multi-Krum: the nodes whose update each round's aggregate kept (the others were rejected).
        **({"kept": {str(k): [str(n) for n in v] for k, v in sorted(outcome.kept.items())}} if outcome.kept else {}),
        # What each node's train reply reported each round (numbers: rows, loss, the adapters' Adam step count).
        "train_metrics": {
            str(k): {str(n): m for n, m in sorted(v.items())} for k, v in sorted(outcome.train_metrics.items())
        },
        **({"privacy": outcome.privacy} if outcome.privacy else {}),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RESULT_FILE
    path.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return path


def save_model(model: DefectMlp, path: Path) -> None:
    """The fleet model's arrays (``load_model`` reads them back)."""
    arrays: dict[str, Any] = {"mean": model.mean, "scale": model.scale, "class_names": np.array(model.class_names)}
    for i, (w, b) in enumerate(zip(model.weights, model.biases, strict=True)):
        arrays[f"w{i}"], arrays[f"b{i}"] = w, b
    np.savez(path, **arrays)


def load_model(path: Path) -> DefectMlp:
    """The model ``save_model`` wrote."""
    with np.load(path, allow_pickle=False) as npz:
        layers = sum(1 for k in npz.files if k.startswith("w"))
        return DefectMlp(
            mean=npz["mean"],
            scale=npz["scale"],
            weights=tuple(npz[f"w{i}"] for i in range(layers)),
            biases=tuple(npz[f"b{i}"] for i in range(layers)),
            class_names=tuple(str(c) for c in npz["class_names"]),
        )


# The apps a run can be (``fleet serve --model``): ServerApp and ClientApp, and the run settings it adds.
APPS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "classifier": ("pdm_tools.fleet_learning.deploy:SERVER_APP", "pdm_tools.fleet_learning.client_app:app", {}),
    "process": (
        "pdm_tools.fleet_learning.process_app:SERVER_APP",
        "pdm_tools.fleet_learning.process_app:app",
        {"channels": 0, "quantize": False, "fields": "", "hop": 5, "signal": "process"},
    ),
    "vibration": (  # the same apps on the agents' stored vibration features (``process_app``)
        "pdm_tools.fleet_learning.process_app:SERVER_APP",
        "pdm_tools.fleet_learning.process_app:app",
        {"channels": 0, "quantize": False, "fields": "", "hop": 5, "signal": "vibration"},
    ),
    "adapters": (
        "pdm_tools.fleet_learning.adapter_ship:SERVER_APP",
        "pdm_tools.fleet_learning.adapters:app",
        {"base-model": "", "machine-type": "", "adapter-layers": "", "rank": 2, "alpha": 4.0},
    ),
}


def write_app(folder: Path, model: str = "classifier") -> Path:
    """The Flower App folder ``flwr run`` submits: a ``pyproject.toml`` naming this package's apps for
    ``model`` (``APPS``)."""
    server, client, extra = APPS[model]
    folder.mkdir(parents=True, exist_ok=True)
    config_lines = "\n".join(f"{key} = {json.dumps(value)}" for key, value in {**RUN_CONFIG, **extra}.items())
    (folder / "pyproject.toml").write_text(
        f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{APP_NAME}"
version = "1.0.0"
description = "pdm-agent fleet learning (the code is the installed pdm-agent[fleet])"
dependencies = []

[tool.flwr.app]
publisher = "pdm-agent"

[tool.flwr.app.components]
serverapp = "{server}"
clientapp = "{client}"

[tool.flwr.app.config]
{config_lines}
""",
        encoding="utf-8",
    )
    return folder


def write_connection(flwr_home: Path, address: str) -> Path:
    """``FLWR_HOME/config.toml`` with the SuperLink connection ``flwr run`` uses (plain HTTP: a plant's
    network, or TLS in front of it; see docs/fleet.md)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\ninsecure = true\n',
        encoding="utf-8",
    )
    return path


def flower_command(name: str) -> str:
    """Path of one of Flower's commands: beside this Python (the venv's ``bin``), else on ``PATH``."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found: pip install 'pdm-agent[fleet]'")
    return found


def flower_env(**extra: str) -> dict[str, str]:
    """The environment for Flower's processes: they start each other by name (``flower-superexec``,
    ``flwr-clientapp``), so the folder of Flower's commands leads ``PATH``."""
    folder = str(Path(flower_command("flower-superlink")).parent)
    return {**os.environ, "PATH": os.pathsep.join([folder, os.environ.get("PATH", "")]), **extra}


def wait_for_port(host: str, port: int, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Until ``host:port`` accepts a connection; ``TimeoutError`` after ``timeout_s``, ``RuntimeError`` when
    ``process`` (the one that should listen) exits first."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the process for {host}:{port} exited with {process.returncode}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s} s") from None
            time.sleep(0.5)


def start_superlink(state: Path, host: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    """``flower-superlink`` (plain HTTP) with its database under ``state``, output to ``log``; its own
    process group, so that stopping it stops the ServerApp it started too."""
    state.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            [flower_command("flower-superlink"), "--insecure", "--host", host, "--port", str(port),
             "--database", str(state / "superlink.db")],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=flower_env(),
        )  # fmt: skip


def submit_run(state: Path, address: str, run_config: dict[str, Any], log: Path, model: str = "classifier") -> None:
    """Write the app (of ``model``) and the connection under ``state`` and submit the run (``flwr run``);
    raises ``RuntimeError`` with Flower's output when the SuperLink refuses it."""
    app = write_app(state / "app", model)
    home = state / "flwr-home"
    write_connection(home, address)
    overrides = " ".join(f"{key}={json.dumps(value)}" for key, value in run_config.items())
    done = subprocess.run(
        [flower_command("flwr"), "run", str(app), CONNECTION, "--run-config", overrides],
        env=flower_env(FLWR_HOME=str(home)),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    with log.open("a", encoding="utf-8") as out:
        out.write(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"flwr run failed ({done.returncode}): {(done.stdout + done.stderr).strip()[-2000:]}")


def supernode_command(
    superlink: str, data_dir: Path | None, runtime_port: int, node_config: dict[str, str] | None = None
) -> list[str]:
    """``flower-supernode`` for one agent: its ClientApp reads only ``data_dir`` and what ``node_config``
    names (the process model's local store: ``agent-config``, ``machine``, ``since``, ``fields``; the
    adapters' base: ``base-model``)."""
    node = {**({"data-dir": str(data_dir.resolve())} if data_dir is not None else {}), **(node_config or {})}
    settings = " ".join(f"{key}='{value}'" for key, value in node.items())
    return [
        flower_command("flower-supernode"), "--insecure", "--superlink", superlink,
        "--port", str(runtime_port), "--node-config", settings,
    ]  # fmt: skip


SERVER_APP = ServerApp()
SERVER_APP.main()(_deployed_main)
