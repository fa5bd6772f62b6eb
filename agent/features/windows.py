"""Turn each source's stream of readings or sample blocks into fixed-length, overlapping windows.

The rules of each kind of stream are its modality's (``agent.features.registry``: ``vibration``,
``process``); the ``Windower`` only routes items to per-source buffers and counts.

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

import logging
from collections.abc import Callable

from agent.features.base import Restart, Skip, WindowBuffer
from agent.features.registry import modality
from agent.features.spec import FeatureSpec
from agent.metrics import Metrics
from agent.records import Decoded, Source, Window

logger = logging.getLogger(__name__)

SpecFor = Callable[[Source], FeatureSpec | None]


class Windower:
    """Per-source windowing of decoded items, by the modality of each source's feature spec.

    ``spec_for(source)`` gives the spec of a source, or ``None`` to ignore it; it is called for every
    item, so a changed spec (a new model) takes effect at once: the source's buffer restarts.
    Not thread-safe: one thread calls ``add``.
    """

    def __init__(self, spec_for: SpecFor, metrics: Metrics) -> None:
        self._spec_for = spec_for
        self._metrics = metrics
        self._buffers: dict[Source, tuple[FeatureSpec, WindowBuffer]] = {}
        self._unassigned_logged: set[Source] = set()

    def add(self, item: Decoded) -> list[Window]:
        """Feed one item; returns the windows it completes (oldest first, often none)."""
        source = item.source
        spec = self._spec_for(source)
        if spec is None:
            self._metrics.inc("windows.unassigned")
            if source not in self._unassigned_logged:
                self._unassigned_logged.add(source)
                logger.info("no feature spec for %s: its data is not windowed", source.as_dict())
            return []
        kind = modality(spec.kind)
        current = self._buffers.get(source)
        if current is not None and current[0] is not spec and current[0] != spec:  # `is`: the usual case, cheaply
            logger.info("feature spec of %s changed: its buffer restarts", source.as_dict())
            del self._buffers[source]
            current = None
        reason = kind.reject(spec, item)
        if reason is not None:
            return self._skip(reason, item)
        buffer = None if current is None else current[1]
        if buffer is not None:
            verdict = buffer.follows(item)
            if isinstance(verdict, Skip):
                return self._skip(verdict.reason, item)
            if isinstance(verdict, Restart):
                self._metrics.inc("windows.gaps", reason=verdict.reason)
                logger.info("%s stream of %s restarts (%s)", spec.kind, source.as_dict(), verdict.reason)
                buffer = None
        if buffer is None:
            buffer = kind.new_buffer(spec, item)
            self._buffers[source] = (spec, buffer)
        windows = buffer.append(item)
        if windows:
            self._metrics.inc("windows.emitted", len(windows), kind=spec.kind)
        return windows

    def pending(self, source: Source) -> int:
        """Samples (vibration) or readings (process) buffered for ``source``, 0 if none."""
        current = self._buffers.get(source)
        return 0 if current is None else current[1].pending

    def reset(self, source: Source) -> None:
        """Forget the buffer of ``source``: its next window needs a full window of new data."""
        self._buffers.pop(source, None)

    def _skip(self, reason: str, item: Decoded) -> list[Window]:
        self._metrics.inc("windows.skipped", reason=reason)
        logger.debug("window input skipped (%s) for %s", reason, item.source.as_dict())
        return []
