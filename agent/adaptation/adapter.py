"""A per-machine adapter on disk: the ``.onnx_adapter`` file (ONNX Runtime's format) and its own manifest.

Layout of one adapter (a folder per machine and base model, e.g. ``adapters/<model_id>/<machine>/``)::

    adapter.onnx_adapter   A and (alpha/rank)·B of every adapted layer (ort.AdapterFormat)
    adapter.json           AdapterManifest: the base it belongs to, machine, rank, data, metrics, cost

An adapter is only meaningful on the exact base it was trained on. ``load_adapter`` refuses it (with an
``AdapterError`` naming both sides) unless the base's model id, version and sha256 are the manifest's, the
adapter file has the recorded sha256, and its parameters have the shapes of the base's layers. As a second,
file-level guard the ``.onnx_adapter`` header's model version is set from the base's sha256
(``model_version_of``), so the file alone also says which base it is for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from agent.adaptation.graph import STANDARDIZATION, adapter_parameters, param_names
from agent.adaptation.lora import BaseMlp, LoraWeights

ADAPTER_FILE = "adapter.onnx_adapter"
MANIFEST_FILE = "adapter.json"
SCHEMA_VERSION = 1
KIND = "lora-adapter"
ADAPTER_FORMAT_VERSION = 1  # our parameter layout inside the .onnx_adapter (B pre-scaled by alpha/rank)
_SHA256 = re.compile(r"[0-9a-f]{64}")


class AdapterError(Exception):
    """An adapter cannot be used with this base: wrong base, bad manifest, bad file. Raised at load time."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_path(path: Path) -> str:
    return sha256_bytes(Path(path).read_bytes())


def data_sha256(x: np.ndarray, y: np.ndarray | None = None) -> str:
    """sha256 of the adaptation rows (float32, C order) and labels (int64): which data made an adapter."""
    digest = hashlib.sha256(np.ascontiguousarray(x, dtype=np.float32).tobytes())
    if y is not None:
        digest.update(np.ascontiguousarray(y, dtype=np.int64).tobytes())
    return digest.hexdigest()


def model_version_of(base_sha256: str) -> int:
    """The ``.onnx_adapter`` header's model version for a base: the first 28 bits of its sha256.

    >>> model_version_of("0000001f" + "0" * 56)
    1
    """
    return int(base_sha256[:7], 16)


@dataclass(frozen=True, slots=True)
class BaseIdentity:
    """Which base model an adapter belongs to: the manifest's model id and version, and the model file's sha256."""

    model_id: str
    version: str
    sha256: str

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> BaseIdentity:
        """The identity of the shipped file named by ``model_dir/manifest.json`` (its sha256 is re-computed)."""
        path = Path(model_dir) / "manifest.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            file = Path(model_dir) / str(data["file"])
            identity = cls(str(data["model_id"]), str(data["version"]), sha256_path(file))
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise AdapterError(f"{path}: cannot read the base model's identity: {exc}") from exc
        if identity.sha256 != data.get("sha256"):
            raise AdapterError(f"{path}: the model file's sha256 is not the manifest's")
        return identity

    def describe(self) -> str:
        return f"{self.model_id} {self.version} (sha256 {self.sha256[:12]}…)"

    def to_dict(self) -> dict[str, str]:
        return {"model_id": self.model_id, "version": self.version, "sha256": self.sha256}


@dataclass(frozen=True, slots=True)
class AdapterManifest:
    """``adapter.json``: everything needed to trust and explain one machine's adapter.

    ``layers``: ``{layer: [fan_in, fan_out]}`` of the adapted MatMuls; ``standardization``: the adapter also
    carries the machine's input ``mean``/``scale``. ``data``: ``count``, ``sha256`` (of
    the rows and labels, ``data_sha256``) and a description. ``threshold``: the anomaly threshold of this
    machine's adapted scores (``None`` for a classifier, or to keep the base's). ``metrics``: ``before`` and
    ``after`` dicts (the base and the adapted model on the machine's held-out data). ``training``: config,
    seed, epochs, seconds and peak memory.
    """

    schema_version: int
    kind: str
    base: dict[str, str]
    machine: str
    rank: int
    alpha: float
    layers: dict[str, list[int]]
    standardization: bool
    file: str
    sha256: str
    threshold: float | None
    data: dict[str, Any]
    metrics: dict[str, Any]
    training: dict[str, Any]
    created_at: str

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def base_identity(self) -> BaseIdentity:
        return BaseIdentity(self.base["model_id"], self.base["version"], self.base["sha256"])

    @classmethod
    def from_dict(cls, data: object, where: str) -> AdapterManifest:
        if not isinstance(data, dict):
            raise AdapterError(f"{where}: expected a JSON object")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown, missing = [k for k in data if k not in known], [k for k in known if k not in data]
        if unknown or missing:
            raise AdapterError(f"{where}: unknown key(s) {unknown}, missing key(s) {missing}")
        if data["schema_version"] != SCHEMA_VERSION or data["kind"] != KIND:
            raise AdapterError(
                f"{where}: schema_version {data['schema_version']!r} / kind {data['kind']!r} is not "
                f"{SCHEMA_VERSION} / {KIND!r}"
            )
        base = data["base"]
        if not isinstance(base, dict) or set(base) != {"model_id", "version", "sha256"}:
            raise AdapterError(f"{where}: base must be an object with model_id, version and sha256")
        if not _SHA256.fullmatch(str(base["sha256"])) or not _SHA256.fullmatch(str(data["sha256"])):
            raise AdapterError(f"{where}: sha256 values must be 64 lowercase hex characters")
        file = data["file"]
        if not isinstance(file, str) or Path(file).name != file or file in ("", ".", ".."):
            raise AdapterError(f"{where}: file {file!r} must be a plain file name inside the adapter folder")
        rank = data["rank"]
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise AdapterError(f"{where}: rank must be a positive integer")
        if not isinstance(data["standardization"], bool):
            raise AdapterError(f"{where}: standardization must be true or false")
        threshold = data["threshold"]
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)):
            raise AdapterError(f"{where}: threshold must be a number or null")
        layers = data["layers"]
        if not isinstance(layers, dict) or not layers:
            raise AdapterError(f"{where}: layers must name at least one adapted layer")
        return cls(**{k: data[k] for k in known})


def write_adapter(directory: Path, weights: LoraWeights, manifest: AdapterManifest) -> Path:
    """Write ``adapter.onnx_adapter`` and ``adapter.json`` into ``directory``; return the folder.

    ``manifest.file``/``sha256`` are filled in here (whatever the caller put there is replaced).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params = adapter_parameters(weights)  # kept referenced: OrtValues below are views of these arrays
    values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in params.items()}
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(ADAPTER_FORMAT_VERSION)
    fmt.set_model_version(model_version_of(manifest.base["sha256"]))
    fmt.set_parameters(values)
    path = directory / ADAPTER_FILE
    fmt.export_adapter(str(path))
    del values, params
    final = dataclasses.replace(manifest, file=ADAPTER_FILE, sha256=sha256_path(path))
    (directory / MANIFEST_FILE).write_text(json.dumps(final.to_dict(), indent=2, allow_nan=False) + "\n", "utf-8")
    return directory


def read_manifest(directory: Path) -> AdapterManifest:
    path = Path(directory) / MANIFEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise AdapterError(f"{path}: cannot read adapter manifest: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path}: not valid JSON: {exc}") from exc
    return AdapterManifest.from_dict(data, str(path))


def check_base(manifest: AdapterManifest, base: BaseIdentity, where: str) -> None:
    """Refuse an adapter trained on another base (id, version or file bytes)."""
    wanted = manifest.base_identity()
    if wanted != base:
        fields = [f for f in ("model_id", "version", "sha256") if getattr(wanted, f) != getattr(base, f)]
        raise AdapterError(
            f"{where}: adapter for machine {manifest.machine!r} was trained on base {wanted.describe()}, but this "
            f"session's base is {base.describe()} (different {', '.join(fields)}): an adapter only fits the "
            "exact base it was trained on; train a new adapter for this base"
        )


def load_adapter(
    directory: Path, base: BaseIdentity, mlp: BaseMlp | None = None
) -> tuple[AdapterManifest, LoraWeights]:
    """Read and verify one adapter for ``base``; ``mlp`` (optional) also checks the layer shapes.

    Raises ``AdapterError`` for another base, a changed file, or parameters that do not fit.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    where = str(directory / MANIFEST_FILE)
    check_base(manifest, base, where)
    path = directory / manifest.file
    if not path.is_file():
        raise AdapterError(f"{where}: adapter file {manifest.file!r} does not exist")
    actual = sha256_path(path)
    if actual != manifest.sha256:
        raise AdapterError(f"{where}: sha256 mismatch for {manifest.file!r}: manifest {manifest.sha256}, file {actual}")
    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
    except Exception as exc:  # ONNX Runtime raises its own types for unreadable files
        raise AdapterError(f"{path}: ONNX Runtime cannot read the adapter: {exc}") from exc
    if fmt.get_model_version() != model_version_of(base.sha256):
        raise AdapterError(f"{path}: the adapter file's model version does not match base {base.describe()}")
    params = {name: np.array(value.numpy(), dtype=np.float32) for name, value in fmt.get_parameters().items()}
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    scale = float(manifest.alpha) / manifest.rank
    for layer, (fan_in, fan_out) in manifest.layers.items():
        a_name, b_name = param_names(layer)
        if a_name not in params or b_name not in params:
            raise AdapterError(f"{path}: parameters for layer {layer!r} are missing")
        a, b_scaled = params.pop(a_name), params.pop(b_name)
        if a.shape != (fan_in, manifest.rank) or b_scaled.shape != (manifest.rank, fan_out):
            raise AdapterError(
                f"{path}: layer {layer!r} has A {a.shape}, B {b_scaled.shape}, manifest says rank "
                f"{manifest.rank}, {fan_in} -> {fan_out}"
            )
        if mlp is not None:
            try:
                dense = mlp.layer(layer)
            except KeyError as exc:
                raise AdapterError(f"{path}: {exc.args[0]}") from exc
            if (dense.fan_in, dense.fan_out) != (fan_in, fan_out):
                raise AdapterError(
                    f"{path}: layer {layer!r} is {fan_in} -> {fan_out}, the base's is {dense.fan_in} -> {dense.fan_out}"
                )
        factors[layer] = (a, (b_scaled.astype(np.float64) / scale).astype(np.float32))
    standardization = None
    if manifest.standardization:
        if not all(name in params for name in STANDARDIZATION):
            raise AdapterError(f"{path}: the manifest says the adapter has its own mean/scale, the file has not")
        mean, std = (params.pop(name) for name in STANDARDIZATION)
        if mlp is not None and (mean.shape != mlp.mean.shape or std.shape != mlp.scale.shape):
            raise AdapterError(f"{path}: mean/scale have shapes {mean.shape}/{std.shape}, the base's {mlp.mean.shape}")
        standardization = (mean, std)
    if params:
        raise AdapterError(f"{path}: parameters {sorted(params)} are not in the manifest's layers")
    return manifest, LoraWeights(manifest.rank, float(manifest.alpha), factors, standardization)
