"""A small MLP autoencoder on standardized features, trained with plain numpy (Adam, early stopping).

Score of a row ``x``: ``mean((decode(encode(z)) - z) ** 2)`` with ``z = (x - mean) / scale``, i.e. the
reconstruction error per feature in units of the training standard deviation. Numpy instead of a deep
learning framework keeps training bit-for-bit reproducible for a seed and the dependency list short; the
network is a few thousand weights.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AutoencoderConfig:
    """Architecture and optimizer settings; ``hidden`` are the widths between input and output."""

    hidden: tuple[int, ...] = (32, 8, 32)
    learning_rate: float = 1e-3
    batch_size: int = 64
    max_epochs: int = 300
    patience: int = 20
    weight_decay: float = 1e-5
    min_scale: float = 1e-3

    def to_dict(self) -> dict[str, object]:
        return {
            "hidden": list(self.hidden),
            "activation": "relu",
            "optimizer": "adam",
            "learning_rate": self.learning_rate,
            "batch_size": self.batch_size,
            "max_epochs": self.max_epochs,
            "patience": self.patience,
            "weight_decay": self.weight_decay,
            "min_scale": self.min_scale,
        }


@dataclass(frozen=True, slots=True)
class Autoencoder:
    """Fitted parameters, float32 as they ship in ONNX.

    ``mean``, ``scale``: ``(F,)``; ``weights[i]``: ``(fan_in, fan_out)``; ``biases[i]``: ``(fan_out,)``.
    ReLU follows every layer except the last.
    """

    mean: np.ndarray
    scale: np.ndarray
    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]

    @property
    def n_features(self) -> int:
        return int(self.mean.shape[0])

    def standardize(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean) / self.scale

    def reconstruct(self, z: np.ndarray) -> np.ndarray:
        """Reconstruction of standardized rows ``z`` (float64 ``(n, F)``)."""
        h = np.asarray(z, dtype=np.float64)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = h @ w.astype(np.float64) + b.astype(np.float64)
            if i < last:
                h = np.maximum(h, 0.0)
        return h

    def score(self, x: np.ndarray) -> np.ndarray:
        """Reference scores in float64: the ONNX graph must reproduce these. ``(n, F)`` → ``(n,)``."""
        z = self.standardize(x)
        return np.mean((self.reconstruct(z) - z) ** 2, axis=1)


@dataclass(frozen=True, slots=True)
class FitReport:
    """How training went: epochs run, the epoch whose weights were kept, and the losses there."""

    epochs_run: int
    best_epoch: int
    train_loss: float
    val_loss: float
    val_loss_history: tuple[float, ...] = field(repr=False)

    def to_dict(self) -> dict[str, object]:
        return {
            "epochs_run": self.epochs_run,
            "best_epoch": self.best_epoch,
            "train_mse": round(self.train_loss, 6),
            "val_mse": round(self.val_loss, 6),
        }


def fit_autoencoder(
    x_train: np.ndarray, x_val: np.ndarray, seed: int, config: AutoencoderConfig | None = None
) -> tuple[Autoencoder, FitReport]:
    """Fit on normal rows ``x_train``; stop when the loss on held-out normal rows ``x_val`` stops improving.

    Deterministic for a given seed, data and config. The scaler is fitted on ``x_train`` only; a feature
    whose standard deviation is below ``min_scale`` times its typical magnitude (or 1e-6 absolute) gets that
    floor, so a nearly constant feature cannot blow up scores on harmless noise.
    """
    config = config or AutoencoderConfig()
    x_train = np.asarray(x_train, dtype=np.float64)
    x_val = np.asarray(x_val, dtype=np.float64)
    if x_train.ndim != 2 or x_val.ndim != 2 or x_train.shape[1] != x_val.shape[1]:
        raise ValueError(f"x_train {x_train.shape} and x_val {x_val.shape} must be (n, F) with the same F")
    if len(x_train) < 2 or len(x_val) < 1:
        raise ValueError(f"need at least 2 training rows and 1 validation row, got {len(x_train)}, {len(x_val)}")
    if not (np.isfinite(x_train).all() and np.isfinite(x_val).all()):
        raise ValueError("training data contain NaN or infinity")

    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    floor = np.maximum(config.min_scale * np.abs(mean), 1e-6)
    scale = np.maximum(std, floor)
    # Round the scaler to float32 now, so training sees exactly the preprocessing that ships in ONNX.
    mean = mean.astype(np.float32).astype(np.float64)
    scale = scale.astype(np.float32).astype(np.float64)
    z_train = (x_train - mean) / scale
    z_val = (x_val - mean) / scale

    rng = np.random.default_rng(seed)
    sizes = (x_train.shape[1], *config.hidden, x_train.shape[1])
    weights = [
        rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(fan_in, fan_out)) for fan_in, fan_out in itertools.pairwise(sizes)
    ]
    biases = [np.zeros(fan_out) for fan_out in sizes[1:]]
    params = [*weights, *biases]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    step = 0

    def val_loss(ws: list[np.ndarray], bs: list[np.ndarray]) -> float:
        return float(np.mean((_forward(z_val, ws, bs)[-1] - z_val) ** 2))

    best = (val_loss(weights, biases), 0, [p.copy() for p in params])
    history: list[float] = []
    n = len(z_train)
    epoch = 0
    for epoch in range(1, config.max_epochs + 1):
        order = rng.permutation(n)
        for start in range(0, n, config.batch_size):
            batch = z_train[order[start : start + config.batch_size]]
            grads = _gradients(batch, weights, biases)
            step += 1
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                if i < len(weights):
                    g = g + config.weight_decay * p
                m[i] = beta1 * m[i] + (1 - beta1) * g
                v[i] = beta2 * v[i] + (1 - beta2) * g * g
                m_hat = m[i] / (1 - beta1**step)
                v_hat = v[i] / (1 - beta2**step)
                p -= config.learning_rate * m_hat / (np.sqrt(v_hat) + eps)
        loss = val_loss(weights, biases)
        history.append(loss)
        if loss < best[0] * (1 - 1e-4):
            best = (loss, epoch, [p.copy() for p in params])
        elif epoch - best[1] >= config.patience:
            break

    _, best_epoch, kept = best
    k = len(weights)
    model = Autoencoder(
        mean=mean.astype(np.float32),
        scale=scale.astype(np.float32),
        weights=tuple(w.astype(np.float32) for w in kept[:k]),
        biases=tuple(b.astype(np.float32) for b in kept[k:]),
    )
    report = FitReport(
        epochs_run=epoch,
        best_epoch=best_epoch,
        train_loss=float(np.mean(model.score(x_train))),
        val_loss=float(np.mean(model.score(x_val))),
        val_loss_history=tuple(history),
    )
    logger.info(
        "autoencoder %s: %d epochs, best %d, train mse %.4f, val mse %.4f",
        sizes,
        report.epochs_run,
        report.best_epoch,
        report.train_loss,
        report.val_loss,
    )
    return model, report


def _forward(z: np.ndarray, weights: list[np.ndarray], biases: list[np.ndarray]) -> list[np.ndarray]:
    """Activations of every layer, input first; ReLU after all but the last layer."""
    acts = [z]
    last = len(weights) - 1
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        h = acts[-1] @ w + b
        acts.append(np.maximum(h, 0.0) if i < last else h)
    return acts


def _gradients(z: np.ndarray, weights: list[np.ndarray], biases: list[np.ndarray]) -> list[np.ndarray]:
    """Gradients of mean squared reconstruction error, weights first then biases (same order as params)."""
    acts = _forward(z, weights, biases)
    delta = 2.0 * (acts[-1] - z) / z.size
    gw: list[np.ndarray] = [np.empty(0)] * len(weights)
    gb: list[np.ndarray] = [np.empty(0)] * len(weights)
    for i in range(len(weights) - 1, -1, -1):
        gw[i] = acts[i].T @ delta
        gb[i] = delta.sum(axis=0)
        if i > 0:
            delta = (delta @ weights[i].T) * (acts[i] > 0)
    return [*gw, *gb]
