"""Model classes by the config's ``type:`` (``inference.models[].type``, ``inference.defect.type``) and
the manifest's ``task``: the one table the composition root and the model registry load models through.

A new kind of model is one module in this folder (a class with ``load(model_dir, threads)`` and a
constructor ``(manifest, model_dir, threads)`` that verifies and warms up) plus one entry here.
"""

from __future__ import annotations

from collections.abc import Mapping

from agent.inference.classifier import OnnxDefectClassifier
from agent.inference.image import OnnxImageClassifier
from agent.inference.model import OnnxAnomalyModel
from agent.plugins import registered

ModelClass = type[OnnxAnomalyModel] | type[OnnxDefectClassifier] | type[OnnxImageClassifier]

MODEL_KINDS: Mapping[str, ModelClass] = {
    "anomaly": OnnxAnomalyModel,
    "classifier": OnnxDefectClassifier,
    "image-classifier": OnnxImageClassifier,
}


def model_class(kind: str) -> ModelClass:
    """The class of model kind ``kind``; ``ValueError`` naming the known kinds otherwise."""
    return registered(MODEL_KINDS, kind, "model type")
