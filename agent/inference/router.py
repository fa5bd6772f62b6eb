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
from typing import Generic, TypeVar

from agent.features.spec import FeatureSpec
from agent.inference.base import AnomalyModel
from agent.inference.classifier import DefectPrediction, OnnxDefectClassifier
from agent.records import Source, Window

M = TypeVar("M")


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


class CurrentClassifier:
    """The defect classifier the registry keeps current, as ``agent.inference.base.DefectClassifier``.

    ``classify`` takes the slot's classifier once per call; ``model_id``/``version`` are those of the
    classifier that gave the last answer (the scoring worker reads them right after ``classify``), so a
    prediction is always stored with the version that made it, even across a swap.
    """

    def __init__(self, slot: ModelSlot[OnnxDefectClassifier]) -> None:
        self._slot = slot
        self._last: OnnxDefectClassifier | None = None

    @property
    def _answered(self) -> OnnxDefectClassifier:
        return self._last if self._last is not None else self._slot.model

    @property
    def model_id(self) -> str:
        return self._answered.model_id

    @property
    def version(self) -> str:
        return self._answered.version

    @property
    def class_names(self) -> tuple[str, ...]:
        return self._answered.class_names

    def classify(self, windows: Sequence[Window], rpm: float | Sequence[float]) -> list[DefectPrediction]:
        model = self._slot.model
        self._last = model
        return model.classify(windows, rpm)

    def current(self) -> OnnxDefectClassifier:
        """The classifier now in the slot; the next ``classify`` answers with it (and reports its version)."""
        model = self._slot.model
        self._last = model
        return model
