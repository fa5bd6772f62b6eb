"""The defect stage of scoring: which defect an anomalous vibration window shows, at the machine's speed."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from agent.adaptation.serving import AdapterStore
from agent.features.bearing import extract_bearing_matrix
from agent.inference.base import DefectClassifier
from agent.inference.classifier import DefectPrediction
from agent.metrics import Metrics
from agent.records import Reading, Source, Window
from agent.runtime.worker import to_lines
from agent.storage.points import defect_lines

logger = logging.getLogger(__name__)


class ShaftSpeeds:
    """Latest shaft speed per machine, from a field of its process readings (the defect classifier needs it).

    Written by the ingest worker, read by the scoring worker: single dict assignments and lookups are
    atomic in CPython, and a reader seeing the previous speed for one window is harmless.
    """

    def __init__(self, speed_field: str, default_rpm: float | None) -> None:
        self._field = speed_field
        self._default = default_rpm
        self._rpm: dict[str, float] = {}

    def observe(self, reading: Reading) -> None:
        value = reading.fields.get(self._field)
        if value is not None and value > 0:
            self._rpm[reading.source.machine] = float(value)

    def rpm(self, machine: str) -> float | None:
        return self._rpm.get(machine, self._default)

    def snapshot(self) -> dict[str, float]:
        """The latest speed per machine (for a scoring process: ``agent.runtime.scoring_process``)."""
        return dict(self._rpm)

    def replace(self, speeds: dict[str, float]) -> None:
        """Take the speeds another process observed (a single assignment: readers see one or the other)."""
        self._rpm = dict(speeds)


@dataclass(frozen=True)
class DefectStage:
    """Which anomalous windows get a defect class, and with what speed (scoring worker only)."""

    classifier: DefectClassifier
    sensors: tuple[str, ...]
    speeds: ShaftSpeeds

    def handles(self, source: Source) -> bool:
        return any(fnmatch.fnmatchcase(source.sensor, p) for p in self.sensors)

    def classify(
        self,
        windows: Sequence[Window],
        scores: np.ndarray,
        thresholds: np.ndarray,
        metrics: Metrics,
        adapters: AdapterStore | None,
    ) -> dict[int, DefectPrediction]:
        """Defect class of each anomalous window of a classified sensor whose machine speed is known."""
        chosen: list[int] = []
        rpms: list[float] = []
        for i, (window, score, threshold) in enumerate(zip(windows, scores, thresholds, strict=True)):
            if score <= threshold or not self.handles(window.source):
                continue
            rpm = self.speeds.rpm(window.source.machine)
            if rpm is None:
                metrics.inc("defect.skipped", reason="unknown_speed")
                continue
            chosen.append(i)
            rpms.append(rpm)
        if not chosen:
            return {}
        try:
            predictions = self._predict([windows[i] for i in chosen], rpms, adapters)
        except ValueError as exc:
            # E.g. a sampling rate too low for the classifier's bands: the anomaly still alerts, unclassified.
            metrics.inc("defect.skipped", len(chosen), reason="unusable_window")
            logger.warning("defect classification skipped: %s", exc)
            return {}
        metrics.inc("defect.classified", len(chosen))
        return dict(zip(chosen, predictions, strict=True))

    def lines(self, window: Window, prediction: DefectPrediction, metrics: Metrics) -> list[str]:
        """The ``defect`` point of one classified window."""
        clf = self.classifier
        probabilities = prediction.as_dict()["probabilities"]
        return to_lines(
            lambda w: defect_lines(w, clf.model_id, clf.version, prediction.class_name, probabilities),
            window,
            metrics,
        )

    def _predict(
        self, windows: list[Window], rpms: list[float], adapters: AdapterStore | None
    ) -> list[DefectPrediction]:
        """The classifier's verdicts: through a machine's classifier adapter where it has one."""
        if adapters is None:
            return self.classifier.classify(windows, rpms)
        model = self.classifier.current()
        adapters.refresh(model)
        adapted: dict[str, list[int]] = {}
        for i, window in enumerate(windows):
            if adapters.adapter_for(model, window.source.machine) is not None:
                adapted.setdefault(window.source.machine, []).append(i)
        if not adapted:
            return model.classify(windows, rpms)
        out: list[DefectPrediction | None] = [None] * len(windows)
        plain = [i for i, window in enumerate(windows) if window.source.machine not in adapted]
        if plain:
            predictions = model.classify([windows[i] for i in plain], [rpms[i] for i in plain])
            for i, prediction in zip(plain, predictions, strict=True):
                out[i] = prediction
        names = model.class_names
        for machine, rows in adapted.items():
            x = extract_bearing_matrix(model.spec, [windows[i] for i in rows], [rpms[i] for i in rows])
            for i, p in zip(rows, adapters.run(model, machine, x, "probabilities"), strict=True):
                out[i] = DefectPrediction(names[int(p.argmax())], float(p.max()), names, p.copy())
        return [p for p in out if p is not None]
