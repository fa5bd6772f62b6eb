"""Quantized candidates of one FP32 ONNX model, built from calibration feature rows.

Every candidate is a file next to the others (``<out>/<name>.onnx``) plus a ``Candidate`` record: the
recipe (what was done, on what data) and, per layer, the weight width and the weight SQNR.

Recipes (``default_recipes``):

- ``int8-static-{minmax,percentile,entropy}-{tensor,channel}``: static QDQ, uint8 activations / int8
  weights, calibrated on the rows (``pdm_tools.quantization.static.quantize_static_qdq``, 7-bit weights because
  this CPU has no VNNI, see ``QuantizeConfig``);
- ``int8-dynamic``: weights int8 per channel, activations quantized at run time (MatMulInteger);
- ``w4-rtn`` / ``w4-gptq``: 4-bit weight-only ``MatMulNBits`` (com.microsoft), round-to-nearest as the
  baseline and GPTQ (``pdm_tools.quantization.gptq``) with the Hessian of the calibration activations;
- ``mixed-int8`` / ``mixed-w4-gptq``: the same with the most sensitive layers kept in FP32 (INT8) or at
  8 bits (4-bit), chosen by measured per-layer sensitivity (``pdm_tools.quantization.sensitivity``).

The input standardization and the task tail (the anomaly score, or Softmax/ArgMax) always stay in float:
they are cheap and the score must be computed from the unclipped input (see ``pdm_tools.quantization.static``).
The graph is read through ``pdm_tools.quantization.layers`` (task, float-only nodes, dense layers).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from pdm_tools.quantization import gptq, nbits, sensitivity
from pdm_tools.quantization import static as q
from pdm_tools.quantization.layers import Layer, Task, dense_layers, float_nodes, task_of
from pdm_tools.quantization.sensitivity import sqnr_db

logger = logging.getLogger(__name__)

Method = Literal["static", "dynamic", "nbits"]


@dataclass(frozen=True, slots=True)
class Recipe:
    """How to build one candidate.

    ``keep_float``: the sensitive layers of a mixed-precision candidate; they stay FP32 (``keep_bits`` 32)
    or, for MatMulNBits candidates, get ``keep_bits`` = 8.
    """

    name: str
    method: Method
    bits: int = 8
    calibration: str | None = None
    per_channel: bool = False
    algorithm: str | None = None
    keep_float: tuple[str, ...] = ()
    keep_bits: int = 32
    mixed_from: str | None = None
    reduce_range: bool = True
    weight_type: str = "int8"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "bits": self.bits}
        if self.method == "static":
            out |= {
                "format": "QDQ",
                "calibration_method": self.calibration,
                "per_channel": self.per_channel,
                "activation_type": "uint8",
                "weight_type": self.weight_type,
                "reduce_range": self.reduce_range,
            }
        elif self.method == "dynamic":
            out |= {"format": "MatMulInteger", "per_channel": self.per_channel, "weight_type": self.weight_type}
            out["reduce_range"] = self.reduce_range
        else:
            out |= {"format": "MatMulNBits (com.microsoft), weight-only", "algorithm": self.algorithm}
        if self.keep_float:
            out["sensitive_layers"] = list(self.keep_float)
            out["sensitive_layers_bits"] = self.keep_bits
            out["mixed_precision_of"] = self.mixed_from
        return out


@dataclass(frozen=True, slots=True)
class LayerRecord:
    """A layer of a built candidate: weight width (32 = float) and weight SQNR in dB (None when float)."""

    name: str
    k: int
    n: int
    bits: int
    weight_sqnr_db: float | None
    block_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layer": self.name, "shape": [self.k, self.n], "bits": self.bits}
        out["weight_sqnr_db"] = None if self.weight_sqnr_db is None else round(self.weight_sqnr_db, 2)
        if self.block_size:
            out["block_size"] = self.block_size
        return out


@dataclass(frozen=True, slots=True)
class Candidate:
    recipe: Recipe
    path: Path | None
    layers: tuple[LayerRecord, ...] = ()
    error: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def name(self) -> str:
        return self.recipe.name

    @property
    def min_bits(self) -> int:
        return min((layer.bits for layer in self.layers), default=32)


STATIC_CALIBRATIONS = ("minmax", "percentile", "entropy")


def default_recipes() -> list[Recipe]:
    """Every recipe the quantize command tries, in the order they are listed in the record."""
    out = [
        Recipe(
            f"int8-static-{cal}-{'channel' if pc else 'tensor'}",
            "static",
            calibration=cal,
            per_channel=pc,
        )
        for cal in STATIC_CALIBRATIONS
        for pc in (False, True)
    ]
    out.append(Recipe("int8-dynamic", "dynamic", per_channel=True))
    # GPTQ before its round-to-nearest baseline: with equal speed and size the earlier one wins the gate.
    out.append(Recipe("w4-gptq", "nbits", bits=4, algorithm="gptq"))
    out.append(Recipe("w4-rtn", "nbits", bits=4, algorithm="rtn"))
    return out


def build(
    recipe: Recipe,
    fp32_path: Path,
    rows: np.ndarray,
    out_path: Path,
    *,
    x_by_weight: Mapping[str, np.ndarray] | None = None,
) -> Candidate:
    """Build one candidate file at ``out_path``; a failure becomes ``Candidate.error`` (it loses the gate)."""
    model = onnx.load(str(fp32_path))
    task = task_of(model)
    layers = dense_layers(model)
    keep = set(recipe.keep_float)
    unknown = keep - {layer.name for layer in layers}
    if unknown:
        raise ValueError(f"keep_float names unknown layers {sorted(unknown)}")
    parent = {lay.weight: _weight(model, lay.weight) for lay in layers}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if recipe.method == "static":
            excluded = float_nodes(task) + [
                n for lay in layers if lay.name in keep for n in (lay.matmul, *lay.followers)
            ]
            config = q.QuantizeConfig(
                calibration=recipe.calibration or "minmax",
                per_channel=recipe.per_channel,
                reduce_range=recipe.reduce_range,
                weight_type=recipe.weight_type,
            )
            # The histogram calibrators print progress to stdout; keep the command's output to its table.
            with contextlib.redirect_stdout(io.StringIO()):
                q.quantize_static_qdq(fp32_path, out_path, rows, config, excluded)
            if task == "anomaly":
                q.score_reads_float(out_path)
            records = _int8_records(out_path, layers, keep, parent)
        elif recipe.method == "dynamic":
            _quantize_dynamic(fp32_path, out_path, task, layers, keep, recipe)
            records = _int8_records(out_path, layers, keep, parent)
        else:
            records = _build_nbits(recipe, model, rows, out_path, layers, keep, x_by_weight)
        session(out_path)  # every candidate must load in ONNX Runtime
    except Exception as exc:  # a candidate that cannot be built is a gate verdict, not a crash
        logger.warning("candidate %s failed: %s", recipe.name, exc)
        return Candidate(recipe, None, error=f"{type(exc).__name__}: {exc}")
    return Candidate(recipe, out_path, tuple(records))


def build_all(
    fp32_path: Path,
    rows: np.ndarray,
    out_dir: Path,
    recipes: Sequence[Recipe] | None = None,
    *,
    mixed: bool = True,
    sensitivity_rows: int = 512,
) -> tuple[list[Candidate], dict[str, Any]]:
    """Build every recipe into ``out_dir`` (and, with ``mixed``, the mixed-precision ones).

    Returns the candidates and the per-layer sensitivity record (``sensitivity.mixed_precision``).
    """
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    recipes = list(recipes if recipes is not None else default_recipes())
    model = onnx.load(str(fp32_path))
    x_by_weight = _calibration_inputs(model, rows) if any(r.algorithm == "gptq" for r in recipes) else None
    out = [build(r, fp32_path, rows, Path(out_dir) / f"{r.name}.onnx", x_by_weight=x_by_weight) for r in recipes]
    report: dict[str, Any] = {}
    if mixed:
        probe = rows[np.linspace(0, len(rows) - 1, min(len(rows), sensitivity_rows)).astype(int)]
        for base_name, name, keep_bits in (
            ("int8-static-minmax-tensor", "mixed-int8", 32),
            ("w4-gptq", "mixed-w4-gptq", 8),
        ):
            base = next((r for r in recipes if r.name == base_name), None)
            if base is None:
                continue

            def make(keep: tuple[str, ...], base: Recipe = base, keep_bits: int = keep_bits) -> Path:
                tmp = Path(out_dir) / ".sensitivity" / f"{base.name}-{'-'.join(keep) or 'none'}.onnx"
                recipe = replace(base, keep_float=keep, keep_bits=keep_bits)
                cand = build(recipe, fp32_path, rows, tmp, x_by_weight=x_by_weight)
                if cand.error or cand.path is None:
                    raise RuntimeError(cand.error)
                return cand.path

            try:
                choice = sensitivity.mixed_precision(fp32_path, probe, make)
            except Exception as exc:  # no sensitivity, no mixed candidate: a verdict, not a crash
                logger.warning("mixed-precision candidate %s failed: %s", name, exc)
                out.append(Candidate(replace(base, name=name, mixed_from=base.name), None, error=f"sensitivity: {exc}"))
                continue
            report[name] = choice.to_dict()
            recipe = Recipe(
                name,
                base.method,
                bits=base.bits,
                calibration=base.calibration,
                per_channel=base.per_channel,
                algorithm=base.algorithm,
                keep_float=choice.keep,
                keep_bits=keep_bits,
                mixed_from=base.name,
            )
            out.append(build(recipe, fp32_path, rows, Path(out_dir) / f"{name}.onnx", x_by_weight=x_by_weight))
        _rmtree(Path(out_dir) / ".sensitivity")
    return out, report


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    return q.session(path, threads)


def rows_sha256(rows: np.ndarray) -> str:
    """sha256 of the float32 C-order bytes of the rows (the calibration data hash in the manifest)."""
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.float32).tobytes()).hexdigest()


def _quantize_dynamic(
    fp32_path: Path, out_path: Path, task: Task, layers: Sequence[Layer], keep: set[str], recipe: Recipe
) -> None:
    excluded = float_nodes(task) + [lay.matmul for lay in layers if lay.name in keep]
    with _quiet_root_logger():
        quantize_dynamic(
            str(fp32_path),
            str(out_path),
            op_types_to_quantize=["MatMul"],
            per_channel=recipe.per_channel,
            reduce_range=recipe.reduce_range,
            weight_type=QuantType.QInt8 if recipe.weight_type == "int8" else QuantType.QUInt8,
            nodes_to_exclude=excluded,
        )


def _build_nbits(
    recipe: Recipe,
    model: onnx.ModelProto,
    rows: np.ndarray,
    out_path: Path,
    layers: Sequence[Layer],
    keep: set[str],
    x_by_weight: Mapping[str, np.ndarray] | None,
) -> list[LayerRecord]:
    weights = nbits.matmul_weights(model)
    if recipe.algorithm == "gptq" and x_by_weight is None:
        x_by_weight = _calibration_inputs(model, rows)
    quantized: dict[str, Any] = {}
    records = []
    for layer in layers:
        w = weights[layer.weight]
        bits = recipe.bits
        if layer.name in keep:
            if recipe.keep_bits >= 32:
                records.append(LayerRecord(layer.name, layer.k, layer.n, 32, None))
                continue
            bits = recipe.keep_bits
        block = block_size_for(layer.k)
        if recipe.algorithm == "gptq":
            assert x_by_weight is not None
            bq = gptq.gptq_quantize(w, gptq.hessian(x_by_weight[layer.weight]), bits=bits, block_size=block)
        else:
            bq = gptq.rtn_quantize(w, bits=bits, block_size=block)
        quantized[layer.weight] = bq
        records.append(LayerRecord(layer.name, layer.k, layer.n, bits, sqnr_db(w, bq.dequantize()), block))
    proto = nbits.to_matmul_nbits(model, quantized)
    onnx.save(proto, str(out_path))
    return records


def block_size_for(k: int) -> int:
    """MatMulNBits block along K: a power of two ≥ 16; 32 unless K is smaller (then 16, zero-padded).

    >>> [block_size_for(k) for k in (8, 16, 32, 48, 256)]
    [16, 16, 32, 32, 32]
    """
    return 32 if k >= 32 else 16


def _weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def _calibration_inputs(model: onnx.ModelProto, rows: np.ndarray) -> dict[str, np.ndarray]:
    input_name = model.graph.input[0].name
    return dict(nbits.matmul_inputs(model, {input_name: rows}, nbits.matmul_weights(model)))


def _int8_records(
    path: Path, layers: Sequence[Layer], keep: set[str], parent: Mapping[str, np.ndarray]
) -> list[LayerRecord]:
    """Per-layer width and weight SQNR read back from the quantized file (``<w>_quantized/_scale/_zero_point``)."""
    proto = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    out = []
    for layer in layers:
        qw = inits.get(f"{layer.weight}_quantized")
        if layer.name in keep or qw is None:
            out.append(LayerRecord(layer.name, layer.k, layer.n, 32, None))
            continue
        scale = inits[f"{layer.weight}_scale"].astype(np.float64)
        zp = inits[f"{layer.weight}_zero_point"].astype(np.float64)
        deq = (qw.astype(np.float64) - zp) * scale  # per-channel scales run along N (axis 1)
        out.append(LayerRecord(layer.name, layer.k, layer.n, 8, sqnr_db(parent[layer.weight], deq)))
    return out


class _quiet_root_logger:
    """The ORT quantizers log root-logger warnings suggesting quant_pre_process, which we skip on purpose."""

    def __enter__(self) -> None:
        self._root = logging.getLogger()
        self._level = self._root.level
        self._root.setLevel(max(self._level, logging.ERROR))

    def __exit__(self, *exc: object) -> None:
        self._root.setLevel(self._level)


def _rmtree(path: Path) -> None:
    if not path.exists():
        return
    for child in sorted(path.rglob("*"), reverse=True):
        child.unlink() if child.is_file() else child.rmdir()
    path.rmdir()
