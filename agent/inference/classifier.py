"""The bearing defect classifier at serving time: its manifest and a verified, warmed-up ONNX session.

When the vibration anomaly model fires, the agent asks this model *which* defect the window shows
(normal, inner_race, outer_race, ball) and puts the answer into the alert. The features need the shaft
speed: ``classify(windows, rpm)`` computes them with ``agent.features.bearing`` (the same code as
training) and returns one ``DefectPrediction`` per window.

Its ``manifest.json`` is the one ``agent.inference.manifest.Manifest`` format with ``task: "classifier"``
(``class_names`` instead of a threshold, outputs ``probabilities`` float32 ``[batch, C]`` and ``label``
int64 ``[batch]``), under the same trust rules as an anomaly model's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.features.bearing import BearingFeatureSpec, extract_bearing_matrix
from agent.inference.errors import ModelError
from agent.inference.manifest import Manifest
from agent.inference.session import ServedModel
from agent.records import Window

logger = logging.getLogger(__name__)

TASK = "classifier"
_ORT_TYPES = {"float32": "tensor(float)", "int64": "tensor(int64)"}


@dataclass(frozen=True, slots=True)
class DefectPrediction:
    """The classifier's verdict on one window. ``probabilities``: float32 ``(len(class_names),)``."""

    class_name: str
    probability: float
    class_names: tuple[str, ...]
    probabilities: np.ndarray

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, for an alert's details: ``{"defect": ..., "probability": ..., "probabilities": {...}}``."""
        return {
            "defect": self.class_name,
            "probability": round(self.probability, 4),
            "probabilities": {n: round(float(p), 4) for n, p in zip(self.class_names, self.probabilities, strict=True)},
        }


# The training code (pdm_tools/training/defect_train.py) still builds manifests under this name; it is the one
# ``Manifest`` (task "classifier"), kept as an alias until that code imports ``Manifest`` itself.
ClassifierManifest = Manifest


class OnnxDefectClassifier(ServedModel):
    """One classifier loaded from its directory, checked against its manifest and warmed up.

    Built once by the composition root, then called from the inference worker thread only. Construction
    raises ``ModelError``; ``predict_proba`` and ``classify`` raise ``ValueError`` on bad input.
    """

    def __init__(self, manifest: Manifest, model_dir: Path, threads: int = 1) -> None:
        spec = manifest.spec()
        if manifest.task != TASK or not isinstance(spec, BearingFeatureSpec):
            raise ModelError(
                f"{model_dir}: model {manifest.model_id!r} is a {manifest.task!r} model, not a {TASK!r}", reason="task"
            )
        super().__init__(manifest, model_dir, threads)
        self._spec = spec
        self._check_session(self._path)
        self._warm_up()
        logger.info("loaded classifier %s version %s (%s)", manifest.model_id, manifest.version, manifest.file)

    @classmethod
    def load(cls, model_dir: Path, threads: int = 1) -> OnnxDefectClassifier:
        """Read and verify the manifest in ``model_dir`` and build the classifier."""
        return cls(Manifest.load(model_dir, TASK), model_dir, threads)

    def current(self) -> OnnxDefectClassifier:
        """This classifier (``CurrentClassifier.current`` gives the registry's current one)."""
        return self

    @property
    def spec(self) -> BearingFeatureSpec:
        return self._spec

    @property
    def class_names(self) -> tuple[str, ...]:
        return self._manifest.class_names

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities of feature rows: float32 ``(n, F)`` → float32 ``(n, C)``."""
        f = len(self._manifest.feature_names)
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != f:
            raise ValueError(f"features must be a float32 array of shape (n, {f}), got {getattr(x, 'shape', x)!r}")
        if x.shape[0] == 0:
            return np.empty((0, len(self.class_names)), dtype=np.float32)
        if not np.isfinite(x).all():
            raise ValueError("features contain NaN or infinity")
        (probs,) = self._session.run(["probabilities"], {"features": np.ascontiguousarray(x)})
        return np.asarray(probs, dtype=np.float32)

    def classify(self, windows: Sequence[Window], rpm: float | Sequence[float]) -> list[DefectPrediction]:
        """One prediction per vibration window; ``rpm``: the shaft speed (one number or one per window)."""
        probs = self.predict_proba(extract_bearing_matrix(self._spec, windows, rpm))
        names = self.class_names
        return [DefectPrediction(names[int(p.argmax())], float(p.max()), names, p.copy()) for p in probs]

    def _check_session(self, path: Path) -> None:
        for kind, expected, actual in (
            ("input", self._manifest.inputs, self._session.get_inputs()),
            ("output", self._manifest.outputs, self._session.get_outputs()),
        ):
            got = [(a.name, a.type, len(a.shape)) for a in actual]
            want = [(t.name, _ORT_TYPES.get(t.dtype), len(t.shape)) for t in expected]
            if got != want:
                raise ModelError(f"{path}: graph {kind}s {got} do not match the manifest's {want}", reason="shape")

    def _warm_up(self) -> None:
        # First runs allocate the arena and pre-pack weights; pay that at start, and fail at load if broken.
        for batch in (1, 8):
            x = np.zeros((batch, len(self._manifest.feature_names)), dtype=np.float32)
            try:
                probs, _labels = self._session.run(["probabilities", "label"], {"features": x})
            except Exception as exc:  # ORT's own exception types: a graph that loads but cannot run
                raise ModelError(
                    f"classifier {self._manifest.model_id}: warm-up failed: {exc}", reason="warmup"
                ) from exc
            if np.shape(probs) != (batch, len(self.class_names)) or not np.isfinite(probs).all():
                raise ModelError(f"classifier {self._manifest.model_id}: warm-up returned {probs!r}", reason="warmup")
