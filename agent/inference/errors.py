"""Errors of the inference stage."""

from __future__ import annotations

# Why a model directory was refused: the ``reason`` label of ``models.refused`` (stable values).
REASONS = (
    "manifest",  # unreadable or invalid manifest.json (JSON, keys, types, values)
    "version",  # the version is not a semantic version (registry only)
    "task",  # the manifest's task is not the one the agent uses this model id for
    "file",  # the model file named by the manifest is missing
    "sha256",  # the model file's sha256 differs from the manifest's
    "feature_spec",  # invalid feature spec, another feature-code version, hash or names mismatch
    "shape",  # inputs/outputs do not fit the features, or the graph does not match the manifest
    "onnx",  # ONNX Runtime cannot load the file
    "warmup",  # the warm-up run failed or returned non-finite values
    "geometry",  # a new version windows the data differently than the running one (registry only)
    "duplicate",  # another directory holds the same model id and version (registry only)
)


class ModelError(Exception):
    """A model directory cannot be used: bad manifest, wrong checksum, or a session that does not match.

    Raised at load time (start of the agent, a new version found by the registry, or ``pdm-agent``
    commands), never per window: a model that loads has been verified against its manifest and its
    feature specification. ``reason`` is one of ``REASONS`` (the label the refusal is counted under).
    """

    def __init__(self, message: str, reason: str = "manifest") -> None:
        super().__init__(message)
        self.reason = reason
