"""The model seam: what the scoring worker may ask of a model, and the optional abilities a model declares.

Models are built, verified and warmed up by the composition root (or swapped in by the model registry's
watcher) and then called from the scoring worker's thread only. A model declares an optional ability by
returning an object for it (usually itself) from the matching property, and ``None`` when it has not got
it; the worker never probes with ``getattr``. Model classes by the config's ``type:`` are in
``agent.inference.kinds``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from agent.features.bearing import BearingFeatureSpec
from agent.features.spec import FeatureSpec
from agent.inference.classifier import DefectPrediction
from agent.records import Window


class Explainable(Protocol):
    """Ability ``explainable``: per-feature contributions to the score of anomalous rows (for alerts)."""

    def explain(self, x: np.ndarray) -> np.ndarray:
        """float32 ``(n, F)`` features -> ``(n, F)`` non-negative contributions; ``ValueError`` if it cannot."""
        ...


class Adaptable(Protocol):
    """Ability ``adaptable``: a base that per-machine LoRA adapters can be verified against and run on."""

    @property
    def model_id(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def directory(self) -> Path:
        """The model's directory (manifest and ONNX file) the adapters' graph is built from."""
        ...


class AnomalyModel(Protocol):
    """``type: anomaly``: features of a window in, a score out (higher = more anomalous).

    ``score`` is called from the scoring worker only, with float32 ``(n, F)`` rows built with ``spec``;
    it returns float32 ``(n,)`` and raises ``ValueError`` on rows of the wrong shape.
    """

    @property
    def model_id(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def threshold(self) -> float: ...

    @property
    def spec(self) -> FeatureSpec: ...

    def score(self, x: np.ndarray) -> np.ndarray: ...

    @property
    def explainable(self) -> Explainable | None:
        """The explaining side of this model, or ``None`` when it cannot name contributing features."""
        ...

    @property
    def adaptable(self) -> Adaptable | None:
        """The base for per-machine adapters, or ``None`` when adapters cannot be served on it."""
        ...


class ServingClassifier(Adaptable, Protocol):
    """One loaded classifier version: what adapters are run on (``DefectClassifier.current``)."""

    @property
    def spec(self) -> BearingFeatureSpec: ...

    @property
    def class_names(self) -> tuple[str, ...]: ...

    def classify(self, windows: Sequence[Window], rpm: float | Sequence[float]) -> list[DefectPrediction]: ...


class DefectClassifier(Protocol):
    """``type: classifier``: which defect an anomalous vibration window shows (scoring worker only).

    ``classify(windows, rpm)`` returns one prediction per window (``ValueError`` for windows it cannot
    use, e.g. a sampling rate too low for its bands); ``model_id``/``version`` are those of the version
    that gave the last answer. ``current()`` is the loaded version itself, for running a machine's adapter.
    """

    @property
    def model_id(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def class_names(self) -> tuple[str, ...]: ...

    def classify(self, windows: Sequence[Window], rpm: float | Sequence[float]) -> list[DefectPrediction]: ...

    def current(self) -> ServingClassifier: ...
