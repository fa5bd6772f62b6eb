"""Per-machine adapters in the agent: found on disk, verified against the base, trained automatically."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from agent.adaptation.adapt import adapt_machine
from agent.adaptation.auto import AutoAdapter
from agent.adaptation.lora import LoraConfig
from agent.adaptation.serving import AdapterStore, adapter_id
from agent.inference.model import OnnxAnomalyModel
from agent.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
FAST = LoraConfig(max_epochs=60, patience=10)


@pytest.fixture(scope="module")
def model() -> OnnxAnomalyModel:
    return OnnxAnomalyModel.load(REPO / "models/vibration_anomaly")


def _machine_rows(model: OnnxAnomalyModel, n: int, shift: float, seed: int) -> np.ndarray:
    """Feature rows of a machine whose normal sits ``shift`` standard deviations off the fleet's on some features."""
    graph = onnx.load(str(model.directory / model.manifest.file)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    mean = inits[next(n for n in graph.node if n.name == "normalize_sub").input[1]]
    scale = inits[next(n for n in graph.node if n.name == "normalize_div").input[1]]
    offset = np.zeros_like(mean)
    offset[::3] = shift
    rng = np.random.default_rng(seed)
    return (mean + scale * (offset + 0.2 * rng.standard_normal((n, mean.size)))).astype(np.float32)


def test_store_serves_a_verified_adapter_and_leaves_other_machines_on_the_base(model, tmp_path: Path):
    metrics = Metrics()
    store = AdapterStore(tmp_path, metrics, reload_interval_s=0)
    store.refresh(model)
    assert store.adapter_for(model, "m04") is None
    rows = _machine_rows(model, 200, shift=4.0, seed=1)
    assert (model.score(rows) > model.threshold).mean() > 0.9  # the fleet model flags this healthy machine

    manifest = adapt_machine(model.directory, "m04", rows, tmp_path / model.model_id / "m04", config=FAST)
    (tmp_path / model.model_id / ".m05.staging").mkdir()  # staging folders are ignored
    store.refresh(model)
    assert store.adapter_for(model, "m04") is None  # reload_interval_s 0: only rescanned when told
    store.invalidate(model.model_id)
    store.refresh(model)
    served = store.adapter_for(model, "m04")
    assert served is not None and adapter_id(served) == f"m04@{manifest.sha256[:12]}"
    later = _machine_rows(model, 100, shift=4.0, seed=2)
    assert served.threshold is not None
    assert (store.score(model, "m04", later) > served.threshold).mean() < 0.05
    assert store.adapter_for(model, "m01") is None
    assert metrics.get("adapters.loaded", model=model.model_id) == 1

    # Removing the directory removes the adapter at the next scan.
    shutil.rmtree(tmp_path / model.model_id / "m04")
    store.invalidate(model.model_id)
    store.refresh(model)
    assert store.adapter_for(model, "m04") is None


def test_an_adapter_of_another_base_is_refused_and_counted(model, tmp_path: Path):
    other = OnnxAnomalyModel.load(REPO / "models/process_anomaly")
    rows = _machine_rows(model, 100, shift=2.0, seed=3)
    adapt_machine(model.directory, "m04", rows, tmp_path / other.model_id / "m04", config=FAST)
    metrics = Metrics()
    store = AdapterStore(tmp_path, metrics, reload_interval_s=0)
    store.refresh(other)
    assert store.adapter_for(other, "m04") is None
    assert metrics.get("adapters.refused", model=other.model_id) == 1
    store.invalidate(other.model_id)
    store.refresh(other)  # unchanged files: not retried
    assert metrics.get("adapters.refused", model=other.model_id) == 1


def test_auto_adapter_trains_machines_the_base_does_not_fit_and_skips_the_others(model, tmp_path: Path):
    metrics = Metrics()
    store = AdapterStore(tmp_path, metrics, reload_interval_s=0)
    store.refresh(model)
    auto = AutoAdapter(store, metrics, windows=120, min_anomalous_fraction=0.1, config=FAST)
    auto.start()
    try:
        for machine, shift in (("m01", 0.0), ("m04", 4.0)):
            rows = _machine_rows(model, 150, shift=shift, seed=4)
            for chunk in np.array_split(rows, 5):
                auto.observe(model, machine, chunk, model.score(chunk) > model.threshold)
        deadline = time.monotonic() + 60
        while metrics.get("adapters.trained", model=model.model_id) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        auto.stop(60)
    assert metrics.get("adapters.trained", model=model.model_id) == 1
    assert metrics.get("adapters.not_needed", model=model.model_id) == 1
    assert sorted(p.name for p in (tmp_path / model.model_id).iterdir()) == ["m04"]  # staging renamed away
    store.refresh(model)
    assert store.adapter_for(model, "m04") is not None and store.adapter_for(model, "m01") is None


def test_auto_adapter_needs_enough_windows_for_a_held_out_slice(tmp_path: Path):
    with pytest.raises(ValueError, match="windows"):
        AutoAdapter(AdapterStore(tmp_path, Metrics()), Metrics(), windows=10)


def test_an_adapter_of_one_layer_at_another_rank_runs_on_the_shared_session(model, tmp_path: Path):
    # Regression: one symbolic rank for every layer made ONNX Runtime reuse a rank-1 buffer for a rank-2 branch.
    rows = _machine_rows(model, 100, shift=3.0, seed=5)
    config = LoraConfig(rank=2, alpha=4.0, layers=("layer1_matmul",), max_epochs=20)
    adapt_machine(model.directory, "m04", rows, tmp_path / model.model_id / "m04", config=config)
    store = AdapterStore(tmp_path, Metrics(), reload_interval_s=0)
    store.refresh(model)
    assert store.adapter_for(model, "m04") is not None
    assert store.score(model, "m04", rows).shape == (100,)


def _vibration_windows(machine: str, n: int) -> list:
    from agent.records import Source, Window
    from pdm_tools.simulator.machine import SimulatedMachine, fleet_profile

    profile = fleet_profile(0, seed=42)
    signal = SimulatedMachine(profile, seed=1).vibration(0.0, 4096 * n).astype(np.float64)
    source = Source.of(machine=machine, sensor="vibration")
    times = np.arange(4096) / profile.rate_hz
    return [
        Window(
            source, "vibration", i, i + 1, ("value",), signal[None, i * 4096 : (i + 1) * 4096], times, profile.rate_hz
        )
        for i in range(n)
    ], profile.rpm


def test_the_defect_stage_classifies_an_adapted_machine_through_its_adapter(tmp_path: Path):
    from agent.features.bearing import extract_bearing_matrix
    from agent.inference.classifier import OnnxDefectClassifier
    from agent.runtime.defect import DefectStage, ShaftSpeeds

    classifier = OnnxDefectClassifier.load(REPO / "models/defect_classifier")
    windows, rpm = _vibration_windows("m04", 60)
    x = extract_bearing_matrix(classifier.spec, windows, rpm)
    # A technician "confirmed" these healthy-looking windows as ball defects: the adapter must say so for m04.
    ball = classifier.class_names.index("ball")
    adapt_machine(classifier.directory, "m04", x, tmp_path / classifier.model_id / "m04", y=np.full(len(x), ball))
    stage = DefectStage(classifier, ("vibration*",), ShaftSpeeds("rpm", rpm))
    others, _ = _vibration_windows("m01", 10)
    store = AdapterStore(tmp_path, Metrics(), reload_interval_s=0)
    predictions = stage._predict(others + windows[:10], [rpm] * 20, store)
    base = classifier.classify(others, rpm)
    assert [p.class_name for p in predictions[:10]] == [p.class_name for p in base]
    assert all(np.array_equal(p.probabilities, q.probabilities) for p, q in zip(predictions[:10], base, strict=True))
    assert [p.class_name for p in predictions[10:]] == ["ball"] * 10


def test_a_failing_adapter_costs_its_machine_the_adaptation_not_the_batch(model, tmp_path: Path):
    from agent.runtime.batch import BatchScorer

    class BrokenStore(AdapterStore):
        def score(self, model, machine, x):  # type: ignore[no-untyped-def]
            raise RuntimeError("ONNX Runtime failure")

    rows = _machine_rows(model, 60, shift=4.0, seed=6)
    adapt_machine(model.directory, "m04", rows, tmp_path / model.model_id / "m04", config=FAST)
    metrics = Metrics()
    worker = BatchScorer(metrics, adapters=BrokenStore(tmp_path, metrics, reload_interval_s=0))
    windows = [type("W", (), {"source": type("S", (), {"machine": m})()})() for m in ["m01"] * 3 + ["m04"] * 3]
    scores, thresholds, adapters = worker._run_model(model, windows, rows[:6])  # type: ignore[arg-type]
    assert np.array_equal(scores, model.score(rows[:6]))
    assert list(thresholds) == [model.threshold] * 6 and adapters == [None] * 6
    assert metrics.get("adapters.errors", model=model.model_id) == 1
