"""Static INT8 quantization of the defect classifier and its comparison with the FP32 parent.

The layers (MatMul, Add, Relu) are quantized (QDQ, calibrated on training feature rows); the input
standardization, the Softmax and the ArgMax stay in float. The recipe, calibration reader and session
settings are those of the anomaly models (``pdm_tools.training.quantize``); only the graph's node and
output names differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from pdm_tools.training import quantize as q
from pdm_tools.training.defect_mlp import FLOAT_NODES, INPUT_NAME, PROBABILITIES


def quantize_classifier(
    fp32_path: Path, int8_path: Path, calibration_rows: np.ndarray, config: q.QuantizeConfig
) -> dict[str, Any]:
    """Write the INT8 QDQ classifier; return the recipe (what was done, on what data)."""
    return q.quantize_static_qdq(fp32_path, int8_path, calibration_rows, config, list(FLOAT_NODES))


def run_classifier(sess: ort.InferenceSession, rows: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Class probabilities of all rows, float32 ``(n, C)``, in batches."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    out = [
        sess.run([PROBABILITIES], {INPUT_NAME: rows[i : i + batch_size]})[0] for i in range(0, len(rows), batch_size)
    ]
    n_classes = int(sess.get_outputs()[0].shape[1])
    return np.concatenate(out).astype(np.float32) if out else np.empty((0, n_classes), np.float32)


def compare_probabilities(fp32: np.ndarray, int8: np.ndarray) -> dict[str, float | int]:
    """How far the INT8 probabilities are from FP32's, and how often the predicted class agrees."""
    diff = np.abs(fp32.astype(np.float64) - int8.astype(np.float64))
    return {
        "rows": len(fp32),
        "label_agreement": float(np.mean(fp32.argmax(axis=1) == int8.argmax(axis=1))) if len(fp32) else 1.0,
        "max_abs_prob_diff": float(diff.max()) if len(fp32) else 0.0,
        "mean_abs_prob_diff": float(diff.mean()) if len(fp32) else 0.0,
    }
