"""``pdm-agent``: the command line. Each subcommand keeps its own flags next to its code."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from agent.config import ConfigError, load_config

DEFAULT_CONFIG = Path("config/agent.yaml")

logger = logging.getLogger("agent")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)-7s %(threadName)-10s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def cmd_run(args: argparse.Namespace) -> int:
    from agent.bootstrap import build_agent  # heavy imports (onnxruntime) only when running

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"invalid configuration {args.config}: {exc}", file=sys.stderr)
        return 1
    _setup_logging(args.log_level or config.agent.log_level)
    try:
        agent = build_agent(config)
    except Exception as exc:
        logger.error("cannot start: %s", exc)
        return 1
    agent.run_until_signal()
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 1
    if args.models:
        from agent.bootstrap import build_models
        from agent.inference.manifest import ModelError
        from agent.metrics import Metrics

        try:
            models = build_models(config, Metrics())
        except ModelError as exc:
            print(f"invalid model: {exc}", file=sys.stderr)
            return 1
        for model in models.router.models:
            print(f"model {model.model_id} {model.version}: ok (threshold {model.threshold:.4g})")
        if models.classifier is not None:
            names = ", ".join(models.classifier.class_names)
            print(f"defect classifier {models.classifier.model_id} {models.classifier.version}: ok ({names})")
    print(f"{args.file}: ok")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from agent.simulator import cli as simulator_cli

    _setup_logging(args.log_level or "INFO")
    return simulator_cli.main(args)


def cmd_train(args: argparse.Namespace) -> int:
    from agent.training import cli as training_cli

    _setup_logging(args.log_level or "INFO")
    return training_cli.main(args)


def cmd_model_quantize(args: argparse.Namespace) -> int:
    from agent.quantization import cli as quantization_cli

    _setup_logging(args.log_level or "WARNING")
    return quantization_cli.main(args)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from agent.evaluation import cli as evaluation_cli

    _setup_logging(args.log_level or "WARNING")
    return evaluation_cli.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdm-agent",
        description="Edge predictive-maintenance agent: MQTT sensor data -> InfluxDB, quantized ONNX "
        "anomaly models, MQTT alerts.",
    )
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="override the log level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run the agent",
        description="Subscribe to the gateway's topics, store every reading in InfluxDB, score windows with the "
        "configured models and publish alerts. Stops gracefully on SIGTERM/SIGINT.",
    )
    run.add_argument("--config", "-c", type=Path, default=DEFAULT_CONFIG, help="config file (default: %(default)s)")
    run.set_defaults(func=cmd_run)

    validate = sub.add_parser(
        "validate-config",
        help="check a config file and exit 0 (valid) or 1 (the key path and the reason)",
        description="Validate a config file without connecting to anything. With --models, also load and "
        "verify every configured model (sha256, feature spec hash).",
    )
    validate.add_argument("file", type=Path, help="the YAML config file")
    validate.add_argument("--models", action="store_true", help="also load and verify the configured models")
    validate.set_defaults(func=cmd_validate)

    from agent.simulator import cli as simulator_cli
    from agent.training import cli as training_cli

    simulate = sub.add_parser(
        "simulate",
        help="run the factory gateway simulator",
        description="Publish simulated machines (vibration blocks, temperature, current, pressure) over MQTT, "
        "with faults scheduled by config or --fault, and write the ground truth of the faults.",
    )
    simulator_cli.add_arguments(simulate)
    simulate.set_defaults(func=cmd_simulate)

    train = sub.add_parser(
        "train",
        help="build the shipped models (train, export to ONNX, quantize, gate, write manifests)",
        description="Train the anomaly models on normal data from the simulator (and the defect classifier on "
        "CWRU), export them to ONNX, build and gate the quantized candidates (pdm-agent model quantize) and "
        "write manifest.json, MODEL_CARD.md, calibration.npz and eval.npz.",
    )
    training_cli.add_arguments(train)
    train.set_defaults(func=cmd_train)

    from agent.evaluation import cli as evaluation_cli

    evaluate = sub.add_parser(
        "evaluate",
        help="evaluate the models on public datasets with the published protocols",
        description="Run a published evaluation protocol on a dataset folder and print the results next to "
        "the published ones (--json for one JSON object).",
    )
    evaluation_cli.add_arguments(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    from agent.quantization import cli as quantization_cli

    model = sub.add_parser("model", help="work on a built model (quantize)", description="Commands on a model dir.")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="MODEL_COMMAND")
    quantize = model_sub.add_parser(
        "quantize",
        help="build quantized candidates of a model's FP32 parent, measure them and gate which one ships",
        description="Build INT8 static (MinMax/Percentile/Entropy, per tensor and per channel), INT8 dynamic, "
        "4-bit weight-only (round-to-nearest and GPTQ) and mixed-precision candidates from the FP32 model, "
        "measure accuracy on held-out data and latency on this machine, and pick the cheapest that passes.",
    )
    quantization_cli.add_arguments(quantize)
    quantize.set_defaults(func=cmd_model_quantize)

    from agent.adaptation import cli as adaptation_cli

    adaptation_cli.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
