"""Options every ``pdm-agent`` command shares: ``--log-level`` and ``--log-format`` before or after it."""

from __future__ import annotations

import pytest

from agent.cli import build_parser

COMMANDS = [
    ["run"],
    ["config", "validate", "x.yaml"],
    ["validate-config", "x.yaml"],
    ["adapt", "--model", "m", "--machine", "a"],
    ["train"],
    ["evaluate", "cwru"],
    ["model", "quantize", "m", "--calibration", "c.npz"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_log_options_are_taken_before_and_after_the_command(command: list[str]) -> None:
    parser = build_parser()
    before = parser.parse_args(["--log-level", "DEBUG", "--log-format", "json", *command])
    after = parser.parse_args([*command, "--log-level", "DEBUG", "--log-format", "json"])
    neither = parser.parse_args(command)
    assert (before.log_level, before.log_format) == (after.log_level, after.log_format) == ("DEBUG", "json")
    assert (neither.log_level, neither.log_format) == (None, None)


def test_a_value_before_the_command_is_not_reset_by_the_command() -> None:
    args = build_parser().parse_args(["--log-format", "json", "run", "--log-level", "ERROR"])
    assert (args.log_format, args.log_level) == ("json", "ERROR")


def test_an_unknown_log_format_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["run", "--log-format", "xml"])
    assert exited.value.code == 2
    assert "invalid choice: 'xml'" in capsys.readouterr().err
