"""``pdm-agent model quantize`` end to end on small generated models, and the quantization pitfalls.

Each DESIGN.md pitfall we hit has a test here so it stays fixed: Distribution calibration refused for
INT8, Gemm graphs refused (the MatMulNBits converter skips Gemm), 7-bit weights (reduce_range) on CPUs
without VNNI, the anomaly score computed from the float input, and MatMulNBits blocks for K < 16.
No timing thresholds: latencies are recorded, never asserted.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.cli import main as pdm_agent
from agent.features.bearing import BearingFeatureSpec
from agent.inference.manifest import SCHEMA_VERSION, Manifest, TensorInfo, sha256_file
from pdm_tools.common.graph_names import INPUT_NAME, LABEL, PROBABILITIES, SCORE_NODES
from pdm_tools.models.defect_mlp import export_onnx, fit_mlp
from pdm_tools.quantization import candidates as cands
from pdm_tools.quantization import cli as qcli
from pdm_tools.quantization import static as q
from pdm_tools.quantization.data import DataError, Rows, load_rows, save_rows
from pdm_tools.quantization.layers import dense_layers
from pdm_tools.quantization.workflow import Settings, quantize_model
from pdm_tools.training import cli as training_cli

FAST = ["--runs", "20"]


@pytest.fixture(scope="module")
def anomaly_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A quick-trained vibration model directory (with calibration.npz and eval.npz)."""
    import argparse

    out = tmp_path_factory.mktemp("quick")
    parser = argparse.ArgumentParser()
    training_cli.add_arguments(parser)
    args = parser.parse_args(["--quick", "--out", str(out), "--model", "vibration-anomaly"])
    assert training_cli.main(args) == 0
    return out / "vibration_anomaly"


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small classifier on generated 48-feature rows (4 separable classes), with its data files."""
    out = tmp_path_factory.mktemp("classifier")
    spec = BearingFeatureSpec()
    rng = np.random.default_rng(0)
    centers = rng.normal(scale=3.0, size=(4, spec.n_features))

    def rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        r = np.random.default_rng(seed)
        y = np.arange(n) % 4
        return (centers[y] + r.normal(size=(n, spec.n_features))).astype(np.float32), y

    x, y = rows(400, 1)
    model = fit_mlp(x, y, ("normal", "inner_race", "outer_race", "ball"), seed=0)
    export_onnx(model, out / "model.fp32.onnx")
    Manifest(
        schema_version=SCHEMA_VERSION,
        model_id="test-classifier",
        version="0.0.1",
        task="classifier",
        file="model.fp32.onnx",
        sha256=sha256_file(out / "model.fp32.onnx"),
        inputs=(TensorInfo(INPUT_NAME, ("batch", spec.n_features), "float32"),),
        outputs=(TensorInfo(PROBABILITIES, ("batch", 4), "float32"), TensorInfo(LABEL, ("batch",), "int64")),
        feature_spec=spec.to_dict(),
        feature_spec_hash=spec.spec_hash(),
        feature_names=spec.feature_names(),
        class_names=model.class_names,
        metrics={},
        quantization={},
        created_by="test",
        training={"seed": 0},
    ).write(out)
    save_rows(out / "calibration.npz", x[:256])
    xe, ye = rows(300, 2)
    save_rows(out / "eval.npz", xe, ye)
    return out


def _quantize(model_dir: Path, *extra: str) -> int:
    return pdm_agent(
        [
            "model",
            "quantize",
            str(model_dir),
            "--calibration",
            str(model_dir / "calibration.npz"),
            "--eval",
            str(model_dir / "eval.npz"),
            *FAST,
            *extra,
        ]
    )


def _check_record(model_dir: Path, record: dict[str, Any]) -> None:
    names = [c["name"] for c in record["candidates"]]
    expected = ["fp32", *(r.name for r in cands.default_recipes()), "mixed-int8", "mixed-w4-gptq"]
    assert names == expected
    verdicts = record["gate"]["verdicts"]
    for c in record["candidates"]:
        assert "error" not in c, c
        path = model_dir / c["file"]
        assert sha256_file(path) == c["sha256"]
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # every candidate loads
        assert c["layers"] and all("bits" in layer and "output_sqnr_db" in layer for layer in c["layers"])
        assert c["metrics"], c["name"]
        assert verdicts[c["name"]]["reasons"], c["name"]  # every candidate, winner or loser, says why
        assert c["name"] in record["latency"]["per_candidate"]
    w4 = next(c for c in record["candidates"] if c["name"] == "w4-gptq")
    assert {layer["bits"] for layer in w4["layers"]} == {4}
    mixed = next(c for c in record["candidates"] if c["name"] == "mixed-w4-gptq")
    assert {layer["bits"] for layer in mixed["layers"]} == {4, 8}
    assert record["sensitivity"]["mixed-w4-gptq"]["sensitive_layers"]
    assert record["calibration"]["rows"] == len(load_rows(model_dir / "calibration.npz").x)
    assert len(record["calibration"]["sha256"]) == 64


def test_quantize_command_records_every_candidate_and_ships_what_the_gate_chose(anomaly_dir: Path) -> None:
    assert _quantize(anomaly_dir, "--ship") == 0
    manifest = Manifest.load(anomaly_dir)  # sha256 of the shipped file verified
    record = manifest.quantization
    _check_record(anomaly_dir, record)
    assert manifest.file == record["shipped_file"]
    assert sha256_file(anomaly_dir / manifest.file) == manifest.sha256
    assert json.loads((anomaly_dir / "candidates" / qcli.RECORD_FILE).read_text())["candidates"]
    card = (anomaly_dir / "MODEL_CARD.md").read_text()
    assert "## Quantization" in card and all(c["name"] in card for c in record["candidates"])
    assert "ΔAUC" in card and "SQNR" in card


def test_classifier_quantize_measures_accuracy_and_agreement(classifier_dir: Path) -> None:
    assert _quantize(classifier_dir, "--ship") == 0
    manifest = Manifest.load(classifier_dir)
    record = manifest.quantization
    _check_record(classifier_dir, record)
    for c in record["candidates"]:
        assert {"accuracy_delta_points", "macro_f1_delta_points", "agreement"} <= set(c["metrics"])
    int8 = next(c for c in record["candidates"] if c["name"] == "int8-static-minmax-tensor")
    assert int8["metrics"]["agreement"] >= 0.99
    assert "Δaccuracy" in (classifier_dir / "MODEL_CARD.md").read_text()


def test_a_quantized_winner_is_copied_next_to_the_parent_and_named_in_the_manifest(
    classifier_dir: Path, tmp_path: Path
) -> None:
    x = load_rows(classifier_dir / "calibration.npz").x
    ev = load_rows(classifier_dir / "eval.npz", labels=True)
    outcome = quantize_model(
        classifier_dir / "model.fp32.onnx", x, ev, tmp_path / "c", Settings(runs=5, repeats=1),
        relative_to=classifier_dir,
    )  # fmt: skip
    forced = dataclasses.replace(outcome, decision=dataclasses.replace(outcome.decision, chosen="w4-gptq"))
    raw = json.loads((classifier_dir / "manifest.json").read_text())
    assert qcli.ship(classifier_dir, raw, forced, ev) == "model.w4-gptq.onnx"
    manifest = Manifest.load(classifier_dir)
    assert manifest.file == "model.w4-gptq.onnx"
    assert "com.microsoft" in {n.domain for n in onnx.load(str(classifier_dir / manifest.file)).graph.node}


def test_quantize_command_refuses_data_of_the_wrong_width(anomaly_dir: Path, tmp_path: Path) -> None:
    save_rows(tmp_path / "bad.npz", np.zeros((10, 3), np.float32))
    assert pdm_agent(["model", "quantize", str(anomaly_dir), "--calibration", str(tmp_path / "bad.npz")]) == 2
    with pytest.raises(DataError, match="no array 'y'"):
        load_rows(tmp_path / "bad.npz", labels=True)


def test_data_files_are_byte_reproducible(tmp_path: Path) -> None:
    x, y = np.arange(12, dtype=np.float32).reshape(4, 3), np.array([0, 1, 0, 1])
    a, b = save_rows(tmp_path / "a.npz", x, y), save_rows(tmp_path / "b.npz", x, y)
    assert a.read_bytes() == b.read_bytes()
    got = load_rows(a, 3, labels=True)
    np.testing.assert_array_equal(got.x, x)
    assert got.y is not None and got.y.tolist() == [0, 1, 0, 1]


# --- pitfalls (DESIGN.md "Quantization facts") --------------------------------------------------------


def test_distribution_calibration_is_refused_for_int8() -> None:
    with pytest.raises(ValueError, match="FP8"):
        q.QuantizeConfig(calibration="distribution")


def test_gemm_graphs_are_refused_because_matmulnbits_skips_gemm(tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.ones((16, 4), np.float32), "w")
    b = numpy_helper.from_array(np.zeros(4, np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fused")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 4])],
        initializer=[w, b],
    )
    with pytest.raises(ValueError, match="Gemm"):
        dense_layers(helper.make_model(graph))


def test_exported_graphs_keep_matmul_and_add_so_every_layer_gets_4_bits(anomaly_dir: Path) -> None:
    fp32 = onnx.load(str(anomaly_dir / "model.fp32.onnx"))
    layers = dense_layers(fp32)
    w4 = onnx.load(str(anomaly_dir / "candidates" / "w4-gptq.onnx"))
    assert sum(n.op_type == "MatMulNBits" for n in w4.graph.node) == len(layers)
    assert not any(n.op_type == "MatMul" for n in w4.graph.node)


def test_int8_weights_use_7_bits_on_cpus_without_vnni(anomaly_dir: Path) -> None:
    """reduce_range: u8×s8 on AVX2 (vpmaddubsw) saturates int16 sums with full-range weights.

    With 7-bit symmetric weights |w| ≤ 64, so a pair of products stays within 2 × 255 × 64 = 32640 < 32767.
    """
    for name in ("int8-static-minmax-tensor", "int8-static-entropy-channel", "int8-dynamic"):
        proto = onnx.load(str(anomaly_dir / "candidates" / f"{name}.onnx"))
        weights = [numpy_helper.to_array(t) for t in proto.graph.initializer if t.name.endswith(".weight_quantized")]
        assert weights, name
        for w in weights:
            assert w.dtype == np.int8 and np.abs(w.astype(int)).max() <= 64, name


def test_static_candidates_compute_the_score_from_the_float_input(anomaly_dir: Path) -> None:
    for name in ("int8-static-minmax-tensor", "int8-static-percentile-channel", "mixed-int8"):
        proto = onnx.load(str(anomaly_dir / "candidates" / f"{name}.onnx"))
        producer = {o: n for n in proto.graph.node for o in n.output}
        for node in proto.graph.node:
            if node.name in SCORE_NODES:
                assert all(producer[i].op_type != "DequantizeLinear" for i in node.input if i in producer), name


def test_layers_narrower_than_a_block_are_padded_to_a_valid_matmulnbits_block(tmp_path: Path) -> None:
    """The autoencoder bottleneck has K = 8; MatMulNBits needs blocks of a power of two ≥ 16 along K."""
    rng = np.random.default_rng(0)
    w = [rng.normal(size=(16, 8)).astype(np.float32), rng.normal(size=(8, 16)).astype(np.float32)]
    inits = [numpy_helper.from_array(a, f"layer{i}.weight") for i, a in enumerate(w)]
    nodes = [
        helper.make_node("MatMul", ["features", "layer0.weight"], ["h"], name="layer0_matmul"),
        helper.make_node("MatMul", ["h", "layer1.weight"], ["score"], name="layer1_matmul"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 16])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, tmp_path / "m.onnx")
    x = rng.normal(size=(64, 16)).astype(np.float32)
    cand = cands.build(
        cands.Recipe("w4", "nbits", bits=4, algorithm="gptq"), tmp_path / "m.onnx", x, tmp_path / "w4.onnx"
    )
    assert cand.error is None and [r.block_size for r in cand.layers] == [16, 16]
    got = ort.InferenceSession(str(tmp_path / "w4.onnx"), providers=["CPUExecutionProvider"]).run(None, {"features": x})
    assert np.corrcoef(got[0].ravel(), (x @ w[0] @ w[1]).ravel())[0, 1] > 0.9


def test_rows_for_the_gate_have_both_labels_for_an_anomaly_model(anomaly_dir: Path) -> None:
    rows = load_rows(anomaly_dir / "eval.npz", labels=True)
    assert isinstance(rows, Rows) and rows.y is not None and set(rows.y.tolist()) == {0, 1}


def test_quantize_json_prints_the_record_and_nothing_else(classifier_dir: Path, tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    assert _quantize(classifier_dir, "--out", str(tmp_path / "c"), "--json") == 0
    result = json.loads(capsys.readouterr().out)  # the whole of stdout: no table around it
    assert result["shipped"] is None and result["record_file"] == str(tmp_path / "c" / qcli.RECORD_FILE)
    assert result["record"] == json.loads((tmp_path / "c" / qcli.RECORD_FILE).read_text())
