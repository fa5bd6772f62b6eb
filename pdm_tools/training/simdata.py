"""Training and evaluation data for the shipped models, generated with the machine simulator.

Data go through exactly the serving path: simulator signal → ``SampleBlock``/``Reading`` → ``Windower``
→ ``extract_matrix``. Nothing here computes a feature itself.

Machines come from one simulated fleet (``fleet_profile``: nominally identical units with small
differences) and are split by machine, not by time, so validation and test measure what matters in the
field — a machine the model has never seen:

- ``train``: healthy machines the autoencoder is fitted on (and calibrated on, for INT8);
- ``val``: other healthy machines; early stopping and the threshold use them (no labels involved);
- ``test``: yet other machines; healthy, for the false-alarm rate, and with injected faults, for the
  detection rate per fault kind in the model card. Fault data never reach fitting or thresholds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.features.extract import extract_matrix
from agent.features.spec import FeatureSpec
from agent.features.windows import Windower
from agent.metrics import Metrics
from agent.records import NS_PER_S, Reading, SampleBlock, Source, Window
from pdm_tools.simulator.machine import Fault, MachineProfile, SimulatedMachine, fleet_profile

logger = logging.getLogger(__name__)

VIBRATION_SPEC = FeatureSpec(
    kind="vibration",
    window_samples=4096,
    hop_samples=2048,
    channels=("value",),
    band_edges_hz=(0, 50, 100, 200, 500, 1000, 2000, 3000, 4000, 5120),
)
PROCESS_SPEC = FeatureSpec(
    kind="process", window_samples=30, hop_samples=5, channels=("temperature", "current", "pressure")
)
PROCESS_PERIOD_S = 1.0  # the simulator's default publishing period for process values
VIBRATION_FAULTS = ("bearing_outer", "bearing_inner", "bearing_ball", "imbalance")
PROCESS_FAULTS = ("overheating",)
FAULT_SEVERITIES = (0.25, 1.0)
# Many machines with a little data each generalize better to a new machine than few with a lot.
DEFAULT_VIBRATION_MINUTES = 2.5
DEFAULT_PROCESS_MINUTES = 90.0  # the process load varies with periods of 3 to 15 minutes

# Samples per simulated block fed to the Windower: larger than the gateway's 2048 only to go faster;
# the Windower gives the same windows for any block size.
_BLOCK_SAMPLES = 10 * 2048
# Windows are turned into features in batches of this many, so raw windows never pile up in memory.
_FEATURE_BATCH = 512


@dataclass(frozen=True, slots=True)
class DataPlan:
    """How much data to simulate: machines per split and simulated time per machine.

    ``vibration_minutes`` and ``process_minutes`` are per machine and split; fault evaluation simulates
    ``fault_fraction`` of that per test machine, fault kind and severity.
    """

    seed: int
    train_machines: int = 16
    val_machines: int = 4
    test_machines: int = 4
    vibration_minutes: float = DEFAULT_VIBRATION_MINUTES
    process_minutes: float = DEFAULT_PROCESS_MINUTES
    fault_fraction: float = 0.2

    @classmethod
    def quick(cls, seed: int) -> DataPlan:
        """A tiny plan for tests: seconds of vibration, minutes of process data."""
        return cls(
            seed=seed,
            train_machines=3,
            val_machines=1,
            test_machines=1,
            vibration_minutes=0.25,
            process_minutes=20.0,
            fault_fraction=0.5,
        )

    def machines(self, split: str) -> list[MachineProfile]:
        """Profiles of the machines of ``split`` (``train``, ``val`` or ``test``), disjoint by index."""
        counts = {"train": self.train_machines, "val": self.val_machines, "test": self.test_machines}
        first = {"train": 0, "val": self.train_machines, "test": self.train_machines + self.val_machines}
        return [fleet_profile(first[split] + i, self.seed) for i in range(counts[split])]


@dataclass(frozen=True, slots=True)
class Dataset:
    """Feature rows (float32 ``(n, F)``) of one model, by split; ``faults`` maps ``kind@severity`` to rows."""

    spec: FeatureSpec
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    faults: dict[str, np.ndarray]
    description: dict[str, Any] = field(default_factory=dict)


def vibration_dataset(plan: DataPlan, faults: bool = True) -> Dataset:
    """Vibration feature rows for the ``vibration-anomaly`` model."""
    seconds = plan.vibration_minutes * 60

    def rows(profiles: list[MachineProfile], duration_s: float, fault: tuple[str, float] | None = None) -> np.ndarray:
        return np.concatenate(
            [vibration_rows(_machine(p, plan.seed, fault), duration_s, VIBRATION_SPEC) for p in profiles]
        )

    return _dataset(plan, VIBRATION_SPEC, rows, seconds, VIBRATION_FAULTS if faults else (), "vibration")


def process_dataset(plan: DataPlan, faults: bool = True) -> Dataset:
    """Process feature rows for the ``process-anomaly`` model."""
    seconds = plan.process_minutes * 60

    def rows(profiles: list[MachineProfile], duration_s: float, fault: tuple[str, float] | None = None) -> np.ndarray:
        return np.concatenate([process_rows(_machine(p, plan.seed, fault), duration_s, PROCESS_SPEC) for p in profiles])

    return _dataset(plan, PROCESS_SPEC, rows, seconds, PROCESS_FAULTS if faults else (), "process")


def _dataset(
    plan: DataPlan, spec: FeatureSpec, rows: Any, seconds: float, kinds: tuple[str, ...], sensor: str
) -> Dataset:
    train = rows(plan.machines("train"), seconds)
    val = rows(plan.machines("val"), seconds)
    test = rows(plan.machines("test"), seconds)
    fault_rows = {
        f"{kind}@{severity:g}": rows(plan.machines("test"), seconds * plan.fault_fraction, (kind, severity))
        for kind in kinds
        for severity in FAULT_SEVERITIES
    }
    names = {split: [p.name for p in plan.machines(split)] for split in ("train", "val", "test")}
    description = {
        "source": "pdm_tools.simulator (SimulatedMachine), fleet_profile machines, healthy unless stated",
        "simulator_seed": plan.seed,
        "sensor": sensor,
        "minutes_per_machine": plan.vibration_minutes if sensor == "vibration" else plan.process_minutes,
        "machines": names,
        "windows": {"train": len(train), "val": len(val), "test": len(test)},
        "fault_evaluation": {
            "machines": names["test"],
            "minutes_per_machine": round(seconds * plan.fault_fraction / 60, 3),
            "kinds": list(kinds),
            "severities": list(FAULT_SEVERITIES),
            "onset": "full severity from the first window (ramp_s = 0)",
        },
        "splits": "by machine: train fits the model and calibrates INT8; val (other machines) stops "
        "training and sets the threshold; test (other machines again) measures false alarms and detection",
    }
    logger.info("%s data: %s windows", sensor, description["windows"])
    return Dataset(spec, train, val, test, fault_rows, description)


def _machine(profile: MachineProfile, seed: int, fault: tuple[str, float] | None) -> SimulatedMachine:
    faults = () if fault is None else (Fault(profile.name, fault[0], 0.0, severity=fault[1], ramp_s=0.0),)
    return SimulatedMachine(profile, faults, seed)


def _source(machine: SimulatedMachine, sensor: str) -> Source:
    return Source.of(site="sim", line="training", machine=machine.profile.name, sensor=sensor)


def vibration_rows(machine: SimulatedMachine, duration_s: float, spec: FeatureSpec) -> np.ndarray:
    """Feature rows of every complete vibration window in ``[0, duration_s)`` of ``machine``."""
    source = _source(machine, "vibration")
    rate = machine.profile.rate_hz
    total = int(duration_s * rate)

    def blocks() -> Iterator[SampleBlock]:
        for start in range(0, total, _BLOCK_SAMPLES):
            n = min(_BLOCK_SAMPLES, total - start)
            samples = machine.vibration(start / rate, n)
            yield SampleBlock(source, round(start * NS_PER_S / rate), rate, samples)

    return _features(spec, blocks())


def process_rows(machine: SimulatedMachine, duration_s: float, spec: FeatureSpec) -> np.ndarray:
    """Feature rows of every complete process window in ``[0, duration_s)`` of ``machine``."""
    source = _source(machine, "process")

    def readings() -> Iterator[Reading]:
        for k in range(int(duration_s / PROCESS_PERIOD_S)):
            t_s = k * PROCESS_PERIOD_S
            values = machine.process(t_s)
            if values is not None:
                yield Reading(source, round(t_s * NS_PER_S), values)

    return _features(spec, readings())


def _features(spec: FeatureSpec, items: Iterator[Reading | SampleBlock]) -> np.ndarray:
    metrics = Metrics()
    windower = Windower(lambda _source: spec, metrics)
    pending: list[Window] = []
    out: list[np.ndarray] = []
    for item in items:
        pending.extend(windower.add(item))
        if len(pending) >= _FEATURE_BATCH:
            out.append(extract_matrix(spec, pending))
            pending = []
    if pending:
        out.append(extract_matrix(spec, pending))
    skipped = metrics.get("windows.skipped") + metrics.get("windows.gaps")
    if skipped:  # the simulator's stream is contiguous; anything else is a bug worth stopping for
        raise RuntimeError(f"windowing dropped simulated data: {metrics.snapshot()}")
    return np.concatenate(out) if out else np.empty((0, spec.n_features), dtype=np.float32)
