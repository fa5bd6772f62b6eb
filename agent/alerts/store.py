"""The alert engine's state on disk: one JSON file, replaced atomically (write, fsync, rename).

Saved after every step that changed it, so a crash loses at most the decisions of the last batch; a
restart then neither re-raises open events as new nor floods clears (see ``AlertEngine.restore``).
A file that cannot be read is moved aside (``.corrupt``) and reported, and the agent starts empty.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from agent.statefile import write_atomically

logger = logging.getLogger(__name__)


class AlertStateStore:
    """Reads and writes the state file at ``path`` (its folder is created)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def load(self) -> dict[str, Any] | None:
        """The saved state, or ``None`` when there is none (or it was unreadable and has been moved aside)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            state = json.loads(text)
            if not isinstance(state, dict):
                raise ValueError("top level is not an object")
            return state
        except ValueError as exc:
            aside = self.path.with_suffix(self.path.suffix + ".corrupt")
            os.replace(self.path, aside)
            logger.error(
                "alert state %s is unreadable (%s); moved to %s, starting without open alerts", self.path, exc, aside
            )
            return None

    def save(self, state: dict[str, Any]) -> None:
        write_atomically(self.path, json.dumps(state, separators=(",", ":"), allow_nan=False).encode())
