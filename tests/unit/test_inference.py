"""The ONNX adapter: verified at construction, strict about its input, and right about healthy vs faulty."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from agent.inference.manifest import MANIFEST_FILE, ModelError
from agent.inference.model import OnnxAnomalyModel
from pdm_tools.simulator.machine import Fault, SimulatedMachine, fleet_profile
from pdm_tools.training.simdata import PROCESS_SPEC, VIBRATION_SPEC, process_rows, vibration_rows

REPO = Path(__file__).resolve().parents[2]
VIBRATION_DIR = REPO / "models" / "vibration_anomaly"
PROCESS_DIR = REPO / "models" / "process_anomaly"

# A machine of another simulated fleet than the one the shipped models were trained on (seed 42):
# seed 0 is the simulator's default, i.e. the demo's m01.
UNSEEN_SEED = 0


@pytest.fixture(scope="module")
def vibration_model() -> OnnxAnomalyModel:
    return OnnxAnomalyModel.load(VIBRATION_DIR)


@pytest.fixture(scope="module")
def process_model() -> OnnxAnomalyModel:
    return OnnxAnomalyModel.load(PROCESS_DIR)


def _machine(fault: str | None = None) -> SimulatedMachine:
    profile = fleet_profile(0, UNSEEN_SEED)
    faults = [] if fault is None else [Fault(profile.name, fault, 0.0, ramp_s=0.0)]
    return SimulatedMachine(profile, faults, seed=UNSEEN_SEED)


def test_shipped_models_have_the_shipped_specs(
    vibration_model: OnnxAnomalyModel, process_model: OnnxAnomalyModel
) -> None:
    assert vibration_model.spec == VIBRATION_SPEC
    assert process_model.spec == PROCESS_SPEC
    assert vibration_model.model_id == "vibration-anomaly"
    assert process_model.model_id == "process-anomaly"


def test_healthy_vibration_of_an_unseen_machine_scores_below_threshold(
    vibration_model: OnnxAnomalyModel,
) -> None:
    scores = vibration_model.score(vibration_rows(_machine(), 10.0, vibration_model.spec))
    assert scores.dtype == np.float32 and len(scores) == 49
    assert scores.max() < vibration_model.threshold


def test_bearing_fault_vibration_scores_above_threshold(vibration_model: OnnxAnomalyModel) -> None:
    scores = vibration_model.score(vibration_rows(_machine("bearing_outer"), 2.0, vibration_model.spec))
    assert (scores > vibration_model.threshold).all()


def test_healthy_process_values_of_an_unseen_machine_score_below_threshold(
    process_model: OnnxAnomalyModel,
) -> None:
    scores = process_model.score(process_rows(_machine(), 600.0, process_model.spec))
    assert len(scores) == 115
    assert scores.max() < process_model.threshold


def test_overheating_scores_above_threshold(process_model: OnnxAnomalyModel) -> None:
    scores = process_model.score(process_rows(_machine("overheating"), 120.0, process_model.spec))
    assert (scores > process_model.threshold).all()


def test_scores_do_not_depend_on_batching(process_model: OnnxAnomalyModel) -> None:
    x = process_rows(_machine(), 300.0, process_model.spec)
    one_by_one = np.concatenate([process_model.score(x[i : i + 1]) for i in range(len(x))])
    np.testing.assert_allclose(one_by_one, process_model.score(x), rtol=1e-6)


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (np.zeros((2, 18), dtype=np.float64), "must be float32, got float64"),
        (np.zeros((2, 17), dtype=np.float32), r"shape \(n, 18\).*got \(2, 17\)"),
        (np.zeros(18, dtype=np.float32), r"shape \(n, 18\)"),
        ([[0.0] * 18], "must be a numpy array"),
    ],
)
def test_score_rejects_wrong_input(process_model: OnnxAnomalyModel, x: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        process_model.score(x)  # type: ignore[arg-type]


def test_score_rejects_non_finite_features(process_model: OnnxAnomalyModel) -> None:
    x = np.ones((3, 18), dtype=np.float32)
    x[1, 4] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity in 1 of 3 rows"):
        process_model.score(x)


def test_score_of_an_empty_batch_is_empty(process_model: OnnxAnomalyModel) -> None:
    assert process_model.score(np.empty((0, 18), dtype=np.float32)).shape == (0,)


def test_construction_refuses_a_graph_that_does_not_match_the_manifest(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    shutil.copytree(PROCESS_DIR, model_dir)
    path = model_dir / MANIFEST_FILE
    data = json.loads(path.read_text())
    data["inputs"][0]["name"] = "x"
    path.write_text(json.dumps(data))
    with pytest.raises(ModelError, match=r"graph inputs \['features'\] do not match the manifest's \['x'\]"):
        OnnxAnomalyModel.load(model_dir)


def test_threads_must_be_positive() -> None:
    with pytest.raises(ValueError, match="threads"):
        OnnxAnomalyModel.load(PROCESS_DIR, threads=0)
