"""Static INT8 quantization (QDQ, calibrated on feature rows) of our graphs and its side-by-side report.

Only the layers are quantized. For the autoencoder the input normalization (Sub/Div) and the score tail
(Sub/Mul/ReduceMean) stay in float, so the reconstruction error is computed against the float input.
Anomalous rows fall outside the calibrated range of the first layer and get clipped there; that clipping
can only make the reconstruction worse, so it keeps (never hides) large scores. For the defect classifier
the standardization, the Softmax and the ArgMax stay in float (``quantize_classifier``); the recipe,
calibration reader and session settings are the same.

Measured facts, not assumptions, go into the report: score differences against the FP32 parent on
held-out rows, file sizes, and latency of both models in the same process (p50, batch 1 and 32).
"""

from __future__ import annotations

import hashlib
import logging
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from pdm_tools.common.graph_names import (
    CLASSIFIER_FLOAT_NODES,
    INPUT_NAME,
    NORMALIZE_NODES,
    OUTPUT_NAME,
    PROBABILITIES,
    SCORE_NODES,
)

logger = logging.getLogger(__name__)

CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}
# ORT's Distribution calibrator is meant for FP8; for INT8 it gives wrong ranges (DESIGN.md). Refused by name.
REFUSED_CALIBRATION_METHODS = {"distribution": "Distribution calibration is meant for FP8, not for INT8 (DESIGN.md)"}
_QUANT_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}


@dataclass(frozen=True, slots=True)
class QuantizeConfig:
    """How to quantize. ``reduce_range`` uses 7-bit weights.

    On x86 CPUs without AVX-512 VNNI (AVX2 only), ONNX Runtime's u8×s8 kernel multiplies with
    ``vpmaddubsw``, which saturates the int16 sum of two products when both operands use their full range;
    7-bit weights keep those sums in range, at the cost of half the weight resolution. On VNNI CPUs the
    sums are exact either way. It is on by default so that the same file gives the same scores on both
    kinds of CPU (the threshold is computed from those scores).
    """

    calibration: str = "minmax"
    percentile: float = 99.999
    per_channel: bool = False
    reduce_range: bool = True
    activation_type: str = "uint8"
    weight_type: str = "int8"

    def __post_init__(self) -> None:
        if self.calibration.lower() in REFUSED_CALIBRATION_METHODS:
            raise ValueError(REFUSED_CALIBRATION_METHODS[self.calibration.lower()])
        if self.calibration not in CALIBRATION_METHODS:
            raise ValueError(f"calibration must be one of {sorted(CALIBRATION_METHODS)}, got {self.calibration!r}")
        for name in ("activation_type", "weight_type"):
            if getattr(self, name) not in _QUANT_TYPES:
                raise ValueError(f"{name} must be one of {sorted(_QUANT_TYPES)}, got {getattr(self, name)!r}")


class RowsReader(CalibrationDataReader):
    """Feeds calibration rows (float32 ``(n, F)``, or ``(n, 1, S, S)`` images) to the calibrator."""

    def __init__(self, rows: np.ndarray, batch_size: int | None = None, input_name: str = INPUT_NAME) -> None:
        self._rows = np.ascontiguousarray(rows, dtype=np.float32)
        self._input = input_name
        # One batch by default: the percentile calibrator stacks batches and needs them all the same size.
        self._batch_size = batch_size or max(1, len(self._rows))
        self._it: Iterator[dict[str, np.ndarray]] = iter(())
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(
            {self._input: self._rows[i : i + self._batch_size]} for i in range(0, len(self._rows), self._batch_size)
        )


def quantize(fp32_path: Path, int8_path: Path, calibration_rows: np.ndarray, config: QuantizeConfig) -> dict[str, Any]:
    """Write the INT8 QDQ anomaly model; return the recipe part of the report (what was done, on what data)."""
    recipe = quantize_static_qdq(fp32_path, int8_path, calibration_rows, config, [*NORMALIZE_NODES, *SCORE_NODES])
    score_reads_float(Path(int8_path))
    return recipe


def quantize_classifier(
    fp32_path: Path, int8_path: Path, calibration_rows: np.ndarray, config: QuantizeConfig
) -> dict[str, Any]:
    """Write the INT8 QDQ defect classifier; return the recipe (what was done, on what data)."""
    return quantize_static_qdq(fp32_path, int8_path, calibration_rows, config, list(CLASSIFIER_FLOAT_NODES))


def quantize_static_qdq(
    fp32_path: Path,
    int8_path: Path,
    calibration_rows: np.ndarray,
    config: QuantizeConfig,
    excluded: list[str],
    input_name: str = INPUT_NAME,
) -> dict[str, Any]:
    """Static QDQ quantization of any of our graphs, ``excluded`` nodes kept in float; returns the recipe.

    ``calibration_rows``: what the graph's input ``input_name`` takes, batched on the first axis
    (feature rows ``(n, F)``, or images ``(n, 1, S, S)`` for the image classifier).
    """
    rows = np.ascontiguousarray(calibration_rows, dtype=np.float32)
    if rows.ndim < 2 or len(rows) == 0:
        raise ValueError(f"calibration rows must be a non-empty (n, ...) array, got {rows.shape}")
    extra: dict[str, Any] = {"WeightSymmetric": True, "ActivationSymmetric": False}
    if config.calibration == "percentile":
        extra["CalibPercentile"] = config.percentile
    # The quantizer logs a root-logger warning suggesting quant_pre_process; we skip that on purpose
    # (it fuses MatMul+Add into Gemm, see DESIGN.md), so silence it for the duration of the call.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        quantize_static(
            str(fp32_path),
            str(int8_path),
            RowsReader(rows, input_name=input_name),
            quant_format=QuantFormat.QDQ,
            per_channel=config.per_channel,
            reduce_range=config.reduce_range,
            activation_type=_QUANT_TYPES[config.activation_type],
            weight_type=_QUANT_TYPES[config.weight_type],
            nodes_to_exclude=excluded,
            calibrate_method=CALIBRATION_METHODS[config.calibration],
            extra_options=extra,
        )
    finally:
        root.setLevel(level)
    return {
        "method": "static",
        "format": "QDQ",
        "tool": f"onnxruntime.quantization.quantize_static (onnxruntime {ort.__version__})",
        "activation_type": config.activation_type,
        "weight_type": config.weight_type,
        "calibration_method": config.calibration
        + (f" (p{config.percentile})" if config.calibration == "percentile" else ""),
        "per_channel": config.per_channel,
        "reduce_range": config.reduce_range,
        "excluded_nodes": excluded,
        "calibration_samples": len(rows),
        "calibration_sha256": hashlib.sha256(rows.tobytes()).hexdigest(),
    }


def score_reads_float(path: Path) -> None:
    """Make the (float) score tail read float tensors, not the Q/DQ copies the quantizer routed it to.

    ``quantize_static`` sends every consumer of a quantized tensor through the same QuantizeLinear →
    DequantizeLinear pair, excluded nodes included. For the score that would be wrong: ``z`` clipped to its
    calibration range would be compared with the reconstruction of the same clipped ``z``, so an input far
    outside the normal range would look *normal*. Rewiring the tail to the float tensor keeps it honest.
    """
    proto = onnx.load(str(path))
    producer = {out: node for node in proto.graph.node for out in node.output}
    for node in proto.graph.node:
        if node.name not in SCORE_NODES:
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            qn = producer.get(dq.input[0])
            if qn is not None and qn.op_type == "QuantizeLinear":
                node.input[i] = qn.input[0]
    used = {name for node in proto.graph.node for name in node.input} | {o.name for o in proto.graph.output}
    # Drop Q/DQ pairs that nothing reads any more (e.g. on the float reconstruction), in two passes.
    for _ in range(2):
        keep = [
            n
            for n in proto.graph.node
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or any(o in used for o in n.output)
        ]
        del proto.graph.node[:]
        proto.graph.node.extend(keep)
        used = {name for node in proto.graph.node for name in node.input} | {o.name for o in proto.graph.output}
    live_inits = [t for t in proto.graph.initializer if t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(live_inits)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    """A CPU session configured like serving (sequential, one inter-op thread)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def run_scores(sess: ort.InferenceSession, rows: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Scores of all rows (float32 ``(n,)``), in batches."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    out = [sess.run([OUTPUT_NAME], {INPUT_NAME: rows[i : i + batch_size]})[0] for i in range(0, len(rows), batch_size)]
    return np.concatenate(out).astype(np.float32) if out else np.empty(0, np.float32)


def compare_scores(fp32: np.ndarray, int8: np.ndarray, threshold: float | None = None) -> dict[str, float]:
    """Absolute differences of INT8 vs FP32 scores, and their size relative to the threshold if given."""
    diff = np.abs(fp32.astype(np.float64) - int8.astype(np.float64))
    out = {
        "rows": len(diff),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "pearson_r": float(np.corrcoef(fp32, int8)[0, 1]) if len(diff) > 1 else 1.0,
    }
    if threshold is not None:
        out["max_abs_diff_over_threshold"] = float(diff.max() / threshold)
    return out


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


def measure_latency(
    paths: dict[str, Path],
    rows: np.ndarray,
    batches: Sequence[int] = (1, 32),
    runs: int = 400,
    repeats: int = 5,
) -> dict[str, Any]:
    """p50 latency in microseconds per ``session.run`` for each model and batch size, one thread.

    The models are timed in the same process, interleaved in ``repeats`` rounds so that frequency changes
    and noisy neighbours hit all of them alike. The result is a record of this machine, not a guarantee.
    """
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    sessions = {name: session(path) for name, path in paths.items()}
    samples: dict[tuple[str, int], list[float]] = {(n, b): [] for n in sessions for b in batches}
    inputs = {b: {INPUT_NAME: np.ascontiguousarray(np.resize(rows, (b, rows.shape[1])))} for b in batches}
    for sess in sessions.values():  # warm-up: first runs allocate and pre-pack
        for b in batches:
            for _ in range(20):
                sess.run([OUTPUT_NAME], inputs[b])
    for _ in range(repeats):
        for b in batches:
            for name, sess in sessions.items():
                feed = inputs[b]
                times = samples[(name, b)]
                for _ in range(runs):
                    t0 = time.perf_counter_ns()
                    sess.run([OUTPUT_NAME], feed)
                    times.append((time.perf_counter_ns() - t0) / 1e3)
    result: dict[str, Any] = {"unit": "microseconds per run, p50", "threads": 1, "runs": runs * repeats}
    for name in sessions:
        result[name] = {f"batch{b}_p50_us": round(float(np.median(samples[(name, b)])), 1) for b in batches}
    result["cpu"] = cpu_description()
    return result


def cpu_description() -> str:
    """CPU model name and whether it has AVX-512 VNNI (it changes which INT8 kernels run)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    isa = (
        "avx512_vnni"
        if "avx512_vnni" in flags
        else "avx_vnni"
        if "avx_vnni" in flags
        else ("avx2 (no VNNI)" if "avx2" in flags else "no avx2")
    )
    return f"{name}; {isa}"
