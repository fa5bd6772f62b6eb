"""The defect classifier: a small MLP over bearing features, its numpy forward pass and its ONNX graph.

Fitting uses scikit-learn's ``MLPClassifier`` (fixed seed, so reruns give the same weights); the fitted
weights are copied into a plain ``DefectMlp`` record, which is what gets exported and what the tests
compare the ONNX output with.

Graph (opset 17), input ``features`` float32 ``[batch, F]``, outputs ``probabilities`` float32
``[batch, C]`` and ``label`` int64 ``[batch]`` (index into the class names)::

    features ─ Sub(mean) ─ Div(scale) ─ MatMul ─ Add ─ Relu ─ … ─ MatMul ─ Add ─▶ logits ─ Softmax ─▶ probabilities
                                                                                     └─ ArgMax ─▶ label

As for the anomaly models (DESIGN.md): the standardization is explicit Sub/Div (not the ``ai.onnx.ml``
Scaler op, which blocks the quantizer) and every layer is MatMul followed by a separate Add, never Gemm.
The float-only nodes carry the names the quantizer leaves alone (``pdm_tools.common.graph_names``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from pdm_tools.common.graph_names import (
    CLASSIFIER_FLOAT_NODES,
    INPUT_NAME,
    IR_VERSION,
    LABEL,
    OPSET,
    PROBABILITIES,
)
from pdm_tools.models.export import mlp_graph


@dataclass(frozen=True)
class MlpConfig:
    """Hyper-parameters of the classifier (recorded in the manifest)."""

    hidden: tuple[int, ...] = (64, 32)
    alpha: float = 0.1
    learning_rate_init: float = 1e-3
    max_iter: int = 300
    balance: bool = True

    def to_dict(self) -> dict[str, object]:
        return {
            "hidden": list(self.hidden),
            "alpha": self.alpha,
            "learning_rate_init": self.learning_rate_init,
            "max_iter": self.max_iter,
            "balance": self.balance,
            "activation": "relu",
            "solver": "adam",
        }


@dataclass(frozen=True)
class DefectMlp:
    """A fitted MLP: ``mean``/``scale`` ``(F,)``; ``weights[i]`` ``(in, out)``, ``biases[i]`` ``(out,)``."""

    mean: np.ndarray
    scale: np.ndarray
    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]
    class_names: tuple[str, ...]

    @property
    def n_features(self) -> int:
        return len(self.mean)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits of rows ``x`` ``(n, F)`` in float32 arithmetic, as the graph computes them."""
        h = (np.asarray(x, dtype=np.float32) - self.mean.astype(np.float32)) / self.scale.astype(np.float32)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = h @ w.astype(np.float32) + b.astype(np.float32)
            if i < last:
                h = np.maximum(h, 0)
        return h

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities ``(n, C)`` (softmax of the logits)."""
        z = self.logits(x)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class indices ``(n,)``."""
        return np.argmax(self.logits(x), axis=1)


def fit_mlp(
    x: np.ndarray, y: np.ndarray, class_names: Sequence[str], seed: int, config: MlpConfig | None = None
) -> DefectMlp:
    """Fit on feature rows ``x`` ``(n, F)`` with labels ``y`` ``(n,)`` in ``range(len(class_names))``.

    With ``config.balance`` every class is resampled (cyclically, deterministically) to the size of the
    largest one, so that a class with few windows (CWRU has 5 s of healthy data) still counts.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    config = config or MlpConfig()
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    k = len(class_names)
    present = np.bincount(y, minlength=k)
    if len(y) != len(x) or (present == 0).any() or y.max() >= k:
        raise ValueError(
            f"every class needs training rows; rows per class {dict(zip(class_names, present.tolist(), strict=True))}"
        )
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    if config.balance:
        rows = np.concatenate([np.resize(np.flatnonzero(y == c), present.max()) for c in range(k)])
        x, y = x[rows], y[rows]
    clf = MLPClassifier(
        hidden_layer_sizes=config.hidden,
        activation="relu",
        solver="adam",
        alpha=config.alpha,
        learning_rate_init=config.learning_rate_init,
        max_iter=config.max_iter,
        random_state=seed,
        shuffle=True,
    )
    # One BLAS thread: the matrices are tiny, and on a busy 2-core box OpenBLAS threads that wait for each
    # other make the fit 5x slower (measured).
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        # Separable problems reach ~0 loss without meeting sklearn's tolerance: not a failure.
        warnings.simplefilter("ignore", category=ConvergenceWarning)
        clf.fit((x - mean) / scale, y)
    weights = [np.asarray(w, dtype=np.float32) for w in clf.coefs_]
    biases = [np.asarray(b, dtype=np.float32) for b in clf.intercepts_]
    if k == 2:  # sklearn uses one logistic output for two classes; make it a two-logit softmax
        weights[-1] = np.concatenate([np.zeros_like(weights[-1]), weights[-1]], axis=1)
        biases[-1] = np.concatenate([np.zeros_like(biases[-1]), biases[-1]])
    return DefectMlp(
        mean=mean.astype(np.float32),
        scale=scale.astype(np.float32),
        weights=tuple(weights),
        biases=tuple(biases),
        class_names=tuple(class_names),
    )


def build_onnx(model: DefectMlp, metadata: Mapping[str, str] | None = None) -> onnx.ModelProto:
    """The classifier graph of ``model`` (see the module docstring); passes the full checker."""
    f, c = model.n_features, len(model.class_names)
    inits, nodes = mlp_graph(model.mean, model.scale, model.weights, model.biases, "logits", CLASSIFIER_FLOAT_NODES[:2])
    nodes += [
        helper.make_node("Softmax", ["logits"], [PROBABILITIES], name=CLASSIFIER_FLOAT_NODES[2], axis=-1),
        helper.make_node("ArgMax", ["logits"], [LABEL], name=CLASSIFIER_FLOAT_NODES[3], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "defect_classifier",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", f])],
        [
            helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, ["batch", c]),
            helper.make_tensor_value_info(LABEL, TensorProto.INT64, ["batch"]),
        ],
        initializer=inits,
        doc_string="Bearing defect class probabilities (classes: " + ", ".join(model.class_names) + ").",
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="pdm-agent", ir_version=IR_VERSION
    )
    meta = {"class_names": ",".join(model.class_names), **(metadata or {})}
    for key, value in sorted(meta.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export_onnx(model: DefectMlp, path: Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write the FP32 classifier graph to ``path``."""
    Path(path).write_bytes(build_onnx(model, metadata).SerializeToString())
    return Path(path)
