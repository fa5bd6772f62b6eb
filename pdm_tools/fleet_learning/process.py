"""The fleet's process model: one autoencoder trained by all agents on their own commissioning data, each
agent keeping its own standardization and threshold.

Why this split. A machine's normal operating point (the level of every channel) is its own; what machines
of one kind share is how their channels move together. So each agent fits its commissioning baseline
locally (``agent.commissioning.detector.fit_detector``: mean and drift-scaled long-run scale per channel on
its first ``TRAIN_ROWS`` readings) and feeds the fleet autoencoder the baseline's causally smoothed z
vector (the moving average over ``smoothing_steps`` readings, before the baseline takes ``max |z|``). The
autoencoder is the only thing the fleet trains; it learns the normal joint pattern of those vectors.

Score of a step: the RMS reconstruction error of its smoothed z vector (RMS, not MSE, so the score is on
the z scale the baseline's ``threshold_factor`` was chosen for). Threshold: per machine (per SKAB file),
``threshold_factor`` times the largest score over its own commissioning windows, the baseline's label-free
rule. Nothing here reads a label except the confusion counts of an evaluation.

Training: plain numpy Adam epochs (``pdm_tools.models.autoencoder``'s backpropagation) starting from given
weights, so a federated round, the central fit and a local-only fit run the same code and the same number
of epochs from the same initial weights; only the rows they see differ.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord
from numpy.lib.stride_tricks import sliding_window_view

from agent.commissioning.detector import DetectorConfig, fit_detector
from pdm_tools.models.autoencoder import Autoencoder, _gradients

# The SKAB protocol's commissioning period (``pdm_tools.evaluation.skab``): rows a machine trains on.
TRAIN_ROWS = 400
PROCESS_HIDDEN = (16, 4, 16)


@dataclass(frozen=True)
class AeTraining:
    """One client's training in one round (sent by the server in the round's config)."""

    epochs: int = 5
    learning_rate: float = 1e-3
    batch_size: int = 64
    # FedProx (``--strategy fedprox``): ``mu / 2 * ||theta - theta_start||^2`` added to the loss.
    proximal_mu: float = 0.0


@dataclass(frozen=True)
class Series:
    """One machine's (one SKAB file's) smoothed z vectors: ``train`` ``(m, C)`` the commissioning windows,
    ``test`` ``(t, C)`` one per later step; ``labels`` ``(t,)`` bool (all False when unlabelled); ``mean``,
    ``scale`` ``(C,)`` the machine's commissioning baseline (the standardization behind the z vectors)."""

    train: np.ndarray
    test: np.ndarray
    labels: np.ndarray
    mean: np.ndarray | None = None
    scale: np.ndarray | None = None


def smoothed_z(values: np.ndarray, labels: np.ndarray | None, config: DetectorConfig | None = None) -> Series:
    """The autoencoder's rows of one machine's readings ``values`` ``(n, C)``: the commissioning baseline
    fitted on the first ``TRAIN_ROWS``, then the causal ``smoothing_steps`` mean of the standardized
    readings at every step. Window ``r`` ends at step ``r + k - 1``, as in ``pdm_tools.evaluation.skab``."""
    config = config or DetectorConfig()
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 2 or len(x) < TRAIN_ROWS:
        raise ValueError(f"readings must be (n >= {TRAIN_ROWS}, C), got {x.shape}")
    det = fit_detector(x[:TRAIN_ROWS], config)
    k = det.smoothing_steps
    windows = sliding_window_view((x - det.mean) / det.scale, k, axis=0).mean(axis=-1)  # (n - k + 1, C)
    cut = TRAIN_ROWS - k + 1
    test = windows[cut:]
    # Unlabelled (an agent's own readings): every step counts as normal, so an alarm is a false positive.
    test_labels = np.asarray(labels, dtype=bool)[TRAIN_ROWS:] if labels is not None else np.zeros(len(test), bool)
    return Series(train=windows[:cut], test=test, labels=test_labels, mean=det.mean, scale=det.scale)


def init_autoencoder(n_features: int, hidden: Sequence[int], seed: int) -> Autoencoder:
    """Fresh weights (He-normal, as ``fit_autoencoder`` starts), zero biases, identity scaler: the rows are
    already each machine's own z values."""
    rng = np.random.default_rng(seed)
    sizes = (n_features, *hidden, n_features)
    weights = tuple(
        rng.normal(0.0, np.sqrt(2.0 / a), size=(a, b)).astype(np.float32) for a, b in itertools.pairwise(sizes)
    )
    return Autoencoder(
        mean=np.zeros(n_features, np.float32),
        scale=np.ones(n_features, np.float32),
        weights=weights,
        biases=tuple(np.zeros(b, np.float32) for b in sizes[1:]),
    )


def train_autoencoder(
    model: Autoencoder, rows: np.ndarray, training: AeTraining, seed: int
) -> tuple[Autoencoder, float]:
    """``training.epochs`` epochs of minibatch Adam from ``model`` on ``rows`` ``(n, F)``; the new model and
    the last epoch's mean squared reconstruction error. With ``training.proximal_mu > 0`` (FedProx) the loss
    gains ``mu / 2 * ||theta - theta_start||^2``, which keeps a client whose rows differ from the fleet's
    nearer the round's start."""
    rng = np.random.default_rng(seed)
    z = model.standardize(rows)
    layers = len(model.weights)
    params = [np.asarray(p, np.float64) for p in (*model.weights, *model.biases)]
    start = [p.copy() for p in params]
    m1 = [np.zeros_like(p) for p in params]
    m2 = [np.zeros_like(p) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    step = 0
    for _ in range(training.epochs):
        order = rng.permutation(len(z))
        for lo in range(0, len(z), training.batch_size):
            grads = _gradients(z[order[lo : lo + training.batch_size]], params[:layers], params[layers:])
            if training.proximal_mu > 0:
                grads = [g + training.proximal_mu * (p - p0) for g, p, p0 in zip(grads, params, start, strict=True)]
            step += 1
            lr = training.learning_rate * np.sqrt(1 - beta2**step) / (1 - beta1**step)
            for i, g in enumerate(grads):
                m1[i] = beta1 * m1[i] + (1 - beta1) * g
                m2[i] = beta2 * m2[i] + (1 - beta2) * g * g
                params[i] = params[i] - lr * m1[i] / (np.sqrt(m2[i]) + eps)
    trained = Autoencoder(
        mean=model.mean,
        scale=model.scale,
        weights=tuple(p.astype(np.float32) for p in params[:layers]),
        biases=tuple(p.astype(np.float32) for p in params[layers:]),
    )
    return trained, float(np.mean(trained.score(rows))) if len(rows) else 0.0


def rms_score(model: Autoencoder, rows: np.ndarray) -> np.ndarray:
    """RMS reconstruction error per row ``(n,)``, on the z scale."""
    return np.sqrt(model.score(rows)) if len(rows) else np.zeros(0)


def machine_threshold(model: Autoencoder, series: Series, factor: float) -> float:
    """A machine's threshold on the RMS score: ``factor`` times its largest commissioning score (label-free)."""
    return factor * float(rms_score(model, series.train).max())


def confusion(model: Autoencoder, series: Sequence[Series], factor: float) -> dict[str, int]:
    """Point-wise confusion counts over the machines' test steps, each machine thresholded at ``factor``
    times its own largest commissioning score (label-free)."""
    tp = fp = fn = tn = 0
    for s in series:
        threshold = machine_threshold(model, s, factor)
        flags = rms_score(model, s.test) > threshold
        tp += int((flags & s.labels).sum())
        fp += int((flags & ~s.labels).sum())
        fn += int((~flags & s.labels).sum())
        tn += int((~flags & ~s.labels).sum())
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn}


def to_arrays(model: Autoencoder) -> ArrayRecord:
    """The autoencoder's trained parameters on the wire: ``w0``, ``b0``, ``w1``, ... float32."""
    arrays: dict[str, Array] = {}
    for i, (w, b) in enumerate(zip(model.weights, model.biases, strict=True)):
        arrays[f"w{i}"] = Array(np.ascontiguousarray(w, dtype=np.float32))
        arrays[f"b{i}"] = Array(np.ascontiguousarray(b, dtype=np.float32))
    return ArrayRecord(arrays)


def from_arrays(record: ArrayRecord, n_features: int) -> Autoencoder:
    """The inverse of :func:`to_arrays`; ``ValueError`` when the arrays are not an autoencoder of
    ``n_features`` channels."""
    arrays = {k: np.asarray(v.numpy(), dtype=np.float32) for k, v in record.items()}
    layers = sum(1 for k in arrays if k.startswith("w"))
    try:
        weights = tuple(arrays[f"w{i}"] for i in range(layers))
        biases = tuple(arrays[f"b{i}"] for i in range(layers))
    except KeyError as exc:
        raise ValueError(f"autoencoder arrays lack {exc}; got {sorted(arrays)}") from None
    widths = [n_features] + [w.shape[1] if w.ndim == 2 else -1 for w in weights]
    if (
        layers == 0
        or widths[-1] != n_features
        or any(
            w.shape != (widths[i], widths[i + 1]) or b.shape != (widths[i + 1],)
            for i, (w, b) in enumerate(zip(weights, biases, strict=True))
        )
    ):
        shapes = {k: list(v.shape) for k, v in arrays.items()}
        raise ValueError(f"arrays {shapes} are not an autoencoder of {n_features} channels")
    return Autoencoder(
        mean=np.zeros(n_features, np.float32), scale=np.ones(n_features, np.float32), weights=weights, biases=biases
    )
