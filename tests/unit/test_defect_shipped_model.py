"""The shipped defect classifier: its manifest verifies, and it names the simulator's bearing faults.

The simulator's bearing defects follow the CWRU bearing's geometry (``pdm_tools.simulator.machine``) but ring
another resonance at another sampling rate (10240 Hz) and speed, so this checks that the model, trained on
CWRU only, is usable on the windows the agent will actually give it when the anomaly model fires.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from agent.inference.classifier import OnnxDefectClassifier
from agent.records import Source, Window
from pdm_tools.simulator.machine import Fault, SimulatedMachine, fleet_profile

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "defect_classifier"
EXPECTED = {None: "normal", "bearing_outer": "outer_race", "bearing_inner": "inner_race", "bearing_ball": "ball"}


@pytest.fixture(scope="module")
def model() -> OnnxDefectClassifier:
    return OnnxDefectClassifier.load(MODEL_DIR)


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_shipped_classifier_names_the_simulated_bearing_fault(model: OnnxDefectClassifier, kind: str | None) -> None:
    profile = fleet_profile(1, seed=5)
    faults = [Fault(machine=profile.name, kind=kind, start_s=0.0, ramp_s=0.0)] if kind else []
    machine = SimulatedMachine(profile, faults, seed=5)
    n = model.spec.window_samples
    windows = [
        Window(
            source=Source.of(machine=profile.name, sensor="vibration"),
            kind="vibration",
            start_ns=0,
            end_ns=1,
            channels=model.spec.channels,
            data=np.asarray(machine.vibration(2.0 + 0.5 * k, n), dtype=np.float64)[None],
            times_s=np.arange(n) / profile.rate_hz,
            rate_hz=profile.rate_hz,
        )
        for k in range(10)
    ]
    votes = Counter(p.class_name for p in model.classify(windows, profile.rpm))
    assert votes.most_common(1)[0][0] == EXPECTED[kind], votes
