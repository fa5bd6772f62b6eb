"""Per-machine adapters in the live agent: found on disk, verified against the running base, hot-loaded.

Layout: ``{adaptation.dir}/{model_id}/{machine}/adapter.json`` (+ the ``.onnx_adapter`` file it names);
directories whose name starts with ``.`` are ignored, so a writer can stage an adapter there and rename it
into place (``AutoAdapter`` does). ``AdapterStore`` keeps, per anomaly model, one ``MachineAdapters``
built on the version of the model that is running; when the registry swaps in a new version, the
adapters are verified again against it, and those trained for the old base are refused (counted, logged,
and the machine is scored by the base).

Everything here runs on the scoring worker's thread: ``refresh`` rescans at most every
``reload_interval_s`` (or at once after ``invalidate``), ``score`` runs a machine's adapted model.
Machines without an adapter are not touched: the caller scores them with the model itself, unchanged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent.adaptation.adapter import AdapterError, AdapterManifest
from agent.adaptation.runtime import MachineAdapters
from agent.inference.base import Adaptable
from agent.metrics import Metrics

logger = logging.getLogger(__name__)

MANIFEST_FILE = "adapter.json"


@dataclass
class _ModelAdapters:
    version: str
    runtime: MachineAdapters | None  # None: this base cannot carry adapters (reason logged once)
    fingerprints: dict[str, tuple[tuple[int, int], ...]] = field(default_factory=dict)


def adapter_id(manifest: AdapterManifest) -> str:
    """A short, stable name of one adapter: machine and the start of its file's sha256 (``m04@3fa2c1d09b7e``)."""
    return f"{manifest.machine}@{manifest.sha256[:12]}"


class AdapterStore:
    """The adapters of every anomaly model, by machine (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        metrics: Metrics,
        reload_interval_s: float = 10.0,
        threads: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = Path(root)
        self._metrics = metrics
        self._interval = reload_interval_s
        self._threads = threads
        self._clock = clock
        self._models: dict[str, _ModelAdapters] = {}
        self._next_scan: dict[str, float] = {}

    def invalidate(self, model_id: str) -> None:
        """Rescan the model's adapters at the next ``refresh`` (a new adapter was just written)."""
        self._next_scan.pop(model_id, None)

    def refresh(self, model: Adaptable) -> None:
        """Follow the running version of ``model`` and the adapters on disk (cheap when nothing is due)."""
        entry = self._models.get(model.model_id)
        now = self._clock()
        if entry is not None and entry.version == model.version:
            if self._interval <= 0 and model.model_id in self._next_scan:
                return
            if now < self._next_scan.get(model.model_id, -1.0):
                return
        else:
            entry = self._models[model.model_id] = _ModelAdapters(model.version, self._base(model))
        self._next_scan[model.model_id] = now + self._interval
        if entry.runtime is not None:
            self._scan(model, entry)

    def adapter_for(self, model: Adaptable, machine: str) -> AdapterManifest | None:
        entry = self._models.get(model.model_id)
        if entry is None or entry.version != model.version or entry.runtime is None:
            return None
        return entry.runtime.adapter(machine)

    def score(self, model: Adaptable, machine: str, x: np.ndarray) -> np.ndarray:
        """Scores of ``machine``'s feature rows through its adapter (the caller checked ``adapter_for``)."""
        return self.run(model, machine, x, "score").reshape(x.shape[0])

    def run(self, model: Adaptable, machine: str, x: np.ndarray, output: str) -> np.ndarray:
        """One output (``score``, ``probabilities``) of ``machine``'s feature rows through its adapter."""
        entry = self._models[model.model_id]
        assert entry.runtime is not None
        (values,) = entry.runtime.run(machine, x, outputs=[output])
        return np.asarray(values, dtype=np.float32)

    def _base(self, model: Adaptable) -> MachineAdapters | None:
        try:
            runtime = MachineAdapters.from_model_dir(model.directory, standardization=True, threads=self._threads)
        except (AdapterError, ValueError, OSError) as exc:
            self._metrics.inc("adapters.unsupported", model=model.model_id)
            logger.warning("model %s %s cannot carry adapters: %s", model.model_id, model.version, exc)
            return None
        logger.info("adapters for %s %s served from %s", model.model_id, model.version, self.root / model.model_id)
        return runtime

    def _scan(self, model: Adaptable, entry: _ModelAdapters) -> None:
        assert entry.runtime is not None
        folder = self.root / model.model_id
        present: set[str] = set()
        if folder.is_dir():
            for directory in sorted(folder.iterdir()):
                if directory.name.startswith(".") or not (directory / MANIFEST_FILE).is_file():
                    continue
                machine = directory.name
                present.add(machine)
                stamp = _fingerprint(directory)
                if entry.fingerprints.get(machine) == stamp:
                    continue
                entry.fingerprints[machine] = stamp
                self._load(model, entry.runtime, machine, directory)
        for machine in set(entry.runtime.machines()) - present:
            entry.runtime.remove_adapter(machine)
            entry.fingerprints.pop(machine, None)
            logger.info("adapter of machine %s for %s removed (its directory is gone)", machine, model.model_id)
        self._metrics.set("adapters.loaded", len(entry.runtime.machines()), model=model.model_id)

    def _load(self, model: Adaptable, runtime: MachineAdapters, machine: str, directory: Path) -> None:
        try:
            manifest = runtime.add_adapter(machine, directory)
        except (AdapterError, ValueError, OSError) as exc:
            # The machine keeps its previous adapter if it had one (files unchanged => not retried).
            self._metrics.inc("adapters.refused", model=model.model_id)
            logger.error("adapter %s refused: %s", directory, exc)
            return
        self._metrics.inc("adapters.swaps", model=model.model_id)
        logger.info("adapter %s of %s %s active", adapter_id(manifest), model.model_id, model.version)


def _fingerprint(directory: Path) -> tuple[tuple[int, int], ...]:
    """Size and mtime of the adapter's files: a change means a new adapter to verify."""
    out = []
    for path in sorted(directory.iterdir()):
        if path.is_file():
            st = path.stat()
            out.append((st.st_size, st.st_mtime_ns))
    return tuple(out)
