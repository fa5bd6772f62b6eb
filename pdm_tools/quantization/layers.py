"""Our ONNX graphs as the quantizer sees them: the task, the nodes that stay in float and the dense layers.

``candidates`` builds quantized copies layer by layer, ``sensitivity`` measures the layers one at a time and
``report`` records them; all three read the graph through these functions. Graphs must keep MatMul + Add
(no Gemm): the MatMulNBits converter skips Gemm (DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx

from pdm_tools.common.graph_names import (
    CLASSIFIER_FLOAT_NODES,
    NORMALIZE_NODES,
    OUTPUT_NAME,
    PROBABILITIES,
    SCORE_NODES,
)

Task = Literal["classifier", "anomaly"]


@dataclass(frozen=True, slots=True)
class Layer:
    """One dense layer of the graph: its MatMul node, weight initializer ``(k, n)``, output tensor and Add."""

    name: str
    matmul: str
    weight: str
    output: str
    k: int
    n: int
    followers: tuple[str, ...]  # the Add (and Relu) nodes that belong to the layer


def task_of(model: onnx.ModelProto) -> Task:
    """``anomaly`` (output ``score``) or ``classifier`` (output ``probabilities``)."""
    outputs = {o.name for o in model.graph.output}
    if OUTPUT_NAME in outputs:
        return "anomaly"
    if PROBABILITIES in outputs:
        return "classifier"
    raise ValueError(f"not one of our graphs (outputs {sorted(outputs)}): expected 'score' or 'probabilities'")


def float_nodes(task: Task) -> list[str]:
    """Nodes that always stay in float: the input standardization and the task tail."""
    return [*NORMALIZE_NODES, *SCORE_NODES] if task == "anomaly" else list(CLASSIFIER_FLOAT_NODES)


def task_tensor(task: Task) -> str:
    """The tensor whose error the sensitivity analysis measures: the score, or the logits."""
    return OUTPUT_NAME if task == "anomaly" else "logits"


def dense_layers(model: onnx.ModelProto) -> list[Layer]:
    """The MatMul layers whose second input is an initializer, in graph order. Refuses Gemm graphs."""
    inits = {t.name: t for t in model.graph.initializer}
    if any(node.op_type == "Gemm" for node in model.graph.node):
        raise ValueError(
            "the graph has Gemm nodes (MatMul+Add fused, e.g. by quant_pre_process): the MatMulNBits quantizer "
            "skips Gemm; export MatMul + Add (DESIGN.md)"
        )
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    layers = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        dims = tuple(inits[node.input[1]].dims)
        followers: list[str] = []
        tensor = node.output[0]
        for op in ("Add", "Relu"):
            nxt = [c for c in consumers.get(tensor, []) if c.op_type == op]
            if len(nxt) != 1:
                break
            followers.append(nxt[0].name)
            tensor = nxt[0].output[0]
        weight = node.input[1]
        layers.append(
            Layer(weight.removesuffix(".weight"), node.name, weight, node.output[0], dims[0], dims[1], tuple(followers))
        )
    if not layers:
        raise ValueError("no MatMul layer with an initializer weight: nothing to quantize")
    return layers


def parameter_count(model: onnx.ModelProto) -> int:
    return int(sum(np.prod(t.dims) for t in model.graph.initializer))


def macs_per_sample(model: onnx.ModelProto) -> int:
    """Multiply-adds per input row of the dense layers."""
    return int(sum(layer.k * layer.n for layer in dense_layers(model)))
