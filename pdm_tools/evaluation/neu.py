"""NEU surface defect classification: the shipped image model on every image of a folder, trained on nothing.

Every image in DIR (``<class>_<n>.jpg``, six classes) is decoded with the agent's codec, prepared with
the agent's ``prepare`` and scored by the model folder's FP32 and INT8 files (``model.fp32.onnx``,
``model.int8.onnx``; the manifest names the one the agent runs). Printed: accuracy and macro-F1 of the
shipped file, the confusion matrix, FP32 vs INT8 accuracy and agreement, p50 milliseconds per image at
batch 1 and batch 16 on one thread, and the file sizes.

The images the model was trained on are in the shared folder too; the split it was trained with is
recorded in the manifest (``training``), and ``--split test`` scores only the test part of that split.
Images kept aside from the shared folder are the honest measure: point --data at them.

Data: --data DIR (``images/`` inside it, or the images themselves), default $PDM_DATASETS/neu or
../shared/datasets/neu. Without images there: a one-line message and exit status 2.

Example: pdm-agent evaluate neu --json > neu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from agent.inference.errors import ModelError
from agent.inference.image import OnnxImageClassifier
from agent.inference.session import open_session
from pdm_tools.datasets.neu import DatasetError, default_data_dir, image_files, load_images, stratified_split
from pdm_tools.evaluation.classification import scores
from pdm_tools.images.export import FP32_FILE, INT8_FILE
from pdm_tools.images.measure import agreement, latency, run_probs
from pdm_tools.images.train import TrainConfig, prepared

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "surface_defect"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=None, help="folder of NEU images (default $PDM_DATASETS/neu)")
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=DEFAULT_MODEL_DIR,
        help="image model folder (default: the shipped models/surface_defect)",
    )
    parser.add_argument(
        "--split",
        choices=["all", "test"],
        default="all",
        help="all images of DIR (default), or only the test part of the split the model was trained with",
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def main(args: argparse.Namespace) -> int:
    data = Path(args.data if args.data is not None else default_data_dir())
    try:
        result = evaluate(data, Path(args.model_dir), test_only=args.split == "test")
    except (DatasetError, ModelError) as exc:
        print(f"neu: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, allow_nan=False) if args.json else render_text(result))
    return 0


def evaluate(data: Path, model_dir: Path, test_only: bool = False) -> dict[str, Any]:
    """Score the model folder's FP32 and INT8 files on the images of ``data``; see the module docstring."""
    image_files(data)  # no images: say so before anything else
    model = OnnxImageClassifier.load(model_dir)  # the manifest, sha256 and spec checks of the agent
    classes = model.classes
    images = load_images(data)
    if test_only:
        seed = int(model.manifest.training.get("seed", TrainConfig.seed))
        split = tuple(model.manifest.training.get("config", {}).get("split", TrainConfig.split))
        images = images.subset(stratified_split(images.labels, split, seed)[2])
    x = prepared(images.grays, model.input_size)
    paths = {"fp32": model_dir / FP32_FILE, "int8": model_dir / INT8_FILE}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise ModelError(f"{model_dir}: missing {missing} (rebuild with pdm-agent train --model surface-defect)")
    probs = {name: run_probs(open_session(p, 1), x) for name, p in paths.items()}
    scored = {name: classification(p, images.labels, len(classes)) for name, p in probs.items()}
    shipped = "int8" if model.manifest.file == INT8_FILE else "fp32"
    timing = latency(paths, x[: min(len(x), 64)])
    sizes = {name: p.stat().st_size for name, p in paths.items()}
    return {
        "dataset": "neu",
        "data": str(data),
        "model": f"{model.model_id} {model.version}",
        "shipped": shipped,
        "images": len(images),
        "split": "test part of the training split" if test_only else "every image in the folder",
        "classes": list(classes),
        "accuracy": scored[shipped]["accuracy"],
        "macro_f1": scored[shipped]["macro_f1"],
        "f1_per_class": scored[shipped]["f1_per_class"],
        "confusion": scored[shipped]["confusion"],
        "fp32_accuracy": scored["fp32"]["accuracy"],
        "int8_accuracy": scored["int8"]["accuracy"],
        "fp32_macro_f1": scored["fp32"]["macro_f1"],
        "int8_macro_f1": scored["int8"]["macro_f1"],
        "agreement": agreement(probs["fp32"], probs["int8"]),
        "fp32_p50_ms": {b: v["p50_ms"] for b, v in timing["fp32"].items()},
        "int8_p50_ms": {b: v["p50_ms"] for b, v in timing["int8"].items()},
        "size_bytes": sizes | {"shipped": sizes[shipped]},
        "threads": 1,
        "wrong": [images.files[i] for i in np.flatnonzero(probs[shipped].argmax(axis=1) != images.labels)][:50],
    }


def classification(probs: np.ndarray, labels: np.ndarray, n_classes: int) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class F1 and the confusion matrix (rows true, columns predicted) of probabilities."""
    s = scores(labels, probs.argmax(axis=1), n_classes)
    s["images"] = s.pop("test_windows")
    return s


def render_text(r: dict[str, Any]) -> str:
    classes = r["classes"]
    width = max(len(c) for c in classes)
    lines = [
        f"NEU surface defects: {r['model']} ({r['shipped']} shipped) on {r['images']} images ({r['split']})",
        f"accuracy {r['accuracy']:.4f}, macro-F1 {r['macro_f1']:.4f}",
        f"FP32 accuracy {r['fp32_accuracy']:.4f}, INT8 accuracy {r['int8_accuracy']:.4f}, "
        f"INT8 agrees with FP32 on {r['agreement']:.2%}",
        "p50 ms per image, one thread: "
        + ", ".join(
            f"{name} batch {b.removeprefix('batch')} {r[f'{name}_p50_ms'][b]:.3f}"
            for name in ("fp32", "int8")
            for b in r[f"{name}_p50_ms"]
        ),
        f"size bytes: FP32 {r['size_bytes']['fp32']}, INT8 {r['size_bytes']['int8']}",
        "",
        "confusion (rows true, columns predicted):",
        " " * (width + 1) + " ".join(f"{c[:6]:>6}" for c in classes),
    ]
    for name, row in zip(classes, r["confusion"], strict=True):
        lines.append(f"{name:>{width}} " + " ".join(f"{v:6d}" for v in row))
    return "\n".join(lines)
