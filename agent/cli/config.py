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
from pathlib import Path

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
    validate.set_defaults(func=cmd_validate)


def print_config_error(file: Path, exc: ConfigError) -> None:
    """Every problem of ``file``, one per line, on stderr."""
    count = len(exc.errors)
    print(f"{file}: invalid configuration ({count} error{'s' if count > 1 else ''})", file=sys.stderr)
    for line in str(exc).splitlines():
        print(f"  {line}", file=sys.stderr)


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        print_config_error(args.file, exc)
        return 1
    if args.models:
        from agent.bootstrap import build_models  # heavy imports (onnxruntime) only when asked
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


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2))
    return 0
