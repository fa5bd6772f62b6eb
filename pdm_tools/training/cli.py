"""``pdm-agent train``: rebuild the shipped anomaly models from simulated data with fixed seeds.

``pdm-agent train`` writes both models into ``models/`` (about a minute on 2 cores);
``pdm-agent train --quick --out DIR`` is the tiny run the tests use.
``pdm-agent train --model surface-defect --data DIR`` builds the camera image classifier from the NEU images
(``pdm_tools.training.surface_defect``); ``--model all`` builds it too when the images are
there and keeps the shipped ``models/surface_defect`` otherwise.

Exit status: 0 every model asked for was built; 2 a usage error (bad options, ``--quick`` with the defect
classifier only, or ``--model defect-classifier`` without the CWRU data, or ``--model surface-defect`` without
the NEU images).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pdm_tools.common.progress import note
from pdm_tools.models.autoencoder import AutoencoderConfig
from pdm_tools.quantization.static import CALIBRATION_METHODS, QuantizeConfig
from pdm_tools.training.simdata import (
    DEFAULT_PROCESS_MINUTES,
    DEFAULT_VIBRATION_MINUTES,
    DataPlan,
    Dataset,
    process_dataset,
    vibration_dataset,
)
from pdm_tools.training.train import Evaluation, train_anomaly_model

logger = logging.getLogger(__name__)

# model id -> (directory under --out, dataset builder)
MODELS: dict[str, tuple[str, Callable[[DataPlan], Dataset]]] = {
    "vibration-anomaly": ("vibration_anomaly", vibration_dataset),
    "process-anomaly": ("process_anomaly", process_dataset),
}
DEFECT_MODEL = "defect-classifier"
IMAGE_MODEL = "surface-defect"
DEFAULT_SEED = 42
DEFAULT_VERSION = "1.0.0"
QUICK_AUTOENCODER = AutoencoderConfig(max_epochs=30, patience=5)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("models"), help="output directory (default: models)")
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help=f"simulator and training seed (default {DEFAULT_SEED})"
    )
    parser.add_argument(
        "--minutes",
        type=float,
        default=DEFAULT_VIBRATION_MINUTES,
        help=f"simulated minutes of vibration per machine and split (default {DEFAULT_VIBRATION_MINUTES:g})",
    )
    parser.add_argument(
        "--process-minutes",
        type=float,
        default=DEFAULT_PROCESS_MINUTES,
        help="simulated minutes of process values per machine and split; they arrive once a second, so "
        f"they need a longer span than vibration (default {DEFAULT_PROCESS_MINUTES:g})",
    )
    parser.add_argument("--quick", action="store_true", help="tiny data and few epochs (tests; not for shipping)")
    parser.add_argument(
        "--model",
        choices=["all", *MODELS, DEFECT_MODEL, IMAGE_MODEL],
        default="all",
        help="which model to build (default all; the defect classifier needs the CWRU data, see --cwru-data; "
        "the surface-defect image classifier the NEU images, see --data)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="NEU images for the surface-defect classifier (default $PDM_DATASETS/neu or ../shared/datasets/neu); "
        "with --model all and no images there, the shipped model is kept and a line says so",
    )
    parser.add_argument(
        "--cwru-data",
        type=Path,
        default=None,
        help="CWRU folder for the defect classifier (default $PDM_DATASETS/cwru or ../shared/datasets/cwru); "
        "with --model all and no data there, the classifier is skipped with a message",
    )
    parser.add_argument(
        "--calibration",
        choices=sorted(CALIBRATION_METHODS),
        default="minmax",
        help="calibration of model.int8.onnx, the static INT8 candidate kept next to the parent (default minmax; "
        "the gate tries every method)",
    )
    parser.add_argument(
        "--ship",
        choices=["auto", "int8", "fp32"],
        default="auto",
        help="file named in the manifest; auto = the quantization gate's choice (pdm_tools.quantization.gate: the "
        "cheapest candidate that keeps accuracy on held-out data and is not slower than FP32; default auto)",
    )
    parser.add_argument("--model-version", default=DEFAULT_VERSION, help=f"model version (default {DEFAULT_VERSION})")
    parser.add_argument("--json", action="store_true", help="print what was built as one JSON object")


def main(args: argparse.Namespace) -> int:
    if args.minutes <= 0 or args.process_minutes <= 0:
        print("pdm-agent train: error: --minutes and --process-minutes must be > 0", file=sys.stderr)
        return 2
    if args.quick and args.model == IMAGE_MODEL:
        print(
            "pdm-agent train: error: --quick builds the anomaly models only; drop it for --model surface-defect",
            file=sys.stderr,
        )
        return 2
    if args.quick and args.model == DEFECT_MODEL:
        # --quick trains on a few seconds of simulated data; the classifier trains on the CWRU recordings
        print(
            "pdm-agent train: error: --quick builds the anomaly models only; drop it for --model defect-classifier",
            file=sys.stderr,
        )
        return 2
    if args.quick:
        plan = DataPlan.quick(args.seed)
        autoencoder, latency_runs = QUICK_AUTOENCODER, 50
    else:
        plan = DataPlan(seed=args.seed, vibration_minutes=args.minutes, process_minutes=args.process_minutes)
        autoencoder, latency_runs = AutoencoderConfig(), 400
    command = _command(args)
    built: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    # The models trained from a public dataset: skipped under --quick, and under "all" without their data.
    for name, train_it in ((DEFECT_MODEL, _train_defect_classifier), (IMAGE_MODEL, _train_image_model)):
        if args.model not in ("all", name):
            continue
        if args.quick:
            skipped[name] = "--quick builds the anomaly models only"
            continue
        status, result = train_it(args)
        if status != 0:
            return status
        if isinstance(result, str):
            skipped[name] = result
        else:
            built.append(result)
    names = [] if args.model in (DEFECT_MODEL, IMAGE_MODEL) else list(MODELS) if args.model == "all" else [args.model]
    for name in names:
        subdir, build = MODELS[name]
        started = time.monotonic()
        note(f"{name}: simulating the training data")
        data = build(plan)
        note(f"{name}: training, exporting, quantizing and gating")
        manifest = train_anomaly_model(
            name,
            data.spec,
            data.train,
            data.val,
            args.out / subdir,
            seed=args.seed,
            version=args.model_version,
            evaluation=Evaluation(test=data.test, faults=data.faults),
            data_description=data.description,
            created_by=command,
            autoencoder=autoencoder,
            quantization=QuantizeConfig(calibration=args.calibration),
            ship=args.ship,
            latency_runs=latency_runs,
        )
        det = manifest.metrics.get("detection_rate", {})
        built.append(
            {
                "model": name,
                "file": str(args.out / subdir / manifest.file),
                "threshold": manifest.threshold,
                "false_alarm_rate_test": manifest.metrics.get("false_alarm_rate_test", 0),
                "detection_rate": {k: v["rate"] for k, v in det.items()},
                "seconds": round(time.monotonic() - started, 1),
            }
        )
        if not args.json:
            print(
                f"{name}: {args.out / subdir / manifest.file} threshold {manifest.threshold:g}, "
                f"false alarms {manifest.metrics.get('false_alarm_rate_test', 0):.3%}, detection "
                + ", ".join(f"{k} {v['rate']:.0%}" for k, v in det.items())
                + f" ({time.monotonic() - started:.0f} s)"
            )
    for name, reason in skipped.items():
        print(f"{name}: skipped: {reason}", file=sys.stderr)
    if args.json:
        print(json.dumps({"built": built, "skipped": skipped}, indent=2))
    return 0


def _train_defect_classifier(args: argparse.Namespace) -> tuple[int, dict[str, Any] | str]:
    """The CWRU defect classifier (``pdm_tools.training.defect_train``), into ``--out``/defect_classifier:
    (exit status, what was built or why it was skipped)."""
    from pdm_tools.datasets.cwru import DatasetError, default_data_dir
    from pdm_tools.training.defect_train import train_defect_classifier

    data = args.cwru_data if args.cwru_data is not None else default_data_dir()
    if not (Path(data) / "index.json").exists() and args.model == "all":
        return 0, f"no CWRU data at {data} (pass --cwru-data DIR)"
    out = args.out / "defect_classifier"
    started = time.monotonic()
    note(f"{DEFECT_MODEL}: CWRU features, training, cross-load evaluation")
    try:
        manifest = train_defect_classifier(data, out, args.seed, args.model_version, ship=args.ship)
    except DatasetError as exc:
        print(f"pdm-agent train: error: defect classifier: {exc}", file=sys.stderr)
        return 2, str(exc)
    cross = manifest.metrics.get("cross_load", {})
    if not args.json:
        print(
            f"{manifest.model_id} {manifest.version}: {out / manifest.file} "
            f"(cross-load mean macro-F1 {cross.get('mean_macro_f1', 'not evaluated')})"
        )
    return 0, {
        "model": DEFECT_MODEL,
        "file": str(out / manifest.file),
        "cross_load_mean_macro_f1": cross.get("mean_macro_f1"),
        "seconds": round(time.monotonic() - started, 1),
    }


def _train_image_model(args: argparse.Namespace) -> tuple[int, dict[str, Any] | str]:
    """The NEU surface-defect CNN (``pdm_tools.training.surface_defect``), into ``--out``/surface_defect:
    (exit status, what was built or why it was skipped)."""
    from pdm_tools.datasets.neu import DatasetError, default_data_dir
    from pdm_tools.images.train import TrainConfig
    from pdm_tools.training.surface_defect import build_surface_defect

    data = Path(args.data if args.data is not None else default_data_dir())
    if not data.is_dir():
        if args.model == "all":
            return 0, f"no NEU images at {data} (pass --data DIR); models/surface_defect is kept as shipped"
        print(f"pdm-agent train: error: surface-defect: no NEU images at {data} (pass --data DIR)", file=sys.stderr)
        return 2, "no data"
    note(f"{IMAGE_MODEL}: decoding the images, training, quantizing and gating")
    try:
        summary = build_surface_defect(
            data,
            args.out / "surface_defect",
            TrainConfig(seed=args.seed),
            version=args.model_version,
            ship=args.ship,
            progress=None if args.json else note,
        )
    except DatasetError as exc:
        print(f"pdm-agent train: error: surface-defect: {exc}", file=sys.stderr)
        return 2, str(exc)
    if not args.json:
        test = summary["test"]
        print(
            f"{IMAGE_MODEL}: {summary['dir']} ships {summary['shipped']}; test accuracy FP32 "
            f"{test['fp32']['accuracy']:.4f}, INT8 {test['int8']['accuracy']:.4f} on {test['images']} images "
            f"({summary['seconds']:.0f} s)"
        )
    return 0, summary


def _command(args: argparse.Namespace) -> str:
    """The command that rebuilds these files (the output directory is left out: it does not change them)."""
    parts = ["pdm-agent train", f"--seed {args.seed}"]
    if args.quick:
        parts.append("--quick")
    else:
        parts += [f"--minutes {args.minutes:g}", f"--process-minutes {args.process_minutes:g}"]
    if args.model != "all":
        parts.append(f"--model {args.model}")
    parts += [
        f"--calibration {args.calibration}",
        f"--ship {args.ship}",
        f"--model-version {args.model_version}",
    ]
    return " ".join(parts)
