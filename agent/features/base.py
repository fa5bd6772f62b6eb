"""The modality seam: how one kind of stream (``FeatureSpec.kind``) is cut into windows and turned into
feature rows. Registry by kind: ``agent.features.registry``.

A modality is stateless and shared; its ``new_buffer`` makes the per-source state. Both are used from one
thread at a time: buffers by the ingest worker's ``Windower``, ``features`` by whichever worker extracts
(scoring, or training code offline), so neither needs locks. Everything here is pure: no I/O, no clock.
Feature names and the spec's own rules per kind live in ``agent.features.spec`` (they are hashed into
every model's manifest, so they change only with ``FEATURE_CODE_VERSION``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from agent.features.spec import FeatureSpec
from agent.records import Decoded, Window


@dataclass(frozen=True, slots=True)
class Continues:
    """The item continues the buffer's stream."""


@dataclass(frozen=True, slots=True)
class Skip:
    """Leave the item out (counted as ``windows.skipped{reason}``); the buffer is kept."""

    reason: str


@dataclass(frozen=True, slots=True)
class Restart:
    """The stream broke (counted as ``windows.gaps{reason}``): the item starts a new buffer."""

    reason: str


StreamVerdict = Continues | Skip | Restart


class WindowBuffer(Protocol):
    """The buffered stream of one source (made by ``Modality.new_buffer``, owned by the ``Windower``)."""

    @property
    def pending(self) -> int:
        """Samples or readings buffered now."""
        ...

    def follows(self, item: Decoded) -> StreamVerdict:
        """Whether ``item`` (already accepted by ``Modality.reject``) continues this stream."""
        ...

    def append(self, item: Decoded) -> list[Window]:
        """Add ``item``; returns the windows it completes, oldest first (often none)."""
        ...


class Modality(Protocol):
    """One kind of stream: its windowing rules and its feature code."""

    kind: str

    def reject(self, spec: FeatureSpec, item: Decoded) -> str | None:
        """Why ``item`` cannot go into a window of ``spec`` (a ``windows.skipped`` reason), else ``None``."""
        ...

    def new_buffer(self, spec: FeatureSpec, item: Decoded) -> WindowBuffer:
        """An empty buffer for ``item``'s source, to which ``item`` is appended next."""
        ...

    def check_window(self, spec: FeatureSpec, window: Window) -> str | None:
        """What is wrong with a window of this kind for ``spec`` (beyond kind, channels and shapes), or ``None``."""
        ...

    def features(self, spec: FeatureSpec, windows: Sequence[Window]) -> np.ndarray:
        """Feature rows of checked windows: float64 ``(len(windows), spec.n_features)``.

        Every row must hold a feature that every sample and time of its window feeds (a mean, say), so that a
        non-finite input always shows as a non-finite row: the caller checks the output, not each input.
        """
        ...
