"""ONNX Runtime adapter for anomaly models: a verified, warmed-up session that turns features into scores.

The model only scores (higher = more anomalous); comparing with ``threshold`` is the thresholder's job and
deciding whether to notify is the alert engine's (``agent/alerts/engine.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from agent.features.spec import FeatureSpec
from agent.inference.errors import ModelError
from agent.inference.manifest import Manifest
from agent.inference.session import ServedModel, session_options

logger = logging.getLogger(__name__)

TASK = "anomaly"
EXPLAIN_VALUE = "squared_error"
_ORT_TYPES = {"float32": "tensor(float)"}


class OnnxAnomalyModel(ServedModel):
    """One anomaly model loaded from its directory, checked against its manifest.

    Built once by the composition root (or a command), then called from the inference worker thread only:
    ``score`` is not meant to be called from several threads at once (ONNX Runtime allows it, but the
    worker batches windows instead). Construction raises ``ModelError``; ``score`` raises ``ValueError``.
    """

    def __init__(self, manifest: Manifest, model_dir: Path, threads: int = 1) -> None:
        spec = manifest.spec()
        if manifest.task != TASK or manifest.threshold is None or not isinstance(spec, FeatureSpec):
            raise ModelError(
                f"{model_dir}: model {manifest.model_id!r} is a {manifest.task!r} model, not an {TASK!r} model",
                reason="task",
            )
        super().__init__(manifest, model_dir, threads)
        self._spec = spec
        self._threshold = manifest.threshold
        self._explainer: ort.InferenceSession | None = None
        self._check_session(self._path)
        self._input = manifest.inputs[0].name
        self._output = manifest.outputs[0].name
        self._warm_up()
        logger.info(
            "loaded model %s version %s (%s, %d features, threshold %.6g)",
            manifest.model_id,
            manifest.version,
            manifest.file,
            manifest.n_features,
            manifest.threshold,
        )

    @classmethod
    def load(cls, model_dir: Path, threads: int = 1) -> OnnxAnomalyModel:
        """Read and verify the manifest in ``model_dir`` and build the model."""
        return cls(Manifest.load(model_dir, TASK), model_dir, threads)

    @property
    def threshold(self) -> float:
        return self._threshold

    @property
    def spec(self) -> FeatureSpec:
        return self._spec

    @property
    def n_features(self) -> int:
        return self._manifest.n_features

    def score(self, x: np.ndarray) -> np.ndarray:
        """Anomaly scores of feature rows. ``x``: float32 ``(n, F)`` → float32 ``(n,)``."""
        if not isinstance(x, np.ndarray):
            raise ValueError(f"features must be a numpy array, got {type(x).__name__}")
        if x.dtype != np.float32:
            raise ValueError(f"features must be float32, got {x.dtype}")
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(
                f"features must have shape (n, {self.n_features}) for model {self.model_id}, got {x.shape}"
            )
        if x.shape[0] == 0:
            return np.empty(0, dtype=np.float32)
        if not np.isfinite(x).all():
            bad = int((~np.isfinite(x).all(axis=1)).sum())
            raise ValueError(f"features contain NaN or infinity in {bad} of {x.shape[0]} rows")
        (scores,) = self._session.run([self._output], {self._input: np.ascontiguousarray(x)})
        return np.asarray(scores, dtype=np.float32).reshape(x.shape[0])

    @property
    def explainable(self) -> OnnxAnomalyModel:
        """Declared ability: ``explain`` (the autoencoders export their per-feature squared error)."""
        return self

    @property
    def adaptable(self) -> OnnxAnomalyModel:
        """Declared ability: per-machine adapters on this base (``directory``)."""
        return self

    def explain(self, x: np.ndarray) -> np.ndarray:
        """Each feature's share of the score of each row (float64 ``(n, F)``, rows sum to 1).

        For the autoencoders of ``pdm_tools/models/export.py`` the score is the mean of the per-feature squared
        reconstruction errors (graph value ``squared_error``), so the shares say which features the model
        could not reconstruct. The explaining session is built on first use (alerts only) from the verified
        file, with that value as an extra output; the scoring session is untouched. A graph without it
        raises ``ValueError``.
        """
        if self._explainer is None:
            self._explainer = self._build_explainer()
        (errors,) = self._explainer.run([EXPLAIN_VALUE], {self._input: np.ascontiguousarray(x, dtype=np.float32)})
        errors = np.asarray(errors, dtype=np.float64).reshape(x.shape[0], self.n_features)
        total = errors.sum(axis=1, keepdims=True)
        return np.divide(errors, total, out=np.zeros_like(errors), where=total > 0)

    def _build_explainer(self) -> ort.InferenceSession:
        model = onnx.load(str(self._path))
        if not any(EXPLAIN_VALUE in node.output for node in model.graph.node):
            raise ValueError(f"model {self.model_id} has no {EXPLAIN_VALUE!r} value to explain its score with")
        model.graph.output.append(onnx.helper.make_tensor_value_info(EXPLAIN_VALUE, onnx.TensorProto.FLOAT, None))
        return ort.InferenceSession(model.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"])

    def _check_session(self, path: Path) -> None:
        expected_in, expected_out = self._manifest.inputs, self._manifest.outputs
        actual_in, actual_out = self._session.get_inputs(), self._session.get_outputs()
        for kind, expected, actual in (
            ("input", expected_in, actual_in),
            ("output", expected_out, actual_out),
        ):
            if [t.name for t in expected] != [a.name for a in actual]:
                raise ModelError(
                    f"{path}: graph {kind}s {[a.name for a in actual]} do not match the manifest's "
                    f"{[t.name for t in expected]}",
                    reason="shape",
                )
            for t, a in zip(expected, actual, strict=True):
                if a.type != _ORT_TYPES.get(t.dtype):
                    raise ModelError(
                        f"{path}: graph {kind} {a.name!r} has type {a.type}, manifest says {t.dtype}", reason="shape"
                    )
                if len(a.shape) != len(t.shape):
                    raise ModelError(
                        f"{path}: graph {kind} {a.name!r} has shape {a.shape}, manifest says {list(t.shape)}",
                        reason="shape",
                    )
                for got, want in zip(a.shape, t.shape, strict=True):
                    # A named manifest axis ("batch") must be dynamic in the graph; a number must match.
                    if (isinstance(want, int) and got != want) or (isinstance(want, str) and isinstance(got, int)):
                        raise ModelError(
                            f"{path}: graph {kind} {a.name!r} has shape {a.shape}, manifest says {list(t.shape)}",
                            reason="shape",
                        )

    def _warm_up(self) -> None:
        # The first Run of a session allocates its memory arena, pre-packs weights and picks kernels, which
        # takes many times longer than a steady-state call. Paying that here, at start, keeps the first real
        # window from missing its deadline and makes a broken model fail at load instead of on live data.
        for batch in (1, 8):
            x = np.zeros((batch, self.n_features), dtype=np.float32)
            try:
                (scores,) = self._session.run([self._output], {self._input: x})
            except Exception as exc:  # ORT's own exception types: a graph that loads but cannot run
                raise ModelError(f"model {self.model_id}: warm-up failed: {exc}", reason="warmup") from exc
            if np.shape(scores) != (batch,) or not np.isfinite(scores).all():
                raise ModelError(
                    f"model {self.model_id}: warm-up returned {scores!r} for a batch of {batch} zero rows",
                    reason="warmup",
                )
