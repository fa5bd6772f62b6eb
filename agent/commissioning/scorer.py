"""Adapter between the pipeline's records and the per-machine commissioning baselines.

The scoring worker owns one ``CommissioningScorer`` (not thread-safe). Each process reading of a matching
sensor becomes one multivariate step in ``channels`` order; while a machine is commissioning no score is
produced; afterwards each step yields a ``Score`` under model id ``commissioning-baseline`` whose version
is a hash of the configuration, so scores of differently configured baselines are never mixed up.

With a ``BaselineStore`` the baselines outlive the process: ``restore`` (before the first step) continues
those of the previous run, and ``snapshot`` hands the caller a document to write off the scoring thread
after each phase change and every ``save_interval_s``. A fitted baseline is replaced only by ``rebaseline``
(an operator's command), never by the agent on its own.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from agent.commissioning.baseline import BaselineBank, CommissioningBaseline, CommissioningConfig
from agent.commissioning.store import BaselineStore, StateRefused
from agent.metrics import Metrics
from agent.records import Reading, Score, Source

logger = logging.getLogger(__name__)

MODEL_ID = "commissioning-baseline"


URGENT_MIN_INTERVAL_S = 1.0
"""Phase changes are saved at most this often (each save writes every machine's baseline)."""


class CommissioningScorer:
    """Scores process readings of the sources it handles with a baseline learned per source."""

    def __init__(
        self,
        config: CommissioningConfig,
        sensors: Sequence[str],
        channels: Sequence[str],
        metrics: Metrics,
        store: BaselineStore | None = None,
        save_interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not channels:
            raise ValueError("commissioning needs at least one channel")
        self._config = config
        self._bank = BaselineBank(config)
        self._sensors = tuple(sensors)
        self._channels = tuple(channels)
        self._metrics = metrics
        self._handled: dict[str, bool] = {}
        self._recipe = {"config": config.to_dict(), "channels": list(self._channels)}
        self.version = hashlib.sha256(json.dumps(self._recipe, sort_keys=True).encode()).hexdigest()[:12]
        self.store = store
        self._save_interval_s = save_interval_s
        self._clock = clock
        self._changed = False  # steps since the last snapshot
        self._urgent = False  # a phase change (or a rebaseline) since the last snapshot: save it soon
        self._last_snapshot = clock() - URGENT_MIN_INTERVAL_S  # the first phase change is saved at once
        for phase in ("commissioning", "monitoring"):
            metrics.set("commissioning.baselines", 0, phase=phase)

    def handles(self, source: Source) -> bool:
        """Whether readings of this source are scored here (called for every reading: cached per sensor)."""
        sensor = source.sensor
        hit = self._handled.get(sensor)
        if hit is None:
            hit = self._handled[sensor] = any(fnmatch.fnmatchcase(sensor, p) for p in self._sensors)
        return hit

    def restore(self) -> int:
        """Continue the baselines of the previous run (before the first step); returns how many.

        A file of another spec or format version is moved aside and reported (error log, counted), and
        every machine commissions anew; a single unusable entry is skipped and counted the same way.
        """
        if self.store is None:
            return 0
        try:
            entries = self.store.load(self.version)
        except StateRefused as exc:
            self._metrics.inc("commissioning.state_errors", reason=exc.reason)
            logger.error(
                "commissioning baselines %s not loaded (%s); moved to %s; every machine commissions anew",
                self.store.path,
                exc,
                exc.aside,
            )
            return 0
        restored = 0
        for entry in entries or []:
            try:
                source = Source(tuple((str(k), str(v)) for k, v in entry["source"]))
                self._bank.put(source, CommissioningBaseline.from_state(entry, self._config))
            except (KeyError, TypeError, ValueError) as exc:
                self._metrics.inc("commissioning.state_errors", reason="invalid_baseline")
                logger.error("a commissioning baseline in %s is unusable and starts anew: %s", self.store.path, exc)
                continue
            restored += 1
        self._count_phases()
        logger.info("restored %d commissioning baseline(s) from %s", restored, self.store.path)
        return restored

    def snapshot(self, force: bool = False) -> dict[str, Any] | None:
        """The document to save now, or ``None`` when nothing is due: a phase change (or a rebaseline) is due
        within ``URGENT_MIN_INTERVAL_S``, other progress every ``save_interval_s``; ``force`` (at stop, and
        before an operator's command is acknowledged) whenever anything changed.

        Phase changes come in crowds (a fleet of new machines at start, machines commissioned together end
        together): saved one by one, every batch of readings rebuilt the whole document."""
        if self.store is None or not (self._changed or self._urgent):
            return None
        now = self._clock()
        since = now - self._last_snapshot
        if not (force or (self._urgent and since >= URGENT_MIN_INTERVAL_S) or since >= self._save_interval_s):
            return None
        self._changed = self._urgent = False
        self._last_snapshot = now
        baselines = [
            {"source": [list(tag) for tag in key.tags], **baseline.to_state()}
            for key, baseline in self._bank.items()
            if isinstance(key, Source)
        ]
        return self.store.document(self.version, self._recipe, baselines)

    def rebaseline(self, machine: str, sensor: str | None = None) -> list[Source]:
        """Discard the baselines of ``machine`` (of one ``sensor`` only if given), on an operator's command:
        their next readings commission them anew. Returns the sources reset (none: nothing known there)."""
        reset = [
            key
            for key, _ in self._bank.items()
            if isinstance(key, Source) and key.machine == machine and sensor in (None, key.sensor)
        ]
        for key in reset:
            self._bank.reset(key)
        if reset:
            self._urgent = True
            self._count_phases()
        return reset

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
        self._changed = True
        after = self.phase(reading.source)
        if after != before:
            # A new machine or the end of its commissioning (the step that completes it is not scored):
            # saved at once, so that a crash neither forgets the machine nor makes it commission again.
            self._urgent = True
            self._count_phases()
            if after == "monitoring":
                baseline = self._bank.get(reading.source)
                assert baseline is not None and baseline.detector is not None
                logger.info(
                    "commissioning of %s done after %d readings: threshold %.4g; scoring starts",
                    reading.source,
                    baseline.steps_seen,
                    baseline.detector.threshold,
                )
        if result is None:
            self._metrics.inc("commissioning.steps", phase="commissioning")
            return None
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

    def _count_phases(self) -> None:
        phases = Counter(baseline.phase for _, baseline in self._bank.items())
        for phase in ("commissioning", "monitoring"):
            self._metrics.set("commissioning.baselines", phases[phase], phase=phase)
