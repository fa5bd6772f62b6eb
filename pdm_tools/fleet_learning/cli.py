"""``pdm-agent fleet …``: federated learning across agents with Flower.

``fleet evaluate`` runs a federation in Flower's simulation runtime over a dataset split like a fleet and
compares it with central and local-only training (``pdm_tools.fleet_learning.evaluate``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from threadpoolctl import threadpool_limits

from pdm_tools.datasets.cwru import CLASS_NAMES, DatasetError, default_data_dir, load_cwru
from pdm_tools.fleet_learning.data import ClientDataError, Fleet, cwru_fleet, synthetic_fleet
from pdm_tools.fleet_learning.params import LocalTraining
from pdm_tools.fleet_learning.server_app import STRATEGIES, FederationConfig, FederationError

DATASETS = ("cwru", "synthetic")


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
        help="cwru: one client per motor load (or several per load); synthetic: machines at different speeds",
    )
    evaluate.add_argument(
        "--data", type=Path, default=None, help="CWRU folder (default $PDM_DATASETS/cwru or ../shared/datasets/cwru)"
    )
    evaluate.add_argument(
        "--clients", type=int, default=None, help="clients (default: cwru one per load, synthetic 10)"
    )
    evaluate.add_argument("--rounds", type=int, default=20, help="federated rounds (default 20)")
    evaluate.add_argument("--strategy", choices=STRATEGIES, default="fedavg", help="aggregation (default fedavg)")
    evaluate.add_argument("--local-epochs", type=int, default=LocalTraining.epochs, help="client epochs per round")
    evaluate.add_argument(
        "--leave-out-load", type=int, default=None, metavar="HP", help="cwru: no client trains on this load"
    )
    evaluate.add_argument(
        "--poisoned",
        action="store_true",
        help="instead: one client sends a reversed, scaled update; how far it moves the fleet model under "
        "fedavg, trimmed mean and krum",
    )
    evaluate.add_argument("--seed", type=int, default=42, help="seed of the initial weights and client batches")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(fleet_main=main_evaluate)


def main(args: argparse.Namespace) -> int:
    return int(args.fleet_main(args))


def main_evaluate(args: argparse.Namespace) -> int:
    if args.rounds < 1 or (args.clients is not None and args.clients < 2) or args.local_epochs < 1:
        print("fleet evaluate: --rounds and --local-epochs must be >= 1, --clients >= 2", file=sys.stderr)
        return 2
    try:
        fleet = _fleet(args)
        config = FederationConfig(
            class_names=CLASS_NAMES,
            rounds=args.rounds,
            strategy=args.strategy,
            min_clients=len(fleet.clients),
            training=LocalTraining(epochs=args.local_epochs),
            seed=args.seed,
        )
        # One BLAS thread per process: tiny matrices, and the simulation runs one process per CPU.
        with threadpool_limits(limits=1, user_api="blas"):
            if args.poisoned:
                from pdm_tools.fleet_learning.evaluate import robustness

                result: dict[str, Any] = {"dataset": args.dataset, "poisoning": robustness(fleet, config)}
            else:
                from pdm_tools.fleet_learning.evaluate import evaluate_fleet

                result = {"dataset": args.dataset, **evaluate_fleet(fleet, config)}
    except (DatasetError, ClientDataError, FederationError) as exc:
        print(f"fleet evaluate: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2 if args.json else None, allow_nan=False))
    return 0


def _fleet(args: argparse.Namespace) -> Fleet:
    if args.dataset == "synthetic":
        return synthetic_fleet(args.clients or 10, 300, args.seed)
    data_dir = args.data if args.data is not None else default_data_dir()
    if not (Path(data_dir) / "index.json").is_file() and (Path(data_dir) / "cwru" / "index.json").is_file():
        data_dir = Path(data_dir) / "cwru"
    from agent.features.bearing import BearingFeatureSpec

    recordings = load_cwru(Path(data_dir))
    loads = len({r.load_hp for r in recordings if r.kind != "normal"})
    return cwru_fleet(recordings, BearingFeatureSpec(), args.clients or loads, args.leave_out_load)
