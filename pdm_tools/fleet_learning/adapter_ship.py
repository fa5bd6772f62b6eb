"""Federated LoRA adapters in deployment: ``fleet serve --model adapters`` and the adapter the agents load.

The coordinator reads the base (a classifier version directory, the same one the agents run) and federates
an adapter on it with the agents' SuperNodes (``adapters.federate_adapters``): each ``fleet client --data DIR
--base-model MODEL_DIR`` trains the factors on its labelled windows, and a client whose base has another
sha256 refuses the round. The result is one adapter for the machines of one type (``--machine-type``), in
the agents' adapter format (``agent.adaptation.adapter``: ``adapter.onnx_adapter`` and ``adapter.json``),
whose manifest carries the federation's provenance (strategy, rounds, clients with their row counts and
data hashes, bytes per round; never the data). It is written under ``out/adapters/<model id>/<type>/`` and
loaded back against the base before the run ends, so an adapter an agent would refuse fails here.

An agent serves adapters per machine (``AdapterStore``: ``{adaptation.dir}/{model id}/{machine}/``), so
``distribute.install_adapter`` puts one verified copy per machine of the type (``fleet install-adapter``).
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from agent.adaptation.adapter import (
    KIND,
    SCHEMA_VERSION,
    AdapterManifest,
    BaseIdentity,
    load_adapter,
    read_manifest,
    write_adapter,
)
from agent.adaptation.lora import BaseMlp
from pdm_tools.fleet_learning.adapters import AdapterFederation, AdapterOutcome, federate_adapters
from pdm_tools.fleet_learning.server_app import check_byzantine, make_strategy
from pdm_tools.fleet_learning.ship import client_entries

ADAPTERS_DIR = "adapters"


def read_base(model_dir: Path) -> tuple[BaseIdentity, BaseMlp]:
    """The base of a model version directory: its identity (sha256 verified) and its graph as numpy."""
    identity = BaseIdentity.from_model_dir(model_dir)
    file = json.loads((Path(model_dir) / "manifest.json").read_text(encoding="utf-8"))["file"]
    return identity, BaseMlp.from_onnx(Path(model_dir) / file)


def config_from_run(run_config: dict[str, Any], base: BaseMlp) -> AdapterFederation:
    """The adapter federation from a submitted run's settings; layers default to the first and last of the
    base (the adaptation measurement's choice, ``CWRU_LORA``). ``ValueError`` for a ``byzantine`` count the
    strategy cannot tolerate with ``min-clients`` (``server_app.check_byzantine``) and for what no strategy
    runs (``server_app.make_strategy``)."""
    layers = tuple(n for n in str(run_config.get("adapter-layers", "")).split(",") if n)
    layers = layers or (base.layer_names[0], base.layer_names[-1])
    for name in layers:
        base.layer(name)  # KeyError names the layers the base has
    config = AdapterFederation(
        layers=layers,
        rank=int(run_config.get("rank", 2)),
        alpha=float(run_config.get("alpha", 4.0)),
        rounds=int(run_config.get("rounds", 10)),
        local_epochs=int(run_config.get("local-epochs", 5)),
        min_clients=int(run_config.get("min-clients", 2)),
        seed=int(run_config.get("seed", 42)),
        round_timeout_s=float(run_config.get("round-timeout-s", 120.0)),
        strategy=str(run_config.get("strategy", "fedavg")),
        krum_malicious=int(run_config.get("byzantine", 1)),
        dp_noise=float(run_config.get("dp-noise", 0.0)),
        dp_clip=float(run_config.get("dp-clip", 0.0)),
        secagg=bool(run_config.get("secagg", False)),
    )
    make_strategy(config.aggregation())  # ValueError: a combination no strategy runs
    check_byzantine(config.strategy, config.krum_malicious, config.min_clients)  # or Krum cannot tolerate that many
    return config


def provenance(config: AdapterFederation, outcome: AdapterOutcome) -> dict[str, Any]:
    """What produced the adapter: the settings, the rounds and who took part with how much data (by hash)."""
    counters = outcome.counters
    return {
        **config.to_dict(),
        "min_clients": config.min_clients,
        "rounds_completed": len(counters.evaluation),
        "clients": client_entries(counters),
        "bytes_per_round": {str(k): v for k, v in sorted(counters.bytes_per_round.items())},
        **({"privacy": counters.privacy} if counters.privacy else {}),
        **({"secagg_settings": counters.secagg} if counters.secagg else {}),
    }


def write_fleet_adapter(
    out_dir: Path, model_dir: Path, machine_type: str, config: AdapterFederation, outcome: AdapterOutcome
) -> Path:
    """The fleet adapter as ``out_dir/adapters/<model id>/<machine_type>/``; returns the folder after loading
    it against the base the way an agent will."""
    if outcome.adapter is None:
        raise ValueError("the federation has no adapter to ship")
    identity, base = read_base(model_dir)
    weights = outcome.adapter
    federation = provenance(config, outcome)
    clients = federation["clients"]
    last = max(outcome.counters.evaluation, default=0)
    manifest = AdapterManifest(
        schema_version=SCHEMA_VERSION,
        kind=KIND,
        base=identity.to_dict(),
        machine=machine_type,
        rank=weights.rank,
        alpha=weights.alpha,
        layers={name: [int(a.shape[0]), int(b.shape[1])] for name, (a, b) in weights.factors.items()},
        standardization=False,
        file="",
        sha256="0" * 64,
        threshold=None,
        data={
            "count": sum(int(c.get("rows", 0)) for c in clients),
            # Of the clients' rows-file hashes, sorted: which data, together, made this adapter.
            "sha256": hashlib.sha256(
                "".join(sorted(str(c.get("data-sha256", "")) for c in clients)).encode()
            ).hexdigest(),
            "labelled": True,
            "per_class": None,
            "description": f"federated: {len(clients)} agents' labelled windows, each by its rows file's sha256 "
            "in training.federation.clients (no data left an agent)",
        },
        metrics={
            "rule": "federated evaluation: base plus the fleet adapter on every client's held-out rows, "
            "confusion counts summed over clients",
            "rounds": {str(k): v for k, v in sorted(outcome.counters.evaluation.items())},
            **({"after": outcome.counters.evaluation[last]} if last else {}),
        },
        training={"federation": federation},
        created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    folder = Path(out_dir) / ADAPTERS_DIR / identity.model_id / machine_type
    write_adapter(folder, weights, manifest)
    load_adapter(folder, identity, base)  # refused here rather than on the agents
    return folder


def _deployed_main(grid: Grid, context: Context) -> None:
    """The ServerApp of a submitted adapter run: the federation on the base ``base-model``, then the adapter
    (``write_fleet_adapter``) and ``federation.json`` in ``out-dir``."""
    from pdm_tools.fleet_learning import deploy

    run_config = dict(context.run_config)
    out_dir = Path(str(run_config.get("out-dir") or "."))
    model_dir = Path(str(run_config["base-model"]))
    identity, base = read_base(model_dir)
    config = config_from_run(run_config, base)
    outcome = AdapterOutcome()
    federate_adapters(grid, config, base, outcome, identity.sha256, context)
    head: dict[str, Any] = {"federation": provenance(config, outcome), "complete": outcome.adapter is not None}
    if outcome.adapter is not None:
        folder = write_fleet_adapter(out_dir, model_dir, str(run_config["machine-type"]), config, outcome)
        head["adapter"] = {"path": str(folder), "sha256": read_manifest(folder).sha256, "base": identity.to_dict()}
        head["adapter_parameters"] = outcome.adapter.n_parameters
    deploy.write_summary(out_dir, head, outcome.counters)


SERVER_APP = ServerApp()
SERVER_APP.main()(_deployed_main)
