"""Feature extraction: windows in, float32 feature rows out. Training and serving both call this.

Definitions (``x``: the samples of one window, ``n`` of them, population moments, no ddof):

Vibration, on the raw samples ``x``:

- ``mean``, ``std`` (population, ``ddof=0``), ``rms = sqrt(mean(x**2))``, ``peak = max|x|``;
- ``crest_factor = peak / rms``, defined as 0 when ``rms == 0``;
- ``skewness = m3 / m2**1.5`` (biased Fisher-Pearson, as ``scipy.stats.skew`` by default);
- ``kurtosis = m4 / m2**2``: **Pearson** kurtosis, 3 for a normal distribution (as
  ``scipy.stats.kurtosis(fisher=False)``), not the excess kurtosis;
- for a constant window (``m2 <= (1e-10 * peak)**2``, i.e. no variation beyond float64 rounding)
  skewness and kurtosis are defined as 0 instead of NaN;
- ``band_{lo}_{hi}hz = log10(P + 1e-12)`` where ``P`` is the power of the band: the window is
  mean-removed, multiplied by a periodic Hann window ``w`` and transformed (``X = rfft``); bin ``k``
  (frequency ``k * rate_hz / n``) belongs to the band if ``lo <= f < hi`` (the last band also takes
  ``f == hi``), and

      P = sum_k c_k |X_k|**2 / (n * sum(w**2)),   c_k = 2, except 1 for DC and the Nyquist bin.

  This is the one-sided periodogram integrated over the band, so ``P`` is a mean square in the
  signal's units squared: it does not depend on the window length or the sampling rate, a sine of
  amplitude ``A`` inside the band gives ``P = A**2 / 2``, and bands covering ``[0, rate/2]`` add up
  to the Hann-weighted variance ``sum((x - mean)**2 * w**2) / sum(w**2)``.

Process, per channel, on values ``y`` at times ``t`` (seconds since the window's first reading):
``mean``, ``std`` (``ddof=0``), ``slope`` (least-squares slope of ``y`` against ``t``, units per
second; 0 if all times are equal), ``min``, ``max``, ``last`` (the value of the latest reading).

All arithmetic is float64; results are float32. Non-finite input or output raises ``ValueError``.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Sequence
from typing import Final

import numpy as np

from agent.features.spec import FeatureSpec
from agent.records import FeatureVector, Window

logger = logging.getLogger(__name__)

BAND_POWER_EPS: Final = 1e-12
# Relative variation below which a window counts as constant (float64 rounding is ~1e-16 relative).
_CONSTANT_REL: Final = 1e-10
# Vibration rows per chunk: ~1 MiB of float64 samples per temporary array (measured fastest).
_CHUNK_BYTES: Final = 1 << 20


def extract(spec: FeatureSpec, window: Window) -> FeatureVector:
    """Features of one window: ``values`` float32, shape ``(spec.n_features,)``."""
    values = extract_matrix(spec, [window])[0]
    return FeatureVector(window=window, names=spec.feature_names(), values=values, spec_hash=spec.spec_hash())


def extract_matrix(spec: FeatureSpec, windows: Sequence[Window]) -> np.ndarray:
    """Features of many windows at once: float32, shape ``(len(windows), spec.n_features)``.

    Row ``i`` equals ``extract(spec, windows[i]).values``. Raises ``ValueError`` if the spec is for
    another feature code version, or a window does not match the spec (kind, channels, length, rate,
    band edges above its Nyquist frequency) or holds non-finite values.
    """
    spec.require_supported()
    if not windows:
        return np.empty((0, spec.n_features), dtype=np.float32)
    for i, window in enumerate(windows):
        _check_window(spec, window, i)
    if spec.kind == "vibration":
        x = np.stack([w.data[0] for w in windows]).astype(np.float64, copy=False)
        rates = np.array([w.rate_hz for w in windows], dtype=np.float64)
        _check_finite(x.reshape(len(windows), -1), windows)
        out = vibration_features(x, rates, spec.band_edges_hz)
    else:
        y = np.stack([w.data for w in windows]).astype(np.float64, copy=False)
        t = np.stack([w.times_s for w in windows]).astype(np.float64, copy=False)
        _check_finite(np.concatenate([y.reshape(len(windows), -1), t], axis=1), windows)
        out = process_features(y, t)
    with np.errstate(over="ignore"):  # checked just below, with the window named
        result = out.astype(np.float32)
    if not np.isfinite(result).all():
        bad = int(np.flatnonzero(~np.isfinite(result).all(axis=1))[0])
        raise ValueError(
            f"features of window {bad} ({windows[bad].source}) overflow float32: "
            f"{dict(zip(spec.feature_names(), out[bad].tolist(), strict=True))}"
        )
    return result


def _check_window(spec: FeatureSpec, window: Window, i: int) -> None:
    where = f"window {i} ({window.source})"
    if window.kind != spec.kind:
        raise ValueError(f"{where}: kind {window.kind!r} does not match the spec kind {spec.kind!r}")
    if tuple(window.channels) != spec.channels:
        raise ValueError(f"{where}: channels {list(window.channels)} do not match the spec {list(spec.channels)}")
    expected = (len(spec.channels), spec.window_samples)
    if window.data.shape != expected:
        raise ValueError(f"{where}: data shape {window.data.shape} does not match the spec {expected}")
    if window.times_s.shape != (spec.window_samples,):
        raise ValueError(f"{where}: times_s shape {window.times_s.shape} does not match ({spec.window_samples},)")
    if spec.kind == "vibration":
        rate = window.rate_hz
        if rate is None or not np.isfinite(rate) or rate <= 0:
            raise ValueError(f"{where}: a vibration window needs a positive rate_hz, got {rate!r}")
        if spec.band_edges_hz and spec.band_edges_hz[-1] > rate / 2:
            raise ValueError(
                f"{where}: band edge {spec.band_edges_hz[-1]:g} Hz is above the Nyquist frequency "
                f"{rate / 2:g} Hz of rate_hz={rate:g}"
            )


def _check_finite(rows: np.ndarray, windows: Sequence[Window]) -> None:
    finite = np.isfinite(rows).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"window {bad} ({windows[bad].source}) holds non-finite values")


def vibration_features(x: np.ndarray, rate_hz: np.ndarray, band_edges_hz: Sequence[float]) -> np.ndarray:
    """Vibration features of ``x`` float64 ``(m, n)`` sampled at ``rate_hz`` ``(m,)``.

    Returns float64 ``(m, 7 + len(bands))`` in the order of ``FeatureSpec.feature_names()``.
    Rows are processed in chunks of about ``_CHUNK_BYTES`` so that the temporaries stay in cache
    (about 2x faster than one pass over a large batch).
    """
    rows = max(1, _CHUNK_BYTES // (8 * x.shape[1]))
    if x.shape[0] > rows:
        return np.concatenate(
            [
                vibration_features(x[i : i + rows], rate_hz[i : i + rows], band_edges_hz)
                for i in range(0, x.shape[0], rows)
            ]
        )
    stats = _moment_stats(x)
    if len(band_edges_hz) < 2:
        return stats
    bands = np.log10(band_powers(x, rate_hz, band_edges_hz) + BAND_POWER_EPS)
    return np.concatenate([stats, bands], axis=1)


def _moment_stats(x: np.ndarray) -> np.ndarray:
    """``rms, peak, crest_factor, kurtosis, skewness, std, mean`` of each row of ``x`` ``(m, n)``.

    >>> _moment_stats(np.array([[1.0, -1.0, 1.0, -1.0], [2.0, 2.0, 2.0, 2.0]])).tolist()
    [[1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0], [2.0, 2.0, 1.0, 0.0, 0.0, 0.0, 2.0]]
    """
    mean = x.mean(axis=1)
    d = x - mean[:, None]
    d2 = d * d
    m2 = d2.mean(axis=1)
    n = x.shape[1]
    m3 = np.einsum("ij,ij->i", d2, d) / n
    m4 = np.einsum("ij,ij->i", d2, d2) / n
    rms = np.sqrt(np.einsum("ij,ij->i", x, x) / n)
    peak = np.abs(x).max(axis=1)
    varies = m2 > (_CONSTANT_REL * peak) ** 2
    skew = np.divide(m3, m2**1.5, out=np.zeros_like(m2), where=varies)
    kurt = np.divide(m4, m2 * m2, out=np.zeros_like(m2), where=varies)
    crest = np.divide(peak, rms, out=np.zeros_like(rms), where=rms > 0)
    return np.stack([rms, peak, crest, kurt, skew, np.sqrt(m2), mean], axis=1)


def band_powers(x: np.ndarray, rate_hz: np.ndarray, band_edges_hz: Sequence[float]) -> np.ndarray:
    """Mean-square power per band (linear, not log) of each row of ``x`` float64 ``(m, n)``.

    ``rate_hz``: ``(m,)``. Returns float64 ``(m, len(band_edges_hz) - 1)``; see the module docstring.
    A sine of amplitude 2 at 250 Hz has power 2**2 / 2 = 2, all of it in its band:

    >>> t = np.arange(4096) / 10240.0
    >>> band_powers(2 * np.sin(2 * np.pi * 250 * t)[None, :], np.array([10240.0]), (0, 100, 500)).round(6)
    array([[0., 2.]])
    """
    m, n = x.shape
    w = _hann(n)
    spectrum = np.fft.rfft((x - x.mean(axis=1, keepdims=True)) * w, axis=1)
    power = spectrum.real**2 + spectrum.imag**2
    edges = tuple(float(e) for e in band_edges_hz)
    out = np.empty((m, len(edges) - 1), dtype=np.float64)
    rates = np.asarray(rate_hz, dtype=np.float64)
    for rate in np.unique(rates):  # usually one rate per batch; masks are cached per rate
        rows = rates == rate
        out[rows] = power[rows] @ _band_weights(n, float(rate), edges)
    return out


@functools.lru_cache(maxsize=64)
def _hann(n: int) -> np.ndarray:
    """Periodic Hann window (the DFT-even one used for spectral analysis), float64 ``(n,)``, read-only.

    >>> _hann(4).round(12).tolist()
    [0.0, 0.5, 1.0, 0.5]
    """
    w = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)
    w.setflags(write=False)
    return w


@functools.lru_cache(maxsize=64)
def _band_weights(n: int, rate_hz: float, edges: tuple[float, ...]) -> np.ndarray:
    """Matrix ``(n // 2 + 1, bands)`` mapping ``|rfft|**2`` to band power (one-sided, normalised)."""
    n_bins = n // 2 + 1
    freqs = np.arange(n_bins) * (rate_hz / n)
    one_sided = np.full(n_bins, 2.0)
    one_sided[0] = 1.0
    if n % 2 == 0:
        one_sided[-1] = 1.0
    scale = one_sided / (n * np.sum(_hann(n) ** 2))
    weights = np.zeros((n_bins, len(edges) - 1), dtype=np.float64)
    for j, (lo, hi) in enumerate(itertools.pairwise(edges)):
        last = j == len(edges) - 2
        inside = (freqs >= lo) & ((freqs <= hi) if last else (freqs < hi))
        if not inside.any():
            raise ValueError(
                f"band {lo:g}-{hi:g} Hz holds no FFT bin for a window of {n} samples at {rate_hz:g} Hz "
                f"(bin spacing {rate_hz / n:g} Hz): widen the band or lengthen the window"
            )
        weights[inside, j] = scale[inside]
    weights.setflags(write=False)
    return weights


def process_features(y: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Process features of values ``y`` float64 ``(m, channels, n)`` at times ``t`` float64 ``(m, n)``.

    Returns float64 ``(m, channels * 6)``: per channel ``mean, std, slope, min, max, last``
    (``spec.PROCESS_STATS`` order).

    >>> process_features(np.array([[[1.0, 3.0, 5.0]]]), np.array([[0.0, 1.0, 2.0]])).tolist()
    [[3.0, 1.632993161855452, 2.0, 1.0, 5.0, 5.0]]
    """
    mean = y.mean(axis=2)
    std = y.std(axis=2)
    slope = least_squares_slope(y, t)
    stats = np.stack([mean, std, slope, y.min(axis=2), y.max(axis=2), y[:, :, -1]], axis=2)
    return stats.reshape(y.shape[0], -1)


def least_squares_slope(y: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Least-squares slope of ``y`` ``(m, c, n)`` against ``t`` ``(m, n)``, shape ``(m, c)``.

    The slope is 0 where all times of a row are equal.

    >>> least_squares_slope(np.array([[[0.0, 2.0, 4.0], [1.0, 1.0, 1.0]]]), np.array([[0.0, 0.5, 1.0]]))
    array([[4., 0.]])
    """
    tc = t - t.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=2, keepdims=True)
    num = np.einsum("mn,mcn->mc", tc, yc)
    den = np.einsum("mn,mn->m", tc, tc)[:, None]
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)
