"""Waiting helpers for tests of the spool's writers (no timing is ever asserted)."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout_s`` (a bound, not a check)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)
