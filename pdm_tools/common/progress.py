"""Progress of a long tool command (``train``, ``evaluate``, ``model quantize``): a line on stderr every
``interval_s`` with the time so far and what the command said it is doing, only when stderr is a terminal.

A pipe, a file, CI or ``--json`` consumers get nothing extra: their output stays the results and the logs.
Lines, not a carriage-return bar, so that they interleave cleanly with log lines. The command's code says
what it is doing with :func:`note`, a no-op when no progress is shown.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

INTERVAL_S = 10.0

_active: Progress | None = None
_lock = threading.Lock()


class Progress:
    """Periodic ``{command}: {elapsed} s, {doing}`` lines on ``stream`` from a daemon thread."""

    def __init__(
        self,
        command: str,
        stream: TextIO,
        interval_s: float = INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._command = command
        self._stream = stream
        self._interval_s = interval_s
        self._clock = clock
        self._started = clock()
        self._doing = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def note(self, doing: str) -> None:
        self._doing = doing

    def line(self) -> str:
        """The progress line now.

        >>> times = iter([100.0, 142.4])
        >>> progress = Progress("pdm-agent train", sys.stderr, clock=lambda: next(times))
        >>> progress.note("vibration-anomaly: training")
        >>> progress.line()
        'pdm-agent train: 42 s, vibration-anomaly: training'
        """
        elapsed = f"{self._clock() - self._started:.0f} s"
        return f"{self._command}: {elapsed}, {self._doing}" if self._doing else f"{self._command}: {elapsed}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            print(self.line(), file=self._stream, flush=True)


@contextmanager
def progress(command: str, stream: TextIO | None = None, interval_s: float = INTERVAL_S) -> Iterator[None]:
    """Show progress of ``command`` while the block runs, if ``stream`` (stderr) is a terminal."""
    global _active
    out = sys.stderr if stream is None else stream
    if not out.isatty():
        yield
        return
    shown = Progress(command, out, interval_s)
    with _lock:
        _active = shown
    shown.start()
    try:
        yield
    finally:
        shown.stop()
        with _lock:
            _active = None


def note(doing: str) -> None:
    """What the running command is doing now (shown in its next progress line, if any)."""
    with _lock:
        if _active is not None:
            _active.note(doing)
