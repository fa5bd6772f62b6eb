"""Build the shipped bearing defect classifier from CWRU: fit, export, quantize, measure, manifest, card.

Trains on all three motor loads (the first 85 % of every fault recording and of the 5 s healthy
recording; the rest is held out for the quantization gate), after running the cross-load evaluation
(``pdm_tools.evaluation.cwru``) whose figures go into the manifest. Output directory (default
``models/defect_classifier``)::

    model.fp32.onnx   the exported MLP (FP32 parent)
    model.int8.onnx   its static INT8 (QDQ) quantization (a copy of that candidate)
    candidates/       every quantized candidate, measured and gated (``pdm_tools.quantization``)
    calibration.npz   calibration rows; eval.npz: the held-out rows with their class ids
    manifest.json     names the shipped file (the gate's choice), sha256, spec, classes
    MODEL_CARD.md     the same facts for people

Everything except the measured latencies is a function of the data and the seed.

    python -m pdm_tools.training.defect_train [--data DIR] [--out models/defect_classifier] [--seed 42]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import sklearn
from threadpoolctl import threadpool_limits

from agent.features.bearing import BearingFeatureSpec
from agent.inference.classifier import TASK, ClassifierManifest, OnnxDefectClassifier
from agent.inference.manifest import SCHEMA_VERSION, TensorInfo, sha256_file
from pdm_tools.common.graph_names import INPUT_NAME, LABEL, PROBABILITIES
from pdm_tools.common.modelcard import write_model_card
from pdm_tools.datasets.cwru import (
    CLASS_NAMES,
    NORMAL_TRAIN_HOP,
    DatasetError,
    Recording,
    default_data_dir,
    featurize,
    load_cwru,
    stack,
)
from pdm_tools.evaluation import cwru
from pdm_tools.models.defect_mlp import MlpConfig, export_onnx, fit_mlp
from pdm_tools.quantization import static as q
from pdm_tools.quantization.data import Rows, subsample
from pdm_tools.quantization.static import compare_probabilities, run_classifier
from pdm_tools.training.train import CALIBRATION_ROWS, FP32_FILE, INT8_FILE, Ship, quantize_and_choose

logger = logging.getLogger(__name__)

MODEL_ID = "bearing-defect-classifier"
DEFAULT_VERSION = "1.0.0"
DEFAULT_SEED = 42
DEFAULT_OUT = Path("models/defect_classifier")
# The last part of every recording is held out of the shipped model's training: the quantization gate
# measures accuracy on it (CWRU has no fourth load to hold out instead).
HOLDOUT_FRACTION = 0.15


def training_rows(
    recordings: Sequence[Recording], spec: BearingFeatureSpec
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training rows and labels, and the held-out ones (the last ``HOLDOUT_FRACTION`` of every recording)."""
    train_blocks, held_blocks = [], []
    for r in recordings:
        hop = NORMAL_TRAIN_HOP if r.kind == "normal" else spec.hop_samples
        head, tail = split_by_time(r.samples, HOLDOUT_FRACTION)
        train_blocks.append((featurize(spec, r, head, hop), r.label))
        held_blocks.append((featurize(spec, r, tail, hop), r.label))
    x, y = stack(train_blocks, spec.n_features)
    x_held, y_held = stack(held_blocks, spec.n_features)
    return x, y, x_held, y_held


def split_by_time(samples: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The first ``1 - fraction`` of a recording and the rest, disjoint.

    >>> [len(part) for part in split_by_time(np.arange(100.0), 0.15)]
    [85, 15]
    """
    cut_at = round(len(samples) * (1 - fraction))
    return samples[:cut_at], samples[cut_at:]


def train_defect_classifier(
    data_dir: Path,
    out_dir: Path = DEFAULT_OUT,
    seed: int = DEFAULT_SEED,
    version: str = DEFAULT_VERSION,
    *,
    spec: BearingFeatureSpec | None = None,
    config: MlpConfig | None = None,
    quantization: q.QuantizeConfig | None = None,
    ship: Ship = "auto",
    evaluate: bool = True,
    latency_runs: int = 400,
) -> ClassifierManifest:
    """Fit on every recording in ``data_dir`` (CWRU layout) and write the model directory; return its manifest.

    ``evaluate``: first run the cross-load and random-split protocols (``pdm_tools.evaluation.cwru``) and put
    their figures into the manifest's metrics.
    """
    spec = spec or cwru.FEATURE_SETS[cwru.DEFAULT_FEATURES]
    config = config or MlpConfig()
    quantization = quantization or q.QuantizeConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with threadpool_limits(limits=1, user_api="blas"):
        evaluation = cwru.evaluate(Path(data_dir), spec, seed, config, quantized=True) if evaluate else None
        recordings = load_cwru(Path(data_dir))
        x, y, x_held, y_held = training_rows(recordings, spec)
        model = fit_mlp(x, y, CLASS_NAMES, seed, config)
    fit_s = time.perf_counter() - t0

    fp32_path, int8_path = out_dir / FP32_FILE, out_dir / INT8_FILE
    export_onnx(model, fp32_path, {"model_id": MODEL_ID, "version": version, "feature_spec_hash": spec.spec_hash()})
    p32 = run_classifier(q.session(fp32_path), x)
    if not np.allclose(p32, model.predict_proba(x), atol=1e-5):
        raise RuntimeError("the exported ONNX graph does not reproduce the numpy model")
    shipped_file, quant_record = quantize_and_choose(
        fp32_path,
        x[subsample(len(x), CALIBRATION_ROWS)],
        Rows(x_held, y_held) if len(y_held) else None,  # recordings too short to hold a window out: no gate data
        out_dir,
        ship,
        quantization.calibration,
        latency_runs,
    )
    p8 = run_classifier(q.session(int8_path), x)
    logger.info("%s: shipping %s (%s)", MODEL_ID, shipped_file, quant_record["ship_reason"])

    metrics: dict[str, Any] = {
        "train_accuracy_fp32": round(float(np.mean(p32.argmax(axis=1) == y)), 6),
        "train_accuracy_int8": round(float(np.mean(p8.argmax(axis=1) == y)), 6),
        "int8_vs_fp32_on_train_rows": {
            k: round(v, 6) if isinstance(v, float) else v for k, v in compare_probabilities(p32, p8).items()
        },
    }
    if evaluation is not None:
        metrics["evaluation"] = "pdm-agent evaluate cwru (pdm_tools.evaluation.cwru), same spec, config and seed"
        for key in ("cross_load", "cross_load_faults_only"):
            metrics[key] = _brief(evaluation[key])
        metrics["random_split"] = {k: evaluation["random_split"][k] for k in ("accuracy", "macro_f1", "test_windows")}
        size = evaluation.get("cross_fault_size")
        if size:
            metrics["cross_fault_size"] = {
                "mean_accuracy": size["mean_accuracy"],
                "mean_macro_f1": size["mean_macro_f1"],
                "per_test_diameter_in": {
                    f"{f['test_diameter_in']:g}": {"accuracy": f["accuracy"], "macro_f1": f["macro_f1"]}
                    for f in size["folds"].values()
                },
            }
        bearing = evaluation["cross_bearing"]
        metrics["cross_bearing"] = {
            **{k: bearing[k] for k in ("accuracy", "macro_f1", "mean_bearing_recall", "min_bearing_recall")},
            "bearings": len(bearing["bearings"]),
            "envelope_visible_bearings": bearing["envelope_visible_bearings"],
        }
        quant = evaluation["quantized"]
        metrics["cross_load_int8"] = _brief(quant["cross_load"])
        metrics["int8_max_macro_f1_drop_points"] = quant["max_macro_f1_drop_points"]

    manifest = ClassifierManifest(
        schema_version=SCHEMA_VERSION,
        model_id=MODEL_ID,
        version=version,
        task=TASK,
        file=shipped_file,
        sha256=sha256_file(out_dir / shipped_file),
        inputs=(TensorInfo(INPUT_NAME, ("batch", spec.n_features), "float32"),),
        outputs=(
            TensorInfo(PROBABILITIES, ("batch", len(CLASS_NAMES)), "float32"),
            TensorInfo(LABEL, ("batch",), "int64"),
        ),
        feature_spec=spec.to_dict(),
        feature_spec_hash=spec.spec_hash(),
        feature_names=spec.feature_names(),
        class_names=CLASS_NAMES,
        metrics=metrics,
        quantization=quant_record,
        created_by="pdm_tools.training.defect_train.train_defect_classifier",
        training={
            "seed": seed,
            "data": {
                "dataset": "CWRU bearing data (drive end, 12 kHz), loads 0-2, all recordings of index.json",
                "recordings": {k: sum(r.kind == k for r in recordings) for k in CLASS_NAMES},
                "normal_window_hop": NORMAL_TRAIN_HOP,
            },
            "rows": {
                "train": len(y),
                "per_class": dict(zip(CLASS_NAMES, np.bincount(y).tolist(), strict=True)),
                "held_out": len(y_held),
                "held_out_rule": f"the last {HOLDOUT_FRACTION:.0%} of every recording (time split), never trained on; "
                "the quantization gate measures on them (eval.npz)",
            },
            "model": {"type": "mlp", "layers": [spec.n_features, *config.hidden, len(CLASS_NAMES)], **config.to_dict()},
            "fit_seconds_including_evaluation": round(fit_s, 1),
            "tools": {
                "numpy": np.__version__,
                "scikit-learn": sklearn.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": ort.__version__,
            },
        },
    )
    manifest.write(out_dir)
    write_model_card(manifest, out_dir)
    OnnxDefectClassifier.load(out_dir)  # fail the build, not the first agent start
    return manifest


def _brief(summary: dict[str, Any]) -> dict[str, Any]:
    return {
        "mean_accuracy": summary["mean_accuracy"],
        "mean_macro_f1": summary["mean_macro_f1"],
        "per_test_load": {
            str(r["test_load"]): {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"]}
            for r in summary["rotations"].values()
        },
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", type=Path, default=None, help="CWRU folder with index.json (default as evaluate cwru)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"model directory (default {DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"training seed (default {DEFAULT_SEED})")
    parser.add_argument("--model-version", default=DEFAULT_VERSION, help=f"model version (default {DEFAULT_VERSION})")
    parser.add_argument("--ship", choices=["auto", "int8", "fp32"], default="auto", help="file named in the manifest")
    parser.add_argument("--no-evaluate", action="store_true", help="skip the cross-load evaluation (faster)")
    parser.add_argument(
        "--features",
        choices=sorted(cwru.FEATURE_SETS),
        default=cwru.DEFAULT_FEATURES,
        help=f"feature set (as evaluate cwru --features; default {cwru.DEFAULT_FEATURES})",
    )


def main(args: argparse.Namespace) -> int:
    data_dir = args.data if args.data is not None else default_data_dir()
    try:
        manifest = train_defect_classifier(
            data_dir,
            args.out,
            args.seed,
            args.model_version,
            spec=cwru.FEATURE_SETS[args.features],
            ship=args.ship,
            evaluate=not args.no_evaluate,
        )
    except DatasetError as exc:
        print(f"defect classifier: {exc}", file=sys.stderr)
        return 2
    cross = manifest.metrics.get("cross_load", {})
    print(
        f"{manifest.model_id} {manifest.version}: {args.out / manifest.file} "
        f"(cross-load mean macro-F1 {cross.get('mean_macro_f1', 'not evaluated')})"
    )
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdm_tools.training.defect_train", description=__doc__)
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(cli())
