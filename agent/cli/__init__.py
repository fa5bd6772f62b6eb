"""``pdm-agent``: the command line. Each subcommand keeps its own flags next to its code."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path

from agent import __version__
from agent.cli import adapt as adapt_cli
from agent.cli import config as config_cli
from agent.cli import init as init_cli
from agent.config import ConfigError, load_config
from agent.logs import LOG_FORMATS, LOG_LEVELS, setup_logging

PLUGIN_GROUP = "pdm_agent.commands"

DEFAULT_CONFIG = Path("config/agent.yaml")

logger = logging.getLogger("agent")
_RST_LITERAL = re.compile(r"``([^`]+)``")


def _setup_logging(level: str, log_format: str = "text") -> None:
    setup_logging(level, log_format)


def cmd_run(args: argparse.Namespace) -> int:
    from agent.bootstrap import build_agent  # heavy imports (onnxruntime) only when running

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        config_cli.print_config_error(args.config, exc)
        return 1
    _setup_logging(args.log_level or config.agent.log_level, args.log_format or config.agent.log_format)
    try:
        agent = build_agent(config)
    except Exception as exc:
        logger.error("cannot start: %s", exc)
        return 1
    agent.run_until_signal()
    return 0


def build_parser(plugins: bool = True) -> argparse.ArgumentParser:
    """The whole command line; with ``plugins`` false only the runtime's own commands (what ``run`` parses)."""
    parser = argparse.ArgumentParser(
        prog="pdm-agent",
        description="Edge predictive-maintenance agent: MQTT sensor data -> InfluxDB, quantized ONNX "
        "anomaly models, MQTT alerts.",
    )
    parser.add_argument("--version", action="version", version=f"pdm-agent {__version__}")
    _add_log_options(parser, default=None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run the agent",
        description="Subscribe to the gateway's topics, store every reading in InfluxDB, score windows with the "
        "configured models and publish alerts. Stops gracefully on SIGTERM/SIGINT.",
    )
    run.add_argument("--config", "-c", type=Path, default=DEFAULT_CONFIG, help="config file (default: %(default)s)")
    run.set_defaults(func=cmd_run)

    config_cli.add_parser(sub)
    init_cli.add_parser(sub)
    adapt_cli.add_parser(sub)
    if plugins:
        _add_plugin_commands(sub)
    _finish_subcommands(parser)
    return parser


def _add_log_options(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=default, help="override the log level")
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=default,
        help="text (for people) or json (one object per line, for log shippers); default agent.log_format, else text",
    )


def _finish_subcommands(parser: argparse.ArgumentParser) -> None:
    """What every (sub)subcommand gets, the plugins' included: ``--log-level`` and ``--log-format`` after the
    subcommand too (``pdm-agent run --log-format json``), and a description in plain text.

    The log options' default there is SUPPRESS: argparse lets a subcommand's default overwrite what was given
    before the subcommand, so only a value given after it may. Descriptions are often module docstrings,
    written in reST for the API docs: their double-backquoted literals lose the backquotes in --help.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases share one parser
                _add_log_options(sub, default=argparse.SUPPRESS)
                if sub.description:
                    sub.description = plain_text(sub.description)
                _finish_subcommands(sub)


def plain_text(rst: str) -> str:
    """reST inline literals as plain text, for a terminal.

    >>> plain_text("reads ``agent.features.bearing`` (``x``) and `y`")
    'reads agent.features.bearing (x) and `y`'
    """
    return _RST_LITERAL.sub(r"\1", rst)


def _add_plugin_commands(sub: argparse._SubParsersAction) -> None:
    """Subcommands registered by other installed parts (entry point group ``pdm_agent.commands``).

    The tools (``pdm_tools``) add ``train``, ``evaluate``, ``simulate`` and ``model``; their heavy
    dependencies come with ``pip install 'pdm-agent[tools]'`` and are imported only when a command runs,
    which then says what to install if they are missing. The runtime never imports the tools by name.
    """
    for entry in entry_points(group=PLUGIN_GROUP):
        try:
            register = entry.load()
        except ImportError as exc:  # a broken plugin must not take the runtime's own commands down
            print(f"pdm-agent: ignoring commands of {entry.value}: {exc}", file=sys.stderr)
            continue
        register(sub, _setup_logging)


def command_of(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (after the global options), or None.

    >>> command_of(["--log-level", "DEBUG", "run", "--config", "x.yaml"])
    'run'
    >>> command_of(["--version"]) is None
    True
    """
    pre = argparse.ArgumentParser(add_help=False)
    for option in ("--log-level", "--log-format"):  # their values are checked by the real parser
        pre.add_argument(option)
    _, rest = pre.parse_known_args(list(argv))
    return rest[0] if rest and not rest[0].startswith("-") else None


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. The runtime's own commands (``run``, ``config``, ``init``, ``adapt``) are parsed without
    loading the plugins' subcommands: a plugin's registration may import its modules (the tools' CLI pulls in
    training, evaluation, quantization and Flower: ~110 MB resident), which a service running ``pdm-agent run``
    must not carry."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(plugins=False)
    if command_of(argv) not in subcommands(parser):
        parser = build_parser()  # a plugin's command, --help or a usage error: the whole command line
    args = parser.parse_args(argv)
    return int(args.func(args))


def subcommands(parser: argparse.ArgumentParser) -> set[str]:
    """The names (aliases included) of ``parser``'s subcommands."""
    return {
        name for action in parser._actions if isinstance(action, argparse._SubParsersAction) for name in action.choices
    }


if __name__ == "__main__":
    sys.exit(main())
