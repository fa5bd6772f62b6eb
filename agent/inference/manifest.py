"""The manifest that ships beside every model: what the ONNX file is, what it expects, how it was made.

``manifest.json`` is the contract between training and serving, one format for every task:

- ``task: "anomaly"`` — an anomaly model: one float32 input ``[batch, F]`` (one column per feature
  name), one float32 output ``[batch]`` (the score), plus ``threshold`` and ``threshold_rule``; its
  ``feature_spec`` is an ``agent.features.spec.FeatureSpec``;
- ``task: "classifier"`` — the defect classifier: input ``features`` float32 ``[batch, F]``, outputs
  ``probabilities`` float32 ``[batch, C]`` and ``label`` int64 ``[batch]``, plus ``class_names``; its
  ``feature_spec`` is an ``agent.features.bearing.BearingFeatureSpec``;
- ``task: "image-classifier"`` — a camera image classifier: input ``image`` float32 ``[batch, 1, S, S]``,
  output ``probs`` float32 ``[batch, C]`` (softmax inside the graph), plus ``class_names``; its
  ``feature_spec`` is an ``agent.images.preprocess.ImageSpec`` (how a frame becomes the input).

``Manifest.load`` refuses a model directory unless the manifest has exactly the keys of its task, the
ONNX file has the recorded sha256, and the feature specification recorded in it hashes to the recorded
hash with today's feature code — so a model never meets features it was not trained on. Every refusal is
a ``ModelError`` that names the key or file, with a ``reason`` (``agent.inference.errors.REASONS``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.inference.errors import ModelError

if TYPE_CHECKING:
    from agent.features.bearing import BearingFeatureSpec
    from agent.features.spec import FeatureSpec
    from agent.images.preprocess import ImageSpec

__all__ = ["MANIFEST_FILE", "SCHEMA_VERSION", "TASKS", "Manifest", "ModelError", "TensorInfo", "sha256_file"]

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION = 1
TASKS = ("anomaly", "classifier", "image-classifier")

# Keys every manifest has, and the keys of each task; ``to_dict`` writes them in field order.
_TASK_KEYS = {
    "anomaly": ("threshold", "threshold_rule"),
    "classifier": ("class_names",),
    "image-classifier": ("class_names",),
}
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TENSOR_KEYS = ("name", "shape", "dtype")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Name, shape and element type of a graph input or output; ``"batch"`` marks the dynamic axis."""

    name: str
    shape: tuple[str | int, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """Everything serving needs to trust a model file (see module docstring).

    ``metrics``, ``quantization`` and ``training`` are descriptive records for people (and the model card);
    serving only reads ``file``, ``sha256``, ``inputs``, ``outputs``, ``feature_spec*`` and the task's keys.
    ``quantization`` is free-form (the training side records its recipe and measurements there).
    Task keys: ``threshold``/``threshold_rule`` are set for ``anomaly`` only, ``class_names`` for
    ``classifier`` only (``None`` / empty otherwise, and not written).
    """

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
    threshold: float | None = None
    threshold_rule: str | None = None
    class_names: tuple[str, ...] = ()
    metrics: dict[str, Any]
    quantization: dict[str, Any]
    created_by: str
    training: dict[str, Any]

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    def spec(self) -> FeatureSpec | BearingFeatureSpec | ImageSpec:
        """The feature specification the model was trained with (the task decides its type)."""
        return _spec_class(self.task).from_dict(self.feature_spec)

    def to_dict(self) -> dict[str, Any]:
        """The JSON record: common keys and the task's keys, in a stable order."""
        skip = {k for keys in _TASK_KEYS.values() for k in keys} - set(_TASK_KEYS[self.task])
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in skip:
                continue
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
    def from_dict(cls, data: object, where: str = MANIFEST_FILE) -> Manifest:
        """Parse and type-check a manifest record (no file checks; ``load`` does those)."""
        if not isinstance(data, dict):
            raise ModelError(f"{where}: expected a JSON object at the top level")
        if "schema_version" in data:
            schema_version = _get(data, "schema_version", int, where)
            if schema_version != SCHEMA_VERSION:
                raise ModelError(
                    f"{where}: schema_version {schema_version} is not supported (this agent reads {SCHEMA_VERSION})"
                )
        task = _get(data, "task", str, where) if "task" in data else None
        if task is not None and task not in TASKS:
            raise ModelError(f"{where}: task {task!r} is not one of {list(TASKS)}")
        task_keys = {k for keys in _TASK_KEYS.values() for k in keys}
        known = [f.name for f in dataclasses.fields(cls) if f.name not in task_keys]
        known += _TASK_KEYS[task] if task is not None else ()
        for key in data:
            if key not in known:
                other = [t for t, keys in _TASK_KEYS.items() if key in keys]
                hint = f" (a key of task {other[0]!r} manifests)" if other else ""
                raise ModelError(f"{where}: unknown key {key!r}{hint}")
        for key in known:
            if key not in data:
                raise ModelError(f"{where}: missing key {key!r}")
        assert task is not None
        file = _get(data, "file", str, where)
        if not file or Path(file).name != file or file in (".", ".."):
            raise ModelError(f"{where}: file {file!r} must be a plain file name inside the model directory")
        digest = _get(data, "sha256", str, where)
        if not _SHA256.fullmatch(digest):
            raise ModelError(f"{where}: sha256 must be 64 lowercase hex characters")
        spec_hash = _get(data, "feature_spec_hash", str, where)
        names = _get(data, "feature_names", list, where)
        if not names or not all(isinstance(n, str) for n in names):
            raise ModelError(f"{where}: feature_names must be a non-empty list of strings")
        inputs = _tensors(data, "inputs", where)
        outputs = _tensors(data, "outputs", where)
        task_values = _TASK_CHECKS[task](data, names, inputs, outputs, where)
        return cls(
            schema_version=_get(data, "schema_version", int, where),
            model_id=_get(data, "model_id", str, where),
            version=_get(data, "version", str, where),
            task=task,
            file=file,
            sha256=digest,
            inputs=inputs,
            outputs=outputs,
            feature_spec=_get(data, "feature_spec", dict, where),
            feature_spec_hash=spec_hash,
            feature_names=tuple(names),
            metrics=_get(data, "metrics", dict, where),
            quantization=_get(data, "quantization", dict, where),
            created_by=_get(data, "created_by", str, where),
            training=_get(data, "training", dict, where),
            **task_values,
        )

    @classmethod
    def read(cls, model_dir: Path, task: str | None = None) -> Manifest:
        """Read and parse ``model_dir/manifest.json`` without checking the files (cheap: no hashing).

        ``task``: the task the caller will use the model for; another task is refused (reason ``task``).
        """
        path = Path(model_dir) / MANIFEST_FILE
        where = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ModelError(f"{where}: cannot read manifest: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise ModelError(f"{where}: not UTF-8 text: {exc}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelError(f"{where}: not valid JSON: {exc}") from exc
        manifest = cls.from_dict(data, where)
        if task is not None and manifest.task != task:
            raise ModelError(
                f"{where}: model {manifest.model_id!r} is a {manifest.task!r} model, used here as {task!r}",
                reason="task",
            )
        return manifest

    @classmethod
    def load(cls, model_dir: Path, task: str | None = None) -> Manifest:
        """Read ``model_dir/manifest.json`` and verify it against the ONNX file and the feature code."""
        manifest = cls.read(model_dir, task)
        manifest.verify(model_dir)
        return manifest

    def verify(self, model_dir: Path) -> None:
        """Check the ONNX file's sha256, the feature spec hash and the feature names; raise ``ModelError``."""
        where = str(Path(model_dir) / MANIFEST_FILE)
        onnx_path = Path(model_dir) / self.file
        if not onnx_path.is_file():
            raise ModelError(f"{where}: model file {self.file!r} does not exist in {model_dir}", reason="file")
        actual = sha256_file(onnx_path)
        if actual != self.sha256:
            raise ModelError(
                f"{where}: sha256 mismatch for {self.file!r}: manifest says {self.sha256}, file has {actual}",
                reason="sha256",
            )
        kind = _spec_class(self.task).__name__
        try:
            spec = self.spec()
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{where}: feature_spec is not a valid {kind}: {exc}", reason="feature_spec") from exc
        if not spec.is_supported:
            raise ModelError(
                f"{where}: feature_spec version {spec.version} is not computed by this agent's feature code "
                "(retrain the model with this agent version)",
                reason="feature_spec",
            )
        spec_hash = spec.spec_hash()
        if spec_hash != self.feature_spec_hash:
            raise ModelError(
                f"{where}: feature_spec_hash mismatch: manifest says {self.feature_spec_hash}, the feature "
                f"code hashes feature_spec to {spec_hash} (features changed since training: retrain)",
                reason="feature_spec",
            )
        names = tuple(spec.feature_names())
        if names != self.feature_names:
            raise ModelError(
                f"{where}: feature_names do not match the feature spec: manifest has "
                f"{list(self.feature_names)}, spec gives {list(names)}",
                reason="feature_spec",
            )


def _spec_class(task: str) -> type[FeatureSpec] | type[BearingFeatureSpec] | type[ImageSpec]:
    # Imported here: the feature code imports numpy-heavy modules that manifest readers may not need.
    if task == "image-classifier":
        from agent.images.preprocess import ImageSpec

        return ImageSpec
    if task == "classifier":
        from agent.features.bearing import BearingFeatureSpec

        return BearingFeatureSpec
    from agent.features.spec import FeatureSpec

    return FeatureSpec


def _anomaly_keys(
    data: dict[str, Any], names: list[str], inputs: tuple[TensorInfo, ...], outputs: tuple[TensorInfo, ...], where: str
) -> dict[str, Any]:
    threshold = _get(data, "threshold", (int, float), where)
    if not math.isfinite(threshold) or threshold <= 0:
        raise ModelError(f"{where}: threshold must be a finite number > 0, got {threshold!r}")
    if len(inputs) != 1 or inputs[0].shape != ("batch", len(names)) or inputs[0].dtype != "float32":
        raise ModelError(
            f"{where}: inputs must be one float32 tensor of shape ['batch', {len(names)}] "
            f"(one column per feature name), got {[t.to_dict() for t in inputs]}",
            reason="shape",
        )
    if len(outputs) != 1 or outputs[0].shape != ("batch",) or outputs[0].dtype != "float32":
        raise ModelError(
            f"{where}: outputs must be one float32 tensor of shape ['batch'], got {[t.to_dict() for t in outputs]}",
            reason="shape",
        )
    return {"threshold": float(threshold), "threshold_rule": _get(data, "threshold_rule", str, where)}


def _classifier_keys(
    data: dict[str, Any], names: list[str], inputs: tuple[TensorInfo, ...], outputs: tuple[TensorInfo, ...], where: str
) -> dict[str, Any]:
    classes = _class_names(data, where)
    want_in = (TensorInfo("features", ("batch", len(names)), "float32"),)
    want_out = (
        TensorInfo("probabilities", ("batch", len(classes)), "float32"),
        TensorInfo("label", ("batch",), "int64"),
    )
    if inputs != want_in or outputs != want_out:
        raise ModelError(
            f"{where}: inputs/outputs must be {[t.to_dict() for t in want_in]} / "
            f"{[t.to_dict() for t in want_out]}, got {[t.to_dict() for t in inputs]} / "
            f"{[t.to_dict() for t in outputs]}",
            reason="shape",
        )
    return {"class_names": tuple(classes)}


def _class_names(data: dict[str, Any], where: str) -> list[str]:
    classes: list[str] = _get(data, "class_names", list, where)
    if len(classes) < 2 or not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
        raise ModelError(f"{where}: class_names must be two or more distinct strings")
    return classes


def _image_classifier_keys(
    data: dict[str, Any], names: list[str], inputs: tuple[TensorInfo, ...], outputs: tuple[TensorInfo, ...], where: str
) -> dict[str, Any]:
    classes = _class_names(data, where)
    spec = _get(data, "feature_spec", dict, where)
    size = spec.get("size")
    want_in = (TensorInfo("image", ("batch", 1, size, size), "float32"),)
    want_out = (TensorInfo("probs", ("batch", len(classes)), "float32"),)
    if inputs != want_in or outputs != want_out:
        raise ModelError(
            f"{where}: inputs/outputs must be {[t.to_dict() for t in want_in]} / {[t.to_dict() for t in want_out]} "
            f"(feature_spec.size and class_names), got {[t.to_dict() for t in inputs]} / "
            f"{[t.to_dict() for t in outputs]}",
            reason="shape",
        )
    return {"class_names": tuple(classes)}


_TASK_CHECKS = {"anomaly": _anomaly_keys, "classifier": _classifier_keys, "image-classifier": _image_classifier_keys}


def _get(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = data[key]
    # bool is an int in Python; a manifest with "threshold": true is still wrong.
    if isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ModelError(f"{where}: key {key!r} must be of type {names}, got {type(value).__name__}")
    return value


def _tensors(data: dict[str, Any], key: str, where: str) -> tuple[TensorInfo, ...]:
    items = _get(data, key, list, where)
    out = []
    for i, item in enumerate(items):
        at = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise ModelError(f"{where}: {at} must be an object")
        for k in item:
            if k not in _TENSOR_KEYS:
                raise ModelError(f"{where}: unknown key {k!r} in {at}")
        for k in _TENSOR_KEYS:
            if k not in item:
                raise ModelError(f"{where}: missing key {k!r} in {at}")
        shape = item["shape"]
        if not isinstance(item["name"], str) or not isinstance(item["dtype"], str):
            raise ModelError(f"{where}: {at}.name and {at}.dtype must be strings")
        if not isinstance(shape, list) or not all(
            isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool)) for d in shape
        ):
            raise ModelError(f"{where}: {at}.shape must be a list of ints and axis names")
        out.append(TensorInfo(item["name"], tuple(shape), item["dtype"]))
    return tuple(out)
