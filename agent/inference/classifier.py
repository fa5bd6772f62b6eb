"""The bearing defect classifier at serving time: its manifest and a verified, warmed-up ONNX session.

When the vibration anomaly model fires, the agent asks this model *which* defect the window shows
(normal, inner_race, outer_race, ball) and puts the answer into the alert. The features need the shaft
speed: ``classify(windows, rpm)`` computes them with ``agent.features.bearing`` (the same code as
training) and returns one ``DefectPrediction`` per window.

``manifest.json`` of a classifier has the same trust rules as an anomaly model's (exact keys, sha256 of
the ONNX file, the feature spec hashing to the recorded hash with today's feature code), with
``task: "classifier"``, ``class_names`` instead of a threshold, and two outputs: ``probabilities``
float32 ``[batch, C]`` and ``label`` int64 ``[batch]``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.features.bearing import BearingFeatureSpec, extract_bearing_matrix
from agent.inference.errors import ModelError
from agent.inference.manifest import MANIFEST_FILE, SCHEMA_VERSION, TensorInfo, sha256_file
from agent.inference.session import open_session
from agent.records import Window

logger = logging.getLogger(__name__)

TASK = "classifier"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ORT_TYPES = {"float32": "tensor(float)", "int64": "tensor(int64)"}


@dataclass(frozen=True, slots=True)
class DefectPrediction:
    """The classifier's verdict on one window. ``probabilities``: float32 ``(len(class_names),)``."""

    class_name: str
    probability: float
    class_names: tuple[str, ...]
    probabilities: np.ndarray

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, for an alert's details: ``{"defect": ..., "probability": ..., "probabilities": {...}}``."""
        return {
            "defect": self.class_name,
            "probability": round(self.probability, 4),
            "probabilities": {n: round(float(p), 4) for n, p in zip(self.class_names, self.probabilities, strict=True)},
        }


@dataclass(frozen=True, slots=True)
class ClassifierManifest:
    """What serving needs to trust a classifier file; ``metrics``/``quantization``/``training`` are for people."""

    schema_version: int
    model_id: str
    version: str
    task: str
    file: str
    sha256: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    feature_spec: dict[str, Any]
    feature_spec_hash: str
    feature_names: tuple[str, ...]
    class_names: tuple[str, ...]
    metrics: dict[str, Any]
    quantization: dict[str, Any]
    created_by: str
    training: dict[str, Any]

    def spec(self) -> BearingFeatureSpec:
        return BearingFeatureSpec.from_dict(self.feature_spec)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("inputs", "outputs"):
                value = [t.to_dict() for t in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    def write(self, model_dir: Path) -> Path:
        """Write ``manifest.json`` (stable key order, so reruns give identical bytes)."""
        path = Path(model_dir) / MANIFEST_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: object, where: str = MANIFEST_FILE) -> ClassifierManifest:
        """Parse and type-check (no file checks; ``load`` does those). Raises ``ModelError``."""
        if not isinstance(data, dict):
            raise ModelError(f"{where}: expected a JSON object at the top level")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in known]
        missing = [k for k in known if k not in data]
        if unknown or missing:
            raise ModelError(f"{where}: unknown key(s) {unknown}, missing key(s) {missing}")
        types: dict[str, type] = {
            "schema_version": int, "model_id": str, "version": str, "task": str, "file": str, "sha256": str,
            "inputs": list, "outputs": list, "feature_spec": dict, "feature_spec_hash": str, "feature_names": list,
            "class_names": list, "metrics": dict, "quantization": dict, "created_by": str, "training": dict,
        }  # fmt: skip
        for key, kind in types.items():
            if isinstance(data[key], bool) or not isinstance(data[key], kind):
                raise ModelError(f"{where}: key {key!r} must be of type {kind.__name__}")
        if data["schema_version"] != SCHEMA_VERSION:
            raise ModelError(f"{where}: schema_version {data['schema_version']} is not supported ({SCHEMA_VERSION})")
        if data["task"] != TASK:
            raise ModelError(f"{where}: task {data['task']!r} is not {TASK!r}")
        file = data["file"]
        if not file or Path(file).name != file or file in (".", ".."):
            raise ModelError(f"{where}: file {file!r} must be a plain file name inside the model directory")
        if not _SHA256.fullmatch(data["sha256"]):
            raise ModelError(f"{where}: sha256 must be 64 lowercase hex characters")
        names, classes = data["feature_names"], data["class_names"]
        if not names or not all(isinstance(n, str) for n in names):
            raise ModelError(f"{where}: feature_names must be a non-empty list of strings")
        if len(classes) < 2 or not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
            raise ModelError(f"{where}: class_names must be two or more distinct strings")
        inputs, outputs = _tensors(data["inputs"], "inputs", where), _tensors(data["outputs"], "outputs", where)
        want_in = (TensorInfo("features", ("batch", len(names)), "float32"),)
        want_out = (
            TensorInfo("probabilities", ("batch", len(classes)), "float32"),
            TensorInfo("label", ("batch",), "int64"),
        )
        if inputs != want_in or outputs != want_out:
            raise ModelError(
                f"{where}: inputs/outputs must be {[t.to_dict() for t in want_in]} / "
                f"{[t.to_dict() for t in want_out]}, got {[t.to_dict() for t in inputs]} / "
                f"{[t.to_dict() for t in outputs]}"
            )
        return cls(
            schema_version=data["schema_version"],
            model_id=data["model_id"],
            version=data["version"],
            task=TASK,
            file=file,
            sha256=data["sha256"],
            inputs=inputs,
            outputs=outputs,
            feature_spec=data["feature_spec"],
            feature_spec_hash=data["feature_spec_hash"],
            feature_names=tuple(names),
            class_names=tuple(classes),
            metrics=data["metrics"],
            quantization=data["quantization"],
            created_by=data["created_by"],
            training=data["training"],
        )

    @classmethod
    def load(cls, model_dir: Path) -> ClassifierManifest:
        """Read ``model_dir/manifest.json`` and verify it against the ONNX file and the feature code."""
        path = Path(model_dir) / MANIFEST_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ModelError(f"{path}: cannot read manifest: {exc.strerror or exc}") from exc
        except json.JSONDecodeError as exc:
            raise ModelError(f"{path}: not valid JSON: {exc}") from exc
        manifest = cls.from_dict(data, str(path))
        manifest.verify(model_dir)
        return manifest

    def verify(self, model_dir: Path) -> None:
        """Check the ONNX file's sha256, the feature spec and its hash, and the feature names."""
        where = str(Path(model_dir) / MANIFEST_FILE)
        onnx_path = Path(model_dir) / self.file
        if not onnx_path.is_file():
            raise ModelError(f"{where}: model file {self.file!r} does not exist in {model_dir}")
        actual = sha256_file(onnx_path)
        if actual != self.sha256:
            raise ModelError(
                f"{where}: sha256 mismatch for {self.file!r}: manifest says {self.sha256}, file has {actual}"
            )
        try:
            spec = self.spec()
        except ValueError as exc:
            raise ModelError(f"{where}: feature_spec is not a valid BearingFeatureSpec: {exc}") from exc
        if not spec.is_supported:
            raise ModelError(
                f"{where}: feature_spec version {spec.version} is not computed by this agent's feature code "
                "(retrain the model with this agent version)"
            )
        if spec.spec_hash() != self.feature_spec_hash:
            raise ModelError(
                f"{where}: feature_spec_hash mismatch: manifest says {self.feature_spec_hash}, the feature code "
                f"hashes feature_spec to {spec.spec_hash()} (features changed since training: retrain)"
            )
        if spec.feature_names() != self.feature_names:
            raise ModelError(f"{where}: feature_names do not match the feature spec")


def _tensors(items: list[Any], key: str, where: str) -> tuple[TensorInfo, ...]:
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) != {"name", "shape", "dtype"}:
            raise ModelError(f"{where}: {key}[{i}] must be an object with name, shape and dtype")
        shape = item["shape"]
        if not isinstance(shape, list) or not all(isinstance(d, str | int) and not isinstance(d, bool) for d in shape):
            raise ModelError(f"{where}: {key}[{i}].shape must be a list of ints and axis names")
        out.append(TensorInfo(str(item["name"]), tuple(shape), str(item["dtype"])))
    return tuple(out)


class OnnxDefectClassifier:
    """One classifier loaded from its directory, checked against its manifest and warmed up.

    Built once by the composition root, then called from the inference worker thread only. Construction
    raises ``ModelError``; ``predict_proba`` and ``classify`` raise ``ValueError`` on bad input.
    """

    def __init__(self, manifest: ClassifierManifest, model_dir: Path, threads: int = 1) -> None:
        self._manifest = manifest
        self._spec = manifest.spec()
        path = Path(model_dir) / manifest.file
        self._session = open_session(path, threads)
        self._check_session(path)
        self._warm_up()
        logger.info("loaded classifier %s version %s (%s)", manifest.model_id, manifest.version, manifest.file)

    @classmethod
    def load(cls, model_dir: Path, threads: int = 1) -> OnnxDefectClassifier:
        """Read and verify the manifest in ``model_dir`` and build the classifier."""
        return cls(ClassifierManifest.load(model_dir), model_dir, threads)

    @property
    def manifest(self) -> ClassifierManifest:
        return self._manifest

    @property
    def model_id(self) -> str:
        return self._manifest.model_id

    @property
    def version(self) -> str:
        return self._manifest.version

    @property
    def spec(self) -> BearingFeatureSpec:
        return self._spec

    @property
    def class_names(self) -> tuple[str, ...]:
        return self._manifest.class_names

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities of feature rows: float32 ``(n, F)`` → float32 ``(n, C)``."""
        f = len(self._manifest.feature_names)
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != f:
            raise ValueError(f"features must be a float32 array of shape (n, {f}), got {getattr(x, 'shape', x)!r}")
        if x.shape[0] == 0:
            return np.empty((0, len(self.class_names)), dtype=np.float32)
        if not np.isfinite(x).all():
            raise ValueError("features contain NaN or infinity")
        (probs,) = self._session.run(["probabilities"], {"features": np.ascontiguousarray(x)})
        return np.asarray(probs, dtype=np.float32)

    def classify(self, windows: Sequence[Window], rpm: float | Sequence[float]) -> list[DefectPrediction]:
        """One prediction per vibration window; ``rpm``: the shaft speed (one number or one per window)."""
        probs = self.predict_proba(extract_bearing_matrix(self._spec, windows, rpm))
        names = self.class_names
        return [DefectPrediction(names[int(p.argmax())], float(p.max()), names, p.copy()) for p in probs]

    def _check_session(self, path: Path) -> None:
        for kind, expected, actual in (
            ("input", self._manifest.inputs, self._session.get_inputs()),
            ("output", self._manifest.outputs, self._session.get_outputs()),
        ):
            got = [(a.name, a.type, len(a.shape)) for a in actual]
            want = [(t.name, _ORT_TYPES.get(t.dtype), len(t.shape)) for t in expected]
            if got != want:
                raise ModelError(f"{path}: graph {kind}s {got} do not match the manifest's {want}")

    def _warm_up(self) -> None:
        # First runs allocate the arena and pre-pack weights; pay that at start, and fail at load if broken.
        for batch in (1, 8):
            x = np.zeros((batch, len(self._manifest.feature_names)), dtype=np.float32)
            probs, _labels = self._session.run(["probabilities", "label"], {"features": x})
            if np.shape(probs) != (batch, len(self.class_names)) or not np.isfinite(probs).all():
                raise ModelError(f"classifier {self._manifest.model_id}: warm-up returned {probs!r}")
