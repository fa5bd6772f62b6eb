"""Sinks by the config's ``storage.type``.

A new sink is one module beside ``influx_v1.py`` (the class, implementing ``agent.storage.base.Sink``, and a
``from_settings`` factory that reads its section of the config) plus one entry here. Nothing is imported
by name magic: a missing or misspelled module fails at import, with its traceback.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from agent.plugins import registered
from agent.storage import influx_v1, influx_v2
from agent.storage.base import Sink

SinkFactory = Callable[[Any], Sink]
"""Builds a sink from the config's ``storage`` section (each factory documents the keys it reads)."""

SINKS: Mapping[str, SinkFactory] = {
    "influx_v1": influx_v1.from_settings,
    "influx_v2": influx_v2.from_settings,
}


def build_sink(kind: str, settings: Any) -> Sink:
    """The sink registered as ``kind``; ``ValueError`` naming the known kinds otherwise."""
    return registered(SINKS, kind, "sink type")(settings)
