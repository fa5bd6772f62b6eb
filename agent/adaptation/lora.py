"""LoRA on a frozen dense base, in numpy: the base MLP read from its ONNX graph, low-rank branches, Adam.

The base is one of the agent's MLP graphs (``pdm_tools.models.export.mlp_graph``: ``(x - mean) / scale``
then MatMul + Add layers with ReLU between them), FP32 or static INT8 QDQ. Its weights are read from the
graph (dequantized when the base is QDQ: QLoRA-style, the quantized base stays frozen) and never change.
Each chosen layer ``i`` gets a branch (Hu et al. 2021)::

    h_{i+1} = act(h_i @ W_i + b_i + s * (h_i @ A_i) @ B_i),    s = alpha / rank

with ``A_i`` ``(fan_in, rank)`` random and ``B_i`` ``(rank, fan_out)`` zero at the start, so the adapted
model *is* the base until training moves ``B``. Only ``A`` and ``B`` are learned, with the model's own
objective on the machine's own data: the mean squared reconstruction error of standardized features for
an autoencoder (commissioning data of normal operation), class-balanced cross-entropy for a classifier
(windows whose defect a technician confirmed). Adam, mini-batches, early stopping on a held-out slice;
float64 arithmetic and a seeded generator make a run reproducible bit for bit.

Size: this module stays one file (~590 lines) on purpose: the forward pass, its hand-written gradients
(checked against finite differences in the tests) and the reader of the base graph they run on must be
read side by side; the graph builder is ``agent.adaptation.graph``, the file format ``adapter``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
import tracemalloc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import numpy_helper

logger = logging.getLogger(__name__)

Kind = Literal["autoencoder", "classifier"]


@dataclass(frozen=True)
class DenseLayer:
    """One frozen dense layer: ``weight`` float32 ``(fan_in, fan_out)``, ``bias`` float32 ``(fan_out,)``.

    ``name`` is the MatMul node's name in the base graph (``layer0_matmul``): it names the layer in adapters.
    """

    name: str
    weight: np.ndarray
    bias: np.ndarray
    relu: bool

    @property
    def fan_in(self) -> int:
        return int(self.weight.shape[0])

    @property
    def fan_out(self) -> int:
        return int(self.weight.shape[1])


@dataclass(frozen=True)
class BaseMlp:
    """The frozen base read from an ONNX graph: standardization, dense layers, and what its output means.

    ``kind`` is ``autoencoder`` (output ``score``: mean squared reconstruction error of ``z``) or
    ``classifier`` (outputs ``probabilities`` and ``label`` from the logits). ``quantized``: the weights
    were dequantized from a QDQ graph (activations are then float here, quantized in ONNX Runtime).
    """

    kind: Kind
    mean: np.ndarray
    scale: np.ndarray
    layers: tuple[DenseLayer, ...]
    quantized: bool = False

    @property
    def n_features(self) -> int:
        return int(self.mean.shape[0])

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    def layer(self, name: str) -> DenseLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no dense layer {name!r}; the base has {list(self.layer_names)}")

    @classmethod
    def from_onnx(cls, model: onnx.ModelProto | Path) -> BaseMlp:
        """Read an MLP graph of ``pdm_tools.models`` (FP32 or INT8 QDQ); ``ValueError`` if it is not one."""
        proto = onnx.load(str(model)) if isinstance(model, Path | str) else model
        return _read_mlp(proto)

    def standardize(self, x: np.ndarray, lora: LoraWeights | None = None) -> np.ndarray:
        """``(x - mean) / scale`` in float64, ``(n, F)``; the adapter's own standardization if it has one."""
        mean, scale = (self.mean, self.scale) if lora is None or lora.standardization is None else lora.standardization
        return (np.asarray(x, dtype=np.float64) - mean.astype(np.float64)) / scale.astype(np.float64)

    def output(self, x: np.ndarray, lora: LoraWeights | None = None) -> np.ndarray:
        """Last layer's output (reconstruction or logits) of raw feature rows ``x`` ``(n, F)``, float64."""
        return _forward(self, self.standardize(x, lora), lora)[0][-1]

    def score(self, x: np.ndarray, lora: LoraWeights | None = None) -> np.ndarray:
        """Autoencoder score ``(n,)``: mean squared reconstruction error of the standardized rows."""
        self._expect("autoencoder")
        z = self.standardize(x, lora)
        return np.mean((_forward(self, z, lora)[0][-1] - z) ** 2, axis=1)

    def predict_proba(self, x: np.ndarray, lora: LoraWeights | None = None) -> np.ndarray:
        """Classifier probabilities ``(n, C)`` (softmax of the logits)."""
        self._expect("classifier")
        return _softmax(self.output(x, lora))

    def predict(self, x: np.ndarray, lora: LoraWeights | None = None) -> np.ndarray:
        """Classifier class indices ``(n,)``."""
        self._expect("classifier")
        return np.argmax(self.output(x, lora), axis=1)

    def _expect(self, kind: Kind) -> None:
        if self.kind != kind:
            raise ValueError(f"this base is an {self.kind}, not a {kind}")


@dataclass(frozen=True)
class LoraWeights:
    """The learned low-rank factors: ``factors[layer] = (A (fan_in, r), B (r, fan_out))`` float32.

    The effective update of a layer's weight is ``scale * A @ B`` with ``scale = alpha / rank``.
    ``standardization``: optional per-machine ``(mean, scale)`` float32 ``(F,)`` replacing the base's input
    standardization (computed from the machine's rows, not learned; see ``LoraConfig.refit_standardization``).
    """

    rank: int
    alpha: float
    factors: Mapping[str, tuple[np.ndarray, np.ndarray]]
    standardization: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self.factors)

    @property
    def n_parameters(self) -> int:
        extra = 0 if self.standardization is None else sum(v.size for v in self.standardization)
        return sum(a.size + b.size for a, b in self.factors.values()) + extra

    def delta(self, layer: str) -> np.ndarray:
        """``scale * A @ B`` of ``layer`` in float64 ``(fan_in, fan_out)``: what a merge adds to ``W``."""
        a, b = self.factors[layer]
        return self.scale * (a.astype(np.float64) @ b.astype(np.float64))

    @classmethod
    def initial(cls, base: BaseMlp, layers: Sequence[str], rank: int, alpha: float, seed: int) -> LoraWeights:
        """``A ~ N(0, 1/fan_in)``, ``B = 0``: the adapted model equals the base until ``B`` moves."""
        rng = np.random.default_rng(seed)
        factors = {}
        for name in layers:
            layer = base.layer(name)
            a = rng.normal(0.0, 1.0 / np.sqrt(layer.fan_in), size=(layer.fan_in, rank))
            factors[name] = (a.astype(np.float32), np.zeros((rank, layer.fan_out), dtype=np.float32))
        return cls(rank=rank, alpha=alpha, factors=factors)


@dataclass(frozen=True)
class LoraConfig:
    """Adapter shape and optimizer settings (recorded in the adapter manifest).

    ``layers``: names of the dense layers to adapt (``None``: all of them). ``refit_standardization``: also
    replace the base's input mean and scale by the machine's own (from its training rows, with the floor of
    ``pdm_tools.models.autoencoder``): a machine at another operating point then starts from standardized
    inputs the base knows, and the low-rank factors learn the rest. Off by default (pure LoRA).
    """

    rank: int = 4
    alpha: float = 8.0
    layers: tuple[str, ...] | None = None
    learning_rate: float = 5e-3
    batch_size: int = 32
    max_epochs: int = 200
    patience: int = 20
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    refit_standardization: bool = False
    min_scale: float = 1e-3

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")

    def to_dict(self) -> dict[str, object]:
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "layers": None if self.layers is None else list(self.layers),
            "optimizer": "adam",
            "learning_rate": self.learning_rate,
            "batch_size": self.batch_size,
            "max_epochs": self.max_epochs,
            "patience": self.patience,
            "weight_decay": self.weight_decay,
            "val_fraction": self.val_fraction,
            "refit_standardization": self.refit_standardization,
        }


@dataclass(frozen=True)
class LoraFitReport:
    """How adaptation went: epochs, the kept epoch, losses before and after, time and peak memory."""

    epochs_run: int
    best_epoch: int
    train_loss_before: float
    train_loss_after: float
    val_loss_before: float
    val_loss_after: float
    train_rows: int
    val_rows: int
    seconds: float
    peak_memory_bytes: int
    val_loss_history: tuple[float, ...] = field(repr=False, default=())

    def to_dict(self) -> dict[str, object]:
        return {
            "epochs_run": self.epochs_run,
            "best_epoch": self.best_epoch,
            "train_loss_before": round(self.train_loss_before, 6),
            "train_loss_after": round(self.train_loss_after, 6),
            "val_loss_before": round(self.val_loss_before, 6),
            "val_loss_after": round(self.val_loss_after, 6),
            "train_rows": self.train_rows,
            "val_rows": self.val_rows,
            "seconds": round(self.seconds, 3),
            "peak_memory_bytes": self.peak_memory_bytes,
        }


def train_lora(
    base: BaseMlp,
    x: np.ndarray,
    y: np.ndarray | None = None,
    *,
    seed: int,
    config: LoraConfig | None = None,
    x_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    measure_memory: bool = False,
) -> tuple[LoraWeights, LoraFitReport]:
    """Learn a LoRA adapter for ``base`` from one machine's rows ``x`` (raw features, ``(n, F)``).

    Autoencoder: ``x`` are normal rows (commissioning), ``y`` is ``None``. Classifier: ``y`` ``(n,)`` are
    class indices (classes may be missing: they keep the base's behaviour as far as the low rank allows).
    The held-out slice is ``x_val``/``y_val`` if given, else a seeded random ``config.val_fraction`` of the
    rows (stratified by class for a classifier). The returned weights are those of the epoch with the
    lowest held-out loss (epoch 0 = the base itself, so adaptation never makes the held-out loss worse).
    ``measure_memory``: trace Python/numpy allocations (tracemalloc) for ``peak_memory_bytes``; tracing makes
    the run about 4x slower, so measure time and memory in separate (identical, deterministic) runs.
    """
    config = config or LoraConfig()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != base.n_features:
        raise ValueError(f"x must have shape (n, {base.n_features}), got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("adaptation rows contain NaN or infinity")
    if base.kind == "classifier":
        if y is None:
            raise ValueError("a classifier adapts on labelled rows: y is required")
        y = np.asarray(y, dtype=np.int64)
        n_classes = base.layers[-1].fan_out
        if y.shape != (len(x),) or y.min(initial=0) < 0 or y.max(initial=0) >= n_classes:
            raise ValueError(f"y must be {len(x)} class indices in [0, {n_classes})")
    rng = np.random.default_rng(seed)
    if x_val is None:
        train_idx, val_idx = _split(len(x), y, config.val_fraction, rng)
        x_tr, x_va = x[train_idx], x[val_idx]
        y_tr = None if y is None else y[train_idx]
        y_va = None if y is None else y[val_idx]
    else:
        x_tr, x_va, y_tr = x, np.asarray(x_val, dtype=np.float64), y
        y_va = None if y_val is None else np.asarray(y_val, dtype=np.int64)
    if len(x_tr) < 1 or len(x_va) < 1:
        raise ValueError(f"need training and held-out rows, got {len(x_tr)} and {len(x_va)}")

    layers = base.layer_names if config.layers is None else tuple(config.layers)
    for name in layers:
        base.layer(name)  # KeyError names the unknown layer
    if measure_memory:
        tracemalloc.start()
        tracemalloc.reset_peak()
    t0 = time.perf_counter()
    try:
        weights, report = _fit(base, x_tr, y_tr, x_va, y_va, layers, config, rng, seed)
    finally:
        peak = tracemalloc.get_traced_memory()[1] if measure_memory else 0
        if measure_memory:
            tracemalloc.stop()
    seconds = time.perf_counter() - t0
    report = dataclasses.replace(report, seconds=seconds, peak_memory_bytes=int(peak))
    logger.info(
        "lora r=%d on %s: %d epochs, best %d, val loss %.5g -> %.5g, %.2f s",
        config.rank,
        ",".join(layers),
        report.epochs_run,
        report.best_epoch,
        report.val_loss_before,
        report.val_loss_after,
        seconds,
    )
    return weights, report


def _fit(
    base: BaseMlp,
    x_tr: np.ndarray,
    y_tr: np.ndarray | None,
    x_va: np.ndarray,
    y_va: np.ndarray | None,
    layers: tuple[str, ...],
    config: LoraConfig,
    rng: np.random.Generator,
    seed: int,
) -> tuple[LoraWeights, LoraFitReport]:
    init = LoraWeights.initial(base, layers, config.rank, config.alpha, seed)
    params = [p.astype(np.float64) for name in layers for p in init.factors[name]]
    standardization = machine_standardization(x_tr, config.min_scale) if config.refit_standardization else None
    init = dataclasses.replace(init, standardization=standardization)
    z_tr, z_va = base.standardize(x_tr, init), base.standardize(x_va, init)
    class_weight = _class_weights(y_tr, base.layers[-1].fan_out) if base.kind == "classifier" else None

    def as_weights(ps: list[np.ndarray]) -> LoraWeights:
        return LoraWeights(
            rank=config.rank,
            alpha=config.alpha,
            factors={n: (ps[2 * i], ps[2 * i + 1]) for i, n in enumerate(layers)},
            standardization=standardization,
        )

    def loss(ps: list[np.ndarray], z: np.ndarray, yy: np.ndarray | None) -> float:
        return loss_and_gradients(base, as_weights(ps), z, yy, class_weight, need_gradients=False)[0]

    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    train_before, val_before = loss(params, z_tr, y_tr), loss(params, z_va, y_va)
    best = (val_before, 0, [p.copy() for p in params])
    history: list[float] = []
    step = epoch = 0
    n = len(z_tr)
    for epoch in range(1, config.max_epochs + 1):
        order = rng.permutation(n)
        for start in range(0, n, config.batch_size):
            rows = order[start : start + config.batch_size]
            yb = None if y_tr is None else y_tr[rows]
            _, grads = loss_and_gradients(base, as_weights(params), z_tr[rows], yb, class_weight)
            step += 1
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                g = g + config.weight_decay * p
                m[i] = beta1 * m[i] + (1 - beta1) * g
                v[i] = beta2 * v[i] + (1 - beta2) * g * g
                p -= config.learning_rate * (m[i] / (1 - beta1**step)) / (np.sqrt(v[i] / (1 - beta2**step)) + eps)
        val = loss(params, z_va, y_va)
        history.append(val)
        if val < best[0] * (1 - 1e-4):
            best = (val, epoch, [p.copy() for p in params])
        elif epoch - best[1] >= config.patience:
            break
    val_after, best_epoch, kept = best
    weights = LoraWeights(
        rank=config.rank,
        alpha=config.alpha,
        factors={n: (kept[2 * i].astype(np.float32), kept[2 * i + 1].astype(np.float32)) for i, n in enumerate(layers)},
        standardization=standardization,
    )
    report = LoraFitReport(
        epochs_run=epoch,
        best_epoch=best_epoch,
        train_loss_before=train_before,
        train_loss_after=loss([p.astype(np.float64) for p in kept], z_tr, y_tr),
        val_loss_before=val_before,
        val_loss_after=val_after,
        train_rows=len(z_tr),
        val_rows=len(z_va),
        seconds=0.0,
        peak_memory_bytes=0,
        val_loss_history=tuple(history),
    )
    return weights, report


def loss_and_gradients(
    base: BaseMlp,
    lora: LoraWeights,
    z: np.ndarray,
    y: np.ndarray | None = None,
    class_weight: np.ndarray | None = None,
    need_gradients: bool = True,
) -> tuple[float, list[np.ndarray]]:
    """The model's own loss on standardized rows ``z`` and its gradients w.r.t. ``A, B`` of each adapted layer.

    Gradients are in ``lora.layers`` order, ``[dA_0, dB_0, dA_1, dB_1, ...]``. Autoencoder: mean over all
    elements of ``(reconstruction - z)²``. Classifier: cross-entropy weighted by ``class_weight[y]``
    (normalized by the batch's total weight).
    """
    acts, pre, branch_in = _forward(base, z, lora)
    out = acts[-1]
    if base.kind == "autoencoder":
        diff = out - z
        value = float(np.mean(diff**2))
        delta = 2.0 * diff / diff.size
    else:
        if y is None:
            raise ValueError("classifier loss needs labels")
        w = np.ones(len(y)) if class_weight is None else class_weight[y]
        total = float(w.sum()) or 1.0
        logp = out - out.max(axis=1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(axis=1, keepdims=True))
        value = float(-(w * logp[np.arange(len(y)), y]).sum() / total)
        delta = np.exp(logp)
        delta[np.arange(len(y)), y] -= 1.0
        delta *= (w / total)[:, None]
    if not need_gradients:
        return value, []
    s = lora.scale
    grads: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for i in range(len(base.layers) - 1, -1, -1):
        layer = base.layers[i]
        factors = lora.factors.get(layer.name)
        back_lora: np.ndarray | None = None
        if factors is not None:
            a, b = (f.astype(np.float64) for f in factors)
            delta_b = delta @ b.T  # (n, r): gradient at h @ A, before the scale
            grads[layer.name] = (s * (acts[i].T @ delta_b), s * (branch_in[layer.name].T @ delta))
            back_lora = s * (delta_b @ a.T)
        if i > 0:
            back = delta @ layer.weight.astype(np.float64).T
            if back_lora is not None:
                back = back + back_lora
            prev = base.layers[i - 1]
            delta = back * (pre[i - 1] > 0) if prev.relu else back
    return value, [g for name in lora.layers for g in grads[name]]


def _forward(
    base: BaseMlp, z: np.ndarray, lora: LoraWeights | None
) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, np.ndarray]]:
    """Activations (input first), pre-activations per layer, and ``h @ A`` of every adapted layer."""
    acts = [np.asarray(z, dtype=np.float64)]
    pre: list[np.ndarray] = []
    branch_in: dict[str, np.ndarray] = {}
    for layer in base.layers:
        h = acts[-1]
        y = h @ layer.weight.astype(np.float64) + layer.bias.astype(np.float64)
        factors = None if lora is None else lora.factors.get(layer.name)
        if factors is not None and lora is not None:
            xa = h @ factors[0].astype(np.float64)
            branch_in[layer.name] = xa
            y = y + lora.scale * (xa @ factors[1].astype(np.float64))
        pre.append(y)
        acts.append(np.maximum(y, 0.0) if layer.relu else y)
    return acts, pre, branch_in


def machine_standardization(x: np.ndarray, min_scale: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Mean and scale of a machine's rows, float32 ``(F,)``: the floor rule of ``fit_autoencoder``.

    >>> [v.tolist() for v in machine_standardization(np.array([[1.0, 5.0], [3.0, 5.0]]))]
    [[2.0, 5.0], [1.0, 0.004999999888241291]]
    """
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    scale = np.maximum(x.std(axis=0), np.maximum(min_scale * np.abs(mean), 1e-6))
    return mean.astype(np.float32), scale.astype(np.float32)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _class_weights(y: np.ndarray | None, n_classes: int) -> np.ndarray:
    """Inverse class frequency (the base recipe balances classes); classes absent from ``y`` get 0.

    >>> _class_weights(np.array([0, 0, 0, 1]), 3).tolist()
    [0.6666666666666666, 2.0, 0.0]
    """
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=n_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(n_classes)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return w


def _split(n: int, y: np.ndarray | None, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train / held-out indices; stratified by class (at least one held-out row per class of 2+)."""
    groups = [np.arange(n)] if y is None else [np.flatnonzero(y == c) for c in np.unique(y)]
    val: list[np.ndarray] = []
    for rows in groups:
        k = round(fraction * len(rows)) if len(rows) > 1 else 0
        k = max(k, 1) if len(rows) > 1 else 0
        val.append(rng.permutation(rows)[:k])
    val_idx = np.sort(np.concatenate(val)) if val else np.empty(0, np.int64)
    mask = np.ones(n, dtype=bool)
    mask[val_idx] = False
    return np.flatnonzero(mask), val_idx


# --- reading the base graph ------------------------------------------------------------------------------


def _read_mlp(proto: onnx.ModelProto) -> BaseMlp:
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    quantized = any(node.op_type == "DequantizeLinear" for node in graph.node)

    def value(name: str) -> np.ndarray:
        """A constant tensor: an initializer, or DequantizeLinear of initializers (dequantized here)."""
        if name in inits:
            return numpy_helper.to_array(inits[name]).astype(np.float32)
        node = producer.get(name)
        if node is not None and node.op_type == "DequantizeLinear" and all(i in inits for i in node.input):
            q = numpy_helper.to_array(inits[node.input[0]]).astype(np.float64)
            s = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
            zp = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64) if len(node.input) > 2 else 0.0
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if np.ndim(s) == 1 and q.ndim > 1:
                shape = [1] * q.ndim
                shape[axis] = -1
                s, zp = s.reshape(shape), np.reshape(zp, shape) if np.ndim(zp) else zp
            return ((q - zp) * s).astype(np.float32)
        raise ValueError(f"tensor {name!r} is not a constant of the graph")

    def after_qdq(name: str) -> str:
        """Follow ``name -> QuantizeLinear -> DequantizeLinear`` to the dequantized tensor, if quantized."""
        users = consumers.get(name, [])
        if len(users) == 1 and users[0].op_type == "QuantizeLinear":
            dq = consumers.get(users[0].output[0], [])
            if len(dq) == 1 and dq[0].op_type == "DequantizeLinear":
                return str(dq[0].output[0])
        return name

    try:
        mean, scale = value("mean"), value("scale")
    except ValueError as exc:
        raise ValueError("not an agent MLP graph: no 'mean'/'scale' standardization initializers") from exc
    outputs = {o.name for o in graph.output}
    if "score" in outputs:
        kind: Kind = "autoencoder"
    elif "probabilities" in outputs:
        kind = "classifier"
    else:
        raise ValueError(f"not an agent MLP graph: outputs {sorted(outputs)} have neither 'score' nor 'probabilities'")
    matmuls = [node for node in graph.node if node.op_type == "MatMul"]
    if not matmuls:
        raise ValueError("the graph has no MatMul: nothing to adapt")
    layers: list[DenseLayer] = []
    for i, node in enumerate(matmuls):
        weight = value(node.input[1])
        out = after_qdq(node.output[0])
        adds = [c for c in consumers.get(out, []) if c.op_type == "Add"]
        bias = np.zeros(weight.shape[1], dtype=np.float32)
        if adds:
            other = [t for t in adds[0].input if t != out]
            bias = value(other[0]).reshape(-1)
        last = i == len(matmuls) - 1
        layers.append(DenseLayer(name=node.name or f"matmul{i}", weight=weight, bias=bias, relu=not last))
    relus = sum(node.op_type == "Relu" for node in graph.node)
    if not quantized and relus != len(layers) - 1:
        raise ValueError(f"expected ReLU after every dense layer but the last, found {relus} Relu for {len(layers)}")
    for prev, nxt in itertools.pairwise(layers):
        if prev.fan_out != nxt.fan_in:
            raise ValueError(f"layers {prev.name} and {nxt.name} do not chain ({prev.fan_out} vs {nxt.fan_in})")
    return BaseMlp(kind=kind, mean=mean, scale=scale, layers=tuple(layers), quantized=quantized)
