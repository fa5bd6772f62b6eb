"""Hand-built ONNX export of the autoencoder, score included, so serving needs nothing but the graph.

Graph (opset 17), input ``features`` float32 ``[batch, F]``, output ``score`` float32 ``[batch]``::

    features ─ Sub(mean) ─ Div(scale) ─▶ z ─ MatMul ─ Add ─ Relu ─ … ─ MatMul ─ Add ─▶ reconstruction
                                         └──────────────────────────────────────────────┐
                          score = ReduceMean((reconstruction − z)², axis 1) ◀── Sub ─ Mul

Choices that matter for quantization (see DESIGN.md): scaling is explicit Sub/Div rather than the
``ai.onnx.ml`` Scaler op, which blocks the quantizer; each layer is a MatMul followed by a separate Add,
never fused into Gemm. The node names of the normalization and of the score tail
(``pdm_tools.common.graph_names``) are the ones the quantizer keeps in float.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pdm_tools.common.graph_names import INPUT_NAME, IR_VERSION, NORMALIZE_NODES, OPSET, OUTPUT_NAME, SCORE_NODES
from pdm_tools.models.autoencoder import Autoencoder


def mlp_graph(
    mean: np.ndarray,
    scale: np.ndarray,
    weights: Sequence[np.ndarray],
    biases: Sequence[np.ndarray],
    output: str,
    normalize_names: Sequence[str],
) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """Initializers and nodes of ``(x - mean) / scale`` (tensor ``z``) through dense ReLU layers to ``output``.

    Scaling is explicit Sub/Div (the ai.onnx.ml Scaler op blocks quantization) and every layer is
    MatMul + Add, never fused to Gemm (the 4-bit MatMulNBits quantizer skips Gemm); see DESIGN.md.
    """
    inits = [
        numpy_helper.from_array(mean.astype(np.float32), "mean"),
        numpy_helper.from_array(scale.astype(np.float32), "scale"),
    ]
    nodes = [
        helper.make_node("Sub", [INPUT_NAME, "mean"], ["centered"], name=normalize_names[0]),
        helper.make_node("Div", ["centered", "scale"], ["z"], name=normalize_names[1]),
    ]
    h = "z"
    last = len(weights) - 1
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"layer{i}.weight"))
        inits.append(numpy_helper.from_array(b.astype(np.float32), f"layer{i}.bias"))
        nodes.append(helper.make_node("MatMul", [h, f"layer{i}.weight"], [f"layer{i}.matmul"], name=f"layer{i}_matmul"))
        out = output if i == last else f"layer{i}.linear"
        nodes.append(helper.make_node("Add", [f"layer{i}.matmul", f"layer{i}.bias"], [out], name=f"layer{i}_add"))
        if i < last:
            nodes.append(helper.make_node("Relu", [out], [f"layer{i}.relu"], name=f"layer{i}_relu"))
            h = f"layer{i}.relu"
    return inits, nodes


def build_onnx(model: Autoencoder, metadata: Mapping[str, str] | None = None) -> onnx.ModelProto:
    """The scoring graph of ``model`` as an ONNX model that passes the full checker."""
    f = model.n_features
    inits, nodes = mlp_graph(model.mean, model.scale, model.weights, model.biases, "reconstruction", NORMALIZE_NODES)
    nodes += [
        helper.make_node("Sub", ["reconstruction", "z"], ["error"], name=SCORE_NODES[0]),
        helper.make_node("Mul", ["error", "error"], ["squared_error"], name=SCORE_NODES[1]),
        helper.make_node("ReduceMean", ["squared_error"], [OUTPUT_NAME], name=SCORE_NODES[2], axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "autoencoder_anomaly",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", f])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch"])],
        initializer=inits,
        doc_string="Anomaly score: mean squared reconstruction error of standardized features.",
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="pdm-agent",
        ir_version=IR_VERSION,
    )
    for key, value in sorted((metadata or {}).items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export_onnx(model: Autoencoder, path: Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write the FP32 scoring graph to ``path``."""
    proto = build_onnx(model, metadata)
    Path(path).write_bytes(proto.SerializeToString())
    return Path(path)
