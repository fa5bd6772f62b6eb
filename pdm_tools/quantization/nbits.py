"""From an FP32 ONNX graph to one whose MatMuls run as ONNX Runtime's 4-bit ``MatMulNBits`` (com.microsoft).

``matmul_weights`` finds the quantizable layers, ``matmul_inputs`` records what each of them reads (for the
Hessians of GPTQ and for sensitivity), and ``to_matmul_nbits`` swaps the MatMuls for ``MatMulNBits`` nodes
carrying our own ``BlockQuantized`` weights. Only the top-level graph is handled (our models have no
subgraphs). Layout of the operator's inputs, checked against ONNX Runtime 1.32 by the unit tests::

    B            uint8 [N, n_blocks, block_size * bits / 8]   codes of column n, block b; low bits first
    scales       float32 [N * n_blocks]                         column-major: index n * n_blocks + b
    zero_points  uint8 [N * ceil(n_blocks * bits / 8)]          per column, packed like B, low bits first

The CPU kernel accepts 2, 4 and 8 bits only. ``accuracy_level`` is left unset, so the kernel computes in
float32 from the dequantized weights and the graph's outputs equal ``X @ BlockQuantized.dequantize()``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from pdm_tools.quantization.gptq import BlockQuantized

MS_DOMAIN = "com.microsoft"
PACKABLE_BITS = (2, 4, 8)  # what MatMulNBits accepts on the CPU in ONNX Runtime 1.32


def matmul_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializer name → float32 (K, N) weight of every MatMul whose second input is a 2-D float initializer."""
    inits = {t.name: t for t in model.graph.initializer}
    out: dict[str, np.ndarray] = {}
    for node in _matmuls(model):
        tensor = inits.get(node.input[1])
        if tensor is not None and tensor.data_type == TensorProto.FLOAT and len(tensor.dims) == 2:
            out[tensor.name] = numpy_helper.to_array(tensor).astype(np.float32)
    return out


def matmul_inputs(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], weights: Iterable[str]
) -> dict[str, np.ndarray]:
    """Weight name → the activations X (n, K) that multiply it when the FP32 ``model`` runs on ``feeds``.

    The MatMuls' first inputs are added as extra graph outputs of a copy and the copy runs once in ONNX
    Runtime (graph optimizations off, so the tensors are those of the graph as written). Leading dimensions
    are flattened into rows; a weight read by several MatMuls gets the rows of all of them.
    """
    names = list(weights)
    known = matmul_weights(model)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"not a 2-D float MatMul weight: {unknown}; MatMul weights are {sorted(known)}")
    sources = {name: [node.input[0] for node in _matmuls(model) if node.input[1] == name] for name in names}
    wanted = sorted({a for srcs in sources.values() for a in srcs} - set(feeds))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(
        helper.make_tensor_value_info(a, TensorProto.FLOAT, None) for a in wanted if a not in present
    )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])
    values = dict(zip(wanted, sess.run(wanted, feeds), strict=True)) if wanted else {}
    values.update({name: np.asarray(v) for name, v in feeds.items()})
    return {
        name: np.concatenate([values[a].reshape(-1, known[name].shape[0]) for a in sources[name]]) for name in names
    }


def to_matmul_nbits(model: onnx.ModelProto, weights: Mapping[str, BlockQuantized]) -> onnx.ModelProto:
    """A copy of ``model`` in which every MatMul reading one of ``weights`` is a ``MatMulNBits`` node.

    Each named weight must be the second input of a MatMul (ValueError otherwise: a Gemm, as made by
    ``quant_pre_process``'s MatMul+Add fusion, is named as such) and match its quantized shape. The float
    initializers that nothing reads any more are removed and the com.microsoft opset is imported.
    """
    _check_request(model, weights)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    taken = {t.name for t in graph.initializer} | {n for node in graph.node for n in [*node.input, *node.output]}
    replacement: dict[str, list[str]] = {}
    for name, quantized in weights.items():
        tensors = _nbits_tensors(name, quantized, taken)
        graph.initializer.extend(tensors)
        replacement[name] = [t.name for t in tensors]
    for i, node in enumerate(graph.node):
        if _is_matmul(node) and node.input[1] in weights:
            graph.node[i].CopyFrom(_nbits_node(node, replacement[node.input[1]], weights[node.input[1]]))
    _drop_unread(graph, set(weights))
    if not any(op.domain == MS_DOMAIN for op in out.opset_import):
        out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return out


def pack_matmul_nbits(quantized: BlockQuantized) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(B, scales, zero_points)`` arrays in MatMulNBits' layout (see the module docstring)."""
    if quantized.bits not in PACKABLE_BITS:
        raise ValueError(f"MatMulNBits (ONNX Runtime 1.32) takes bits in {PACKABLE_BITS}, got {quantized.bits}")
    n, n_blocks, bs = quantized.n, quantized.n_blocks, quantized.block_size
    by_column = quantized.codes.T.reshape(n, n_blocks, bs)
    b = pack_low_first(by_column, quantized.bits)
    scales = np.ascontiguousarray(quantized.scales.T).reshape(-1)
    zero_points = pack_low_first(np.ascontiguousarray(quantized.zero_points.T), quantized.bits).reshape(-1)
    return b, scales, zero_points


def pack_low_first(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 codes of ``bits`` (2, 4 or 8) along the last axis, first value in the lowest bits of a byte.

    The last axis is padded with zeros to a whole byte.

    >>> pack_low_first(np.array([[1, 2, 3]], dtype=np.uint8), 4)
    array([[33,  3]], dtype=uint8)
    """
    per_byte = 8 // bits
    pad = (-values.shape[-1]) % per_byte
    padded = np.concatenate([values, np.zeros((*values.shape[:-1], pad), np.uint8)], axis=-1)
    grouped = padded.reshape(*values.shape[:-1], -1, per_byte)
    packed = np.zeros(grouped.shape[:-1], np.uint8)
    for j in range(per_byte):
        packed |= grouped[..., j] << np.uint8(bits * j)
    return packed


def _matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if _is_matmul(node)]


def _is_matmul(node: onnx.NodeProto) -> bool:
    return node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and len(node.input) == 2


def _check_request(model: onnx.ModelProto, weights: Mapping[str, BlockQuantized]) -> None:
    """Raise ``ValueError`` naming each requested weight that no MatMul reads as B or whose shape differs."""
    known = matmul_weights(model)
    problems = []
    for name, quantized in weights.items():
        if name not in known:
            readers = [f"{n.op_type} {n.name!r}" for n in model.graph.node if name in n.input]
            where = f"read by {', '.join(readers)}" if readers else "read by no node"
            problems.append(f"{name!r} is not the 2-D float B input of a MatMul ({where})")
        elif known[name].shape != (quantized.k, quantized.n):
            problems.append(f"{name!r} has shape {known[name].shape}, quantized as {(quantized.k, quantized.n)}")
        elif quantized.bits not in PACKABLE_BITS:
            problems.append(f"{name!r} has {quantized.bits} bits; MatMulNBits takes {PACKABLE_BITS}")
    if problems:
        raise ValueError(
            "cannot replace with MatMulNBits: "
            + "; ".join(problems)
            + ". Only MatMul nodes are replaced: keep MatMul+Add unfused (quant_pre_process fuses them into Gemm)."
        )


def _nbits_tensors(name: str, quantized: BlockQuantized, taken: set[str]) -> list[onnx.TensorProto]:
    """The B, scales and zero_points initializers for weight ``name``, with names not yet in ``taken``."""
    arrays = pack_matmul_nbits(quantized)
    tensors = []
    for suffix, array in zip((f"_Q{quantized.bits}", "_scales", "_zero_points"), arrays, strict=True):
        unique = _fresh(name + suffix, taken)
        taken.add(unique)
        tensors.append(numpy_helper.from_array(array, unique))
    return tensors


def _fresh(base: str, taken: set[str]) -> str:
    candidate, i = base, 1
    while candidate in taken:
        candidate, i = f"{base}_{i}", i + 1
    return candidate


def _nbits_node(matmul: onnx.NodeProto, inputs: list[str], quantized: BlockQuantized) -> onnx.NodeProto:
    return helper.make_node(
        "MatMulNBits",
        [matmul.input[0], *inputs],
        list(matmul.output),
        name=matmul.name,
        domain=MS_DOMAIN,
        K=quantized.k,
        N=quantized.n,
        bits=quantized.bits,
        block_size=quantized.block_size,
    )


def _drop_unread(graph: onnx.GraphProto, candidates: set[str]) -> None:
    """Remove the ``candidates`` initializers (and graph inputs of that name) that no node or output reads."""
    read = {n for node in graph.node for n in node.input} | {o.name for o in graph.output}
    dead = candidates - read
    keep = [t for t in graph.initializer if t.name not in dead]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    inputs = [v for v in graph.input if v.name not in dead]
    del graph.input[:]
    graph.input.extend(inputs)
