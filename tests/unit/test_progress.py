"""Progress lines of long tool commands: on a terminal only, with what the command says it is doing."""

from __future__ import annotations

import io
import sys
import threading

import pytest

from pdm_tools.common.progress import note, progress

WAIT_S = 10.0


class Terminal(io.StringIO):
    """A stream that says it is a terminal and signals each line written."""

    def __init__(self) -> None:
        super().__init__()
        self.written = threading.Event()

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        n = super().write(text)
        if text.endswith("\n"):
            self.written.set()
        return n


def test_nothing_is_written_when_stderr_is_not_a_terminal() -> None:
    pipe = io.StringIO()
    with progress("pdm-agent train", pipe, interval_s=0.001):
        note("vibration-anomaly: training")  # a no-op without progress
        threading.Event().wait(0.05)
    assert pipe.getvalue() == ""
    assert not any(t.name == "progress" for t in threading.enumerate())


def test_a_terminal_gets_lines_with_the_elapsed_time_and_the_current_step() -> None:
    terminal = Terminal()
    with progress("pdm-agent train", terminal, interval_s=0.01):
        note("vibration-anomaly: training")
        while "vibration-anomaly: training" not in terminal.getvalue():  # a line begun before the note may come first
            terminal.written.clear()
            assert terminal.written.wait(WAIT_S), terminal.getvalue()
    lines = terminal.getvalue().splitlines()
    assert lines and lines[-1].startswith("pdm-agent train: ") and lines[-1].endswith(" s, vibration-anomaly: training")
    assert not any(t.name == "progress" for t in threading.enumerate())  # stopped with the block
    note("after")  # no progress active: ignored


@pytest.mark.parametrize(
    ("command", "shown"),
    [(["evaluate", "--dataset", "synthetic"], True), (["serve", "--state", "s", "--out", "o"], False)],
)
def test_fleet_evaluate_shows_progress_and_the_fleet_services_do_not(
    command: list[str], shown: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("flwr")
    from agent import cli
    from pdm_tools.common import progress as progress_module
    from pdm_tools.fleet_learning import cli as fleet_cli

    seen: list[bool] = []
    monkeypatch.setattr(sys, "stderr", Terminal())
    monkeypatch.setattr(fleet_cli, "main", lambda args: seen.append(progress_module._active is not None) or 0)
    assert cli.main(["fleet", *command]) == 0
    assert seen == [shown]
