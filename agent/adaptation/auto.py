"""Automatic adaptation at the end of a machine's commissioning period (``adaptation.auto``).

For every (anomaly model, machine) without an adapter, the scoring worker hands over the feature rows of
the machine's first windows — its commissioning period, assumed normal, the same assumption as the
commissioning baseline. Once ``windows`` rows are collected, the machine is adapted if the base flagged at
least ``min_anomalous_fraction`` of them (0 = always), on a background thread (seconds, numpy), into a
staging directory that is then renamed into ``{dir}/{model_id}/{machine}``; the ``AdapterStore`` picks it
up at its next refresh. A failure is logged and counted; the machine stays on the base model.

Rows collected before a restart are not kept: a machine that had not finished commissioning starts over.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.adaptation.adapt import adapt_machine
from agent.adaptation.lora import LoraConfig
from agent.adaptation.serving import AdapterStore
from agent.inference.base import Adaptable
from agent.metrics import Metrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Job:
    model_id: str
    version: str
    model_dir: Path
    machine: str
    rows: np.ndarray


class AutoAdapter:
    """Collects commissioning rows per (model, machine) and trains their adapters on its own thread."""

    def __init__(
        self,
        store: AdapterStore,
        metrics: Metrics,
        windows: int = 400,
        min_anomalous_fraction: float = 0.0,
        config: LoraConfig | None = None,
        models: tuple[str, ...] = (),
    ) -> None:
        if windows < 20:
            raise ValueError(f"windows must be >= 20 (a held-out slice is needed), got {windows}")
        self._store = store
        self._metrics = metrics
        self._windows = windows
        self._min_fraction = min_anomalous_fraction
        self._config = config or LoraConfig()
        self._models = models
        self._rows: dict[tuple[str, str], list[np.ndarray]] = {}
        self._flags: dict[tuple[str, str], int] = {}
        self._done: set[tuple[str, str, str]] = set()  # (model id, version, machine): decided, not collecting
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="adaptation", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float) -> None:
        self._jobs.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def observe(self, model: Adaptable, machine: str, rows: np.ndarray, anomalous: np.ndarray) -> None:
        """Commissioning rows of a machine that has no adapter for ``model`` (called from the scoring thread)."""
        if self._models and model.model_id not in self._models:
            return
        if (model.model_id, model.version, machine) in self._done:
            return
        key = (model.model_id, machine)
        collected = self._rows.setdefault(key, [])
        collected.append(np.asarray(rows, dtype=np.float32))
        self._flags[key] = self._flags.get(key, 0) + int(np.count_nonzero(anomalous))
        n = sum(len(r) for r in collected)
        if n < self._windows:
            return
        x = np.concatenate(collected)[: self._windows]
        fraction = self._flags.pop(key) / n
        del self._rows[key]
        self._done.add((model.model_id, model.version, machine))
        if fraction < self._min_fraction:
            self._metrics.inc("adapters.not_needed", model=model.model_id)
            logger.info(
                "machine %s: %.1f %% of %d commissioning windows over %s's threshold; no adapter needed",
                machine,
                100 * fraction,
                n,
                model.model_id,
            )
            return
        logger.info(
            "machine %s: adapting %s %s on %d commissioning windows (%.1f %% flagged by the base)",
            machine,
            model.model_id,
            model.version,
            len(x),
            100 * fraction,
        )
        self._jobs.put(_Job(model.model_id, model.version, model.directory, machine, x))

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._train(job)
            except Exception:
                self._metrics.inc("adapters.training_failures", model=job.model_id)
                logger.exception("adapting %s to machine %s failed; it stays on the base", job.model_id, job.machine)

    def _train(self, job: _Job) -> None:
        folder = self._store.root / job.model_id
        folder.mkdir(parents=True, exist_ok=True)
        staging = folder / f".{job.machine}.{uuid.uuid4().hex[:8]}"
        manifest = adapt_machine(
            job.model_dir,
            job.machine,
            job.rows,
            staging,
            config=self._config,
            description=f"automatic: first {len(job.rows)} windows of machine {job.machine} (commissioning)",
        )
        target = folder / job.machine
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        self._metrics.inc("adapters.trained", model=job.model_id)
        self._store.invalidate(job.model_id)
        logger.info(
            "adapter for machine %s of %s trained in %.1f s; held-out loss %s -> %s, threshold %s",
            job.machine,
            job.model_id,
            manifest.training.get("seconds", float("nan")),
            manifest.metrics["before"].get("held_out_loss"),
            manifest.metrics["after"].get("held_out_loss"),
            manifest.threshold,
        )
