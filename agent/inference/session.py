"""The one way the agent opens an ONNX Runtime session (anomaly models, the defect classifier)."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from agent.inference.errors import ModelError
from agent.inference.manifest import Manifest


def session_options(threads: int = 1) -> ort.SessionOptions:
    """The agent's CPU session settings: ``threads`` intra-op threads, sequential, all graph optimizations."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle worker threads would otherwise spin for a while after each run, stealing CPU from ingest
    # and the database writer on a 2-core box; the models are far too small to need spinning.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def open_session(path: Path, threads: int) -> ort.InferenceSession:
    """A CPU session with ``threads`` intra-op threads; ``ModelError`` if ONNX Runtime cannot load the file."""
    options = session_options(threads)
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for unreadable or invalid graphs
        raise ModelError(f"{path}: ONNX Runtime cannot load the model: {exc}", reason="onnx") from exc


class ServedModel:
    """What every served model has: its verified manifest, its directory and one session of its file.

    ``OnnxAnomalyModel`` and ``OnnxDefectClassifier`` add their task's checks, warm-up and calls.
    """

    def __init__(self, manifest: Manifest, model_dir: Path, threads: int) -> None:
        self._manifest = manifest
        self._path = Path(model_dir) / manifest.file
        self._session = open_session(self._path, threads)

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def model_id(self) -> str:
        return self._manifest.model_id

    @property
    def version(self) -> str:
        return self._manifest.version

    @property
    def directory(self) -> Path:
        """The model's directory (manifest and ONNX file): where per-machine adapters find their base."""
        return self._path.parent
