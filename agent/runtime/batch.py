"""One model's batch of windows: features, one model run (per-machine adapters where served), the
contributing features of the anomalous windows, and their defect class."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from agent.adaptation.auto import AutoAdapter
from agent.adaptation.serving import AdapterStore, adapter_id
from agent.features.extract import extract_matrix
from agent.inference.base import Adaptable, AnomalyModel
from agent.inference.classifier import DefectPrediction
from agent.metrics import Metrics
from agent.records import Score, Window
from agent.runtime.defect import DefectStage
from agent.spool.codec import Entry, encode_features

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the alert engine gets for one scored window (or camera image).

    ``alert_type``: None = the model id; ``evidence``: what the alert shows beside the verdict (a camera
    image's sha256 and fetch URL, ``agent.runtime.inspection``), carried as the ``image`` of the payload.
    """

    score: Score
    defect: DefectPrediction | None = None
    top_features: tuple[tuple[str, float], ...] = ()
    alert_type: str | None = None
    evidence: Mapping[str, object] | None = None


@dataclass(frozen=True)
class Scored:
    """A scored batch: the verdicts, the ``defect`` lines to store, and the feature vectors as one spool
    entry (formatted by the writer: line protocol for a batch's features cost the scoring thread a quarter
    of its time under the benchmark's load)."""

    verdicts: list[Verdict]
    lines: list[str]
    entries: list[Entry]


class BatchScorer:
    """Scores one model's windows in one run (scoring worker only); see the module docstring."""

    def __init__(
        self,
        metrics: Metrics,
        defect: DefectStage | None = None,
        adapters: AdapterStore | None = None,
        auto_adapter: AutoAdapter | None = None,
        top_features: int = 5,
    ) -> None:
        self._metrics = metrics
        self._defect = defect
        self._adapters = adapters
        self._auto = auto_adapter
        self._top_features = top_features

    def score(self, model: AnomalyModel, windows: Sequence[Window]) -> Scored:
        x = extract_matrix(model.spec, windows)
        finite = np.isfinite(x).all(axis=1)
        if not finite.all():
            self._metrics.inc("windows.rejected", int((~finite).sum()), reason="non_finite_features")
            windows = [w for w, ok in zip(windows, finite, strict=True) if ok]
            x = x[finite]
        if not windows:
            return Scored([], [], [])
        t0 = time.perf_counter()
        scores, thresholds, adapters = self._run_model(model, windows, x)
        elapsed = time.perf_counter() - t0
        self._metrics.inc("inference.runs", model=model.model_id)
        self._metrics.inc("windows.scored", len(windows), model=model.model_id)
        self._metrics.set("inference.last_batch_s", elapsed, model=model.model_id)
        self._metrics.set("inference.last_batch_size", len(windows), model=model.model_id)
        self._metrics.observe("inference.seconds", elapsed, model=model.model_id)
        self._metrics.observe("inference.window_seconds", elapsed / len(windows), model=model.model_id)
        names = model.spec.feature_names()
        defects = (
            {}
            if self._defect is None
            else self._defect.classify(windows, scores, thresholds, self._metrics, self._adapters)
        )
        explained = self._explain(model, names, x, scores, [a is None for a in adapters])
        lines: list[str] = []
        verdicts: list[Verdict] = []
        for i, (window, value) in enumerate(zip(windows, scores, strict=True)):
            score = Score(
                source=window.source,
                start_ns=window.start_ns,
                end_ns=window.end_ns,
                model_id=model.model_id,
                model_version=model.version,
                score=float(value),
                threshold=float(thresholds[i]),
                adapter=adapters[i],
            )
            defect = defects.get(i)
            if defect is not None and self._defect is not None:
                lines.extend(self._defect.lines(window, defect, self._metrics))
            verdicts.append(Verdict(score, defect, explained.get(i, ())))
        entries = [
            encode_features(
                model.model_id, model.version, names, [w.source for w in windows], [w.end_ns for w in windows], x
            )
        ]
        return Scored(verdicts, lines, entries)

    def _run_model(
        self, model: AnomalyModel, windows: Sequence[Window], x: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        """Scores, thresholds and adapter of each window: the model itself for machines without an adapter
        (unchanged, in one run), each adapted machine's adapter and threshold for the others."""
        n = len(windows)
        thresholds = np.full(n, model.threshold, dtype=np.float64)
        adapters: list[str | None] = [None] * n
        store = self._adapters
        base = model.adaptable
        if store is None or base is None:
            return model.score(x), thresholds, adapters
        store.refresh(base)
        by_machine: dict[str, list[int]] = {}
        for i, window in enumerate(windows):
            by_machine.setdefault(window.source.machine, []).append(i)
        plain = [i for m, rows in by_machine.items() if store.adapter_for(base, m) is None for i in rows]
        if len(plain) == n:
            scores = model.score(x)
        else:
            scores = self._score_adapted(model, base, store, by_machine, plain, x, thresholds, adapters)
        if self._auto is not None:
            for machine, rows in by_machine.items():
                if adapters[rows[0]] is None:
                    self._auto.observe(base, machine, x[rows], scores[rows] > model.threshold)
        return scores, thresholds, adapters

    def _score_adapted(
        self,
        model: AnomalyModel,
        base: Adaptable,
        store: AdapterStore,
        by_machine: dict[str, list[int]],
        plain: list[int],
        x: np.ndarray,
        thresholds: np.ndarray,
        adapters: list[str | None],
    ) -> np.ndarray:
        scores = np.empty(len(x), dtype=np.float32)
        if plain:
            scores[plain] = model.score(x[plain])
        for machine, rows in by_machine.items():
            manifest = store.adapter_for(base, machine)
            if manifest is None:
                continue
            try:
                scores[rows] = store.score(base, machine, x[rows])
            except Exception:
                # A broken adapter costs its machine the adaptation, not the batch: the base scores it.
                self._metrics.inc("adapters.errors", model=model.model_id)
                logger.exception("adapter of machine %s failed; scored by the base model", machine)
                scores[rows] = model.score(x[rows])
                continue
            if manifest.threshold is not None:
                thresholds[rows] = manifest.threshold
            name = adapter_id(manifest)
            for i in rows:
                adapters[i] = name
        return scores

    def _explain(
        self,
        model: AnomalyModel,
        names: Sequence[str],
        x: np.ndarray,
        scores: np.ndarray,
        explainable: Sequence[bool],
    ) -> dict[int, tuple[tuple[str, float], ...]]:
        """Top contributing features of the anomalous windows scored by the base model."""
        explainer = model.explainable
        hot = np.flatnonzero((scores > model.threshold) & np.asarray(explainable, dtype=bool))
        if explainer is None or not len(hot) or not self._top_features:
            return {}
        try:
            contributions = np.asarray(explainer.explain(x[hot]), dtype=np.float64)
        except ValueError as exc:
            self._metrics.inc("alerts.unexplained", model=model.model_id)
            logger.debug("no top features for %s: %s", model.model_id, exc)
            return {}
        out: dict[int, tuple[tuple[str, float], ...]] = {}
        for i, row in zip(hot.tolist(), contributions, strict=True):
            top = np.argsort(-row, kind="stable")[: self._top_features]
            out[i] = tuple((names[k], round(float(row[k]), 4)) for k in top)
        return out
