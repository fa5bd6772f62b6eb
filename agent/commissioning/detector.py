"""The commissioning detector: drift-scaled, smoothed, per-channel deviation from a machine's own normal.

Fitted on the first readings of one machine (its commissioning period, assumed normal), label-free:

1. **Drift-scaled standardization.** Each channel ``j`` is centred on its commissioning mean and divided by
   its *long-run* standard deviation ``s_j = σ_j · sqrt((1 + ρ_j) / (1 − ρ_j))``, where ``σ_j`` is the
   commissioning standard deviation and ``ρ_j`` the lag-1 autocorrelation, clipped to
   ``[0, max_autocorrelation]``. That is the AR(1) estimate of how far the channel's average wanders over
   long horizons: for a noisy channel (flow, vibration RMS, ``ρ ≈ 0``) it is ``σ``; for a slow one
   (temperatures, ``ρ ≈ 0.95–0.99``) it is 6–14 ``σ``, because a few minutes of commissioning data
   badly under-estimate how far a slowly drifting temperature will go in normal operation. Without it the
   detector alarms on normal warm-up and cool-down.
2. **Causal smoothing.** ``z̄_t`` = mean of the standardized readings ``t − k + 1 … t`` (``k`` =
   ``smoothing_steps``): no look-ahead, and the noise of fast channels shrinks by ``√k``.
3. **Score** = ``max_j |z̄_t,j|``: the channel that moved furthest, in units of its long-run deviation.
   The max (not a sum of squares or a Mahalanobis distance) keeps one large shift from being diluted by
   the other channels, and needs no covariance estimate from a few hundred correlated rows.
4. **Threshold** = ``threshold_factor`` × the largest score over the commissioning windows (those with a
   full window inside the commissioning data). Labels are never used.

Cost: fitting is one pass over the commissioning data (``O(n·C)``); scoring a step is ``O(k·C)``
(240 multiply-adds for 8 channels and ``k = 30``). The fitted state is ``2·C`` floats plus the threshold.

>>> rng = np.random.default_rng(0)
>>> train = rng.normal(size=(400, 3))
>>> det = fit_detector(train, DetectorConfig(smoothing_steps=10))
>>> bool(det.score_windows(np.full((1, 10, 3), 5.0))[0] > det.threshold)
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

# A channel whose commissioning standard deviation is below this fraction of its typical magnitude (or
# 1e-6 absolute) gets that floor: a constant or coarsely quantized channel must not turn harmless
# rounding noise into an infinite score.
MIN_RELATIVE_SCALE = 1e-3
MIN_ABSOLUTE_SCALE = 1e-6


@dataclass(frozen=True, slots=True)
class DetectorConfig:
    """Hyper-parameters; the defaults are the ones evaluated in ``docs/results_skab.md``.

    ``smoothing_steps``: length ``k`` of the causal moving average, in steps (readings).
    ``threshold_factor``: threshold = factor × the largest commissioning score.
    ``max_autocorrelation``: upper clip of ``ρ`` (caps the drift allowance at
    ``sqrt((1 + ρ) / (1 − ρ))`` ≈ 14 standard deviations for 0.99).
    """

    smoothing_steps: int = 30
    threshold_factor: float = 2.4
    max_autocorrelation: float = 0.99

    def __post_init__(self) -> None:
        k = self.smoothing_steps
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"smoothing_steps must be an integer >= 1, got {k!r}")
        f = self.threshold_factor
        if isinstance(f, bool) or not isinstance(f, int | float) or not math.isfinite(f) or f <= 0:
            raise ValueError(f"threshold_factor must be a finite number > 0, got {f!r}")
        r = self.max_autocorrelation
        if isinstance(r, bool) or not isinstance(r, int | float) or not 0 <= r < 1:
            raise ValueError(f"max_autocorrelation must be in [0, 1), got {r!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "smoothing_steps": self.smoothing_steps,
            "threshold_factor": self.threshold_factor,
            "max_autocorrelation": self.max_autocorrelation,
        }


@dataclass(frozen=True, slots=True)
class Detector:
    """A fitted detector. ``mean``, ``scale``: float64 ``(C,)``; ``threshold`` on the score scale.

    ``train_max_score`` is the largest score over the commissioning windows (threshold / factor).
    """

    mean: np.ndarray
    scale: np.ndarray
    smoothing_steps: int
    threshold: float
    train_max_score: float

    @property
    def n_channels(self) -> int:
        return int(self.mean.shape[0])

    def score_windows(self, windows: np.ndarray) -> np.ndarray:
        """Scores of windows ``(m, k, C)`` (oldest reading first) → float64 ``(m,)``."""
        w = np.asarray(windows, dtype=np.float64)
        if w.ndim != 3 or w.shape[1:] != (self.smoothing_steps, self.n_channels):
            raise ValueError(f"windows must have shape (m, {self.smoothing_steps}, {self.n_channels}), got {w.shape}")
        z = (w - self.mean) / self.scale
        return np.abs(z.mean(axis=1)).max(axis=1)

    def score_series(self, x: np.ndarray) -> np.ndarray:
        """Causal scores of a whole series ``(n, C)`` → ``(n,)``; NaN for the first ``k − 1`` steps.

        Vectorized but equal (to rounding) to feeding the rows one by one: score ``t`` only reads rows
        ``t − k + 1 … t``.
        """
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_channels:
            raise ValueError(f"series must have shape (n, {self.n_channels}), got {x.shape}")
        k = self.smoothing_steps
        out = np.full(len(x), np.nan)
        if len(x) >= k:
            windows = sliding_window_view(x, k, axis=0).transpose(0, 2, 1)  # (n - k + 1, k, C)
            out[k - 1 :] = self.score_windows(windows)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready parameters (what a per-machine state file or model card would record)."""
        return {
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "smoothing_steps": self.smoothing_steps,
            "threshold": self.threshold,
            "train_max_score": self.train_max_score,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Detector:
        return cls(
            mean=np.asarray(d["mean"], dtype=np.float64),
            scale=np.asarray(d["scale"], dtype=np.float64),
            smoothing_steps=int(d["smoothing_steps"]),
            threshold=float(d["threshold"]),
            train_max_score=float(d["train_max_score"]),
        )


def long_run_scale(x: np.ndarray, max_autocorrelation: float) -> np.ndarray:
    """Per-channel long-run standard deviation ``σ · sqrt((1 + ρ) / (1 − ρ))`` of ``x`` ``(n, C)``.

    >>> long_run_scale(np.array([[0.0], [2.0], [0.0], [2.0]]), 0.99).round(3).tolist()  # ρ < 0 → σ
    [1.0]
    >>> long_run_scale(np.repeat([[0.0], [2.0]], 50, axis=0), 0.99).round(2).tolist()  # ρ = 0.97
    [8.1]
    """
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    floor = np.maximum(MIN_RELATIVE_SCALE * np.abs(mean), MIN_ABSOLUTE_SCALE)
    sigma = np.maximum(std, floor)
    c = x - mean
    gamma1 = (c[1:] * c[:-1]).sum(axis=0) / len(x)
    rho = np.divide(gamma1, std**2, out=np.zeros_like(gamma1), where=std > 0)
    rho = np.clip(rho, 0.0, max_autocorrelation)
    return np.asarray(sigma * np.sqrt((1.0 + rho) / (1.0 - rho)))


def fit_detector(train: np.ndarray, config: DetectorConfig | None = None) -> Detector:
    """Fit on commissioning rows ``train`` float ``(n, C)``, assumed normal; ``n >= smoothing_steps + 1``.

    Raises ``ValueError`` for a wrong shape, too few rows or non-finite values.
    """
    config = config or DetectorConfig()
    x = np.asarray(train, dtype=np.float64)
    k = config.smoothing_steps
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"commissioning data must be a (n, C) array with C >= 1, got shape {x.shape}")
    if len(x) < k + 1:
        raise ValueError(f"commissioning needs at least smoothing_steps + 1 = {k + 1} rows, got {len(x)}")
    if not np.isfinite(x).all():
        raise ValueError("commissioning data contain NaN or infinity")
    mean = x.mean(axis=0)
    scale = long_run_scale(x, config.max_autocorrelation)
    unscaled = Detector(mean=mean, scale=scale, smoothing_steps=k, threshold=math.inf, train_max_score=0.0)
    train_max = float(np.max(unscaled.score_series(x)[k - 1 :]))
    return Detector(
        mean=mean,
        scale=scale,
        smoothing_steps=k,
        threshold=config.threshold_factor * train_max,
        train_max_score=train_max,
    )
