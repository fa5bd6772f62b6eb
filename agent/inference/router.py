"""Which model scores which source: glob patterns on the ``sensor`` tag, first match wins.

A route holds a ``ModelSlot``: the model currently serving it. ``ModelRegistry`` replaces a slot's
model when a new version has been loaded, verified and warmed up (on its own thread); the scoring
worker reads the slot once per window and scores the window with that model only, so every window is
scored exactly once, by either the old or the new version, never by both and never by neither.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np

from agent.features.spec import FeatureSpec
from agent.records import Source

M = TypeVar("M")


class AnomalyModel(Protocol):
    """A loaded, verified and warmed-up model. ``score`` is called from the scoring worker only."""

    @property
    def model_id(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def threshold(self) -> float: ...

    @property
    def spec(self) -> FeatureSpec: ...

    def score(self, x: np.ndarray) -> np.ndarray:
        """float32 ``(n, F)`` features -> float32 ``(n,)`` scores, higher is more anomalous."""
        ...


class ModelSlot(Generic[M]):
    """The model currently serving one model id.

    Readers take ``model`` (one attribute read: atomic, no lock needed) and use that object for the
    whole of a unit of work; ``agent.inference.registry.ModelRegistry`` is the only writer, and assigns a
    fully loaded, verified and warmed-up model in a single reference assignment.
    """

    __slots__ = ("model",)

    def __init__(self, model: M) -> None:
        self.model = model


@dataclass(frozen=True)
class _Route:
    patterns: tuple[str, ...]
    slot: ModelSlot[AnomalyModel]
    window_spec: FeatureSpec
    """The spec the windower cuts this route's sources with: the first model's, for the whole run.

    The registry only swaps in versions with the same window geometry (kind, channels, window and hop),
    so keeping this object means a new version never restarts a source's window buffer (which would
    lose the windows in progress); features are computed with the scoring model's own spec.
    """


class ModelRouter:
    """Maps sources to models; the route per sensor name is cached (it is asked for every reading)."""

    def __init__(self, routes: Sequence[tuple[tuple[str, ...], AnomalyModel | ModelSlot[AnomalyModel]]]) -> None:
        self._routes = []
        for patterns, target in routes:
            slot = target if isinstance(target, ModelSlot) else ModelSlot(target)
            self._routes.append(_Route(tuple(patterns), slot, slot.model.spec))
        self._cache: dict[str, _Route | None] = {}

    def _route(self, source: Source) -> _Route | None:
        sensor = source.sensor
        try:
            return self._cache[sensor]
        except KeyError:
            pass
        found = next(
            (r for r in self._routes if any(fnmatch.fnmatchcase(sensor, p) for p in r.patterns)),
            None,
        )
        self._cache[sensor] = found  # a dict assignment: safe with the other worker thread reading
        return found

    def model_for(self, source: Source) -> AnomalyModel | None:
        """The model that scores ``source`` now (scoring worker); use the returned object for the window."""
        route = self._route(source)
        return None if route is None else route.slot.model

    def spec_for(self, source: Source) -> FeatureSpec | None:
        """The spec that windows ``source`` (ingest worker's windower); fixed per route for the run."""
        route = self._route(source)
        return None if route is None else route.window_spec

    @property
    def models(self) -> list[AnomalyModel]:
        """The models serving the routes now, one per route, in route order."""
        return [r.slot.model for r in self._routes]
