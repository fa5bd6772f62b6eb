"""Training pipeline: export fidelity, quantization, threshold rule and reproducible builds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from agent.inference.manifest import Manifest, sha256_file
from agent.inference.model import OnnxAnomalyModel
from pdm_tools.common.graph_names import NORMALIZE_NODES, SCORE_NODES
from pdm_tools.common.threshold import threshold_from_scores
from pdm_tools.models.autoencoder import AutoencoderConfig, fit_autoencoder
from pdm_tools.models.export import build_onnx, export_onnx
from pdm_tools.quantization import static as q
from pdm_tools.simulator.machine import SimulatedMachine, fleet_profile
from pdm_tools.training import cli
from pdm_tools.training.simdata import VIBRATION_SPEC, vibration_rows
from pdm_tools.training.train import FP32_FILE, INT8_FILE


def _features(n: int, f: int = 12, seed: int = 0) -> np.ndarray:
    """Correlated, offset, differently scaled rows: a low-rank structure an autoencoder can learn."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).normal(size=(3, f))
    x = rng.normal(size=(n, 3)) @ mixing + 0.1 * rng.normal(size=(n, f))
    return (x * np.linspace(0.5, 20, f) + np.linspace(-5, 100, f)).astype(np.float32)


@pytest.fixture(scope="module")
def fitted() -> Any:
    return fit_autoencoder(_features(600), _features(200, seed=1), seed=3, config=AutoencoderConfig(max_epochs=40))


def test_fit_is_deterministic_for_a_seed(fitted: Any) -> None:
    again, _ = fit_autoencoder(_features(600), _features(200, seed=1), seed=3, config=AutoencoderConfig(max_epochs=40))
    model, _ = fitted
    for a, b in zip(model.weights + model.biases, again.weights + again.biases, strict=True):
        np.testing.assert_array_equal(a, b)


def test_fit_learns_the_structure_of_normal_rows(fitted: Any) -> None:
    model, report = fitted
    assert report.val_loss < 0.3  # standardized units: 1.0 would be "learned nothing"
    shifted = _features(50, seed=2)
    shifted[:, 0] += 10 * model.scale[0]
    assert np.median(model.score(shifted)) > 10 * np.median(model.score(_features(50, seed=2)))


def test_exported_graph_matches_numpy_and_keeps_matmul_add_separate(fitted: Any, tmp_path: Path) -> None:
    model, _ = fitted
    proto = build_onnx(model)
    ops = [n.op_type for n in proto.graph.node]
    assert "Gemm" not in ops and ops.count("MatMul") == ops.count("Add") == 4
    assert {n.domain for n in proto.graph.node} == {""}  # no ai.onnx.ml Scaler
    path = export_onnx(model, tmp_path / "m.onnx")
    x = _features(300, seed=5)
    np.testing.assert_allclose(q.run_scores(q.session(path), x), model.score(x), rtol=1e-5, atol=1e-5)


def test_int8_scores_track_fp32_scores(fitted: Any, tmp_path: Path) -> None:
    model, _ = fitted
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    export_onnx(model, fp32)
    recipe = q.quantize(fp32, int8, _features(600), q.QuantizeConfig())
    assert recipe["calibration_samples"] == 600 and recipe["reduce_range"] is True
    x = _features(300, seed=6)
    a, b = q.run_scores(q.session(fp32), x), q.run_scores(q.session(int8), x)
    threshold = threshold_from_scores(a)
    assert np.max(np.abs(a - b)) < 0.5 * threshold
    assert np.corrcoef(a, b)[0, 1] > 0.5


def test_int8_score_is_computed_in_float_from_the_unquantized_input(fitted: Any, tmp_path: Path) -> None:
    model, _ = fitted
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    export_onnx(model, fp32)
    q.quantize(fp32, int8, _features(600), q.QuantizeConfig())
    proto = onnx.load(str(int8))
    producers = {out: n for n in proto.graph.node for out in n.output}
    for node in proto.graph.node:
        if node.name in (*NORMALIZE_NODES, *SCORE_NODES):
            assert all(producers[i].op_type != "DequantizeLinear" for i in node.input if i in producers), node.name
    # Far outside the calibrated range the first layer saturates; the score must not hide that.
    x = _features(20, seed=7)
    x[:, 2] += 50 * model.scale[2]
    a, b = q.run_scores(q.session(fp32), x), q.run_scores(q.session(int8), x)
    assert (b > 0.5 * a).all()


def test_percentile_calibration_runs(fitted: Any, tmp_path: Path) -> None:
    model, _ = fitted
    export_onnx(model, tmp_path / "fp32.onnx")
    recipe = q.quantize(
        tmp_path / "fp32.onnx",
        tmp_path / "int8.onnx",
        _features(300),
        q.QuantizeConfig(calibration="percentile"),
    )
    assert recipe["calibration_method"].startswith("percentile")


def test_threshold_extrapolates_the_healthy_tail_to_a_tiny_false_alarm_rate() -> None:
    rng = np.random.default_rng(0)
    healthy = rng.exponential(1.0, 5000)  # P(score > t) = exp(-t): 1e-8 at t = 18.4
    assert threshold_from_scores(healthy) == pytest.approx(np.log(1e8), rel=0.1)


def test_threshold_is_never_below_one_and_a_half_times_the_largest_healthy_score() -> None:
    assert threshold_from_scores(np.linspace(0.0, 4.0, 1001)) == pytest.approx(6.0)  # a thin, bounded tail
    with pytest.raises(ValueError, match="finite"):
        threshold_from_scores(np.array([1.0, np.nan]))


def test_vibration_rows_come_from_the_windower() -> None:
    machine = SimulatedMachine(fleet_profile(0, 1), seed=1)
    rows = vibration_rows(machine, 1.0, VIBRATION_SPEC)  # 10240 samples: windows at 0, 2048, 4096, 6144
    assert rows.shape == (4, VIBRATION_SPEC.n_features) and rows.dtype == np.float32


def _train(out: Path, *extra: str) -> int:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.main(parser.parse_args(["--quick", "--out", str(out), *extra]))


def _without_measurements(manifest: dict[str, Any]) -> dict[str, Any]:
    """Everything but the latencies (and the gate verdicts and ship reason that quote them): those are timings."""
    quant = {k: v for k, v in manifest["quantization"].items() if k not in ("latency", "gate", "ship_reason")}
    return {**manifest, "quantization": quant}


def test_quick_training_is_reproducible_and_loads(tmp_path: Path) -> None:
    args = ("--model", "vibration-anomaly", "--ship", "int8")
    assert _train(tmp_path / "a", *args) == 0
    assert _train(tmp_path / "b", *args) == 0
    a, b = tmp_path / "a" / "vibration_anomaly", tmp_path / "b" / "vibration_anomaly"
    for name in (FP32_FILE, INT8_FILE):
        assert sha256_file(a / name) == sha256_file(b / name)
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert _without_measurements(ma) == _without_measurements(mb)
    manifest = Manifest.load(a)
    assert manifest.file == INT8_FILE and manifest.quantization["shipped"] == "int8"
    assert manifest.created_by.startswith("pdm-agent train --seed 42 --quick")
    assert set(manifest.metrics["detection_rate"]) >= {"bearing_outer@1", "bearing_inner@1", "imbalance@1"}
    model = OnnxAnomalyModel(manifest, a)
    healthy = vibration_rows(SimulatedMachine(fleet_profile(0, 5), seed=5), 1.0, VIBRATION_SPEC)
    assert model.score(healthy).shape == (4,)
    card = (a / "MODEL_CARD.md").read_text()
    assert "## Known limits" in card
    for figure in ("scores.png", "roc.png", "int8_vs_fp32.png"):  # drawn beside the model, linked, reproducible
        assert f"](figures/{figure})" in card
        assert (a / "figures" / figure).read_bytes() == (b / "figures" / figure).read_bytes()
        assert (a / "figures" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_refuses_non_positive_minutes(tmp_path: Path) -> None:
    assert _train(tmp_path, "--minutes", "0") == 2
