"""Defect classifier graph: the ONNX outputs equal the numpy MLP; INT8 keeps the layout and the classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from pdm_tools.models.defect_mlp import (
    INPUT_NAME,
    LABEL,
    PROBABILITIES,
    MlpConfig,
    build_onnx,
    export_onnx,
    fit_mlp,
)
from pdm_tools.quantization import static as q
from pdm_tools.quantization.static import compare_probabilities, quantize_classifier, run_classifier

CLASSES = ("normal", "inner_race", "outer_race", "ball")


def blobs(n_per_class: int = 60, features: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (len(CLASSES), features))
    x = np.concatenate([c + rng.normal(0, 1, (n_per_class, features)) for c in centers]) * 5 + 2
    y = np.repeat(np.arange(len(CLASSES)), n_per_class)
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def fitted():
    x, y = blobs()
    return fit_mlp(x, y, CLASSES, seed=1, config=MlpConfig(hidden=(16, 8), alpha=0.1, max_iter=200)), x, y


def test_onnx_probabilities_and_label_equal_the_numpy_model(fitted, tmp_path: Path) -> None:
    model, x, _ = fitted
    path = export_onnx(model, tmp_path / "model.fp32.onnx")
    probs, labels = q.session(path).run([PROBABILITIES, LABEL], {INPUT_NAME: x})
    np.testing.assert_allclose(probs, model.predict_proba(x), atol=1e-6)
    np.testing.assert_array_equal(labels, model.predict(x))
    assert probs.shape == (len(x), 4) and labels.dtype == np.int64


@pytest.mark.filterwarnings("ignore:Stochastic Optimizer")  # fit_mlp silences it the same way
def test_numpy_model_equals_sklearn(fitted) -> None:
    from sklearn.neural_network import MLPClassifier

    model, x, y = fitted
    rows = np.concatenate([np.resize(np.flatnonzero(y == c), np.bincount(y).max()) for c in range(4)])
    z = (x.astype(np.float64) - x.astype(np.float64).mean(axis=0)) / x.astype(np.float64).std(axis=0)
    clf = MLPClassifier(hidden_layer_sizes=(16, 8), alpha=0.1, max_iter=200, random_state=1).fit(z[rows], y[rows])
    np.testing.assert_allclose(model.predict_proba(x), clf.predict_proba(z), atol=1e-4)


def test_graph_keeps_matmul_and_add_separate_and_scaling_as_sub_div(fitted) -> None:
    ops = [node.op_type for node in build_onnx(fitted[0]).graph.node]
    assert "Gemm" not in ops and ops[:2] == ["Sub", "Div"]
    assert ops.count("MatMul") == ops.count("Add") == 3
    assert ops[-2:] == ["Softmax", "ArgMax"]


def test_int8_model_quantizes_the_layers_and_agrees_with_fp32(fitted, tmp_path: Path) -> None:
    model, x, y = fitted
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    export_onnx(model, fp32)
    recipe = quantize_classifier(fp32, int8, x, q.QuantizeConfig())
    ops = {node.op_type for node in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Softmax", "ArgMax"} <= ops
    p32, p8 = run_classifier(q.session(fp32), x), run_classifier(q.session(int8), x)
    comparison = compare_probabilities(p32, p8)
    assert comparison["label_agreement"] >= 0.97
    assert np.mean(p8.argmax(axis=1) == y) >= 0.95
    assert recipe["reduce_range"] is True and recipe["calibration_samples"] == len(x)


def test_fit_refuses_a_class_without_rows() -> None:
    x, y = blobs()
    with pytest.raises(ValueError, match="every class needs training rows"):
        fit_mlp(x[y != 0], y[y != 0], CLASSES, seed=0)
