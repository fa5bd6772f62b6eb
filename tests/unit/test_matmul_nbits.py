"""MatMulNBits packing: ONNX Runtime computes exactly X @ dequantize() of our own quantized weights."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.shape_inference import quant_pre_process

from pdm_tools.common.graph_names import INPUT_NAME
from pdm_tools.models.export import mlp_graph
from pdm_tools.quantization import (
    BlockQuantized,
    gptq_quantize,
    hessian,
    matmul_inputs,
    matmul_weights,
    output_error,
    pack_matmul_nbits,
    rtn_quantize,
    to_matmul_nbits,
)
from pdm_tools.quantization.nbits import pack_low_first

DEFECT_MODEL = Path(__file__).resolve().parents[2] / "models" / "defect_classifier" / "model.fp32.onnx"


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(out) for out in sess.run(None, feeds)]


def single_matmul(w: np.ndarray) -> onnx.ModelProto:
    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "single_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        initializer=[numpy_helper.from_array(w.astype(np.float32), "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def small_mlp(sizes: tuple[int, ...], seed: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A standardize → (MatMul + Add + Relu)* → MatMul + Add graph as exported for our models, and its params."""
    rng = np.random.default_rng(seed)
    params = {
        "mean": rng.normal(0, 2, sizes[0]),
        "scale": rng.uniform(0.5, 3, sizes[0]),
        **{f"layer{i}.weight": rng.normal(0, 0.3, (a, b)) for i, (a, b) in enumerate(itertools.pairwise(sizes))},
        **{f"layer{i}.bias": rng.normal(0, 0.1, b) for i, b in enumerate(sizes[1:])},
    }
    layers = range(len(sizes) - 1)
    inits, nodes = mlp_graph(
        params["mean"],
        params["scale"],
        [params[f"layer{i}.weight"] for i in layers],
        [params[f"layer{i}.bias"] for i in layers],
        "y",
        ("normalize_sub", "normalize_div"),
    )
    graph = helper.make_graph(
        nodes,
        "small_mlp",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", sizes[-1]])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), params


def mlp_forward(x: np.ndarray, params: dict[str, np.ndarray], weights: dict[str, np.ndarray]) -> np.ndarray:
    """Float64 numpy forward pass of ``small_mlp`` (and of the defect classifier's logits) with ``weights``."""
    h = (x.astype(np.float64) - params["mean"]) / params["scale"]
    n_layers = len(weights)
    for i in range(n_layers):
        h = h @ weights[f"layer{i}.weight"].astype(np.float64) + params[f"layer{i}.bias"]
        if i < n_layers - 1:
            h = np.maximum(h, 0.0)
    return h


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))


def test_pack_low_first_puts_the_first_code_in_the_lowest_bits() -> None:
    np.testing.assert_array_equal(pack_low_first(np.array([1, 2, 15, 4, 7], np.uint8), 4), [0x21, 0x4F, 0x07])
    np.testing.assert_array_equal(pack_low_first(np.array([1, 2, 3, 0, 2], np.uint8), 2), [0b00111001, 0b10])
    np.testing.assert_array_equal(pack_low_first(np.array([200, 7], np.uint8), 8), [200, 7])


def test_packed_arrays_have_the_matmul_nbits_shapes_with_zero_points_padded_per_column() -> None:
    q = rtn_quantize(np.random.default_rng(0).standard_normal((40, 5)), block_size=16)  # 3 blocks per column
    b, scales, zero_points = pack_matmul_nbits(q)
    assert b.shape == (5, 3, 8) and b.dtype == np.uint8
    assert scales.shape == (15,) and scales.dtype == np.float32
    assert zero_points.shape == (5 * 2,) and zero_points.dtype == np.uint8
    np.testing.assert_array_equal(scales.reshape(5, 3), q.scales.T)
    assert b[2, 1, 0] == q.codes[16, 2] | (q.codes[17, 2] << 4)
    assert zero_points[2 * 2 + 1] == q.zero_points[2, 2]  # column 2, block 2: low nibble of its second byte


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("k", [64, 40])
@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_single_matmul_nbits_equals_numpy_dequantized_product(bits: int, k: int, block_size: int) -> None:
    rng = np.random.default_rng(k * block_size + bits)
    w = rng.standard_normal((k, 7))
    q = rtn_quantize(w, bits=bits, block_size=block_size)
    model = to_matmul_nbits(single_matmul(w), {"w": q})
    x = rng.standard_normal((11, k)).astype(np.float32)
    (y,) = run(model, {"x": x})
    assert_close(y, x.astype(np.float64) @ q.dequantize())


@pytest.mark.parametrize("k", [64, 40])
@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_matmul_add_graph_with_gptq_weights_equals_numpy(k: int, block_size: int) -> None:
    model, params = small_mlp((k, 48, 3), seed=k + block_size)
    rng = np.random.default_rng(block_size)
    x = (params["mean"] + params["scale"] * rng.standard_normal((300, k))).astype(np.float32)
    acts = matmul_inputs(model, {INPUT_NAME: x}, matmul_weights(model))
    quantized = {
        name: gptq_quantize(w, hessian(acts[name]), block_size=block_size) for name, w in matmul_weights(model).items()
    }
    nbits = to_matmul_nbits(model, quantized)
    onnx.checker.check_model(nbits)
    (y,) = run(nbits, {INPUT_NAME: x})
    assert_close(y, mlp_forward(x, params, {name: q.dequantize() for name, q in quantized.items()}))


def test_defect_classifier_with_every_matmul_replaced_equals_numpy() -> None:
    fp32 = onnx.load(str(DEFECT_MODEL))
    params = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in fp32.graph.initializer}
    weights = matmul_weights(fp32)
    assert sorted(weights) == ["layer0.weight", "layer1.weight", "layer2.weight"]
    rng = np.random.default_rng(42)
    x = (params["mean"] + params["scale"] * rng.standard_normal((256, len(params["mean"])))).astype(np.float32)
    acts = matmul_inputs(fp32, {INPUT_NAME: x}, weights)
    quantized = {
        name: gptq_quantize(w, hessian(acts[name]), block_size=16, act_order=True) for name, w in weights.items()
    }
    model = to_matmul_nbits(fp32, quantized)
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node].count("MatMulNBits") == 3
    assert "MatMul" not in [n.op_type for n in model.graph.node]
    assert not set(weights) & {t.name for t in model.graph.initializer}
    assert any(op.domain == "com.microsoft" for op in model.opset_import)
    assert "MatMul" in [n.op_type for n in fp32.graph.node]  # the input model is left alone

    probabilities, labels = run(model, {INPUT_NAME: x})
    logits = mlp_forward(x, params, {name: q.dequantize() for name, q in quantized.items()})
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(labels, logits.argmax(axis=1))


def test_matmul_inputs_are_the_activations_each_weight_multiplies() -> None:
    model, params = small_mlp((20, 16, 2), seed=1)
    x = np.random.default_rng(2).standard_normal((9, 20)).astype(np.float32)
    acts = matmul_inputs(model, {INPUT_NAME: x}, ["layer0.weight", "layer1.weight"])
    z = (x - params["mean"]) / params["scale"]
    assert_close(acts["layer0.weight"], z)
    assert_close(acts["layer1.weight"], np.maximum(z @ params["layer0.weight"] + params["layer0.bias"], 0))
    with pytest.raises(ValueError, match=r"layer0\.bias"):
        matmul_inputs(model, {INPUT_NAME: x}, ["layer0.bias"])


def test_gptq_beats_round_to_nearest_on_a_hidden_layer_of_the_defect_classifier() -> None:
    fp32 = onnx.load(str(DEFECT_MODEL))
    params = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in fp32.graph.initializer}
    rng = np.random.default_rng(7)
    x = (params["mean"] + params["scale"] * rng.standard_normal((2000, len(params["mean"])))).astype(np.float32)
    w = matmul_weights(fp32)["layer1.weight"]
    acts = matmul_inputs(fp32, {INPUT_NAME: x}, ["layer1.weight"])["layer1.weight"]
    gptq = gptq_quantize(w, hessian(acts), block_size=16, act_order=True)
    assert output_error(acts, w, gptq) < output_error(acts, w, rtn_quantize(w, block_size=16))


def test_fused_gemm_from_quant_pre_process_is_refused_by_name(tmp_path: Path) -> None:
    model, _ = small_mlp((32, 16, 2), seed=3)
    onnx.save(model, str(tmp_path / "fp32.onnx"))
    quant_pre_process(str(tmp_path / "fp32.onnx"), str(tmp_path / "pre.onnx"), skip_symbolic_shape=True)
    fused = onnx.load(str(tmp_path / "pre.onnx"))
    assert "Gemm" in [n.op_type for n in fused.graph.node]  # the pitfall is real
    q = rtn_quantize(numpy_helper.to_array(next(t for t in fused.graph.initializer if t.name == "layer0.weight")))
    with pytest.raises(ValueError, match=r"'layer0.weight' is not the 2-D float B input of a MatMul \(read by Gemm"):
        to_matmul_nbits(fused, {"layer0.weight": q})


def test_wrong_shape_unknown_name_and_unpackable_bits_are_refused() -> None:
    w = np.random.default_rng(4).standard_normal((32, 3))
    model = single_matmul(w)
    with pytest.raises(ValueError, match=r"'w' has shape \(32, 3\), quantized as \(32, 4\)"):
        to_matmul_nbits(model, {"w": rtn_quantize(np.ones((32, 4)))})
    with pytest.raises(ValueError, match="'nope' is not the 2-D float B input of a MatMul \\(read by no node\\)"):
        to_matmul_nbits(model, {"nope": rtn_quantize(w)})
    with pytest.raises(ValueError, match=r"3 bits; MatMulNBits takes \(2, 4, 8\)"):
        to_matmul_nbits(model, {"w": rtn_quantize(w, bits=3)})


def test_weight_also_read_by_another_node_keeps_its_float_initializer() -> None:
    w = np.random.default_rng(5).standard_normal((16, 16))
    model = single_matmul(w)
    model.graph.node.append(helper.make_node("Identity", ["w"], ["w_copy"]))
    model.graph.output.append(helper.make_tensor_value_info("w_copy", TensorProto.FLOAT, [16, 16]))
    q = rtn_quantize(w, block_size=16)
    nbits = to_matmul_nbits(model, {"w": q})
    x = np.eye(16, dtype=np.float32)
    y, w_copy = run(nbits, {"x": x})
    assert_close(y, q.dequantize())
    np.testing.assert_array_equal(w_copy, w.astype(np.float32))


def test_block_quantized_is_what_to_matmul_nbits_takes() -> None:
    q = rtn_quantize(np.ones((16, 2)), block_size=16)
    assert isinstance(q, BlockQuantized)
    node = to_matmul_nbits(single_matmul(np.ones((16, 2))), {"w": q}).graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert (node.op_type, node.domain, attrs) == (
        "MatMulNBits",
        "com.microsoft",
        {"K": 16, "N": 2, "bits": 4, "block_size": 16},
    )
