"""Build one shipped anomaly model: fit, export, quantize, measure, threshold, manifest and model card.

Output directory layout::

    model.fp32.onnx   the exported autoencoder scoring graph (FP32 parent)
    model.int8.onnx   its static INT8 (QDQ) quantization (a copy of that candidate)
    candidates/       every quantized candidate (``pdm_tools.quantization``), measured and gated
    model.<name>.onnx the gate's choice, when it is not the FP32 parent
    calibration.npz   the calibration rows; eval.npz the held-out rows the gate measured on
    manifest.json     names the shipped file (the gate's choice), its sha256, spec, threshold, metrics
    MODEL_CARD.md     the same facts for people

Everything except the measured latencies is a function of the inputs and the seed: a rerun writes the
same ONNX bytes and the same metrics.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort

from agent.features.spec import FeatureSpec
from agent.inference.manifest import SCHEMA_VERSION, Manifest, TensorInfo, sha256_file
from pdm_tools.common.graph_names import INPUT_NAME, OUTPUT_NAME
from pdm_tools.common.modelcard import write_model_card
from pdm_tools.common.threshold import THRESHOLD_RULE, round_sig, threshold_from_scores
from pdm_tools.models.autoencoder import AutoencoderConfig, fit_autoencoder
from pdm_tools.models.export import export_onnx
from pdm_tools.quantization import static as q
from pdm_tools.quantization.data import CALIBRATION_FILE, EVAL_FILE, Rows, save_rows, subsample
from pdm_tools.quantization.gate import PARENT
from pdm_tools.quantization.workflow import Settings, quantize_model

logger = logging.getLogger(__name__)

FP32_FILE = "model.fp32.onnx"
INT8_FILE = "model.int8.onnx"
CANDIDATES_DIR = "candidates"

Ship = Literal["auto", "int8", "fp32"]

CALIBRATION_ROWS = 512  # training rows in calibration.npz (evenly spaced)
EVAL_ROWS_PER_LABEL = 1000  # held-out normal and anomalous rows in eval.npz (evenly spaced)


def anomaly_eval_rows(healthy: np.ndarray, faults: Mapping[str, np.ndarray] | None) -> Rows | None:
    """Held-out rows for the gate: healthy (y=0) and faulty (y=1, as many from every fault kind)."""
    if not faults:
        return None
    normal = healthy[subsample(len(healthy), EVAL_ROWS_PER_LABEL)]
    per_kind = max(1, EVAL_ROWS_PER_LABEL // len(faults))
    bad = np.concatenate([rows[subsample(len(rows), per_kind)] for _, rows in sorted(faults.items())])
    return Rows(
        np.concatenate([normal, bad]).astype(np.float32),
        np.r_[np.zeros(len(normal), np.int64), np.ones(len(bad), np.int64)],
    )


def quantize_and_choose(
    fp32_path: Path,
    calibration: np.ndarray,
    eval_rows: Rows | None,
    out_dir: Path,
    ship: Ship,
    calibration_method: str = "minmax",
    latency_runs: int = 400,
) -> tuple[str, dict[str, Any]]:
    """Write calibration.npz/eval.npz, build and gate every candidate (``pdm_tools.quantization``).

    Writes ``candidates/`` and ``model.int8.onnx`` (the static INT8 candidate of ``calibration_method``,
    per tensor) into ``out_dir``; with ``ship="auto"`` the gate's choice is copied to ``model.<name>.onnx``.
    Returns the shipped file name and the manifest's quantization record.
    """
    out_dir = Path(out_dir)
    save_rows(out_dir / CALIBRATION_FILE, calibration)
    files = {"calibration": CALIBRATION_FILE}
    if eval_rows is not None:
        save_rows(out_dir / EVAL_FILE, eval_rows.x, eval_rows.y)
        files["evaluation"] = EVAL_FILE
    settings = Settings(runs=max(20, latency_runs // 2))
    outcome = quantize_model(
        fp32_path, calibration, eval_rows, out_dir / CANDIDATES_DIR, settings, data_files=files, relative_to=out_dir
    )
    int8_name = f"int8-static-{calibration_method}-tensor"
    shutil.copyfile(outcome.paths[int8_name], out_dir / INT8_FILE)
    record = outcome.record
    chosen = outcome.decision.chosen
    if ship == "auto":
        shipped_file = FP32_FILE if chosen == PARENT else f"model.{chosen}.onnx"
        if chosen != PARENT:
            shutil.copyfile(outcome.chosen_path, out_dir / shipped_file)
    else:
        shipped_file = INT8_FILE if ship == "int8" else FP32_FILE
        record["ship_reason"] = f"forced by --ship {ship} (the gate chose {chosen}: {record['ship_reason']})"
        record["shipped"] = ship
    record["shipped_file"] = shipped_file
    record["int8_file"] = INT8_FILE
    record["int8_recipe"] = int8_name
    return shipped_file, record


@dataclass(frozen=True, slots=True)
class Evaluation:
    """Data the model never learns from, used only to describe it: healthy test rows and fault rows."""

    test: np.ndarray | None = None
    faults: Mapping[str, np.ndarray] | None = None


def train_anomaly_model(
    name: str,
    spec: FeatureSpec,
    x_train: np.ndarray,
    x_val: np.ndarray,
    out_dir: Path,
    seed: int,
    version: str,
    *,
    evaluation: Evaluation | None = None,
    data_description: Mapping[str, Any] | None = None,
    created_by: str = "pdm_tools.training.train.train_anomaly_model",
    autoencoder: AutoencoderConfig | None = None,
    quantization: q.QuantizeConfig | None = None,
    ship: Ship = "auto",
    latency_runs: int = 400,
) -> Manifest:
    """Fit, export, quantize and describe one anomaly model in ``out_dir``; return its manifest.

    ``x_train``/``x_val``: float32 ``(n, F)`` healthy feature rows of ``spec``, from different machines.
    ``evaluation`` (optional) adds the false-alarm rate on healthy test rows and the detection rate per
    fault kind to the metrics and the model card.
    """
    names = spec.feature_names()
    for label, x in (("x_train", x_train), ("x_val", x_val)):
        if x.ndim != 2 or x.shape[1] != len(names):
            raise ValueError(f"{label} must have shape (n, {len(names)}) for spec {spec.kind}, got {x.shape}")
    autoencoder = autoencoder or AutoencoderConfig()
    quantization = quantization or q.QuantizeConfig()
    evaluation = evaluation or Evaluation()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    model, fit = fit_autoencoder(x_train, x_val, seed, autoencoder)
    fp32_path, int8_path = out_dir / FP32_FILE, out_dir / INT8_FILE
    export_onnx(model, fp32_path, {"model_id": name, "version": version, "feature_spec_hash": spec.spec_hash()})
    fp32 = q.session(fp32_path)
    _check_export(model.score(x_val), q.run_scores(fp32, x_val))
    calibration = x_train[subsample(len(x_train), CALIBRATION_ROWS)]
    eval_rows = anomaly_eval_rows(x_val if evaluation.test is None else evaluation.test, evaluation.faults)
    shipped_file, quant_record = quantize_and_choose(
        fp32_path, calibration, eval_rows, out_dir, ship, quantization.calibration, latency_runs
    )
    int8 = q.session(int8_path)
    shipped = q.session(out_dir / shipped_file)
    logger.info("%s: shipping %s (%s)", name, shipped_file, quant_record["ship_reason"])

    val_scores = q.run_scores(shipped, x_val)
    threshold = threshold_from_scores(val_scores)
    metrics: dict[str, Any] = {
        "score": "mean squared reconstruction error of standardized features (higher = more anomalous)",
        "val_scores": _quantiles(val_scores),
    }
    held_out = x_val if evaluation.test is None else np.concatenate([x_val, evaluation.test])
    metrics["int8_vs_fp32"] = {
        k: round_sig(v) if isinstance(v, float) else v
        for k, v in q.compare_scores(q.run_scores(fp32, held_out), q.run_scores(int8, held_out), threshold).items()
    }
    if evaluation.test is not None:
        test_scores = q.run_scores(shipped, evaluation.test)
        metrics["test_scores"] = _quantiles(test_scores)
        metrics["false_alarm_rate_test"] = round_sig(float(np.mean(test_scores > threshold)))
    if evaluation.faults:
        metrics["detection_rate"] = {
            kind: {
                "windows": len(rows),
                "rate": round_sig(float(np.mean(scores > threshold))),
                "median_score": round_sig(float(np.median(scores))),
            }
            for kind, rows in sorted(evaluation.faults.items())
            for scores in [q.run_scores(shipped, rows)]
        }

    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        model_id=name,
        version=version,
        task="anomaly",
        file=shipped_file,
        sha256=sha256_file(out_dir / shipped_file),
        inputs=(TensorInfo(INPUT_NAME, ("batch", len(names)), "float32"),),
        outputs=(TensorInfo(OUTPUT_NAME, ("batch",), "float32"),),
        feature_spec=spec.to_dict(),
        feature_spec_hash=spec.spec_hash(),
        feature_names=names,
        threshold=threshold,
        threshold_rule=THRESHOLD_RULE,
        metrics=metrics,
        quantization=quant_record,
        created_by=created_by,
        training={
            "seed": seed,
            "data": dict(data_description or {}),
            "rows": {"train": len(x_train), "val": len(x_val)},
            "model": {
                "type": "autoencoder",
                "layers": [len(names), *autoencoder.hidden, len(names)],
                **autoencoder.to_dict(),
            },
            "fit": fit.to_dict(),
            "tools": {"numpy": np.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
        },
    )
    manifest.write(out_dir)
    write_model_card(manifest, out_dir)
    # The manifest must load with the serving-side checks; fail the build, not the first agent start.
    Manifest.load(out_dir)
    return manifest


def _check_export(reference: np.ndarray, onnx_scores: np.ndarray) -> None:
    """The FP32 graph must reproduce the numpy model (float32 rounding only)."""
    if not np.allclose(onnx_scores, reference, rtol=1e-4, atol=1e-5):
        worst = float(np.max(np.abs(onnx_scores - reference)))
        raise RuntimeError(f"exported ONNX scores differ from the numpy model by up to {worst:g}")


def _quantiles(scores: np.ndarray) -> dict[str, float | int]:
    qs = np.quantile(scores.astype(np.float64), [0.5, 0.9, 0.99, 0.999])
    return {
        "n": len(scores),
        "q50": round_sig(qs[0]),
        "q90": round_sig(qs[1]),
        "q99": round_sig(qs[2]),
        "q99.9": round_sig(qs[3]),
        "max": round_sig(float(scores.max())),
    }
