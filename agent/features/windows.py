"""Turn each source's stream of readings or sample blocks into fixed-length, overlapping windows.

``Windower`` is pure and single-threaded: the inference worker owns one and feeds it every decoded
item in arrival order. It keeps one buffer per source and never holds more than about one window
plus one block per source. What it drops or resets is counted in ``Metrics``:

- ``windows.emitted{kind}``: windows returned;
- ``windows.unassigned``: items of sources without a feature spec (ignored; logged once per source);
- ``windows.gaps{reason}``: vibration buffer resets, ``reason`` = ``gap`` (the next block starts more
  than 1.5 sample periods after the last buffered sample: at least one sample is missing),
  ``overlap`` (it starts less than 0.5 periods after it, and is not a duplicate) or ``rate`` (the
  sampling rate changed). The block then starts a new buffer: windows never span a discontinuity;
- ``windows.skipped{reason}``: items left out, ``reason`` = ``duplicate`` (a vibration block whose
  samples were all received already, as after an MQTT QoS 1 redelivery), ``out_of_order`` (a process
  reading not later than the previous accepted one), ``missing_channel`` (a process reading without
  one of the spec's channels), ``other_channel`` (a block of a channel the spec does not use),
  ``kind_mismatch`` (a block for a process spec or a reading for a vibration spec), ``non_finite``,
  ``empty_block``, ``bad_rate``.
"""

from __future__ import annotations

import bisect
import functools
import logging
import math
from collections import deque
from collections.abc import Callable
from typing import Final

import numpy as np

from agent.features.spec import FeatureSpec
from agent.metrics import Metrics
from agent.records import NS_PER_S, Reading, SampleBlock, Source, Window

logger = logging.getLogger(__name__)

SpecFor = Callable[[Source], FeatureSpec | None]

# A block continues the buffer if its first sample comes 1 +/- 0.5 sample periods after the last one.
MAX_GAP_PERIODS: Final = 1.5
MIN_GAP_PERIODS: Final = 0.5


class Windower:
    """Per-source windowing of ``Reading`` (process) and ``SampleBlock`` (vibration) items.

    ``spec_for(source)`` gives the spec of a source, or ``None`` to ignore it; it is called for every
    item, so a changed spec (a new model) takes effect at once: the source's buffer restarts.
    Not thread-safe: one thread calls ``add``.
    """

    def __init__(self, spec_for: SpecFor, metrics: Metrics) -> None:
        self._spec_for = spec_for
        self._metrics = metrics
        self._buffers: dict[Source, _VibrationBuffer | _ProcessBuffer] = {}
        self._unassigned_logged: set[Source] = set()

    def add(self, item: Reading | SampleBlock) -> list[Window]:
        """Feed one item; returns the windows it completes (oldest first, often none)."""
        source = item.source
        spec = self._spec_for(source)
        if spec is None:
            self._metrics.inc("windows.unassigned")
            if source not in self._unassigned_logged:
                self._unassigned_logged.add(source)
                logger.info("no feature spec for %s: its data is not windowed", source.as_dict())
            return []
        buffer = self._buffers.get(source)
        if buffer is not None and buffer.spec != spec:
            logger.info("feature spec of %s changed: its buffer restarts", source.as_dict())
            del self._buffers[source]
            buffer = None
        if isinstance(item, SampleBlock):
            windows = self._add_block(spec, buffer, item)
        else:
            windows = self._add_reading(spec, buffer, item)
        if windows:
            self._metrics.inc("windows.emitted", len(windows), kind=spec.kind)
        return windows

    def pending(self, source: Source) -> int:
        """Samples (vibration) or readings (process) buffered for ``source``, 0 if none."""
        buffer = self._buffers.get(source)
        return 0 if buffer is None else buffer.pending

    def reset(self, source: Source) -> None:
        """Forget the buffer of ``source``: its next window needs a full window of new data."""
        self._buffers.pop(source, None)

    def _skip(self, reason: str, item: Reading | SampleBlock) -> list[Window]:
        self._metrics.inc("windows.skipped", reason=reason)
        logger.debug("window input skipped (%s) for %s", reason, item.source.as_dict())
        return []

    def _add_block(
        self, spec: FeatureSpec, buffer: _VibrationBuffer | _ProcessBuffer | None, block: SampleBlock
    ) -> list[Window]:
        if spec.kind != "vibration":
            return self._skip("kind_mismatch", block)
        if block.channel != spec.channels[0]:
            return self._skip("other_channel", block)
        if len(block.samples) == 0:
            return self._skip("empty_block", block)
        if not (math.isfinite(block.rate_hz) and block.rate_hz > 0):
            return self._skip("bad_rate", block)
        if not np.isfinite(block.samples).all():
            return self._skip("non_finite", block)
        assert buffer is None or isinstance(buffer, _VibrationBuffer)
        if buffer is not None:
            verdict = buffer.continuity(block)
            if verdict == "duplicate":
                return self._skip("duplicate", block)
            if verdict is not None:
                self._metrics.inc("windows.gaps", reason=verdict)
                logger.info(
                    "vibration stream of %s restarts (%s): block at %d ns after last sample at %d ns",
                    block.source.as_dict(),
                    verdict,
                    block.start_ns,
                    buffer.last_ns,
                )
                buffer = None
        if buffer is None:
            buffer = _VibrationBuffer(spec, block.source, block.rate_hz)
            self._buffers[block.source] = buffer
        buffer.append(block)
        return buffer.take_windows()

    def _add_reading(
        self, spec: FeatureSpec, buffer: _VibrationBuffer | _ProcessBuffer | None, reading: Reading
    ) -> list[Window]:
        if spec.kind != "process":
            return self._skip("kind_mismatch", reading)
        fields = reading.fields
        if any(ch not in fields for ch in spec.channels):
            return self._skip("missing_channel", reading)
        values = [float(fields[ch]) for ch in spec.channels]
        if not all(math.isfinite(v) for v in values):
            return self._skip("non_finite", reading)
        assert buffer is None or isinstance(buffer, _ProcessBuffer)
        if buffer is None:
            buffer = _ProcessBuffer(spec, reading.source)
            self._buffers[reading.source] = buffer
        elif reading.time_ns <= buffer.last_ns:
            return self._skip("out_of_order", reading)
        return buffer.append(reading.time_ns, values)


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

    def continuity(self, block: SampleBlock) -> str | None:
        """``None`` if ``block`` continues the stream, else ``duplicate`` or a reset reason."""
        if not math.isclose(block.rate_hz, self.rate_hz, rel_tol=1e-9):
            return "rate"
        delta = block.start_ns - self.last_ns
        if delta > MAX_GAP_PERIODS * self._period_ns:
            return "gap"
        if delta >= MIN_GAP_PERIODS * self._period_ns:
            return None
        if block.start_ns >= self._anchors[0][1] and block.end_ns <= self.last_ns:
            return "duplicate"
        return "overlap"

    def append(self, block: SampleBlock) -> None:
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

    def _time_ns(self, index: int) -> int:
        k = bisect.bisect_right(self._anchors, index, key=lambda a: a[0]) - 1
        anchor_index, anchor_ns = self._anchors[k]
        return anchor_ns + round((index - anchor_index) * self._period_ns)

    def take_windows(self) -> list[Window]:
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
                    kind="vibration",
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

    def append(self, time_ns: int, values: list[float]) -> list[Window]:
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
                kind="process",
                start_ns=start_ns,
                end_ns=time_ns,
                channels=self.spec.channels,
                data=data,
                times_s=times_s,
            )
        ]
