"""Per-layer error (SQNR) and per-layer sensitivity, and the mixed-precision choice built on them.

SQNR (signal-to-quantization-noise ratio, dB) = 10·log10(Σ ref² / Σ (ref − test)²); higher is better,
~6 dB per bit for a well-scaled uniform quantizer. ``EXACT_DB`` stands for "no error at all" (JSON has no
infinity).

Sensitivity of a layer = the SQNR of the model's task tensor (the anomaly score, or the classifier's
logits) when only that layer is quantized, measured on calibration rows: low SQNR = the layer whose error
hurts most (in an autoencoder, typically the bottleneck). Mixed precision keeps the most sensitive layers
at higher precision (FP32, or 8 bits for 4-bit candidates): the worst one always, then the next worst
while the whole model's task SQNR is below ``target_db``, at most half of the layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from pdm_tools.quantization.layers import dense_layers, task_of, task_tensor

EXACT_DB = 200.0
DEFAULT_TARGET_DB = 30.0


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """SQNR of ``test`` against ``ref`` in dB (``EXACT_DB`` when they are equal).

    >>> round(sqnr_db(np.array([1.0, -1.0]), np.array([1.1, -0.9])), 1)
    20.0
    >>> sqnr_db(np.ones(3), np.ones(3))
    200.0
    """
    r = np.asarray(ref, dtype=np.float64)
    noise = float(np.sum((r - np.asarray(test, dtype=np.float64)) ** 2))
    signal = float(np.sum(r**2))
    if noise == 0.0:
        return EXACT_DB
    if signal == 0.0:
        return -EXACT_DB
    return min(EXACT_DB, 10.0 * math.log10(signal / noise))


def tensors(path: Path, rows: np.ndarray, names: Sequence[str], batch: int = 1024) -> dict[str, np.ndarray | None]:
    """Values of graph tensors ``names`` (intermediate ones too) for ``rows``; None for a name the graph lacks."""
    import onnxruntime as ort

    model = onnx.load(str(path))
    produced = {o for node in model.graph.node for o in node.output}
    present = [n for n in names if n in produced]
    existing = {o.name for o in model.graph.output}
    for name in present:
        if name not in existing:
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    input_name = sess.get_inputs()[0].name
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    parts: dict[str, list[np.ndarray]] = {n: [] for n in present}
    for i in range(0, len(rows), batch):
        values = sess.run(present, {input_name: rows[i : i + batch]})
        for n, v in zip(present, values, strict=True):
            parts[n].append(np.asarray(v, dtype=np.float32))
    return {n: (np.concatenate(parts[n]) if n in parts else None) for n in names}


def layer_output_sqnr(
    fp32_path: Path, candidate_path: Path, rows: np.ndarray, outputs: dict[str, str]
) -> dict[str, float | None]:
    """SQNR (dB) of each layer's MatMul output in the candidate against FP32: ``outputs`` maps layer -> tensor.

    The error is cumulative (it includes what earlier layers did), which is what the next layer sees.
    """
    ref = tensors(fp32_path, rows, list(outputs.values()))
    got = tensors(candidate_path, rows, list(outputs.values()))
    out: dict[str, float | None] = {}
    for layer, tensor in outputs.items():
        a, b = ref[tensor], got[tensor]
        out[layer] = None if a is None or b is None else round(sqnr_db(a, b), 2)
    return out


@dataclass(frozen=True, slots=True)
class MixedChoice:
    """Which layers stay FP32, from which measurements."""

    keep: tuple[str, ...]
    single_layer_sqnr_db: dict[str, float]
    model_sqnr_db: dict[str, float]
    target_db: float
    tensor: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": f"keep the most sensitive layer at higher precision, then the next while the {self.tensor} "
            f"SQNR is below {self.target_db:g} dB (at most half of the layers)",
            "sensitivity_tensor": self.tensor,
            "single_layer_sqnr_db": {k: round(v, 2) for k, v in self.single_layer_sqnr_db.items()},
            "model_sqnr_db_by_kept_layers": {k: round(v, 2) for k, v in self.model_sqnr_db.items()},
            "sensitive_layers": list(self.keep),
        }


def mixed_precision(
    fp32_path: Path,
    rows: np.ndarray,
    make: Callable[[tuple[str, ...]], Path],
    target_db: float = DEFAULT_TARGET_DB,
) -> MixedChoice:
    """Measure each layer's sensitivity and choose the layers to keep in FP32 (see the module docstring).

    ``make(keep)`` builds the quantized model with the layers ``keep`` left in FP32 and returns its path.
    """
    model = onnx.load(str(fp32_path))
    names = [layer.name for layer in dense_layers(model)]
    tensor = task_tensor(task_of(model))
    ref = tensors(fp32_path, rows, [tensor])[tensor]
    assert ref is not None

    def task_sqnr(keep: tuple[str, ...]) -> float:
        value = tensors(make(keep), rows, [tensor])[tensor]
        assert value is not None
        return sqnr_db(ref, value)

    single = {name: task_sqnr(tuple(n for n in names if n != name)) for name in names}
    ranked = sorted(names, key=lambda n: (single[n], names.index(n)))
    keep: list[str] = [ranked[0]]
    progress = {"none": task_sqnr(())}
    progress["+".join(keep)] = task_sqnr(tuple(keep))
    while progress["+".join(keep)] < target_db and len(keep) < len(names) // 2:
        keep.append(ranked[len(keep)])
        progress["+".join(keep)] = task_sqnr(tuple(keep))
    ordered = tuple(n for n in names if n in keep)
    return MixedChoice(ordered, single, progress, target_db, tensor)
