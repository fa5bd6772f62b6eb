"""``pdm-agent train --model surface-defect``: NEU images -> trained CNN -> FP32 + INT8 ONNX -> gate -> model folder.

One command rebuilds ``models/surface_defect/`` from the images with a fixed seed:

1. decode every image with the agent's codec, split them (seeded, stratified) 70 / 15 / 15;
2. train the CNN (``pdm_tools.images.train``) and export it to ONNX (``model.fp32.onnx``);
3. quantize it with calibrated static INT8, per-channel, QDQ (``pdm_tools.quantization.static``) on
   prepared training images (``model.int8.onnx``);
4. score both on the test images (never trained on, never used to pick the epoch) and time both at batch
   1 and 16 on one thread, in interleaved rounds;
5. let the quantization gate (``pdm_tools.quantization.gate``) choose what ships, and write the manifest
   (naming the shipped file) and ``MODEL_CARD.md`` with the measured figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from agent.inference.image import OnnxImageClassifier
from pdm_tools.datasets.neu import CLASS_NAMES, load_images
from pdm_tools.evaluation.neu import classification
from pdm_tools.images.card import write_card
from pdm_tools.images.export import FP32_FILE, INT8_FILE, image_manifest, write_model_dir
from pdm_tools.images.measure import agreement, latency, run_probs
from pdm_tools.images.train import TrainConfig, Trained, prepared, train_surface_cnn
from pdm_tools.quantization.gate import PARENT, Criteria, Measured, decide
from pdm_tools.quantization.static import QuantizeConfig, cpu_description, quantize_static_qdq

INT8_NAME = "int8-static-minmax-channel"
# The bar for shipping INT8 on this CPU: at most 0.6 x the FP32 latency (the gate's own rule is 1.0).
LATENCY_RATIO = 0.6
CALIBRATION_IMAGES = 240
# Kept in float: a quantized softmax gives probabilities in steps of 1/256 (alerts and InfluxDB carry them).
FLOAT_NODES = ("softmax",)


def build_surface_defect(
    data: Path,
    out_dir: Path,
    config: TrainConfig | None = None,
    version: str = "1.0.0",
    ship: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train, export, quantize, gate and write the model folder; returns the summary that ``--json`` prints."""
    say = progress or (lambda _: None)
    config = config or TrainConfig()
    started = time.perf_counter()
    images = load_images(data)
    say(f"decoded {len(images)} images from {data}")
    trained = train_surface_cnn(images, len(CLASS_NAMES), config, say)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (FP32_FILE, INT8_FILE):
        (out_dir / stale).unlink(missing_ok=True)
    fp32 = trained.net.to_onnx(config.size, CLASS_NAMES, doc="surface defect CNN (NEU)")
    write_model_dir(fp32, out_dir, trained.spec, CLASS_NAMES, version=version)
    say("quantizing: static INT8, per-channel, QDQ")
    rng = np.random.default_rng(config.seed)
    calib_idx = np.sort(rng.choice(len(trained.train), min(CALIBRATION_IMAGES, len(trained.train)), replace=False))
    calibration = prepared([trained.train.grays[i] for i in calib_idx], config.size)
    qconfig = QuantizeConfig(calibration="minmax", per_channel=True, reduce_range=True)
    recipe = quantize_static_qdq(
        out_dir / FP32_FILE, out_dir / INT8_FILE, calibration, qconfig, list(FLOAT_NODES), input_name="image"
    )
    say("scoring the test images and timing FP32 and INT8 (batch 1 and 16, one thread)")
    record = _measure(out_dir, trained)
    decision = decide(
        [record["gate_inputs"][PARENT], record["gate_inputs"][INT8_NAME]],
        "classifier",
        Criteria(max_latency_ratio=LATENCY_RATIO),
    )
    chosen = {"auto": decision.chosen, "fp32": PARENT, "int8": INT8_NAME}[ship]
    shipped_file = INT8_FILE if chosen == INT8_NAME else FP32_FILE
    quantization = {
        "recipe": recipe,
        "int8_file": INT8_FILE,
        "fp32_file": FP32_FILE,
        "criteria": Criteria(max_latency_ratio=LATENCY_RATIO).to_dict(),
        "measured": record["measured"],
        "latency": record["latency"],
        "cpu": cpu_description(),
        "gate": decision.to_dict(),
        "shipped": chosen,
        "shipped_file": shipped_file,
        "ship_reason": decision.reason if ship == "auto" else f"--ship {ship} (gate said {decision.chosen})",
    }
    training = _training_record(trained, config, data, time.perf_counter() - started)
    manifest = image_manifest(
        model_dir=out_dir,
        file=shipped_file,
        spec=trained.spec,
        class_names=CLASS_NAMES,
        version=version,
        metrics=_metrics(record["measured"], chosen),
        quantization=quantization,
        training=training,
        created_by="pdm_tools.training.surface_defect.build_surface_defect",
    )
    manifest.write(out_dir)
    OnnxImageClassifier.load(out_dir)  # the folder must load exactly as the agent loads it
    write_card(manifest, out_dir)
    return {
        "model": "surface-defect",
        "dir": str(out_dir),
        "shipped": chosen,
        "file": shipped_file,
        "test": record["measured"],
        "latency_ms": {k: {b: v[b]["p50_ms"] for b in v} for k, v in record["latency"].items()},
        "seconds": round(time.perf_counter() - started, 1),
    }


def _metrics(measured: dict[str, Any], chosen: str) -> dict[str, Any]:
    """The shipped file's test figures (``fp32``/``int8`` beside them in the quantization record)."""
    shipped = measured["int8" if chosen == INT8_NAME else "fp32"]
    return {
        "test_images": measured["images"],
        "accuracy": shipped["accuracy"],
        "macro_f1": shipped["macro_f1"],
        "fp32_accuracy": measured["fp32"]["accuracy"],
        "int8_accuracy": measured["int8"]["accuracy"],
        "int8_agreement": measured["agreement"],
    }


def _measure(out_dir: Path, trained: Trained) -> dict[str, Any]:
    size = trained.spec.size
    x_test = prepared(trained.test.grays, size)
    paths = {PARENT: out_dir / FP32_FILE, INT8_NAME: out_dir / INT8_FILE}
    probs = {name: run_probs(ort.InferenceSession(str(p)), x_test) for name, p in paths.items()}
    n = len(CLASS_NAMES)
    fp32 = classification(probs[PARENT], trained.test.labels, n)
    int8 = classification(probs[INT8_NAME], trained.test.labels, n)
    agree = agreement(probs[PARENT], probs[INT8_NAME])
    timing = latency(paths, x_test)
    sizes = {name: p.stat().st_size for name, p in paths.items()}
    gate_inputs = {}
    for name, bits in ((PARENT, 32), (INT8_NAME, 8)):
        # The gate compares per-image latency at batch 16 (the scoring worker's batches), rounds interleaved.
        t = timing[name]["batch16"]
        metrics = {}
        if name != PARENT:
            metrics = {
                "accuracy_delta_points": round(100 * (int8["accuracy"] - fp32["accuracy"]), 4),
                "macro_f1_delta_points": round(100 * (int8["macro_f1"] - fp32["macro_f1"]), 4),
                "agreement": agree,
            }
        gate_inputs[name] = Measured(
            name=name,
            min_bits=bits,
            size_bytes=sizes[name],
            p50_us=1000 * t["p50_ms"],
            p99_us=float("nan"),
            metrics=metrics,
            round_p50_us=tuple(1000 * v for v in t["round_p50_ms"]),
        )
    measured = {
        "split": "test (15 %, seeded stratified; never trained on, not used to choose the epoch)",
        "images": len(x_test),
        "fp32": {k: fp32[k] for k in ("accuracy", "macro_f1", "confusion")} | {"size_bytes": sizes[PARENT]},
        "int8": {k: int8[k] for k in ("accuracy", "macro_f1", "confusion")} | {"size_bytes": sizes[INT8_NAME]},
        "agreement": agree,
    }
    return {"measured": measured, "latency": timing, "gate_inputs": gate_inputs}


def _training_record(trained: Trained, config: TrainConfig, data: Path, seconds: float) -> dict[str, Any]:
    return {
        "seed": config.seed,
        "data": {
            "dataset": "NEU surface defect database (shared mirror, 416 x 416 JPEG)",
            "folder": data.name,
            "images": {"train": len(trained.train), "validation": len(trained.validation), "test": len(trained.test)},
        },
        "config": config.to_dict(),
        "parameters": trained.net.parameter_count,
        "best_epoch": trained.best_epoch,
        "validation_accuracy": trained.history[trained.best_epoch - 1]["val_accuracy"],
        "train_seconds": round(trained.seconds, 1),
        "seconds_including_evaluation": round(seconds, 1),
        "tools": {"numpy": np.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
    }
