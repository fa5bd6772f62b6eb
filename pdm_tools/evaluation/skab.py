"""SKAB anomaly detection (Skoltech Anomaly Benchmark), published outlier-detection protocol, run through
the agent's own per-machine commissioning baseline (``agent.commissioning.CommissioningBaseline``).

Protocol: in every labelled file the first 400 rows are training data (the commissioning period, taken as
normal without looking at labels) and the rest is test data; each file's rows are fed one by one, in
order, to a fresh baseline, which fits its detector and threshold on the first 400 and then scores each
later row causally (no look-ahead). Predictions on the test rows are compared point by point with the
``anomaly`` column and the confusion counts are pooled over all files:
F1 = TP / (TP + (FP + FN) / 2), FAR = FP / (FP + TN) in %, MAR = FN / (FN + TP) in %.

Files: every ``*.csv`` under --data, recursively (separator ';'). Files without an ``anomaly`` column
(``anomaly-free/anomaly-free.csv``) are skipped and listed; they are not used at all.

Quantized: each file's fitted detector is also exported to ONNX (FP32) and statically quantized to INT8
(QDQ, calibrated on that file's 400 commissioning rows, plainly and with a widened range); each ONNX
model sets its own threshold from its scores on the commissioning windows, the same rule.

Data: --data DIR, default $PDM_DATASETS/skab or ../shared/datasets/skab.

Example: pdm-agent evaluate skab --json > skab.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from agent.commissioning import CommissioningBaseline, CommissioningConfig
from agent.commissioning.detector import Detector
from pdm_tools.common import plots
from pdm_tools.datasets.paths import dataset_dir
from pdm_tools.models.commissioning_export import build_onnx, calibration_rows, window_rows
from pdm_tools.quantization import static as q

logger = logging.getLogger(__name__)

TRAIN_ROWS = 400
LABEL_COLUMN = "anomaly"
NON_SIGNAL_COLUMNS = ("datetime", "anomaly", "changepoint")
NS_PER_ROW = 1_000_000_000  # SKAB is sampled at 1 Hz; the protocol is by row, so row i is at i seconds
# Range factors of the INT8 calibration (see pdm_tools.models.commissioning_export): 1 = commissioning windows only.
INT8_RANGE_FACTORS = (1.0, 8.0)

# From the datasets README (SKAB leaderboard, outlier detection): F1, FAR %, MAR %.
LEADERBOARD: tuple[tuple[str, float, float, float], ...] = (
    ("Conv-AE", 0.78, 13.55, 28.02),
    ("MSET", 0.78, 39.73, 14.13),
    ("T-squared+Q (PCA)", 0.76, 26.62, 24.92),
    ("LSTM-AE", 0.74, 29.96, 25.92),
    ("T-squared", 0.66, 19.21, 42.6),
    ("LSTM-VAE", 0.56, 9.13, 55.03),
    ("Vanilla LSTM", 0.54, 12.54, 59.53),
    ("Vanilla AE", 0.39, 2.59, 75.15),
    ("MSCRED", 0.36, 49.94, 69.88),
    ("Isolation forest", 0.29, 2.56, 82.89),
)


class DatasetError(Exception):
    """The data folder is missing or holds no usable SKAB file."""


@dataclass(frozen=True, slots=True)
class Confusion:
    """Point-wise confusion counts (anomaly = positive).

    >>> c = Confusion(tp=60, fp=10, fn=20, tn=90)
    >>> round(c.f1, 4), c.far, c.mar
    (0.8, 10.0, 25.0)
    """

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    @classmethod
    def of(cls, predicted: np.ndarray, actual: np.ndarray) -> Confusion:
        p = np.asarray(predicted, dtype=bool)
        a = np.asarray(actual, dtype=bool)
        if p.shape != a.shape:
            raise ValueError(f"predictions {p.shape} and labels {a.shape} differ in shape")
        return cls(tp=int((p & a).sum()), fp=int((p & ~a).sum()), fn=int((~p & a).sum()), tn=int((~p & ~a).sum()))

    def __add__(self, other: Confusion) -> Confusion:
        return Confusion(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    @property
    def f1(self) -> float:
        """TP / (TP + (FP + FN) / 2); 0 when there is nothing to count."""
        den = self.tp + (self.fp + self.fn) / 2
        return self.tp / den if den else 0.0

    @property
    def far(self) -> float:
        """False alarm rate FP / (FP + TN), in %."""
        den = self.fp + self.tn
        return 100.0 * self.fp / den if den else 0.0

    @property
    def mar(self) -> float:
        """Missed alarm rate FN / (FN + TP), in %."""
        den = self.fn + self.tp
        return 100.0 * self.fn / den if den else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "f1": round(self.f1, 4),
            "far": round(self.far, 2),
            "mar": round(self.mar, 2),
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "tn": self.tn,
        }


@dataclass(frozen=True, slots=True)
class SkabFile:
    """One labelled file: ``values`` float64 ``(n, C)`` (signal columns in file order), ``labels`` bool ``(n,)``."""

    name: str
    channels: tuple[str, ...]
    values: np.ndarray
    labels: np.ndarray


def default_data_dir() -> Path:
    """The SKAB folder when ``--data`` is not given (see ``pdm_tools.datasets.paths``)."""
    return dataset_dir("skab")


def load_skab(data_dir: Path) -> tuple[list[SkabFile], list[str]]:
    """The labelled files under ``data_dir`` (sorted by relative path) and the skipped ones (with why)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(f"{data_dir} is not a folder: point --data (or PDM_DATASETS) at the SKAB data")
    files: list[SkabFile] = []
    skipped: list[str] = []
    for path in sorted(data_dir.rglob("*.csv")):
        name = path.relative_to(data_dir).as_posix()
        frame = pd.read_csv(path, sep=";")
        if LABEL_COLUMN not in frame.columns:
            skipped.append(f"{name}: no '{LABEL_COLUMN}' column")
            continue
        signals = [c for c in frame.columns if c not in NON_SIGNAL_COLUMNS]
        values = frame[signals].to_numpy(dtype=np.float64)
        if len(frame) <= TRAIN_ROWS:
            skipped.append(f"{name}: {len(frame)} rows, not more than the {TRAIN_ROWS} training rows")
            continue
        if not np.isfinite(values).all():
            skipped.append(f"{name}: non-numeric or missing values")
            continue
        files.append(SkabFile(name, tuple(signals), values, frame[LABEL_COLUMN].to_numpy() > 0.5))
    if not files:
        raise DatasetError(f"no labelled SKAB CSV file (';'-separated, with an '{LABEL_COLUMN}' column) in {data_dir}")
    return files, skipped


def stream_file(values: np.ndarray, config: CommissioningConfig) -> tuple[np.ndarray, np.ndarray, Detector]:
    """Feed the rows one by one to a fresh baseline: scores and anomaly flags ``(n,)`` (NaN/False while
    commissioning) and the fitted detector."""
    baseline = CommissioningBaseline(config)
    scores = np.full(len(values), np.nan)
    flags = np.zeros(len(values), dtype=bool)
    for i, row in enumerate(values):
        result = baseline.update(row, i * NS_PER_ROW)
        if result is not None:
            scores[i] = result.score
            flags[i] = result.is_anomalous
    detector = baseline.detector
    if detector is None:
        raise ValueError(f"{len(values)} rows do not complete commissioning ({config.commissioning_steps} steps)")
    return scores, flags, detector


def protocol_config(config: CommissioningConfig | None = None) -> CommissioningConfig:
    """The evaluation's config: the given (or default) detector with exactly ``TRAIN_ROWS`` commissioning steps."""
    detector = (config or CommissioningConfig()).detector
    return CommissioningConfig(commissioning_steps=TRAIN_ROWS, detector=detector)


def evaluate(
    data_dir: Path,
    config: CommissioningConfig | None = None,
    quantized: bool = True,
    on_file: Callable[[SkabFile, np.ndarray, float], None] | None = None,
    on_onnx: Callable[[dict[str, np.ndarray], float], None] | None = None,
) -> dict[str, Any]:
    """Run the protocol on the files in ``data_dir``; the result is JSON-ready. ``on_file`` gets each file
    with its scores (NaN while commissioning) and threshold, ``on_onnx`` each file's ONNX scores by variant
    with the FP32 model's threshold (the figures of ``--plots``)."""
    config = protocol_config(config)
    t0 = time.perf_counter()
    files, skipped = load_skab(data_dir)
    total = Confusion()
    per_file: list[dict[str, Any]] = []
    fitted: list[tuple[SkabFile, Detector]] = []
    steps = 0
    t_stream = time.perf_counter()
    for f in files:
        scores, flags, detector = stream_file(f.values, config)
        if on_file is not None:
            on_file(f, scores, detector.threshold)
        c = Confusion.of(flags[TRAIN_ROWS:], f.labels[TRAIN_ROWS:])
        total = total + c
        steps += len(f.values)
        fitted.append((f, detector))
        per_file.append(
            {"file": f.name, "rows": len(f.values), "threshold": round(detector.threshold, 6), **c.to_dict()}
        )
    stream_s = time.perf_counter() - t_stream
    result: dict[str, Any] = {
        "protocol": (
            f"SKAB outlier detection: first {TRAIN_ROWS} rows of each file = commissioning (training, "
            "label-free), rest = test, point-wise on 'anomaly', confusion pooled over files"
        ),
        "data": str(data_dir),
        "model": "commissioning baseline: drift-scaled standardization, causal moving average, max over channels",
        "config": config.to_dict(),
        **total.to_dict(),
        "files": len(files),
        "skipped": skipped,
        "per_file": per_file,
        "leaderboard": [{"model": m, "f1": f1, "far": far, "mar": mar} for m, f1, far, mar in LEADERBOARD],
        "timing": {
            "steps": steps,
            "streaming_s": round(stream_s, 3),
            "us_per_step": round(1e6 * stream_s / max(steps, 1), 1),
        },
    }
    if quantized:
        result["quantized"] = evaluate_onnx(fitted, config, on_onnx)
    result["timing"]["total_s"] = round(time.perf_counter() - t0, 3)
    return result


def evaluate_onnx(
    fitted: Sequence[tuple[SkabFile, Detector]],
    config: CommissioningConfig,
    on_onnx: Callable[[dict[str, np.ndarray], float], None] | None = None,
) -> dict[str, Any]:
    """FP32 ONNX and INT8 versions of every file's detector, each thresholded by the same label-free rule."""
    factor = config.detector.threshold_factor
    window = config.detector.smoothing_steps
    variants = ["fp32", *(f"int8_range{int(r)}" for r in INT8_RANGE_FACTORS)]
    totals = {v: Confusion() for v in variants}
    agreement = {v: 0 for v in variants}
    max_diff = {v: 0.0 for v in variants}
    n_test = 0
    latency: dict[str, Any] = {}
    recipe: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="pdm-skab-") as tmp:
        for index, (f, det) in enumerate(fitted):
            k = det.smoothing_steps
            rows = window_rows(f.values, k)  # row r = window ending at step r + k - 1
            train_rows = TRAIN_ROWS - k + 1
            reference = det.score_series(f.values)[k - 1 :]
            ref_flags = reference[train_rows:] > det.threshold
            paths = {"fp32": Path(tmp) / f"{index}.fp32.onnx"}
            paths["fp32"].write_bytes(build_onnx(det).SerializeToString())
            for r in INT8_RANGE_FACTORS:
                name = f"int8_range{int(r)}"
                paths[name] = Path(tmp) / f"{index}.{name}.onnx"
                cal = calibration_rows(f.values[:TRAIN_ROWS], k, r)
                recipe = q.quantize(paths["fp32"], paths[name], cal, q.QuantizeConfig())
            by_variant: dict[str, np.ndarray] = {}
            for name, path in paths.items():
                scores = by_variant[name] = q.run_scores(q.session(path), rows).astype(np.float64)
                threshold = factor * float(scores[:train_rows].max())
                flags = scores[train_rows:] > threshold
                totals[name] = totals[name] + Confusion.of(flags, f.labels[TRAIN_ROWS:])
                agreement[name] += int((flags == ref_flags).sum())
                max_diff[name] = max(max_diff[name], float(np.abs(scores - reference).max()))
            n_test += len(ref_flags)
            if on_onnx is not None:
                on_onnx(by_variant, factor * float(by_variant["fp32"][:train_rows].max()))
            if index == 0:
                latency = q.measure_latency(paths, rows[:train_rows], runs=100, repeats=3)
                latency["sizes_bytes"] = {name: path.stat().st_size for name, path in paths.items()}
    out: dict[str, Any] = {}
    for name in variants:
        out[name] = {
            **totals[name].to_dict(),
            "decision_agreement_with_numpy": round(agreement[name] / max(n_test, 1), 4),
            "max_abs_score_diff": round(max_diff[name], 6),
        }
    out["int8_recipe"] = {k: v for k, v in recipe.items() if k not in ("calibration_sha256", "calibration_samples")}
    out["int8_calibration"] = {
        "int8_range1": f"the {TRAIN_ROWS - window + 1} commissioning windows of each file",
        "int8_range8": "the same windows plus copies stretched 8x about their mean (label-free headroom)",
    }
    out["latency_first_file"] = latency
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="folder searched recursively for SKAB CSV files (default $PDM_DATASETS/skab or ../shared/datasets/skab)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--no-quantize", action="store_true", help="skip the ONNX FP32/INT8 comparison (faster)")
    parser.add_argument(
        "--plots",
        type=Path,
        metavar="DIR",
        help="also write PNG figures into DIR: each file's score over time with the threshold and the labelled "
        "anomaly, the pooled confusion matrix and ROC curve, and the INT8 against the FP32 scores",
    )


def main(args: argparse.Namespace) -> int:
    data_dir = args.data if args.data is not None else default_data_dir()
    figures: list[Path] = []
    ratios: list[np.ndarray] = []  # score / threshold of every test row: one scale across files
    labels: list[np.ndarray] = []
    onnx: dict[str, list[np.ndarray]] = {}  # each variant's scores / the FP32 threshold, every file's rows

    def onnx_scores(by_variant: dict[str, np.ndarray], threshold: float) -> None:
        for name, scores in by_variant.items():
            onnx.setdefault(name, []).append(scores / threshold)

    def score_figure(f: SkabFile, scores: np.ndarray, threshold: float) -> None:
        path = args.plots / f"skab_scores_{plots.file_stem(f.name)}.png"
        title = f"SKAB {f.name}: commissioning baseline score"
        figures.append(plots.score_figure(path, title, scores, threshold, f.labels, TRAIN_ROWS))
        ratios.append(scores[TRAIN_ROWS:] / threshold)
        labels.append(f.labels[TRAIN_ROWS:])

    try:
        if args.plots is not None:
            args.plots.mkdir(parents=True, exist_ok=True)
        on_file = score_figure if args.plots is not None else None
        on_onnx = onnx_scores if args.plots is not None else None
        result = evaluate(Path(data_dir), quantized=not args.no_quantize, on_file=on_file, on_onnx=on_onnx)
    except DatasetError as exc:
        print(f"skab: {exc}", file=sys.stderr)
        return 2
    except (OSError, plots.PlotsUnavailable) as exc:  # the plots folder; matplotlib not installed
        print(f"skab: {exc}", file=sys.stderr)
        return 2
    if args.plots is not None:
        matrix = np.array([[result["tn"], result["fp"]], [result["fn"], result["tp"]]])
        title = f"SKAB, {result['files']} files pooled (test rows)"
        figures.append(plots.confusion_figure(args.plots / "skab_confusion.png", title, matrix, ["normal", "anomaly"]))
        roc_title = f"SKAB, {result['files']} files pooled: score / threshold"
        figures.append(
            plots.roc_figure(args.plots / "skab_roc.png", roc_title, np.concatenate(ratios), np.concatenate(labels))
        )
        if onnx:
            fp32 = np.concatenate(onnx.pop("fp32"))
            series = {name: (fp32, np.concatenate(parts)) for name, parts in onnx.items()}
            figures.append(
                plots.agreement_figure(
                    args.plots / "skab_int8_vs_fp32.png",
                    f"SKAB INT8 vs FP32 ONNX, {result['files']} files, {len(fp32)} rows",
                    series,
                    "FP32 score / FP32 threshold",
                    "INT8 score / FP32 threshold",
                )
            )
        print(f"wrote {len(figures)} figures to {args.plots}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2, allow_nan=False))
    else:
        print(render_text(result))
    return 0


def _row(name: str, f1: float, far: float, mar: float) -> str:
    return f"{name:<44} {f1:>5.3f} {far:>8.2f} {mar:>8.2f}"


def _plain(values: dict[str, Any]) -> str:
    """``{"p50": 3.1, "p99": 4.0}`` as ``p50 3.1, p99 4.0``: report text, not a dict repr."""
    return ", ".join(f"{key} {value}" for key, value in values.items())


def render_text(result: dict[str, Any]) -> str:
    """Human-readable report: ours beside the leaderboard, then the ONNX variants and the per-file lines."""
    lines = [
        f"SKAB, {result['files']} labelled files in {result['data']} (pooled, point-wise)",
        f"{'model':<44} {'F1':>5} {'FAR %':>8} {'MAR %':>8}",
        _row("commissioning baseline (this agent, numpy)", result["f1"], result["far"], result["mar"]),
    ]
    quant = result.get("quantized")
    if quant:
        for name in ("fp32", *(f"int8_range{int(r)}" for r in INT8_RANGE_FACTORS)):
            v = quant[name]
            lines.append(_row(f"  same, ONNX {name}", v["f1"], v["far"], v["mar"]))
    lines.append("published leaderboard (datasets README):")
    lines += [_row(f"  {e['model']}", e["f1"], e["far"], e["mar"]) for e in result["leaderboard"]]
    lines.append("")
    lines += [f"skipped: {s}" for s in result["skipped"]]
    lines.append("config: " + ", ".join(f"{key}={value}" for key, value in result["config"].items()))
    t = result["timing"]
    lines.append(f"streaming: {t['steps']} steps in {t['streaming_s']} s ({t['us_per_step']} us/step)")
    if quant:
        for name in ("fp32", *(f"int8_range{int(r)}" for r in INT8_RANGE_FACTORS)):
            v = quant[name]
            lines.append(
                f"ONNX {name}: decisions equal to numpy on {100 * v['decision_agreement_with_numpy']:.2f} % of "
                f"test rows, max |score diff| {v['max_abs_score_diff']:.4g}"
            )
        lat = quant["latency_first_file"]
        if lat:
            per = "; ".join(f"{n} {_plain(lat[n])}" for n in lat if isinstance(lat[n], dict) and n != "sizes_bytes")
            lines.append(f"latency ({lat['unit']}; {lat['cpu']}): {per}")
            lines.append(f"sizes (bytes): {_plain(lat['sizes_bytes'])}")
    lines.append(
        "per file: " + "; ".join(f"{p['file']} F1 {p['f1']:.2f} FAR {p['far']:.1f}" for p in result["per_file"])
    )
    return "\n".join(lines)
