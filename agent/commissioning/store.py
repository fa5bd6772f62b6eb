"""The commissioning baselines on disk: one JSON file, versioned, tied to the baselines' spec, replaced atomically.

Why: a baseline is what the machine's normal *is*. Kept only in memory, an agent restarted during a fault
commissioned again on the fault, cleared the open alert while the fault went on, and flagged every window
once the machine was normal again. So the baselines are saved (``agent.statefile.write_atomically``) and a
restart continues them: a baseline still collecting continues collecting, a fitted one keeps scoring with
the same detector.

The file says what it is (``format``), its layout (``version``) and the ``spec`` it was written for (a hash
of the commissioning config and the channels: ``CommissioningScorer.version``). A file of another format
version or spec is never loaded, since its detectors would score other channels or on another scale: it is
moved aside (``<name>.<reason>-<UTC time>``, never deleted: the operator may want it back by restoring the
old config) and reported; so is an unreadable one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from agent.statefile import write_atomically

logger = logging.getLogger(__name__)

FORMAT = "pdm-agent/commissioning-baselines"
FORMAT_VERSION = 1


class StateRefused(ValueError):
    """A state file that was not loaded (and has been moved aside to ``aside``); ``reason`` is a stable code:
    ``unreadable``, ``format``, ``version`` or ``spec_mismatch``."""

    def __init__(self, reason: str, detail: str, aside: Path) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.aside = aside


class BaselineStore:
    """Reads and writes the baselines file at ``path`` (its folder is created). Not thread-safe: one saver
    thread writes, and ``load`` runs before it starts."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def document(self, spec: str, recipe: Mapping[str, Any], baselines: list[dict[str, Any]]) -> dict[str, Any]:
        """The file's content for ``baselines`` (one dict per source) of ``spec``; ``recipe`` is what the spec
        hashes (config and channels), kept readable so that a refused file says what differed."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "spec": spec,
            "recipe": dict(recipe),
            "saved_ns": time.time_ns(),
            "baselines": baselines,
        }

    def load(self, spec: str) -> list[dict[str, Any]] | None:
        """The saved baselines of ``spec``, or ``None`` when there is no file. Raises ``StateRefused`` for a
        file that cannot be used, after moving it aside."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            self._refuse("unreadable", str(exc))
        try:
            doc = json.loads(text)
        except ValueError as exc:
            self._refuse("unreadable", f"not JSON: {exc}")
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            self._refuse("format", f"not a {FORMAT} file")
        if doc.get("version") != FORMAT_VERSION:
            self._refuse("version", f"format version {doc.get('version')!r}, this agent reads {FORMAT_VERSION}")
        if doc.get("spec") != spec:
            self._refuse(
                "spec_mismatch",
                f"written for spec {doc.get('spec')!r} ({json.dumps(doc.get('recipe'), sort_keys=True)}), "
                f"the agent now runs {spec!r}",
            )
        baselines = doc.get("baselines")
        if not isinstance(baselines, list) or not all(isinstance(b, dict) for b in baselines):
            self._refuse("unreadable", "'baselines' is not a list of objects")
        return baselines

    def save(self, state: dict[str, Any]) -> None:
        """Replace the file atomically with ``state`` (a ``document``); raises ``OSError`` (e.g. ENOSPC)."""
        write_atomically(self.path, json.dumps(state, separators=(",", ":"), allow_nan=False).encode())

    def _refuse(self, reason: str, detail: str) -> NoReturn:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.{reason}-{stamp}")
        os.replace(self.path, aside)
        raise StateRefused(reason, detail, aside)
