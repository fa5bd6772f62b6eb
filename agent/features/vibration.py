"""Modality ``vibration``: sample blocks at a rate -> contiguous windows -> statistics and band powers.

Windowing: one buffer per source of contiguous samples at one rate. A block continues the buffer if its
first sample comes 1 +/- 0.5 sample periods after the last one; otherwise the buffer restarts
(``gap``, ``overlap``, ``rate``), so windows never span a discontinuity, and a block whose samples were all
received already (an MQTT QoS 1 redelivery) is a ``duplicate``.

Features (``x``: the samples of one window, ``n`` of them, population moments, no ddof):

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

All arithmetic is float64.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from collections.abc import Sequence
from typing import Final

import numpy as np

from agent.features.base import Continues, Restart, Skip, StreamVerdict
from agent.features.spec import FeatureSpec
from agent.records import NS_PER_S, Decoded, SampleBlock, Source, Window

KIND: Final = "vibration"

BAND_POWER_EPS: Final = 1e-12
# Relative variation below which a window counts as constant (float64 rounding is ~1e-16 relative).
_CONSTANT_REL: Final = 1e-10
# Vibration rows per chunk: ~256 KiB of float64 samples per temporary array, so that a chunk's few
# temporaries and its spectrum stay in a core's L2 cache. At 1 MiB (before 2026-12-04) they did not, on a
# 2 MiB L2: 85 us per 4,096-sample window in batches of 32 then, 35 us now with the shared mean-removed
# copy below (docs/benchmarks.md, "Sixth round").
_CHUNK_BYTES: Final = 1 << 18

# A block continues the buffer if its first sample comes 1 +/- 0.5 sample periods after the last one.
MAX_GAP_PERIODS: Final = 1.5
MIN_GAP_PERIODS: Final = 0.5


class VibrationModality:
    """Windows and features of ``SampleBlock`` streams (one channel per spec)."""

    kind = KIND

    def reject(self, spec: FeatureSpec, item: Decoded) -> str | None:
        if not isinstance(item, SampleBlock):
            return "kind_mismatch"
        if item.channel != spec.channels[0]:
            return "other_channel"
        if len(item.samples) == 0:
            return "empty_block"
        if not (math.isfinite(item.rate_hz) and item.rate_hz > 0):
            return "bad_rate"
        if not np.isfinite(item.samples).all():
            return "non_finite"
        return None

    def new_buffer(self, spec: FeatureSpec, item: Decoded) -> _VibrationBuffer:
        assert isinstance(item, SampleBlock)
        return _VibrationBuffer(spec, item.source, item.rate_hz)

    def check_window(self, spec: FeatureSpec, window: Window) -> str | None:
        rate = window.rate_hz
        if rate is None or not np.isfinite(rate) or rate <= 0:
            return f"a vibration window needs a positive rate_hz, got {rate!r}"
        if spec.band_edges_hz and spec.band_edges_hz[-1] > rate / 2:
            return (
                f"band edge {spec.band_edges_hz[-1]:g} Hz is above the Nyquist frequency "
                f"{rate / 2:g} Hz of rate_hz={rate:g}"
            )
        return None

    def features(self, spec: FeatureSpec, windows: Sequence[Window]) -> np.ndarray:
        x = np.stack([w.data[0] for w in windows]).astype(np.float64, copy=False)
        rates = np.array([w.rate_hz for w in windows], dtype=np.float64)
        return vibration_features(x, rates, spec.band_edges_hz)


@functools.lru_cache(maxsize=64)
def _sample_times(n: int, rate_hz: float) -> np.ndarray:
    """``arange(n) / rate_hz``, float64, read-only (shared by all windows of that shape)."""
    times = np.arange(n, dtype=np.float64) / rate_hz
    times.setflags(write=False)
    return times


class _VibrationBuffer:
    """Contiguous samples of one source at one rate, in a growable float64 array.

    Samples have absolute indices counted from the start of the contiguous stream; ``_buf[_lo:_hi]``
    holds indices ``[_base, _total)``. Each block's start time is kept as an anchor ``(index, ns)``
    so window times come from the blocks' own timestamps (no drift from a slightly-off nominal rate).
    """

    def __init__(self, spec: FeatureSpec, source: Source, rate_hz: float) -> None:
        self.spec = spec
        self.source = source
        self.rate_hz = rate_hz
        self._period_ns = NS_PER_S / rate_hz
        self._buf = np.empty(2 * spec.window_samples, dtype=np.float64)
        self._lo = self._hi = 0
        self._base = 0  # absolute index of _buf[_lo]
        self._total = 0  # absolute index of the next sample
        self._next_start = 0  # absolute index where the next window starts
        self._anchors: list[tuple[int, int]] = []  # (absolute index, start_ns) of buffered blocks
        self.last_ns = 0  # time of the last sample received

    @property
    def pending(self) -> int:
        return self._hi - self._lo

    def follows(self, item: Decoded) -> StreamVerdict:
        """Whether ``item`` continues the stream, is a ``duplicate`` to skip, or restarts it."""
        block = item
        assert isinstance(block, SampleBlock)
        if not math.isclose(block.rate_hz, self.rate_hz, rel_tol=1e-9):
            return Restart("rate")
        delta = block.start_ns - self.last_ns
        if delta > MAX_GAP_PERIODS * self._period_ns:
            return Restart("gap")
        if delta >= MIN_GAP_PERIODS * self._period_ns:
            return Continues()
        if block.start_ns >= self._anchors[0][1] and block.end_ns <= self.last_ns:
            return Skip("duplicate")
        return Restart("overlap")

    def append(self, item: Decoded) -> list[Window]:
        block = item
        assert isinstance(block, SampleBlock)
        samples = block.samples
        m = len(samples)
        n = self._hi - self._lo
        if self._hi + m > len(self._buf):
            if n + m > len(self._buf):
                grown = np.empty(max(2 * len(self._buf), n + m), dtype=np.float64)
                grown[:n] = self._buf[self._lo : self._hi]
                self._buf = grown
            else:
                self._buf[:n] = self._buf[self._lo : self._hi]  # numpy copes with the overlap
            self._lo, self._hi = 0, n
        self._buf[self._hi : self._hi + m] = samples
        self._hi += m
        self._anchors.append((self._total, block.start_ns))
        self._total += m
        self.last_ns = block.end_ns
        return self._take_windows()

    def _time_ns(self, index: int) -> int:
        k = bisect.bisect_right(self._anchors, index, key=lambda a: a[0]) - 1
        anchor_index, anchor_ns = self._anchors[k]
        return anchor_ns + round((index - anchor_index) * self._period_ns)

    def _take_windows(self) -> list[Window]:
        """Windows now complete; consumed samples (before the next window start) are dropped."""
        size, hop = self.spec.window_samples, self.spec.hop_samples
        windows = []
        while self._next_start + size <= self._total:
            first = self._lo + self._next_start - self._base
            data = self._buf[first : first + size].copy()[None, :]
            data.setflags(write=False)
            windows.append(
                Window(
                    source=self.source,
                    kind=KIND,
                    start_ns=self._time_ns(self._next_start),
                    end_ns=self._time_ns(self._next_start + size - 1),
                    channels=self.spec.channels,
                    data=data,
                    times_s=_sample_times(size, self.rate_hz),
                    rate_hz=self.rate_hz,
                )
            )
            self._next_start += hop
        if windows:
            self._lo += self._next_start - self._base
            self._base = self._next_start
            while len(self._anchors) > 1 and self._anchors[1][0] <= self._base:
                del self._anchors[0]
        return windows


def vibration_features(x: np.ndarray, rate_hz: np.ndarray, band_edges_hz: Sequence[float]) -> np.ndarray:
    """Vibration features of ``x`` float64 ``(m, n)`` sampled at ``rate_hz`` ``(m,)``.

    Returns float64 ``(m, 7 + len(bands))`` in the order of ``FeatureSpec.feature_names()``.
    Rows are processed in chunks of about ``_CHUNK_BYTES`` so that the temporaries stay in a core's L2
    cache, and the moments and the spectrum share one mean-removed copy of the rows.
    """
    rows = max(1, _CHUNK_BYTES // (8 * x.shape[1]))
    if x.shape[0] > rows:
        return np.concatenate(
            [
                vibration_features(x[i : i + rows], rate_hz[i : i + rows], band_edges_hz)
                for i in range(0, x.shape[0], rows)
            ]
        )
    mean = x.mean(axis=1)
    d = x - mean[:, None]
    stats = _moment_stats(x, mean, d)
    if len(band_edges_hz) < 2:
        return stats
    bands = np.log10(_centered_band_powers(d, rate_hz, band_edges_hz) + BAND_POWER_EPS)
    return np.concatenate([stats, bands], axis=1)


def _moment_stats(x: np.ndarray, mean: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``rms, peak, crest_factor, kurtosis, skewness, std, mean`` of each row of ``x`` ``(m, n)``, given its
    row means ``mean`` and ``d = x - mean[:, None]`` (not changed).

    ``rms`` comes from the same sums as ``std`` (``mean(x**2) = m2 + mean**2``) and ``peak`` from the rows'
    extremes, so that ``x`` is read twice instead of five times (features equal to the former formulas within
    2e-15 relative).

    >>> x = np.array([[1.0, -1.0, 1.0, -1.0], [2.0, 2.0, 2.0, 2.0]])
    >>> _moment_stats(x, x.mean(axis=1), x - x.mean(axis=1)[:, None]).tolist()
    [[1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0], [2.0, 2.0, 1.0, 0.0, 0.0, 0.0, 2.0]]
    """
    n = x.shape[1]
    d2 = d * d
    m2 = d2.mean(axis=1)
    m3 = np.einsum("ij,ij->i", d2, d) / n
    m4 = np.einsum("ij,ij->i", d2, d2) / n
    rms = np.sqrt(m2 + mean * mean)
    peak = np.maximum(x.max(axis=1), -x.min(axis=1))
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
    return _centered_band_powers(x - x.mean(axis=1, keepdims=True), rate_hz, band_edges_hz)


def _centered_band_powers(d: np.ndarray, rate_hz: np.ndarray, band_edges_hz: Sequence[float]) -> np.ndarray:
    """``band_powers`` of rows ``d`` whose means are already removed; ``d`` is multiplied by the Hann window
    in place (the caller's copy, not its samples)."""
    m, n = d.shape
    d *= _hann(n)
    spectrum = np.fft.rfft(d, axis=1)
    power = spectrum.real**2 + spectrum.imag**2
    edges = tuple(float(e) for e in band_edges_hz)
    rates = np.asarray(rate_hz, dtype=np.float64)
    unique = np.unique(rates)
    if len(unique) == 1:  # the usual batch: one rate, no copy of the rows' spectra
        return power @ _band_weights(n, float(unique[0]), edges)
    out = np.empty((m, len(edges) - 1), dtype=np.float64)
    for rate in unique:  # weight matrices are cached per rate
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
