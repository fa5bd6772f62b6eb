"""The "adaptable base" ONNX graph (one per base model, shared by every machine) and merged per-machine models.

``build_adaptable`` adds, for each adapted dense layer, a parallel low-rank branch whose factors are graph
inputs with zero-valued initializers of the same name as defaults (ONNX Runtime's LoRA convention: an
``.onnx_adapter`` file overrides them per run through ``RunOptions.add_active_adapter``)::

    h ──▶ MatMul(W) ─ Add(b) ─▶ y_base ──┐
    │                                    ▼
    └─▶ MatMul(lora.<layer>.A) ─▶ h·A ─▶ Gemm(h·A, lora.<layer>.B, C = y_base) ─▶ y   (y keeps its name)

The adapter's ``B`` is stored pre-multiplied by ``alpha / rank``, so the graph needs no scale node.

Exactness. With the default zero factors the branch ``t = (h @ 0) @ 0`` is a signed zero whose sign depends
on the inputs, and ``y + t`` equals ``y`` bit for bit except when ``y = −0.0`` and ``t = +0.0``. Two forms:

* fused (2 nodes: ``MatMul(h, A)``, then ``Gemm(h·A, B, C=y_base)``), used when the layer has a bias with no
  ``−0.0`` entry. Then ``y_base = h·W + b`` is never ``−0.0``: a sum whose terms include a nonzero ``b_j``
  (or ``b_j = +0``) that is exactly zero is ``+0`` under round-to-nearest, and ``y_base + (±0) = y_base``.
  Checked here for every adapted layer; a QDQ bias is ``(q − zp)·scale``, never ``−0.0``.
* explicit (4 nodes), otherwise: ``y = y_base − (0 − t)``. ``0 − t`` is ``+0`` for both signed zeros and
  exactly ``−t`` otherwise, and ``y − (+0) = y`` for every ``y`` including ``−0.0``.

Either way the unadapted outputs equal the original model's bit for bit (``tests/unit/test_lora.py``
checks it through ONNX Runtime, FP32 and INT8 QDQ), and with an adapter ``y = y_base + t``. Fewer nodes
matter: at these sizes every ONNX Runtime node costs about 1-2 µs per run, more than its arithmetic.

``merge`` folds an adapter into the weights, ``W + (alpha/rank)·A·B``, giving a plain per-machine model of
the base's size and speed (FP32 bases only: folding into INT8 weights would requantize the update away).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from agent.adaptation.lora import BaseMlp, DenseLayer, LoraWeights

RANK_AXIS = "lora_rank"
STANDARDIZATION = ("mean", "scale")  # initializers of the input standardization, overridable per machine
DEFAULT_RANK = 1  # shape of the zero defaults; an adapter of any rank overrides them (the axis is symbolic)


@dataclass(frozen=True)
class AdaptableLayer:
    """One adaptable MatMul: the layer name (its node name), sizes, and the names of its two graph inputs."""

    name: str
    fan_in: int
    fan_out: int

    @property
    def a_name(self) -> str:
        return param_names(self.name)[0]

    @property
    def b_name(self) -> str:
        return param_names(self.name)[1]


def param_names(layer: str) -> tuple[str, str]:
    """Graph input (and adapter parameter) names of a layer's factors.

    >>> param_names("layer0_matmul")
    ('lora.layer0_matmul.A', 'lora.layer0_matmul.B')
    """
    return f"lora.{layer}.A", f"lora.{layer}.B"


def adapter_parameters(weights: LoraWeights) -> dict[str, np.ndarray]:
    """What goes into the ``.onnx_adapter`` file: ``A`` and ``(alpha/rank)·B`` per layer, float32, and the
    machine's ``mean``/``scale`` if the adapter has its own standardization."""
    out: dict[str, np.ndarray] = {}
    if weights.standardization is not None:
        for name, value in zip(STANDARDIZATION, weights.standardization, strict=True):
            out[name] = np.ascontiguousarray(value, dtype=np.float32)
    for layer, (a, b) in weights.factors.items():
        a_name, b_name = param_names(layer)
        out[a_name] = np.ascontiguousarray(a, dtype=np.float32)
        out[b_name] = np.ascontiguousarray(np.float32(weights.scale) * b.astype(np.float32), dtype=np.float32)
    return out


def adaptable_layers(base: onnx.ModelProto) -> list[AdaptableLayer]:
    """The dense layers of ``base`` that can carry a branch (MatMul with a constant weight), in graph order."""
    g = base.graph
    inits = {t.name: t for t in g.initializer}
    producer = {out: node for node in g.node for out in node.output}
    layers = []
    for node in g.node:
        if node.op_type != "MatMul":
            continue
        w = node.input[1]
        if w not in inits and w in producer and producer[w].op_type == "DequantizeLinear":
            w = producer[w].input[0]
        if w not in inits:
            continue
        dims = list(inits[w].dims)
        if len(dims) == 2:
            layers.append(AdaptableLayer(node.name, int(dims[0]), int(dims[1])))
    return layers


def build_adaptable(
    base: onnx.ModelProto, layers: Sequence[str] | None = None, standardization: bool = True
) -> onnx.ModelProto:
    """A copy of ``base`` with a zero-default LoRA branch on each of ``layers`` (default: every dense layer).

    ``standardization``: also make the ``mean``/``scale`` initializers graph inputs (their values stay the
    defaults), so that an adapter may carry the machine's own input standardization. No node is added for
    it: the unadapted graph computes exactly what the base computes.
    """
    model = onnx.ModelProto()
    model.CopyFrom(base)
    g = model.graph
    available = {layer.name: layer for layer in adaptable_layers(model)}
    chosen = list(available) if layers is None else list(layers)
    unknown = [name for name in chosen if name not in available]
    if unknown:
        raise ValueError(f"no adaptable MatMul named {unknown}; the graph has {sorted(available)}")
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    nodes = {node.name: node for node in g.node}
    biases = {layer.name: layer.bias for layer in _read_layers(model)}
    g.initializer.append(numpy_helper.from_array(np.array(0.0, dtype=np.float32), "lora.zero"))
    if standardization:
        inits = {t.name: t for t in g.initializer}
        for name in STANDARDIZATION:
            if name not in inits:
                raise ValueError(f"no {name!r} initializer: the base has no input standardization to override")
            g.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(inits[name].dims)))
    new_nodes: list[onnx.NodeProto] = []
    anchors: dict[str, str] = {}  # tensor y_base -> layer whose branch goes right after its producer
    for name in chosen:
        layer = available[name]
        matmul = nodes[name]
        x = matmul.input[0]
        out = _layer_output(matmul.output[0], consumers)
        a_name, b_name = layer.a_name, layer.b_name
        # One symbolic rank per layer: ONNX Runtime plans buffers assuming equal dim_params are equal sizes,
        # and an adapter may adapt some layers (at its rank) while others keep their zero defaults.
        rank_axis = f"{RANK_AXIS}_{name}"
        g.input.append(helper.make_tensor_value_info(a_name, TensorProto.FLOAT, [layer.fan_in, rank_axis]))
        g.input.append(helper.make_tensor_value_info(b_name, TensorProto.FLOAT, [rank_axis, layer.fan_out]))
        g.initializer.append(numpy_helper.from_array(np.zeros((layer.fan_in, DEFAULT_RANK), np.float32), a_name))
        g.initializer.append(numpy_helper.from_array(np.zeros((DEFAULT_RANK, layer.fan_out), np.float32), b_name))
        fused = out != matmul.output[0] and _bias_is_safe(biases.get(name))
        base_out = f"{out}.lora_base"
        for node in g.node:  # the producer of `out` now writes `base_out`; `out` comes from the Sub below
            for i, o in enumerate(node.output):
                if o == out:
                    node.output[i] = base_out
        anchors[base_out] = name
        p = f"lora.{name}"
        new_nodes.append(helper.make_node("MatMul", [x, a_name], [f"{p}.xa"], name=f"{p}.matmul_a"))
        if fused:
            new_nodes.append(helper.make_node("Gemm", [f"{p}.xa", b_name, base_out], [out], name=f"{p}.gemm_b"))
        else:
            new_nodes += [
                helper.make_node("MatMul", [f"{p}.xa", b_name], [f"{p}.t"], name=f"{p}.matmul_b"),
                helper.make_node("Sub", ["lora.zero", f"{p}.t"], [f"{p}.neg_t"], name=f"{p}.negate"),
                helper.make_node("Sub", [base_out, f"{p}.neg_t"], [out], name=f"{p}.add"),
            ]
    # Keep the node list topologically sorted: each branch right after the node that produced y_base.
    by_layer: dict[str, list[onnx.NodeProto]] = {f"lora.{n}": [] for n in chosen}
    for node in new_nodes:
        by_layer[node.name.rsplit(".", 1)[0]].append(node)
    ordered: list[onnx.NodeProto] = []
    for node in g.node:
        ordered.append(node)
        for o in node.output:
            if o in anchors:
                ordered += by_layer[f"lora.{anchors[o]}"]
    del g.node[:]
    g.node.extend(ordered)
    onnx.checker.check_model(model, full_check=True)
    return model


def merge(base: onnx.ModelProto, weights: LoraWeights) -> onnx.ModelProto:
    """``base`` with each adapted weight replaced by ``W + (alpha/rank)·A·B`` (float32): a per-machine model."""
    model = onnx.ModelProto()
    model.CopyFrom(base)
    g = model.graph
    if any(node.op_type == "DequantizeLinear" for node in g.node):
        raise ValueError(
            "merge needs an FP32 base: folding the update into INT8 weights would requantize it away; "
            "serve a quantized base with its adapter on the shared session instead"
        )
    nodes = {node.name: node for node in g.node if node.op_type == "MatMul"}
    inits = {t.name: t for t in g.initializer}
    if weights.standardization is not None:
        for name, value in zip(STANDARDIZATION, weights.standardization, strict=True):
            inits[name].CopyFrom(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
    for layer in weights.layers:
        if layer not in nodes:
            raise ValueError(f"adapter layer {layer!r} is not a MatMul of the base ({sorted(nodes)})")
        tensor = inits[nodes[layer].input[1]]
        w = numpy_helper.to_array(tensor).astype(np.float64)
        merged = (w + weights.delta(layer)).astype(np.float32)
        tensor.CopyFrom(numpy_helper.from_array(merged, tensor.name))
    onnx.checker.check_model(model, full_check=True)
    return model


def _bias_is_safe(bias: np.ndarray | None) -> bool:
    """True if no entry is ``−0.0`` (then ``h·W + b`` is never ``−0.0``; see the module docstring).

    >>> _bias_is_safe(np.array([0.0, 1.0])), _bias_is_safe(np.array([-0.0, 1.0]))
    (True, False)
    """
    return bias is not None and not bool(np.any((bias == 0) & np.signbit(bias)))


def _read_layers(model: onnx.ModelProto) -> tuple[DenseLayer, ...]:
    try:
        return BaseMlp.from_onnx(model).layers
    except ValueError:
        return ()


def _layer_output(matmul_out: str, consumers: dict[str, list[onnx.NodeProto]]) -> str:
    """The float tensor where a layer's result is complete: after the bias Add (through Q/DQ if quantized)."""
    name = matmul_out
    users = consumers.get(name, [])
    if len(users) == 1 and users[0].op_type == "QuantizeLinear":
        dq = consumers.get(users[0].output[0], [])
        if len(dq) == 1 and dq[0].op_type == "DequantizeLinear":
            name = dq[0].output[0]
            users = consumers.get(name, [])
    adds = [u for u in users if u.op_type == "Add"]
    return str(adds[0].output[0]) if len(users) == 1 and adds else matmul_out
