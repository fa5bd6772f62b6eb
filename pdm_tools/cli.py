"""The tools' subcommands of ``pdm-agent``: ``simulate``, ``train``, ``evaluate``, ``model quantize`` and ``fleet``.

The runtime CLI finds :func:`register` through the entry point group ``pdm_agent.commands`` (see
``pyproject.toml``); it never imports this package by name. When the tools' dependencies are not installed
(``pip install pdm-agent`` without ``[tools]``), the commands are still listed and say what to install.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from collections.abc import Callable
from importlib import metadata
from types import ModuleType

SetupLogging = Callable[[str, str], None]
"""The runtime's log set-up: (level, format), from ``--log-level`` and ``--log-format`` or the command's default."""

_SIMULATE = (
    "run the factory gateway simulator",
    "Publish simulated machines (vibration blocks, temperature, current, pressure) over MQTT, with faults "
    "scheduled by config or --fault, and write the ground truth of the faults.",
)
_CAMERA = (
    "publish camera images (generated, or a NEU-style folder) with their ground truth",
    "Publish inspection images on factory/{site}/{line}/{machine}/camera (raw bytes, or the JSON envelope "
    "with --envelope), generated textures of the NEU classes or the files of --images DIR, and write each "
    "image's true class with --ground-truth.",
)
_TRAIN = (
    "build the shipped models (train, export to ONNX, quantize, gate, write manifests)",
    "Train the anomaly models on normal data from the simulator (and the defect classifier on CWRU), export "
    "them to ONNX, build and gate the quantized candidates (pdm-agent model quantize) and write manifest.json, "
    "MODEL_CARD.md, calibration.npz and eval.npz.",
)
_EVALUATE = (
    "evaluate the models on public datasets with the published protocols",
    "Run a published evaluation protocol on a dataset folder and print the results next to the published "
    "ones (--json for one JSON object).",
)
_FLEET = (
    "federated learning across agents with Flower (evaluate, serve, client, install, rollback)",
    "Train one model across agents without moving their data (Flower): fleet evaluate compares the "
    "federated model with central and local-only training on a dataset split like a fleet (simulation); "
    "fleet serve coordinates a federation, fleet client joins it from an agent, fleet install and "
    "rollback put the resulting model version on an agent and take it back.",
)
_QUANTIZE = (
    "build quantized candidates of a model's FP32 parent, measure them and gate which one ships",
    "Build INT8 static (MinMax/Percentile/Entropy, per tensor and per channel), INT8 dynamic, 4-bit "
    "weight-only (round-to-nearest and GPTQ) and mixed-precision candidates from the FP32 model, measure "
    "accuracy on held-out data and latency on this machine, and pick the cheapest that passes.",
)


def register(sub: argparse._SubParsersAction, setup_logging: SetupLogging) -> None:
    """Add the tools' subcommands to the ``pdm-agent`` parser (placeholders that say what to install when
    the ``[tools]`` extra is missing)."""
    missing = missing_tools()
    if missing:
        for name, (help_text, _) in {"simulate": _SIMULATE, "train": _TRAIN, "evaluate": _EVALUATE}.items():
            sub.add_parser(name, help=f"{help_text} (needs pdm-agent[tools])").set_defaults(
                func=_missing(name, missing)
            )
        sub.add_parser("model", help="work on a built model (needs pdm-agent[tools])").set_defaults(
            func=_missing("model", missing)
        )
        return
    from pdm_tools.evaluation import cli as evaluation_cli
    from pdm_tools.quantization import cli as quantization_cli
    from pdm_tools.simulator import cli as simulator_cli
    from pdm_tools.training import cli as training_cli

    _add_commands(sub, setup_logging, evaluation_cli, quantization_cli, simulator_cli, training_cli)
    _add_fleet(sub, setup_logging)


def _add_fleet(sub: argparse._SubParsersAction, setup_logging: SetupLogging) -> None:
    """``pdm-agent fleet``, or a placeholder that says to install the ``[fleet]`` extra (Flower)."""
    if importlib.util.find_spec("flwr") is None:
        sub.add_parser("fleet", help=f"{_FLEET[0]} (needs pdm-agent[fleet])").set_defaults(
            func=_missing("fleet", ["flwr"], "fleet")
        )
        return
    from pdm_tools.fleet_learning import cli as fleet_cli

    fleet = sub.add_parser("fleet", help=_FLEET[0], description=_FLEET[1])
    fleet_cli.add_arguments(fleet)

    def run(args: argparse.Namespace) -> int:
        setup_logging(args.log_level or "WARNING", args.log_format or "text")
        if args.fleet_command != "evaluate":  # serve and client run until stopped: no progress lines
            return fleet_cli.main(args)
        from pdm_tools.common.progress import progress

        with progress("pdm-agent fleet evaluate"):  # minutes of federated rounds
            return fleet_cli.main(args)

    fleet.set_defaults(func=run)


def missing_tools() -> list[str]:
    """Distributions of the ``[tools]`` extra that are not installed, read from this package's own metadata
    (so the list is the one in ``pyproject.toml``); empty when running from a source tree never installed."""
    try:
        requirements = metadata.requires("pdm-agent") or []
    except metadata.PackageNotFoundError:
        return []
    missing = []
    for requirement in requirements:
        name, _, marker = requirement.partition(";")
        if "extra" not in marker or "tools" not in marker:
            continue
        distribution = re.split(r"[\s<>=!~\[(]", name.strip(), maxsplit=1)[0]
        try:
            metadata.version(distribution)
        except metadata.PackageNotFoundError:
            missing.append(distribution)
    return missing


def _add_commands(
    sub: argparse._SubParsersAction,
    setup_logging: SetupLogging,
    evaluation_cli: ModuleType,
    quantization_cli: ModuleType,
    simulator_cli: ModuleType,
    training_cli: ModuleType,
) -> None:
    def command(
        main: Callable[[argparse.Namespace], int], level: str, name: str | None = None
    ) -> Callable[[argparse.Namespace], int]:
        """``main`` with the log set up; with ``name``, a long job: progress lines while it runs (on a terminal)."""

        def run(args: argparse.Namespace) -> int:
            setup_logging(args.log_level or level, args.log_format or "text")
            if name is None:
                return main(args)
            from pdm_tools.common.progress import progress

            with progress(f"pdm-agent {name}" + (f" {args.dataset}" if name == "evaluate" else "")):
                return main(args)

        return run

    simulate = sub.add_parser("simulate", help=_SIMULATE[0], description=_SIMULATE[1])
    simulator_cli.add_arguments(simulate)
    simulate.set_defaults(func=command(simulator_cli.main, "INFO"))
    # ``simulate camera``: an inspection camera instead of the machines (its own options).
    from pdm_tools.simulator import camera as camera_cli

    cameras = simulate.add_subparsers(title="other simulators", dest="simulator", metavar="{camera}")
    camera = cameras.add_parser("camera", help=_CAMERA[0], description=_CAMERA[1])
    camera_cli.add_arguments(camera)
    camera.set_defaults(func=command(camera_cli.main, "INFO"))

    train = sub.add_parser("train", help=_TRAIN[0], description=_TRAIN[1])
    training_cli.add_arguments(train)
    train.set_defaults(func=command(training_cli.main, "INFO", "train"))

    evaluate = sub.add_parser("evaluate", help=_EVALUATE[0], description=_EVALUATE[1])
    evaluation_cli.add_arguments(evaluate)
    evaluate.set_defaults(func=command(evaluation_cli.main, "WARNING", "evaluate"))

    model = sub.add_parser("model", help="work on a built model (quantize)", description="Commands on a model dir.")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="MODEL_COMMAND")
    quantize = model_sub.add_parser("quantize", help=_QUANTIZE[0], description=_QUANTIZE[1])
    quantization_cli.add_arguments(quantize)
    quantize.set_defaults(func=command(quantization_cli.main, "WARNING", "model quantize"))


def _missing(command: str, missing: list[str], extra: str = "tools") -> Callable[[argparse.Namespace], int]:
    def refuse(args: argparse.Namespace) -> int:
        print(
            f"pdm-agent {command} is one of the tools, which need {', '.join(missing)} (not installed): "
            f"pip install 'pdm-agent[{extra}]'",
            file=sys.stderr,
        )
        return 2

    return refuse
