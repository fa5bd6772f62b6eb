"""Options every ``pdm-agent`` command shares: ``--log-level`` and ``--log-format`` before or after it;
``--json`` of ``config validate``."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from agent.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]

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


def test_validate_json_reports_every_error_with_its_key_and_exits_1(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text('mqtt:\n  port: "1883"\n  password: 12345678\nfoo: 1\n', encoding="utf-8")
    assert main(["config", "validate", str(bad), "--json"]) == 1
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["valid"] is False and err == ""
    assert [e["key"] for e in report["errors"]] == ["mqtt.port", "mqtt.password", "foo"]
    assert "12345678" not in out  # a secret's value is never echoed, in JSON either


def test_validate_json_lists_the_verified_models(capsys) -> None:
    assert main(["validate-config", str(ROOT / "config" / "agent.yaml"), "--models", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["valid"] is True and report["errors"] == []
    assert [(m["model_id"], m["kind"]) for m in report["models"]] == [
        ("vibration-anomaly", "anomaly"),
        ("process-anomaly", "anomaly"),
        ("bearing-defect-classifier", "classifier"),
    ]


def _all_parsers(parser: argparse.ArgumentParser, name: str = "pdm-agent") -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(name, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                found += _all_parsers(sub, f"{name} {sub_name}")
    return found


def test_every_help_text_is_plain_text_for_users() -> None:
    """No reST literals (double backquotes) and no wording meant for the developers."""
    parsers = _all_parsers(build_parser())
    assert {"pdm-agent evaluate cwru", "pdm-agent model quantize", "pdm-agent adapt"} <= {n for n, _ in parsers}
    for name, parser in parsers:
        text = parser.format_help()
        assert "``" not in text, name
        assert not re.search(r"\bthe issue\b|\bTODO\b|\bnot in the issue", text), name


_TOOLS_IMPORTED = (
    "import sys\n"
    "from agent.cli import build_parser, main\n"
    "{call}\n"
    "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pdm_tools'))\n"
)


def _tools_modules_after(call: str) -> list[str]:
    import ast
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _TOOLS_IMPORTED.format(call=call)], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    return list(ast.literal_eval(out.strip().splitlines()[-1]))


def test_run_does_not_load_the_tools_commands(tmp_path) -> None:
    """``pdm-agent run`` parses without the plugins: the tools' CLI imports training, evaluation and Flower."""
    missing = tmp_path / "missing.yaml"
    assert _tools_modules_after(f"main(['--log-level', 'ERROR', 'run', '--config', {str(missing)!r}])") == []
    assert _tools_modules_after(f"main(['config', 'validate', {str(missing)!r}])") == []
    # The whole command line (what --help and the tools' commands get) does load them: the check can fail.
    assert "pdm_tools.cli" in _tools_modules_after("build_parser()")
