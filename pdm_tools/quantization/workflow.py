"""Quantize one FP32 model end to end: build candidates, measure them on held-out data, gate, record.

``quantize_model`` is what ``pdm-agent model quantize`` and ``pdm-agent train`` both call. Measurements:

- accuracy against the FP32 parent on the evaluation rows (``pdm_tools.quantization.data``): classifier
  accuracy, macro-F1 and prediction agreement; anomaly AUC and the detection rate at the operating
  false-alarm rate (each model's threshold set by the shipped threshold rule on the held-out healthy rows);
- per-layer error: SQNR of every layer's MatMul output against FP32 on the same rows, and of its weights;
- latency: p50/p99 per window at the configured batch size and thread count, every model timed in the same
  process, interleaved in rounds so that noisy neighbours hit them alike.

The gate (``pdm_tools.quantization.gate``) then picks the cheapest passing candidate; the record
(``pdm_tools.quantization.report``) goes into the manifest and the model card.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from pdm_tools.common.threshold import threshold_from_scores
from pdm_tools.quantization import candidates as cands
from pdm_tools.quantization import gate
from pdm_tools.quantization import static as q
from pdm_tools.quantization.data import Rows
from pdm_tools.quantization.layers import dense_layers, task_of
from pdm_tools.quantization.report import build_record
from pdm_tools.quantization.sensitivity import layer_output_sqnr

logger = logging.getLogger(__name__)

ThresholdRule = Callable[[np.ndarray], float]


@dataclass(frozen=True, slots=True)
class Settings:
    """Serving conditions the latency is measured at, and the gate's limits."""

    batch: int = 32
    threads: int = 1
    runs: int = 200
    repeats: int = 5
    criteria: gate.Criteria = field(default_factory=gate.Criteria)


@dataclass(frozen=True, slots=True)
class Outcome:
    """The manifest record, the gate's decision and the path of every model (parent included)."""

    record: dict[str, Any]
    decision: gate.Decision
    paths: dict[str, Path]

    @property
    def chosen_path(self) -> Path:
        return self.paths[self.decision.chosen]


def quantize_model(
    fp32_path: Path,
    calibration: np.ndarray,
    evaluation: Rows | None,
    out_dir: Path,
    settings: Settings | None = None,
    *,
    recipes: Sequence[cands.Recipe] | None = None,
    threshold_rule: ThresholdRule | None = None,
    data_files: Mapping[str, str] | None = None,
    relative_to: Path | None = None,
) -> Outcome:
    """Build, measure and gate every candidate of ``fp32_path``; candidate files go to ``out_dir``.

    ``evaluation``: held-out rows with labels (see ``pdm_tools.quantization.data``); without it only FP32 can
    pass. ``threshold_rule``: the anomaly threshold rule (default: the shipped one,
    ``pdm_tools.common.threshold``). ``data_files``: names
    of the calibration/eval files for the record. ``relative_to``: record file paths relative to this dir.
    """
    settings = settings or Settings()
    fp32_path = Path(fp32_path)
    if evaluation is not None and len(evaluation.x) == 0:
        raise ValueError("evaluation rows are empty: pass None to quantize without held-out data")
    model = onnx.load(str(fp32_path))
    task = task_of(model)
    layers = dense_layers(model)
    built, sensitivity = cands.build_all(fp32_path, calibration, Path(out_dir), recipes)
    paths = {gate.PARENT: fp32_path} | {c.name: c.path for c in built if c.path is not None}

    probe = evaluation.x if evaluation is not None else calibration
    outputs = {name: run_task_output(path, probe) for name, path in paths.items()}
    # Per-layer error on in-distribution rows: anomalous rows are clipped by design (pdm_tools.quantization.static).
    normal = probe if evaluation is None or evaluation.y is None or task == "classifier" else probe[evaluation.y == 0]
    metrics: dict[str, dict[str, float]] = {}
    if evaluation is not None and evaluation.y is not None:
        rule = threshold_rule or threshold_from_scores
        for name in paths:
            metrics[name] = (
                classifier_metrics(outputs[gate.PARENT], outputs[name], evaluation.y)
                if task == "classifier"
                else anomaly_metrics(outputs[gate.PARENT], outputs[name], evaluation.y, rule)
            )
    layer_tensors = {layer.name: layer.output for layer in layers}
    out_sqnr = {name: layer_output_sqnr(fp32_path, path, normal, layer_tensors) for name, path in paths.items()}
    latency = measure_latency(paths, probe, settings)

    sizes = {name: path.stat().st_size for name, path in paths.items()}

    def measured_entry(name: str, bits: int) -> gate.Measured:
        lat = latency[name]
        return gate.Measured(
            name, bits, sizes[name], lat.p50_us, lat.p99_us, metrics.get(name, {}), round_p50_us=lat.round_p50_us
        )

    measured = [measured_entry(gate.PARENT, 32)]
    for c in built:
        if c.path is None:
            measured.append(gate.Measured(c.name, c.min_bits, 0, float("inf"), float("inf"), error=c.error))
        else:
            measured.append(measured_entry(c.name, c.min_bits))
    decision = gate.decide(measured, task, settings.criteria)
    logger.info("%s: gate chose %s (%s)", fp32_path.parent.name, decision.chosen, decision.reason)

    record = build_record(
        fp32_path=fp32_path,
        model=model,
        task=task,
        built=built,
        paths=paths,
        calibration=calibration,
        evaluation=evaluation,
        metrics=metrics,
        out_sqnr=out_sqnr,
        latency=latency,
        settings=settings,
        sensitivity=sensitivity,
        decision=decision,
        data_files=data_files or {},
        relative_to=relative_to or fp32_path.parent,
    )
    return Outcome(record, decision, paths)


def run_task_output(path: Path, rows: np.ndarray, batch: int = 1024) -> np.ndarray:
    """The model's task output for all rows: probabilities ``(n, C)`` or scores ``(n,)``."""
    sess = q.session(path)
    name = sess.get_outputs()[0].name
    input_name = sess.get_inputs()[0].name
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    parts = [sess.run([name], {input_name: rows[i : i + batch]})[0] for i in range(0, len(rows), batch)]
    return np.concatenate(parts).astype(np.float32)


def classifier_metrics(p_ref: np.ndarray, p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 of both models, their deltas in points, and how often they agree."""
    from sklearn.metrics import f1_score

    labels = list(range(p_ref.shape[1]))
    a_ref, a = p_ref.argmax(axis=1), p.argmax(axis=1)
    acc_ref, acc = float(np.mean(a_ref == y)), float(np.mean(a == y))
    f1_ref = float(f1_score(y, a_ref, labels=labels, average="macro", zero_division=0))
    f1 = float(f1_score(y, a, labels=labels, average="macro", zero_division=0))
    return {
        "accuracy": _r(acc),
        "accuracy_delta_points": _r(100 * (acc - acc_ref)),
        "macro_f1": _r(f1),
        "macro_f1_delta_points": _r(100 * (f1 - f1_ref)),
        "agreement": _r(float(np.mean(a == a_ref))),
    }


def anomaly_metrics(s_ref: np.ndarray, s: np.ndarray, y: np.ndarray, rule: ThresholdRule) -> dict[str, float]:
    """AUC and its delta; detection at each model's own rule threshold (same operating false-alarm rate)."""
    from sklearn.metrics import roc_auc_score

    normal, anomalous = y == 0, y == 1
    if not normal.any() or not anomalous.any():
        raise ValueError("anomaly evaluation rows need both normal (y=0) and anomalous (y=1) rows")
    auc_ref, auc = float(roc_auc_score(anomalous, s_ref)), float(roc_auc_score(anomalous, s))
    thr_ref, thr = rule(s_ref[normal]), rule(s[normal])
    det_ref, det = float(np.mean(s_ref[anomalous] > thr_ref)), float(np.mean(s[anomalous] > thr))
    return {
        "auc": _r(auc),
        "auc_delta": _r(auc - auc_ref),
        "threshold": _r(thr),
        "detection_rate": _r(det),
        "detection_delta_points": _r(100 * (det - det_ref)),
        "false_alarm_rate": _r(float(np.mean(s[normal] > thr))),
        "score_pearson_r": _r(float(np.corrcoef(s_ref, s)[0, 1])) if len(s) > 1 else 1.0,
    }


@dataclass(frozen=True, slots=True)
class Latency:
    """Microseconds per window (time of one run / batch): p50 and p99 over all runs, p50 of each round."""

    p50_us: float
    p99_us: float
    round_p50_us: tuple[float, ...]


def measure_latency(paths: Mapping[str, Path], rows: np.ndarray, settings: Settings) -> dict[str, Latency]:
    """Latency per window of each model, ``settings.repeats`` rounds of ``settings.runs`` runs each.

    Within a round the models take turns every 10 runs, so that noise hits them alike; the gate compares
    the rounds one by one as well as the pooled p50.
    """
    b = settings.batch
    feed_rows = np.ascontiguousarray(np.resize(np.asarray(rows, dtype=np.float32), (b, rows.shape[1])))
    sessions = {name: q.session(path, settings.threads) for name, path in paths.items()}
    feeds = {name: {s.get_inputs()[0].name: feed_rows} for name, s in sessions.items()}
    outputs = {name: [o.name for o in s.get_outputs()] for name, s in sessions.items()}
    names = list(sessions)
    samples: dict[str, list[list[float]]] = {name: [] for name in names}
    for name, sess in sessions.items():  # warm-up: first runs allocate and pre-pack weights
        for _ in range(20):
            sess.run(outputs[name], feeds[name])
    chunk = 10
    for _ in range(settings.repeats):
        times: dict[str, list[float]] = {name: [] for name in names}
        # Fine-grained round robin (10 runs per model, rotating the order) so that a burst of load from a
        # neighbour lands on every model alike instead of on whichever happened to be timed then.
        for step in range(max(1, settings.runs // chunk)):
            for k in range(len(names)):
                name = names[(k + step) % len(names)]
                sess, feed, outs = sessions[name], feeds[name], outputs[name]
                for _ in range(chunk):
                    t0 = time.perf_counter_ns()
                    sess.run(outs, feed)
                    times[name].append((time.perf_counter_ns() - t0) / 1e3 / b)
        for name in names:
            samples[name].append(times[name])
    out = {}
    for name, rounds in samples.items():
        pooled = np.concatenate(rounds)
        out[name] = Latency(
            round(float(np.percentile(pooled, 50)), 3),
            round(float(np.percentile(pooled, 99)), 3),
            tuple(round(float(np.median(r)), 3) for r in rounds),
        )
    return out


def _r(value: float, digits: int = 6) -> float:
    return round(float(value), digits)
