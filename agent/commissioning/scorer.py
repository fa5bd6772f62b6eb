"""Adapter between the pipeline's records and the per-machine commissioning baselines.

The scoring worker owns one ``CommissioningScorer`` (not thread-safe). Each process reading of a matching
sensor becomes one multivariate step in ``channels`` order; while a machine is commissioning no score is
produced; afterwards each step yields a ``Score`` under model id ``commissioning-baseline`` whose version
is a hash of the configuration, so scores of differently configured baselines are never mixed up.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
from collections.abc import Sequence

import numpy as np

from agent.commissioning.baseline import BaselineBank, CommissioningConfig
from agent.metrics import Metrics
from agent.records import Reading, Score, Source

logger = logging.getLogger(__name__)

MODEL_ID = "commissioning-baseline"


class CommissioningScorer:
    """Scores process readings of the sources it handles with a baseline learned per source."""

    def __init__(
        self, config: CommissioningConfig, sensors: Sequence[str], channels: Sequence[str], metrics: Metrics
    ) -> None:
        if not channels:
            raise ValueError("commissioning needs at least one channel")
        self._bank = BaselineBank(config)
        self._sensors = tuple(sensors)
        self._channels = tuple(channels)
        self._metrics = metrics
        self._handled: dict[str, bool] = {}
        recipe = {"config": config.to_dict(), "channels": list(self._channels)}
        self.version = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]

    def handles(self, source: Source) -> bool:
        """Whether readings of this source are scored here (called for every reading: cached per sensor)."""
        sensor = source.sensor
        hit = self._handled.get(sensor)
        if hit is None:
            hit = self._handled[sensor] = any(fnmatch.fnmatchcase(sensor, p) for p in self._sensors)
        return hit

    def phase(self, source: Source) -> str | None:
        baseline = self._bank.get(source)
        return None if baseline is None else baseline.phase

    def score(self, reading: Reading) -> Score | None:
        """The reading's score, or None while its machine is commissioning (or the reading is unusable, counted)."""
        try:
            step = np.array([reading.fields[c] for c in self._channels], dtype=np.float64)
        except KeyError as exc:
            self._metrics.inc("commissioning.skipped", reason="missing_channel")
            logger.debug("reading of %s lacks channel %s", reading.source, exc)
            return None
        before = self.phase(reading.source)
        try:
            result = self._bank.update(reading.source, step, reading.time_ns)
        except ValueError as exc:
            self._metrics.inc("commissioning.skipped", reason="invalid_step")
            logger.warning("commissioning step of %s refused: %s", reading.source, exc)
            return None
        if result is None:
            self._metrics.inc("commissioning.steps", phase="commissioning")
            return None
        if before != "monitoring":
            logger.info("commissioning of %s done: threshold %.4g; scoring starts", reading.source, result.threshold)
        self._metrics.inc("commissioning.steps", phase="monitoring")
        return Score(
            source=reading.source,
            start_ns=reading.time_ns,
            end_ns=reading.time_ns,
            model_id=MODEL_ID,
            model_version=self.version,
            score=result.score,
            threshold=result.threshold,
        )
