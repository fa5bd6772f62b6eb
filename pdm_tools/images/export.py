"""Write an image model's directory: the ONNX file and the manifest ``agent.inference.image`` verifies."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx

from agent.images.preprocess import ImageSpec
from agent.inference.image import INPUT, OUTPUT, TASK
from agent.inference.manifest import SCHEMA_VERSION, Manifest, TensorInfo, sha256_file

MODEL_ID = "surface_defect"
FP32_FILE = "model.fp32.onnx"
INT8_FILE = "model.int8.onnx"  # static INT8 beside the parent; the manifest names the one that ships


def image_manifest(
    *,
    model_dir: Path,
    file: str,
    spec: ImageSpec,
    class_names: Sequence[str],
    version: str = "1.0.0",
    model_id: str = MODEL_ID,
    metrics: dict[str, Any] | None = None,
    quantization: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    created_by: str = "pdm_tools.images.train",
) -> Manifest:
    """The manifest of ``model_dir/file`` (its sha256 taken now) for an ``image-classifier`` model."""
    return Manifest(
        schema_version=SCHEMA_VERSION,
        model_id=model_id,
        version=version,
        task=TASK,
        file=file,
        sha256=sha256_file(Path(model_dir) / file),
        inputs=(TensorInfo(INPUT, ("batch", 1, spec.size, spec.size), "float32"),),
        outputs=(TensorInfo(OUTPUT, ("batch", len(class_names)), "float32"),),
        feature_spec=spec.to_dict(),
        feature_spec_hash=spec.spec_hash(),
        feature_names=spec.feature_names(),
        class_names=tuple(class_names),
        metrics=metrics or {},
        quantization=quantization or {},
        created_by=created_by,
        training=training or {},
    )


def write_model_dir(
    model: onnx.ModelProto, model_dir: Path, spec: ImageSpec, class_names: Sequence[str], **manifest: Any
) -> Manifest:
    """Save ``model`` as ``model_dir/model.fp32.onnx`` and write its manifest; returns the manifest."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(model_dir / FP32_FILE))
    m = image_manifest(model_dir=model_dir, file=FP32_FILE, spec=spec, class_names=class_names, **manifest)
    m.write(model_dir)
    return m
