"""Distinct field names per machine, bounded: one publisher must not grow InfluxDB's schema without end.

InfluxDB keeps every field key of a measurement for good, and each one costs memory in its index and a
column in every query of the measurement: one publisher that put a counter into its field names created
10,356 field keys in ``reading`` (issue 22). ``FieldKeys`` remembers which field names each machine has
used; a message that brings a name new to its machine is refused (``DecodeError`` code ``field_keys``,
dead-lettered and counted like any bad input) once the machine has ``max_per_machine`` names, or all
machines together ``max_total`` distinct names. Names already known are always accepted.

The known names survive a restart: with a ``path``, the set is saved (atomically) whenever a message adds
a name, before the message is stored and acknowledged; a crash therefore never forgets a name that InfluxDB
may already hold. By default the save happens before the decoder returns; the agent builds it ``deferred``
and calls ``flush()`` once per ingest batch before the spool commit (a save is two fsyncs: with a fleet of
480 machines appearing at once, one save per new machine kept the ingest thread waiting for seconds). The
file is small (names are at most 128 characters) and can be deleted to start counting afresh, e.g. after
dropping the measurement.

Owned by the decoder, so called from the ingest thread only (no lock).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from agent.decode.errors import DecodeError, quote
from agent.statefile import write_atomically

logger = logging.getLogger(__name__)

VERSION: Final = 1


class FieldKeys:
    """Which field names each machine has used; refuses new ones beyond the limits (see the module)."""

    def __init__(self, max_per_machine: int, max_total: int, path: Path | None = None, deferred: bool = False) -> None:
        if max_per_machine < 1 or max_total < 1:
            raise ValueError(f"field key limits must be >= 1, got {max_per_machine} and {max_total}")
        self.max_per_machine = max_per_machine
        self.max_total = max_total
        self.path = path
        self._machines: dict[str, set[str]] = {}
        self._all: set[str] = set()
        self._save_failed = False
        self._deferred = deferred
        self._dirty = False  # deferred: names admitted since the last save
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._load(path)

    @property
    def total(self) -> int:
        """Distinct field names of all machines."""
        return len(self._all)

    def known(self, machine: str) -> frozenset[str]:
        return frozenset(self._machines.get(machine, ()))

    def admit(self, machine: str, names: Iterable[str]) -> None:
        """Accept a message's field names for ``machine``, or raise ``DecodeError`` (``field_keys``) and
        remember nothing of it when one of them is new beyond a limit."""
        known = self._machines.get(machine)
        new = [name for name in names if known is None or name not in known]
        if not new:
            return
        have = len(known) if known is not None else 0
        if have + len(new) > self.max_per_machine:
            raise DecodeError(
                "field_keys",
                f"field {quote(new[0])} would be distinct field name {have + 1} of machine {quote(machine)}; "
                f"the limit is {self.max_per_machine} (mqtt.max_field_keys_per_machine)",
            )
        unseen = {name for name in new if name not in self._all}
        if len(self._all) + len(unseen) > self.max_total:
            raise DecodeError(
                "field_keys",
                f"field {quote(new[0])} would be distinct field name {len(self._all) + 1} of all machines; "
                f"the limit is {self.max_total} (mqtt.max_field_keys)",
            )
        self._machines.setdefault(machine, set()).update(new)
        self._all.update(unseen)
        if self._deferred:
            self._dirty = True
        else:
            self._save()

    def flush(self) -> None:
        """Save the names admitted since the last save (deferred mode); the ingest worker calls it before
        committing the batch whose messages brought them."""
        if self._dirty:
            self._dirty = False
            self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        doc = {"version": VERSION, "machines": {m: sorted(names) for m, names in sorted(self._machines.items())}}
        try:
            write_atomically(self.path, json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode())
        except OSError as exc:
            # Kept in memory; the next new name saves everything again. Logged once per failure streak.
            if not self._save_failed:
                logger.error("known field names not saved to %s: %s (kept in memory)", self.path, exc)
            self._save_failed = True
            return
        if self._save_failed:
            logger.info("known field names saved to %s again", self.path)
        self._save_failed = False

    def _load(self, path: Path) -> None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        try:
            doc = json.loads(text)
            if not isinstance(doc, dict) or doc.get("version") != VERSION or not isinstance(doc["machines"], dict):
                raise ValueError(f"not a version {VERSION} field key file")
            machines = {str(m): {str(n) for n in names} for m, names in doc["machines"].items()}
        except (ValueError, KeyError, TypeError) as exc:
            aside = path.with_suffix(path.suffix + ".corrupt")
            os.replace(path, aside)
            logger.error("known field names %s unreadable (%s); moved to %s, counting afresh", path, exc, aside)
            return
        self._machines = machines
        self._all = set().union(*machines.values()) if machines else set()
