"""``pdm-agent fleet …``: federated learning across agents with Flower.

``fleet evaluate`` runs a federation in Flower's simulation runtime over a dataset split like a fleet and
compares it with central and local-only training (``pdm_tools.fleet_learning.evaluate``). ``fleet serve``
runs the coordinator (Flower's SuperLink) and one federation on it; ``fleet client`` runs an agent's
SuperNode, whose ClientApp trains on the agent's data folder (``pdm_tools.fleet_learning.deploy``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from threadpoolctl import threadpool_limits

from pdm_tools.datasets.cwru import CLASS_NAMES, DatasetError, default_data_dir, load_cwru
from pdm_tools.fleet_learning.ae_kinds import AE_KINDS
from pdm_tools.fleet_learning.ae_kinds import DEFAULT_STRATEGY as AE_DEFAULT_STRATEGY
from pdm_tools.fleet_learning.data import ClientDataError
from pdm_tools.fleet_learning.fleets import Fleet, cwru_fleet, simulator_fleet, synthetic_fleet
from pdm_tools.fleet_learning.params import LocalTraining
from pdm_tools.fleet_learning.process import AeTraining
from pdm_tools.fleet_learning.server_app import STRATEGIES, FederationConfig, FederationError, make_strategy

DATASETS = ("cwru", "skab", "simulator", "simulator-vibration", "synthetic")
# The datasets whose fleets train an autoencoder (the process one on SKAB, the vibration one on simulated pumps).
AE_DATASETS = ("skab", "simulator-vibration")
MODELS = ("federated", "central", "local")
# Seconds of signal per class a simulated machine records (0.4x to 1.6x of it across the fleet).
SIMULATED_SECONDS = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="fleet_command", required=True, metavar="FLEET_COMMAND")
    evaluate = sub.add_parser(
        "evaluate",
        help="federated vs central vs local-only training on a dataset split like a fleet (simulation)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument(
        "--dataset",
        choices=DATASETS,
        required=True,
        help="cwru: one client per motor load (or several per load); skab: the process autoencoder, one client "
        "per testbed group (or several per group); simulator: simulated pumps of one type at different speeds "
        "(their bearing features); simulator-vibration: the vibration autoencoder on such pumps' vibration "
        "features (one machine per client, a fault late in each run); synthetic: Gaussian classes shifted by speed",
    )
    evaluate.add_argument(
        "--data",
        type=Path,
        default=None,
        help="CWRU or SKAB folder (default $PDM_DATASETS/cwru or skab, or ../shared/datasets/...)",
    )
    evaluate.add_argument(
        "--clients", type=int, default=None, help="clients (default: cwru one per load, synthetic 10)"
    )
    evaluate.add_argument(
        "--leave-out-load", type=int, default=None, metavar="HP", help="cwru: no client trains on this load"
    )
    evaluate.add_argument(
        "--least-data-clients",
        type=int,
        default=0,
        metavar="K",
        help="K clients keep only --least-data-fraction of their training data (cwru: of each recording's "
        "training part, by time; skab: of their machine runs); the JSON compares federated and local-only on them",
    )
    evaluate.add_argument(
        "--least-data-fraction",
        type=float,
        default=0.1,
        metavar="F",
        help="share of its training data a least-data client keeps (default 0.1)",
    )
    evaluate.add_argument(
        "--adapters",
        action="store_true",
        help="cwru: instead, one LoRA adapter trained by the machines that meet a new defect size (on the frozen "
        "classifier) against each machine's own; --clients per training load (default 2 per load)",
    )
    evaluate.add_argument(
        "--adapter-diameter", type=float, default=0.014, help="--adapters: the new defect diameter (inch)"
    )
    evaluate.add_argument(
        "--adapter-windows",
        type=int,
        default=3,
        help="--adapters: labelled windows each client keeps per recording (default 3)",
    )
    evaluate.add_argument(
        "--poisoned",
        type=int,
        nargs="?",
        const=1,
        default=0,
        metavar="N",
        help="instead: the N clients with most rows (default 1) send reversed, scaled updates; how far they move "
        "the fleet model under fedavg, trimmed mean, krum and multi-krum, each sized for N attackers (cwru, "
        "simulator, synthetic; with --adapters, the adapter's products A @ B)",
    )
    evaluate.add_argument(
        "--no-quantize",
        action="store_true",
        help="skip the quantization gate after the last round (INT8 against FP32 on every client's held-out "
        "rows or machines, as federated evaluation; run by default except with --poisoned and --adapters)",
    )
    _federation_arguments(evaluate, rounds=20)
    evaluate.add_argument("--seed", type=int, default=42, help="seed of the initial weights and client batches")
    evaluate.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="run with the N seeds --seed, --seed + 1, ...: the figures' means and spreads, and federated minus "
        "central / local-only paired seed by seed with 95 %% intervals (one seed ranks nothing when training "
        "noise is as large as the differences)",
    )
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(fleet_main=main_evaluate)

    serve = sub.add_parser(
        "serve",
        help="run the coordinator (Flower SuperLink) and one federation on the agents that connect",
        description="Start Flower's SuperLink, submit the fleet app, wait for the federation to finish, write "
        "the fleet model (model.npz) and federation.json to --out, stop.",
    )
    serve.add_argument("--host", default="0.0.0.0", help="address the SuperLink listens on (default 0.0.0.0)")
    serve.add_argument("--port", type=int, default=9093, help="SuperLink HTTP port (default 9093)")
    serve.add_argument("--state", type=Path, required=True, help="folder for the SuperLink's database and logs")
    serve.add_argument("--out", type=Path, required=True, help="folder for model.npz and federation.json")
    _federation_arguments(serve, rounds=10)
    serve.add_argument(
        "--min-clients", type=int, default=2, help="clients a round needs; the rest may be offline (default 2)"
    )
    serve.add_argument(
        "--byzantine",
        type=int,
        default=None,
        metavar="N",
        help="krum, multikrum: the malicious clients to tolerate (default 1); needs --min-clients >= 2N + 3 "
        "(Krum's guarantee); multikrum averages the min-clients - N updates Krum ranks best",
    )
    serve.add_argument(
        "--round-timeout-s",
        type=float,
        default=120.0,
        help="how long a round waits for clients before aggregating what came (default 120)",
    )
    serve.add_argument(
        "--timeout-s", type=float, default=3600.0, help="give up when the federation has not finished by then"
    )
    serve.add_argument(
        "--version",
        default="",
        help="also write the fleet model as version VERSION of the defect classifier (ONNX, manifest with the "
        "federation's provenance, model card) into --out, ready to copy into the agents' models_dir; with --model "
        "process, of process-anomaly (a template fleet install specializes with the agent's machine's baseline; "
        "needs --fields); with --model vibration, of vibration-anomaly (likewise, its threshold factor derived "
        "from the clients' held-out windows)",
    )
    serve.add_argument(
        "--model",
        choices=("classifier", *AE_KINDS, "adapters"),
        default="classifier",
        help="what the fleet trains: the defect classifier (default), the process autoencoder (each agent's "
        "machine standardized by its own commissioning baseline), the vibration autoencoder (the same, on the "
        "agents' stored vibration features) or one LoRA adapter on the frozen classifier --base-model for the "
        "machines of one type (see docs/fleet.md)",
    )
    serve.add_argument(
        "--base-model",
        type=Path,
        default=None,
        help="adapters: the classifier version directory the agents run (the frozen base; sha256 checked)",
    )
    serve.add_argument("--machine-type", default="", help="adapters: the machines' type; names the adapter's folder")
    serve.add_argument(
        "--adapter-layers",
        default="",
        help="adapters: dense layers to adapt, comma-separated (default: the base's first and last)",
    )
    serve.add_argument("--rank", type=int, default=2, help="adapters: LoRA rank (default 2)")
    serve.add_argument("--alpha", type=float, default=4.0, help="adapters: LoRA alpha (default 4)")
    serve.add_argument("--channels", type=int, default=0, help="process: the readings' channel count")
    serve.add_argument(
        "--fields",
        default="",
        help="process: the channels' names, comma-separated, in the fleet's order (the agents' --fields; "
        "the version's feature spec)",
    )
    serve.add_argument(
        "--hop", type=int, default=5, help="process --version: the feature spec's hop, in readings (default 5)"
    )
    serve.add_argument(
        "--quantize",
        action="store_true",
        help="after the last round, the quantization gate (INT8 vs FP32) on every client's held-out data; the "
        "classifier's --version ships INT8 only if every client passes",
    )
    serve.add_argument("--json", action="store_true", help="print federation.json when done")
    serve.set_defaults(fleet_main=main_serve)

    client = sub.add_parser(
        "client",
        help="join the fleet: an agent's Flower SuperNode, training on its own data folder",
        description="Run Flower's SuperNode for this agent. Its ClientApp reads only --data (rows.npz; process.npz "
        "for the process model) or, with --agent-config, the machine's readings in the agent's local store, and "
        "sends model parameters, feature sums and counts; it keeps retrying while the coordinator is unreachable.",
    )
    client.add_argument("--superlink", required=True, help="coordinator address host:port")
    source = client.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="the agent's data folder (rows.npz, or process.npz)")
    source.add_argument(
        "--agent-config",
        type=Path,
        help="process or vibration model: read the machine's readings (vibration: its stored feature vectors) "
        "from this agent's local store (its InfluxDB)",
    )
    client.add_argument(
        "--model",
        choices=tuple(AE_KINDS),
        default="process",
        help="with --agent-config: the process readings (default) or the vibration features the fleet trains on",
    )
    client.add_argument("--machine", default="", help="with --agent-config: the machine whose readings train")
    client.add_argument("--since", default="30d", help="with --agent-config: readings of the last 30d (default)")
    client.add_argument(
        "--fields", default="", help="with --agent-config: the channels, comma-separated, in the fleet's order"
    )
    client.add_argument(
        "--base-model",
        type=Path,
        default=None,
        help="adapter federations: the classifier version directory this agent runs (the frozen base)",
    )
    client.add_argument(
        "--runtime-port", type=int, default=9094, help="local port between the SuperNode and its ClientApp"
    )
    client.set_defaults(fleet_main=main_client)

    install = sub.add_parser(
        "install",
        help="put a fleet model version into an agent's models_dir (verified first; the agent hot-swaps it)",
        description="Verify VERSION_DIR (manifest, sha256, feature spec), stage it in MODELS_DIR/.incoming and "
        "rename it into place; the agent's registry verifies, loads and swaps it in if it is the highest version.",
    )
    install.add_argument("version_dir", type=Path, help="a version directory written by fleet serve --version")
    install.add_argument("--models-dir", type=Path, required=True, help="the agent's inference.models_dir")
    install.add_argument(
        "--agent-config",
        type=Path,
        default=None,
        help="process-anomaly and fleet vibration-anomaly versions: fold in this agent's machine's commissioning "
        "baseline (its first readings or stored vibration features in the local store) and threshold",
    )
    install.add_argument("--machine", default="", help="with --agent-config: the machine the version scores")
    install.add_argument("--since", default="30d", help="with --agent-config: readings of the last 30d (default)")
    install.set_defaults(fleet_main=main_install)

    install_adapter = sub.add_parser(
        "install-adapter",
        help="give machines of one type the fleet adapter (verified against the agent's base first)",
        description="Verify ADAPTER_DIR (written by fleet serve --model adapters) against the base version "
        "BASE_DIR (model id, version, sha256; the adapter file's sha256; layer shapes), then put one copy per "
        "--machines into ADAPTERS_DIR/<model id>/<machine>/, staged and renamed; the agent's adapter store loads it.",
    )
    install_adapter.add_argument("adapter_dir", type=Path, help="the adapter folder fleet serve wrote")
    install_adapter.add_argument("--base-model", type=Path, required=True, help="the base version directory")
    install_adapter.add_argument("--adapters-dir", type=Path, required=True, help="the agent's adaptation.dir")
    install_adapter.add_argument("--machines", required=True, help="the machines of the type, comma-separated")
    install_adapter.set_defaults(fleet_main=main_install_adapter)

    rollback = sub.add_parser(
        "rollback",
        help="move the newest verifying version of a model out of models_dir (the agent falls back)",
        description="Move the highest verifying version of MODEL_ID to MODELS_DIR/.rolled-back; the agent's "
        "registry then runs the highest version that remains.",
    )
    rollback.add_argument("--models-dir", type=Path, required=True, help="the agent's inference.models_dir")
    rollback.add_argument(
        "--model-id", default="bearing-defect-classifier", help="model id (default bearing-defect-classifier)"
    )
    rollback.set_defaults(fleet_main=main_rollback)


def _federation_arguments(parser: argparse.ArgumentParser, rounds: int) -> None:
    """The options ``evaluate`` and ``serve`` share: strategy, rounds, local epochs, differential privacy."""
    parser.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default=None,
        help="aggregation (default: fedprox for the autoencoders, --model process|vibration and --dataset "
        "skab|simulator-vibration; fedavg for the classifier and the adapters)",
    )
    parser.add_argument("--rounds", type=int, default=rounds, help=f"federated rounds (default {rounds})")
    parser.add_argument("--local-epochs", type=int, default=LocalTraining.epochs, help="client epochs per round")
    parser.add_argument(
        "--dp-noise",
        type=float,
        default=0.0,
        help="differential privacy: Gaussian noise multiplier (with --dp-clip; fedavg/fedprox; epsilon reported)",
    )
    parser.add_argument(
        "--dp-clip", type=float, default=0.0, help="differential privacy: clipping norm of each client's update"
    )
    parser.add_argument(
        "--secagg",
        action="store_true",
        help="secure aggregation (Flower's SecAgg+): the coordinator sees only the sum of the clients' updates "
        "(defect classifier; fedavg/fedprox, no DP; agents need nothing else)",
    )


def main(args: argparse.Namespace) -> int:
    return int(args.fleet_main(args))


def with_default_strategy(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` of ``fleet evaluate`` or ``fleet serve`` with ``--strategy`` filled in when not given: the
    autoencoders' ``ae_kinds.DEFAULT_STRATEGY`` (FedProx) for ``--model process|vibration`` and ``--dataset
    skab|simulator-vibration``, else FedAvg (the classifier and the adapters, within 1 point of central)."""
    if args.strategy is not None:
        return args
    autoencoder = getattr(args, "model", None) in AE_KINDS or getattr(args, "dataset", None) in AE_DATASETS
    return argparse.Namespace(**{**vars(args), "strategy": AE_DEFAULT_STRATEGY if autoencoder else "fedavg"})


def main_evaluate(args: argparse.Namespace) -> int:
    args = with_default_strategy(args)
    if args.rounds < 1 or (args.clients is not None and args.clients < 2) or args.local_epochs < 1:
        print("fleet evaluate: --rounds and --local-epochs must be >= 1, --clients >= 2", file=sys.stderr)
        return 2
    if args.least_data_clients and (args.dataset not in ("cwru", "skab") or args.poisoned):
        print(
            "fleet evaluate: --least-data-clients is for cwru and skab (the synthetic and simulator fleets' clients "
            "already hold 0.4x to 1.6x the nominal rows; --poisoned measures something else)",
            file=sys.stderr,
        )
        return 2
    if args.seeds < 1:
        print("fleet evaluate: --seeds must be >= 1", file=sys.stderr)
        return 2
    if args.dataset in AE_DATASETS:
        once = _evaluate_skab
    elif args.adapters:
        once = _evaluate_adapters
    else:
        once = _evaluate_classifier
    seeds = [args.seed + i for i in range(args.seeds)]
    try:
        runs = [once(argparse.Namespace(**{**vars(args), "seed": seed})) for seed in seeds]
    except (_EvaluateError, DatasetError, ClientDataError, FederationError, ValueError) as exc:
        print(f"fleet evaluate: {exc}", file=sys.stderr)
        return 2
    if len(runs) == 1:
        result, text = runs[0]
    else:
        from pdm_tools.fleet_learning.seeds import over_seeds, render_seeds_text

        result = over_seeds([r for r, _ in runs], seeds)
        text = render_seeds_text(result)
    print(json.dumps(result, indent=2, allow_nan=False) if args.json else text)
    return 0


class _EvaluateError(Exception):
    """An evaluation that cannot run: options that do not go together, a dataset that does not load (exit 2)."""


def _evaluate_classifier(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """``fleet evaluate`` of the defect classifier (cwru, simulator, synthetic) for ``args.seed``."""
    fleet = _fleet(args)
    config = FederationConfig(
        class_names=CLASS_NAMES,
        rounds=args.rounds,
        strategy=args.strategy,
        min_clients=len(fleet.clients),
        training=LocalTraining(epochs=args.local_epochs),
        dp_noise=args.dp_noise,
        dp_clip=args.dp_clip,
        secagg=args.secagg,
        seed=args.seed,
        quantize=not (args.no_quantize or args.poisoned),
    )
    make_strategy(config)  # a combination that cannot run fails here (exit 2), not after the simulation
    # One BLAS thread per process: tiny matrices, and the simulation runs one process per CPU.
    with threadpool_limits(limits=1, user_api="blas"):
        if args.poisoned:
            from pdm_tools.fleet_learning.evaluate import robustness

            poisoning = robustness(fleet, config, args.poisoned)
            result: dict[str, Any] = {"dataset": args.dataset, "poisoning": poisoning}
        else:
            from pdm_tools.fleet_learning.evaluate import evaluate_fleet

            result = {"dataset": args.dataset, **evaluate_fleet(fleet, config)}
            if "least_data_clients" in result:
                result["least_data_clients"]["fraction"] = args.least_data_fraction
    return result, render_text(result)


def _evaluate_skab(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """``fleet evaluate --dataset skab`` (the process autoencoder) and ``--dataset simulator-vibration`` (the
    same federation on simulated pumps' vibration features; ``pdm_tools.fleet_learning.process_eval``)."""
    from pdm_tools.evaluation import skab
    from pdm_tools.fleet_learning.process_app import ProcessFederation
    from pdm_tools.fleet_learning.process_eval import (
        evaluate_process_fleet,
        simulator_vibration_fleet,
        uneven_skab_fleet,
    )

    if args.poisoned or args.leave_out_load is not None:
        raise _EvaluateError("--poisoned and --leave-out-load are for cwru/synthetic")
    if args.dataset == "simulator-vibration":
        if args.clients is not None and args.clients > 64:
            raise ValueError("--clients: at most 64 simulated machines")
        clients, least = simulator_vibration_fleet(args.clients or 6, args.seed), list[str]()
    else:
        try:
            files, _ = skab.load_skab(args.data if args.data is not None else skab.default_data_dir())
        except skab.DatasetError as exc:
            raise _EvaluateError(str(exc)) from exc
        clients, least = uneven_skab_fleet(files, args.clients, args.least_data_clients, args.least_data_fraction)
    federation = FederationConfig(
        class_names=(),
        rounds=args.rounds,
        strategy=args.strategy,
        min_clients=len(clients),
        dp_noise=args.dp_noise,
        dp_clip=args.dp_clip,
        secagg=args.secagg,
        seed=args.seed,
    )
    config = ProcessFederation(
        federation,
        clients[0].n_channels,
        training=AeTraining(epochs=args.local_epochs),
        quantize=not args.no_quantize,
        signal="vibration" if args.dataset == "simulator-vibration" else "process",
    )
    make_strategy(federation)
    with threadpool_limits(limits=1, user_api="blas"):
        result = {"dataset": args.dataset, **evaluate_process_fleet(clients, config, least)}
    if "least_data_clients" in result:
        result["least_data_clients"]["fraction"] = args.least_data_fraction
    return result, render_process_text(result)


def _evaluate_adapters(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """``fleet evaluate --dataset cwru --adapters`` (``pdm_tools.fleet_learning.adapter_eval``)."""
    from agent.features.bearing import BearingFeatureSpec
    from pdm_tools.fleet_learning.adapter_eval import (
        adapter_robustness,
        default_federation,
        evaluate_adapter_fleet,
        shift_fleet,
    )

    if args.dataset != "cwru" or args.least_data_clients or args.adapter_windows < 1:
        raise _EvaluateError("--adapters is for cwru, without --least-data-clients, with --adapter-windows >= 1")
    # A combination that cannot run fails here, before the data is read.
    switches = {"dp_noise": args.dp_noise, "dp_clip": args.dp_clip, "secagg": args.secagg}
    make_strategy(FederationConfig(class_names=(), strategy=args.strategy, **switches))
    recordings = load_cwru(_cwru_dir(args))
    train_loads = len({r.load_hp for r in recordings if r.kind != "normal"}) - 1
    per_load = max(1, -(-(args.clients or 2 * train_loads) // train_loads))
    base, clients, test, reference = shift_fleet(
        recordings, BearingFeatureSpec(), args.adapter_diameter, per_load, args.adapter_windows
    )
    config = dataclasses.replace(
        default_federation(args.rounds, args.local_epochs, len(clients), args.seed),
        strategy=args.strategy,
        **switches,
    )
    with threadpool_limits(limits=1, user_api="blas"):
        if args.poisoned:
            adapters = adapter_robustness(base, clients, test, reference, config, args.poisoned)
        else:
            adapters = evaluate_adapter_fleet(base, clients, test, reference, config)
    adapters |= {"diameter_in": args.adapter_diameter, "windows_per_recording": args.adapter_windows}
    text = render_adapter_poisoning_text(adapters) if args.poisoned else render_adapter_text(adapters)
    return {"dataset": "cwru", "adapters": adapters}, text


def render_adapter_text(result: dict[str, Any]) -> str:
    """The figures of ``fleet evaluate --adapters`` as a few plain lines."""
    lines = [
        f"cwru adapters: {result['clients']} clients, {result['rounds']} rounds, macro-F1 on the new size at an "
        "unseen load (reference: the other sizes there)"
    ]
    for name in ("base", "federated", "central", "local"):
        v = result[name]
        lines.append(f"  {name:9} {v['macro_f1']:.3f}  reference {v['reference_macro_f1']:.3f}")
    lines.append(
        f"  bytes per round {result['bytes_per_round']:,} ({result['adapter_parameters']} adapter parameters; "
        f"the whole classifier has {result['base_parameters']:,})"
    )
    return "\n".join(lines + _switch_lines(result))


def render_adapter_poisoning_text(result: dict[str, Any]) -> str:
    """The figures of ``fleet evaluate --adapters --poisoned`` as a few plain lines."""
    lines = [
        f"cwru adapters, {result['clients']} clients, {result['poisoned_clients']} poisoned, {result['rounds']} "
        "rounds: shift of the adapter's products vs training, macro-F1 on the new size clean/poisoned"
    ]
    lines += [
        f"  {name:8} {v['shift_vs_training']:7.3f}  {v['macro_f1_clean']:.3f} / {v['macro_f1_poisoned']:.3f}"
        for name, v in result["poisoning"].items()
    ]
    return "\n".join(lines)


def _switch_lines(result: dict[str, Any]) -> list[str]:
    """What secure aggregation and differential privacy did, for the text of any ``fleet evaluate``."""
    lines = []
    if result.get("secagg") or "secagg" in result.get("federation", {}):
        lines.append("  secure aggregation (SecAgg+): the coordinator saw only the sum of the updates")
    if "privacy" in result:
        lines.append(f"  privacy: epsilon {result['privacy']['epsilon']} at delta {result['privacy']['delta']}")
    return lines


def render_process_text(result: dict[str, Any]) -> str:
    """The figures of ``fleet evaluate --dataset skab`` as a few plain lines."""
    dataset, runs = result.get("dataset", "skab"), f"{result['clients']} clients, {result['rounds']} rounds"
    lines = [f"{dataset}: {runs}, pooled over machine runs: F1, FAR %, MAR %"]
    for name in MODELS:
        v = result[name]
        lines.append(f"  {name:9} {v['f1']:.3f} {v['far']:7.2f} {v['mar']:7.2f}")
    few = result["client_with_fewest_rows"]
    lines.append(
        f"  fewest rows: {few['client']} ({few['rows']}): federated F1 {few['federated_f1']:.3f}, "
        f"local {few['local_f1']:.3f}"
    )
    gate = result.get("quantization_gate")
    if gate:
        d = gate["int8_vs_fp32"]
        verdict = "passes" if d["accuracy_rules_passed"] else "fails: " + "; ".join(d["reasons"])
        lines.append(
            f"  INT8 vs FP32 on {gate['clients']} clients' machines: AUC {d['auc_delta']:+.4f}, detection "
            f"{d['detection_delta_points']:+.2f} points, decisions equal on {100 * d['decision_agreement']:.2f} %; "
            f"gate {verdict}"
        )
    least = result.get("least_data_clients")
    if least:
        for name, v in least["clients"].items():
            figures = ", ".join(f"{m} {v[m]['f1']:.3f} / {v[m]['far']:.2f} / {v[m]['mar']:.2f}" for m in MODELS)
            lines.append(f"  least data: {name} ({v['files']} files, {v['rows']} windows): {figures}")
    lines.append(f"  bytes per round {result['bytes_per_round']:,}")
    return "\n".join(lines + _switch_lines(result))


def render_text(result: dict[str, Any]) -> str:
    """The figures of ``fleet evaluate`` as a few plain lines (``--json`` gives all of them)."""
    if "poisoning" in result:
        p = result["poisoning"]
        lines = [
            f"{p['clients']} clients, {p['poisoned_clients']} poisoned, {p['rounds']} rounds: shift vs training, "
            "macro-F1 clean/poisoned"
        ]
        lines += [
            f"  {name:8} {v['shift_vs_training']:7.3f}  {v['macro_f1_clean']:.3f} / {v['macro_f1_poisoned']:.3f}"
            for name, v in p.items()
            if isinstance(v, dict)
        ]
        return "\n".join(lines)
    lines = [f"{result['dataset']}: {result['clients']} clients, {result['rounds']} rounds, macro-F1 on held-out rows"]
    for name in ("federated", "central", "local"):
        unseen = result[name].get("unseen_macro_f1")
        extra = f"  on {result['unseen']}: {unseen:.3f}" if unseen is not None else ""
        lines.append(f"  {name:9} {result[name]['macro_f1']:.3f}{extra}")
    least = result.get("least_data_clients")
    if least:
        for name, v in least["clients"].items():
            lines.append(
                f"  least data: {name} ({v['rows']} rows): federated {v['federated_macro_f1']:.3f}, "
                f"local-only {v['local_macro_f1']:.3f}, central {v['central_macro_f1']:.3f}"
            )
    gate = result.get("quantization_gate")
    if gate:
        fleet = gate["fleet"]
        d = fleet.get("int8_vs_fp32", {})
        lines.append(
            f"  INT8 vs FP32 on {len(gate['clients'])} clients' held-out rows: macro-F1 "
            f"{d.get('macro_f1_delta_points', 0.0):+.2f} points, agreement {100 * d.get('agreement', 0.0):.2f} %; "
            f"ships {gate['ship']}"
        )
    lines.append(f"  bytes per round {result['bytes_per_round']:,}")
    return "\n".join(lines + _switch_lines(result))


def main_serve(args: argparse.Namespace) -> int:
    from pdm_tools.fleet_learning import deploy

    args = with_default_strategy(args)

    if args.rounds < 1 or args.min_clients < 1 or args.local_epochs < 1:
        print("fleet serve: --rounds, --min-clients and --local-epochs must be >= 1", file=sys.stderr)
        return 2
    try:
        if args.byzantine is not None and args.strategy not in ("krum", "multikrum"):
            raise ValueError(
                f"--byzantine sizes krum and multikrum, not --strategy {args.strategy} (the trimmed mean cuts its "
                "fixed share of updates at each end)"
            )
        # What no strategy runs (a robust rule with SecAgg+ or DP), then what Krum cannot tolerate, is refused here.
        switches = {"strategy": args.strategy, "dp-noise": args.dp_noise, "dp-clip": args.dp_clip}
        deploy.config_from_run(
            {**switches, "secagg": args.secagg, "min-clients": args.min_clients, "byzantine": _byzantine(args)}
        )
        if args.quantize and args.model == "adapters":
            raise ValueError("--quantize: the adapters run on the base as shipped (no gate for the factors)")
        kind = AE_KINDS.get(args.model)
        if kind is not None and kind.feature_spec is None and args.channels < 1:
            raise ValueError(f"--model {args.model} needs --channels (the readings' channel count)")
        fields = [f for f in args.fields.split(",") if f]
        if kind is not None and kind.feature_spec is None and args.version and len(fields) != args.channels:
            raise ValueError(f"--model {args.model} --version needs --fields naming the {args.channels} channels")
        adapter_run = _adapter_run_config(args) if args.model == "adapters" else {}
    except ValueError as exc:
        print(f"fleet serve: {exc}", file=sys.stderr)
        return 2
    state, out = args.state.resolve(), args.out.resolve()
    result = out / deploy.RESULT_FILE
    result.unlink(missing_ok=True)
    log = state / "superlink.log"
    try:
        link = deploy.start_superlink(state, args.host, args.port, log)
    except (OSError, FileNotFoundError) as exc:
        print(f"fleet serve: {exc}", file=sys.stderr)
        return 2
    local = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    try:
        deploy.wait_for_port(local, args.port, 60.0, link)
        run_config = serve_run_config(args, out, adapter_run)
        deploy.submit_run(state, f"{local}:{args.port}", run_config, log, args.model)
        print(f"fleet serve: federation submitted; SuperLink log {log}", file=sys.stderr)
        deadline = time.monotonic() + args.timeout_s
        while not result.is_file():
            if link.poll() is not None:
                raise RuntimeError(f"the SuperLink exited with {link.returncode} (see {log})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no result after {args.timeout_s} s (see {log})")
            time.sleep(1.0)
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"fleet serve: {exc}", file=sys.stderr)
        return 1
    finally:
        _stop(link)
    summary = json.loads(result.read_text(encoding="utf-8"))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        last = summary["evaluation"].get(str(args.rounds), {})
        print(f"fleet model in {out}: {args.rounds} rounds, federated evaluation {last}")
    return 0 if summary["complete"] else 1


def _byzantine(args: argparse.Namespace) -> int:
    return 1 if args.byzantine is None else int(args.byzantine)


def serve_run_config(args: argparse.Namespace, out: Path, adapter_run: dict[str, Any]) -> dict[str, Any]:
    """The run config ``fleet serve`` submits (``flwr run --run-config``), which the ServerApp of ``--model``
    reads back (``deploy.config_from_run``, ``process_app.config_from_run``, ``adapter_ship.config_from_run``);
    ``adapter_run``: the adapters' settings (``_adapter_run_config``)."""
    return {
        "strategy": args.strategy,
        "byzantine": _byzantine(args),
        "rounds": args.rounds,
        "min-clients": args.min_clients,
        "local-epochs": args.local_epochs,
        "round-timeout-s": args.round_timeout_s,
        "out-dir": str(out),
        "version": args.version,
        "dp-noise": args.dp_noise,
        "dp-clip": args.dp_clip,
        **({"secagg": True} if args.secagg else {}),
        **(_ae_run_config(args) if args.model in AE_KINDS else {}),
        **({"quantize": True} if args.quantize else {}),
        **adapter_run,
    }


def _ae_run_config(args: argparse.Namespace) -> dict[str, Any]:
    """``fleet serve --model process|vibration``: the autoencoder's run settings (``signal`` names the kind;
    a kind without a fixed feature spec takes the fleet's channels)."""
    if AE_KINDS[args.model].feature_spec is not None:
        return {"signal": args.model}
    return {"signal": args.model, "channels": args.channels, "fields": args.fields, "hop": args.hop}


def main_client(args: argparse.Namespace) -> int:
    from pdm_tools.fleet_learning import deploy
    from pdm_tools.fleet_learning.data import load_client_data
    from pdm_tools.fleet_learning.process_app import PROCESS_FILE, load_process_client, store_client

    node_config: dict[str, str] = {}
    try:  # refuse bad data before joining, not in round 1
        if args.agent_config is not None:
            if not args.machine:
                raise ClientDataError("--agent-config needs --machine (whose readings train)")
            fields = [f for f in args.fields.split(",") if f] or None
            process = store_client(args.agent_config, args.machine, args.since, fields, signal=args.model)
            node_config = {"agent-config": str(args.agent_config.resolve()), "machine": args.machine}
            node_config |= {"since": args.since, "signal": args.model, **({"fields": args.fields} if fields else {})}
            rows = AE_KINDS[args.model].rows
            what = f"machine {args.machine}, {len(process.values[0])} {rows} of the last {args.since} (local store)"
        elif args.base_model is not None:
            from agent.adaptation.adapter import AdapterError
            from pdm_tools.fleet_learning.adapter_ship import read_base

            data = load_client_data(args.data)
            try:
                identity, _ = read_base(args.base_model)
            except AdapterError as exc:
                raise ClientDataError(f"--base-model: {exc}") from exc
            node_config = {"base-model": str(args.base_model.resolve())}
            what = f"{data.name}, {len(data.y)} training rows, {len(data.y_held)} held out; base {identity.describe()}"
        elif (args.data / PROCESS_FILE).is_file():
            process = load_process_client(args.data)
            what = f"{process.name}, {len(process.values)} machine runs (process model)"
        else:
            data = load_client_data(args.data)
            what = f"{data.name}, {len(data.y)} training rows, {len(data.y_held)} held out"
    except (ClientDataError, ValueError, OSError) as exc:  # ValueError: also a bad agent config
        print(f"fleet client: {exc}", file=sys.stderr)
        return 2
    print(f"fleet client: {what}; joining {args.superlink}", file=sys.stderr)
    command = deploy.supernode_command(args.superlink, args.data, args.runtime_port, node_config)
    node = subprocess.Popen(command, env=deploy.flower_env())
    try:
        return node.wait()
    except KeyboardInterrupt:
        _stop(node)
        return 0


def main_install(args: argparse.Namespace) -> int:
    from agent.inference.errors import ModelError
    from pdm_tools.fleet_learning.distribute import install, install_process, is_process_template

    try:
        if is_process_template(args.version_dir):
            if args.agent_config is None or not args.machine:
                print(
                    "fleet install: a fleet process or vibration version needs --agent-config and --machine "
                    "(the machine whose commissioning baseline it is folded with)",
                    file=sys.stderr,
                )
                return 2
            target = install_process(args.version_dir, args.models_dir, args.agent_config, args.machine, args.since)
        else:
            target = install(args.version_dir, args.models_dir)
    except (ModelError, OSError, ClientDataError, ValueError, RuntimeError) as exc:
        print(f"fleet install: refused: {exc}", file=sys.stderr)
        return 1
    print(f"installed {target}")
    return 0


def main_install_adapter(args: argparse.Namespace) -> int:
    from agent.adaptation.adapter import AdapterError
    from agent.inference.errors import ModelError
    from pdm_tools.fleet_learning.distribute import install_adapter

    machines = [m for m in args.machines.split(",") if m]
    try:
        targets = install_adapter(args.adapter_dir, args.base_model, args.adapters_dir, machines)
    except (AdapterError, ModelError, ValueError, OSError) as exc:
        print(f"fleet install-adapter: refused: {exc}", file=sys.stderr)
        return 1
    for target in targets:
        print(f"installed {target}")
    return 0


def _adapter_run_config(args: argparse.Namespace) -> dict[str, Any]:
    """``fleet serve --model adapters``: the run settings, after checking the base and the options
    (``ValueError`` names what is wrong)."""
    from agent.adaptation.adapter import AdapterError
    from pdm_tools.fleet_learning.adapter_ship import config_from_run, read_base

    if args.version:
        raise ValueError("--model adapters writes the agents' adapter folder, not a model --version")
    if args.base_model is None or not args.machine_type or "/" in args.machine_type:
        raise ValueError("--model adapters needs --base-model (the classifier version) and --machine-type NAME")
    if args.rank < 1:
        raise ValueError("--rank must be >= 1")
    try:
        _, base = read_base(args.base_model)
        run = {"adapter-layers": args.adapter_layers, "rank": args.rank, "alpha": args.alpha}
        config_from_run(run, base)
    except (AdapterError, KeyError, OSError) as exc:
        raise ValueError(f"--base-model {args.base_model}: {exc}") from exc
    return {**run, "base-model": str(args.base_model.resolve()), "machine-type": args.machine_type}


def main_rollback(args: argparse.Namespace) -> int:
    from pdm_tools.fleet_learning.distribute import rollback

    try:
        version, moved = rollback(args.models_dir, args.model_id)
    except (LookupError, OSError) as exc:
        print(f"fleet rollback: {exc}", file=sys.stderr)
        return 1
    print(f"rolled back {args.model_id} {version} (moved to {moved})")
    return 0


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate ``process`` (its whole process group when it leads one: the SuperLink and the ServerApp it
    started) and wait; kill it when it does not stop within 10 s."""
    if process.poll() is not None:
        return
    group = os.getpgid(process.pid) == process.pid
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, None)):
        if group:
            os.killpg(process.pid, sig)
        else:
            process.send_signal(sig)
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _cwru_dir(args: argparse.Namespace) -> Path:
    """``--data`` or the default datasets folder, or its ``cwru`` subfolder."""
    data_dir = Path(args.data if args.data is not None else default_data_dir())
    if not (data_dir / "index.json").is_file() and (data_dir / "cwru" / "index.json").is_file():
        data_dir = data_dir / "cwru"
    return data_dir


def _fleet(args: argparse.Namespace) -> Fleet:
    if args.dataset == "synthetic":
        return synthetic_fleet(args.clients or 10, 300, args.seed)
    if args.dataset == "simulator":
        return simulator_fleet(args.clients or 10, SIMULATED_SECONDS, args.seed)
    from agent.features.bearing import BearingFeatureSpec

    recordings = load_cwru(_cwru_dir(args))
    loads = len({r.load_hp for r in recordings if r.kind != "normal"})
    return cwru_fleet(
        recordings,
        BearingFeatureSpec(),
        args.clients or loads,
        args.leave_out_load,
        args.least_data_clients,
        args.least_data_fraction,
    )
