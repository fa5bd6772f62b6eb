"""Modality ``process``: multi-field readings -> the last ``window_samples`` readings -> statistics.

Windowing: one buffer per source holding its last ``window_samples`` accepted readings; a window every
``hop_samples`` readings. Readings not later than the previous one (``out_of_order``), lacking one of the
spec's channels (``missing_channel``) or holding non-finite values (``non_finite``) are skipped.

Features: Process, per channel, on values ``y`` at times ``t`` (seconds since the window's first reading):
``mean``, ``std`` (``ddof=0``), ``slope`` (least-squares slope of ``y`` against ``t``, units per
second; 0 if all times are equal), ``min``, ``max``, ``last`` (the value of the latest reading).

All arithmetic is float64.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Final

import numpy as np

from agent.features.base import Continues, Skip, StreamVerdict
from agent.features.spec import FeatureSpec
from agent.records import NS_PER_S, Decoded, Reading, Source, Window

KIND: Final = "process"


class ProcessModality:
    """Windows and features of ``Reading`` streams (several channels per spec)."""

    kind = KIND

    def reject(self, spec: FeatureSpec, item: Decoded) -> str | None:
        if not isinstance(item, Reading):
            return "kind_mismatch"
        fields = item.fields
        if any(ch not in fields for ch in spec.channels):
            return "missing_channel"
        if not all(math.isfinite(float(fields[ch])) for ch in spec.channels):
            return "non_finite"
        return None

    def new_buffer(self, spec: FeatureSpec, item: Decoded) -> _ProcessBuffer:
        return _ProcessBuffer(spec, item.source)

    def check_window(self, spec: FeatureSpec, window: Window) -> str | None:
        """Nothing beyond the generic checks: process windows carry their own times."""
        return None

    def features(self, spec: FeatureSpec, windows: Sequence[Window]) -> np.ndarray:
        y = np.stack([w.data for w in windows]).astype(np.float64, copy=False)
        t = np.stack([w.times_s for w in windows]).astype(np.float64, copy=False)
        return process_features(y, t)


class _ProcessBuffer:
    """The last ``window_samples`` accepted readings of one source (times in ns, values per channel)."""

    def __init__(self, spec: FeatureSpec, source: Source) -> None:
        self.spec = spec
        self.source = source
        self._times: deque[int] = deque(maxlen=spec.window_samples)
        self._values: deque[list[float]] = deque(maxlen=spec.window_samples)
        self._accepted = 0
        self.last_ns = -(2**63)

    @property
    def pending(self) -> int:
        return len(self._times)

    def follows(self, item: Decoded) -> StreamVerdict:
        """Readings must come in time order; an older or equal time is skipped."""
        assert isinstance(item, Reading)
        return Continues() if item.time_ns > self.last_ns else Skip("out_of_order")

    def append(self, item: Decoded) -> list[Window]:
        assert isinstance(item, Reading)
        time_ns = item.time_ns
        values = [float(item.fields[ch]) for ch in self.spec.channels]
        self._times.append(time_ns)
        self._values.append(values)
        self._accepted += 1
        self.last_ns = time_ns
        size, hop = self.spec.window_samples, self.spec.hop_samples
        if self._accepted < size or (self._accepted - size) % hop:
            return []
        start_ns = self._times[0]
        times_s = (np.fromiter(self._times, dtype=np.int64, count=size) - start_ns) / NS_PER_S
        data = np.array(self._values, dtype=np.float64).T.copy()
        data.setflags(write=False)
        times_s.setflags(write=False)
        return [
            Window(
                source=self.source,
                kind=KIND,
                start_ns=start_ns,
                end_ns=time_ns,
                channels=self.spec.channels,
                data=data,
                times_s=times_s,
            )
        ]


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

    The slope is 0 where all times of a row are equal, and NaN where a time is not finite (so that a bad
    time shows in the row, as ``extract_matrix`` expects).

    >>> least_squares_slope(np.array([[[0.0, 2.0, 4.0], [1.0, 1.0, 1.0]]]), np.array([[0.0, 0.5, 1.0]]))
    array([[4., 0.]])
    """
    tc = t - t.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=2, keepdims=True)
    num = np.einsum("mn,mcn->mc", tc, yc)
    den = np.einsum("mn,mn->m", tc, tc)[:, None]
    return np.divide(num, den, out=np.zeros_like(num), where=den != 0)  # NaN != 0: a NaN den gives NaN
