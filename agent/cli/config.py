"""``pdm-agent config validate FILE [--models]`` and ``pdm-agent config schema``.

``validate`` reads a config file as ``pdm-agent run`` would, without connecting to anything, and lists
every problem with its key path; ``validate-config`` is its older spelling. ``schema`` prints the JSON
Schema of the file for editors (the YAML language server reads it from a
``# yaml-language-server: $schema=...`` comment) and other tools.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from agent.config import ConfigError, json_schema, load_config


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    config = subparsers.add_parser(
        "config",
        help="check a config file, or print the JSON Schema of the config",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = config.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    _add_validate(commands, "validate")
    schema = commands.add_parser(
        "schema",
        help="print the JSON Schema of the config file",
        description="Print the JSON Schema (draft 2020-12) of the agent's config file: every section and key, "
        "its type, default and description. Point your editor at it, e.g. "
        "`pdm-agent config schema > agent.schema.json` and `# yaml-language-server: $schema=agent.schema.json` "
        "at the top of the YAML file.",
    )
    schema.set_defaults(func=cmd_schema)
    _add_validate(subparsers, "validate-config", help_suffix=" (same as: config validate)")


def _add_validate(subparsers: argparse._SubParsersAction, name: str, help_suffix: str = "") -> None:
    validate = subparsers.add_parser(
        name,
        help=f"check a config file: exit 0, or 1 with every problem and its key path{help_suffix}",
        description="Validate a config file without connecting to anything; every problem is listed with its "
        "key path. With --models, also load and verify every configured model (sha256, feature spec hash).",
    )
    validate.add_argument("file", type=Path, help="the YAML config file")
    validate.add_argument("--models", action="store_true", help="also load and verify the configured models")
    validate.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: {file, valid, errors: [{key, reason}], models: [...]} (exit status as without)",
    )
    validate.set_defaults(func=cmd_validate)


def print_config_error(file: Path, exc: ConfigError) -> None:
    """Every problem of ``file``, one per line, on stderr."""
    count = len(exc.errors)
    print(f"{file}: invalid configuration ({count} error{'s' if count > 1 else ''})", file=sys.stderr)
    for line in str(exc).splitlines():
        print(f"  {line}", file=sys.stderr)


def cmd_validate(args: argparse.Namespace) -> int:
    report: dict[str, Any] = {"file": str(args.file), "valid": False, "errors": [], "models": []}
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        report["errors"] = [{"key": key, "reason": reason} for key, reason in exc.errors]
        return _report(args, report, partial(print_config_error, args.file, exc))
    if args.models:
        from agent.bootstrap import build_models  # heavy imports (onnxruntime) only when asked
        from agent.inference.manifest import ModelError
        from agent.metrics import Metrics

        try:
            models = build_models(config, Metrics())
        except ModelError as exc:
            report["errors"] = [{"key": "inference", "reason": f"invalid model: {exc}"}]
            return _report(args, report, partial(print, f"invalid model: {exc}", file=sys.stderr))
        for model in models.router.models:
            report["models"].append(
                {"model_id": model.model_id, "version": model.version, "kind": "anomaly", "threshold": model.threshold}
            )
        if models.classifier is not None:
            c = models.classifier
            report["models"].append(
                {"model_id": c.model_id, "version": c.version, "kind": "classifier", "classes": list(c.class_names)}
            )
    report["valid"] = True
    return _report(args, report, partial(_print_ok, args.file, report["models"]))


def _report(args: argparse.Namespace, report: dict[str, Any], as_text: Callable[[], None]) -> int:
    """Print ``report`` as JSON on stdout (``--json``) or as text; the exit status: 0 valid, 1 not."""
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        as_text()
    return 0 if report["valid"] else 1


def _print_ok(file: Path, models: list[dict[str, Any]]) -> None:
    for model in models:
        if model["kind"] == "classifier":
            names = ", ".join(model["classes"])
            print(f"defect classifier {model['model_id']} {model['version']}: ok ({names})")
        else:
            print(f"model {model['model_id']} {model['version']}: ok (threshold {model['threshold']:.4g})")
    print(f"{file}: ok")


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2))
    return 0
