"""Which model scores which source: glob patterns on the ``sensor`` tag, first match wins."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from agent.features.spec import FeatureSpec
from agent.records import Source


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


class ModelRouter:
    """Maps sources to models; the answer per sensor name is cached (it is asked for every reading)."""

    def __init__(self, routes: Sequence[tuple[tuple[str, ...], AnomalyModel]]) -> None:
        self._routes = list(routes)
        self._cache: dict[str, AnomalyModel | None] = {}

    def model_for(self, source: Source) -> AnomalyModel | None:
        sensor = source.sensor
        try:
            return self._cache[sensor]
        except KeyError:
            pass
        found = next(
            (model for patterns, model in self._routes if any(fnmatch.fnmatchcase(sensor, p) for p in patterns)),
            None,
        )
        self._cache[sensor] = found
        return found

    def spec_for(self, source: Source) -> FeatureSpec | None:
        model = self.model_for(source)
        return None if model is None else model.spec

    @property
    def models(self) -> list[AnomalyModel]:
        return [model for _, model in self._routes]
