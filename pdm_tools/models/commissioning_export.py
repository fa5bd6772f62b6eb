"""ONNX export of a fitted commissioning detector, and its static INT8 (QDQ) quantization.

Graph (opset 17), input ``features`` float32 ``[batch, k·C]``: the last ``k`` readings of ``C`` channels,
oldest first, flattened row-major (element ``i·C + j`` is reading ``i``, channel ``j``); output ``score``
float32 ``[batch]``::

    features ─ Sub(mean) ─ Div(scale) ─▶ z ─ MatMul(A) ─▶ z̄ ─ Abs ─ ReduceMax(axis 1) ─▶ score

``A`` (``k·C × C``) averages each channel over the window (``A[i·C + j, j] = 1/k``), so the graph computes
exactly ``Detector.score_windows``. Sub/Div keep the names of ``pdm_tools.common.graph_names.NORMALIZE_NODES``
so that ``pdm_tools.quantization.static.quantize`` leaves the standardization in float, as it does for the
autoencoder: only the MatMul (and the tensors around it) become INT8.

Why a quantized version is mostly a warning here: static quantization clips every activation to the range
seen in calibration. Calibrated on normal commissioning windows only, the standardized input ``z`` of an
anomaly (a flow drop of 10 long-run deviations, say) is clipped back to the normal range, and the score
can no longer exceed the threshold. ``calibration_rows(..., range_factor)`` widens the calibrated range
label-free, by adding the commissioning windows stretched ``range_factor`` times about their mean; that
trades resolution for headroom. ``pdm-agent evaluate skab`` measures both on real data.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper, numpy_helper

from agent.commissioning.detector import Detector
from pdm_tools.common.graph_names import INPUT_NAME, IR_VERSION, NORMALIZE_NODES, OPSET, OUTPUT_NAME
from pdm_tools.quantization import static as q

MATMUL_NODE = "window_mean_matmul"
SCORE_TAIL_NODES = ("score_abs", "score_max")


def build_onnx(detector: Detector, metadata: Mapping[str, str] | None = None) -> onnx.ModelProto:
    """The scoring graph of ``detector`` (see the module doc); passes the full ONNX checker."""
    k, c = detector.smoothing_steps, detector.n_channels
    average = np.zeros((k * c, c), dtype=np.float32)
    for i in range(k):
        average[i * c : (i + 1) * c, :] = np.eye(c, dtype=np.float32) / k
    inits = [
        numpy_helper.from_array(np.tile(detector.mean, k).astype(np.float32), "mean"),
        numpy_helper.from_array(np.tile(detector.scale, k).astype(np.float32), "scale"),
        numpy_helper.from_array(average, "window_average"),
    ]
    nodes = [
        helper.make_node("Sub", [INPUT_NAME, "mean"], ["centered"], name=NORMALIZE_NODES[0]),
        helper.make_node("Div", ["centered", "scale"], ["z"], name=NORMALIZE_NODES[1]),
        helper.make_node("MatMul", ["z", "window_average"], ["z_mean"], name=MATMUL_NODE),
        helper.make_node("Abs", ["z_mean"], ["z_mean_abs"], name=SCORE_TAIL_NODES[0]),
        helper.make_node("ReduceMax", ["z_mean_abs"], [OUTPUT_NAME], name=SCORE_TAIL_NODES[1], axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "commissioning_detector",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", k * c])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch"])],
        initializer=inits,
        doc_string="Score: max over channels of |window mean of drift-scaled standardized readings|.",
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="pdm-agent", ir_version=IR_VERSION
    )
    for key, value in sorted((metadata or {}).items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    return proto


def window_rows(x: np.ndarray, k: int) -> np.ndarray:
    """All causal windows of a series ``(n, C)`` as graph inputs float32 ``(n − k + 1, k·C)``."""
    x = np.asarray(x, dtype=np.float32)
    if len(x) < k:
        return np.empty((0, k * x.shape[1]), dtype=np.float32)
    windows = sliding_window_view(x, k, axis=0).transpose(0, 2, 1)  # (m, k, C)
    return np.ascontiguousarray(windows.reshape(len(windows), -1))


def calibration_rows(train: np.ndarray, k: int, range_factor: float = 1.0) -> np.ndarray:
    """Commissioning windows, plus (``range_factor > 1``) the same windows stretched about their mean."""
    rows = window_rows(train, k)
    if range_factor <= 1.0:
        return rows
    centre = rows.mean(axis=0)
    return np.concatenate([rows, centre + range_factor * (rows - centre)]).astype(np.float32)


def export_models(
    detector: Detector,
    train: np.ndarray,
    out_dir: Path,
    range_factor: float = 1.0,
    config: q.QuantizeConfig | None = None,
) -> dict[str, Any]:
    """Write ``detector.fp32.onnx`` and ``detector.int8.onnx`` to ``out_dir``; return the paths and recipe.

    ``train``: the commissioning rows ``(n, C)`` the detector was fitted on (they calibrate the INT8 model).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fp32 = out_dir / "detector.fp32.onnx"
    int8 = out_dir / "detector.int8.onnx"
    fp32.write_bytes(build_onnx(detector).SerializeToString())
    rows = calibration_rows(train, detector.smoothing_steps, range_factor)
    recipe = q.quantize(fp32, int8, rows, config or q.QuantizeConfig())
    recipe["calibration_range_factor"] = range_factor
    return {"fp32": fp32, "int8": int8, "recipe": recipe}
