"""The defect classifier as Flower arrays, and the training step a client runs on its own rows.

The federation trains the same model the agent ships (``DefectMlp``: standardization, ReLU layers, softmax),
so the result exports through ``pdm_tools.models.defect_mlp.build_onnx`` unchanged. Fitting it centrally
uses scikit-learn, which cannot start from given weights nor add FedProx's proximal term; a client
therefore runs a few epochs of the same recipe in numpy (Adam, L2 ``alpha``, classes balanced by
resampling, ReLU, softmax cross-entropy) starting from the fleet's weights.

Arrays on the wire: ``w0``, ``b0``, ``w1``, ... float32, the only values a round trains and averages (and
the only ones differential privacy clips and noises). The fleet's standardization ``mean``/``scale`` ``(F,)``
is fixed for the run (the server computes it from the clients' feature sums before round 1) and travels in
each round's config.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from pdm_tools.models.defect_mlp import DefectMlp


@dataclass(frozen=True)
class LocalTraining:
    """One client's training in one round (sent by the server in the round's config)."""

    epochs: int = 5
    learning_rate: float = 1e-3
    alpha: float = 0.1
    batch_size: int = 64
    proximal_mu: float = 0.0


def to_arrays(model: DefectMlp) -> ArrayRecord:
    """The model's trained parameters as a Flower ``ArrayRecord`` (names in the module docstring)."""
    arrays = {}
    for i, (w, b) in enumerate(zip(model.weights, model.biases, strict=True)):
        arrays[f"w{i}"], arrays[f"b{i}"] = w, b
    return ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in arrays.items()})


def from_arrays(record: ArrayRecord, class_names: Sequence[str], mean: np.ndarray, scale: np.ndarray) -> DefectMlp:
    """The inverse of :func:`to_arrays`, with the run's standardization; ``ValueError`` when the arrays do
    not form an MLP."""
    mean, scale = np.asarray(mean, np.float32), np.asarray(scale, np.float32)
    try:
        arrays = {k: np.asarray(v.numpy(), dtype=np.float32) for k, v in record.items()}
        layers = sum(1 for k in arrays if k.startswith("w"))
        weights = tuple(arrays[f"w{i}"] for i in range(layers))
        biases = tuple(arrays[f"b{i}"] for i in range(layers))
    except KeyError as exc:
        raise ValueError(f"model arrays lack {exc}; got {sorted(record.keys())}") from None
    widths = [len(mean)] + [w.shape[1] if w.ndim == 2 else -1 for w in weights]
    if (
        layers == 0
        or mean.shape != scale.shape
        or any(
            w.shape != (widths[i], widths[i + 1]) or b.shape != (widths[i + 1],)
            for i, (w, b) in enumerate(zip(weights, biases, strict=True))
        )
        or widths[-1] != len(class_names)
    ):
        shapes = {k: list(v.shape) for k, v in arrays.items()}
        raise ValueError(
            f"model arrays {shapes} are not an MLP from {len(mean)} features to {len(class_names)} classes"
        )
    return DefectMlp(mean=mean, scale=scale, weights=weights, biases=biases, class_names=tuple(class_names))


def standardization(model: DefectMlp) -> dict[str, Any]:
    """The run's ``mean``/``scale`` as config values (they travel with each round's messages)."""
    return {"mean": model.mean.astype(float).tolist(), "scale": model.scale.astype(float).tolist()}


def init_mlp(
    mean: np.ndarray, scale: np.ndarray, hidden: Sequence[int], class_names: Sequence[str], seed: int
) -> DefectMlp:
    """Fresh weights (Glorot-uniform, as scikit-learn initializes ``MLPClassifier``), zero biases' spread."""
    rng = np.random.default_rng(seed)
    widths = [len(mean), *hidden, len(class_names)]
    weights, biases = [], []
    for fan_in, fan_out in itertools.pairwise(widths):
        bound = np.sqrt(6.0 / (fan_in + fan_out))
        weights.append(rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32))
        biases.append(rng.uniform(-bound, bound, fan_out).astype(np.float32))
    return DefectMlp(
        mean=np.asarray(mean, np.float32),
        scale=np.asarray(scale, np.float32),
        weights=tuple(weights),
        biases=tuple(biases),
        class_names=tuple(class_names),
    )


def balanced_rows(y: np.ndarray, k: int) -> np.ndarray:
    """Row indices with every present class resampled (cyclically) to the largest class's size, as
    ``fit_mlp`` balances; a class the client does not hold is simply absent.

    >>> balanced_rows(np.array([0, 0, 0, 1]), 3).tolist()
    [0, 1, 2, 3, 3, 3]
    """
    counts = np.bincount(y, minlength=k)
    return np.concatenate([np.resize(np.flatnonzero(y == c), counts.max()) for c in range(k) if counts[c] > 0])


def local_train(
    model: DefectMlp, x: np.ndarray, y: np.ndarray, training: LocalTraining, seed: int
) -> tuple[DefectMlp, float]:
    """``training.epochs`` epochs of minibatch Adam from ``model`` on rows ``x`` ``(n, F)``, labels ``y``;
    returns the new model (same ``mean``/``scale``) and the last epoch's mean cross-entropy.

    With ``proximal_mu > 0`` the loss gains ``mu / 2 * ||theta - theta_start||^2`` (FedProx): a client
    whose data differ from the fleet's does not pull its weights far from the round's starting point.
    """
    rng = np.random.default_rng(seed)
    k = len(model.class_names)
    z_all = ((np.asarray(x, np.float64) - model.mean) / model.scale).astype(np.float64)
    rows = balanced_rows(np.asarray(y, np.int64), k)
    params = [np.asarray(p, np.float64) for pair in zip(model.weights, model.biases, strict=True) for p in pair]
    start = [p.copy() for p in params]
    m1 = [np.zeros_like(p) for p in params]
    m2 = [np.zeros_like(p) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    step, loss = 0, 0.0
    layers = len(model.weights)
    for _ in range(training.epochs):
        order = rng.permutation(rows)
        losses = []
        for lo in range(0, len(order), training.batch_size):
            batch = order[lo : lo + training.batch_size]
            grads, batch_loss = _gradients(params, layers, z_all[batch], np.asarray(y)[batch], k, training.alpha)
            if training.proximal_mu > 0:
                grads = [g + training.proximal_mu * (p - p0) for g, p, p0 in zip(grads, params, start, strict=True)]
            step += 1
            for i, g in enumerate(grads):
                m1[i] = beta1 * m1[i] + (1 - beta1) * g
                m2[i] = beta2 * m2[i] + (1 - beta2) * g * g
                lr = training.learning_rate * np.sqrt(1 - beta2**step) / (1 - beta1**step)
                params[i] = params[i] - lr * m1[i] / (np.sqrt(m2[i]) + eps)
            losses.append(batch_loss)
        loss = float(np.mean(losses)) if losses else 0.0
    return (
        DefectMlp(
            mean=model.mean,
            scale=model.scale,
            weights=tuple(params[2 * i].astype(np.float32) for i in range(layers)),
            biases=tuple(params[2 * i + 1].astype(np.float32) for i in range(layers)),
            class_names=model.class_names,
        ),
        loss,
    )


def _gradients(
    params: list[np.ndarray], layers: int, z: np.ndarray, y: np.ndarray, k: int, alpha: float
) -> tuple[list[np.ndarray], float]:
    """Backpropagation of softmax cross-entropy plus scikit-learn's L2 term (``alpha / 2n * ||W||^2``)."""
    n = len(z)
    activations = [z]
    for i in range(layers):
        h = activations[-1] @ params[2 * i] + params[2 * i + 1]
        activations.append(np.maximum(h, 0.0) if i < layers - 1 else h)
    logits = activations[-1]
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    loss = float(-np.mean(np.log(np.maximum(p[np.arange(n), y], 1e-12))))
    delta = p
    delta[np.arange(n), y] -= 1.0
    delta /= n
    grads: list[np.ndarray] = [np.empty(0)] * (2 * layers)
    for i in range(layers - 1, -1, -1):
        grads[2 * i] = activations[i].T @ delta + alpha * params[2 * i] / n
        grads[2 * i + 1] = delta.sum(axis=0)
        if i > 0:
            delta = (delta @ params[2 * i].T) * (activations[i] > 0)
    return grads, loss
