"""Small frozen records passed between pipeline stages.

The flow is ``Message -> (Reading | SampleBlock) -> Window -> FeatureVector -> Score -> Alert``; camera
images are ``Message -> ImageFrame -> Inspection -> Score -> Alert`` (an image is its own window).
Stages never pass loose dicts; arrays carry their shape and dtype in the docstring of the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

NS_PER_S = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Source:
    """Where a reading comes from: the tags taken from the topic template, in template order.

    ``machine`` and ``sensor`` are always present (the config validator requires them in the template).
    """

    tags: tuple[tuple[str, str], ...]

    @property
    def machine(self) -> str:
        return self.tag("machine")

    @property
    def sensor(self) -> str:
        return self.tag("sensor")

    def tag(self, name: str) -> str:
        for key, value in self.tags:
            if key == name:
                return value
        raise KeyError(name)

    def as_dict(self) -> dict[str, str]:
        return dict(self.tags)

    @classmethod
    def of(cls, **tags: str) -> Source:
        """Build a source from keyword tags (tests and the simulator use this)."""
        return cls(tuple(tags.items()))


@dataclass(frozen=True, slots=True)
class Message:
    """One MQTT message as received; ``mid`` identifies it for the manual acknowledgement.

    ``dup``: the broker's DUP flag: it sent this QoS 1 message before (a redelivery after a reconnect, with
    the same packet id), so its first delivery may already be stored (``agent.spool.arrivals``).
    """

    topic: str
    payload: bytes
    qos: int
    mid: int
    received_ns: int
    retained: bool = False
    dup: bool = False


@dataclass(frozen=True, slots=True)
class Reading:
    """Process values of one source at one timestamp (a scalar reading has the single field ``value``)."""

    source: Source
    time_ns: int
    fields: Mapping[str, float]
    seq: int | None = None


@dataclass(frozen=True, slots=True)
class SampleBlock:
    """A block of equally spaced samples of one channel (vibration).

    ``samples``: float32, shape ``(n,)``; sample ``i`` was taken at ``start_ns + i * 1e9 / rate_hz``.
    """

    source: Source
    start_ns: int
    rate_hz: float
    samples: np.ndarray
    channel: str = "value"
    seq: int | None = None

    @property
    def end_ns(self) -> int:
        """Time of the last sample."""
        return self.start_ns + round((len(self.samples) - 1) * NS_PER_S / self.rate_hz)


@dataclass(frozen=True, slots=True)
class ImageFrame:
    """One camera image, decoded once at ingest (``agent.images.codec``) and scored whole (no window).

    ``gray``: uint8, shape ``(height, width)``, read-only. ``payload``: the bytes as received, which the
    ingest worker writes to the image store under ``sha256`` (their hex digest); the frame it queues for
    scoring has them emptied (``b""``), its pixels counted against ``camera.max_pending_bytes``.
    ``metadata``: the camera's optional text metadata (JSON envelope), stored beside the reference.
    """

    source: Source
    time_ns: int
    sha256: str
    format: str
    width: int
    height: int
    gray: np.ndarray
    payload: bytes
    metadata: Mapping[str, str]


Decoded = Reading | SampleBlock | ImageFrame

WindowKind = str
"""The modality that cut the window: a key of ``agent.features.registry.MODALITIES`` (``vibration``, ``process``)."""


@dataclass(frozen=True, slots=True)
class Window:
    """A fixed-length slice of one source's stream, ready for feature extraction.

    ``data``: float64, shape ``(len(channels), n_samples)``.
    ``times_s``: float64, shape ``(n_samples,)``, seconds since ``start_ns`` (process windows; for
    vibration windows the samples are equally spaced at ``rate_hz``).
    """

    source: Source
    kind: WindowKind
    start_ns: int
    end_ns: int
    channels: tuple[str, ...]
    data: np.ndarray
    times_s: np.ndarray
    rate_hz: float | None = None


ScoringItem = Window | Reading | ImageFrame
"""What the ingest worker queues for the scoring worker: windows, readings for the commissioning baselines,
and camera images (scored whole)."""


@dataclass(frozen=True, slots=True)
class FeatureVector:
    """Features of one window. ``values``: float32, shape ``(len(names),)``."""

    window: Window
    names: tuple[str, ...]
    values: np.ndarray
    spec_hash: str


@dataclass(frozen=True, slots=True)
class Score:
    """A model's verdict on one window: higher is more anomalous.

    ``threshold`` comes from the manifest, or from the machine's adapter when ``adapter`` names one
    (``agent.adaptation.serving.adapter_id``: machine and the start of the adapter file's sha256).
    """

    source: Source
    start_ns: int
    end_ns: int
    model_id: str
    model_version: str
    score: float
    threshold: float
    adapter: str | None = None

    @property
    def is_anomalous(self) -> bool:
        return self.score > self.threshold


AlertState = Literal["new", "update", "clear"]


@dataclass(frozen=True, slots=True)
class Alert:
    """One message of an alert event's lifecycle, decided by the alert engine (``agent/alerts/engine.py``).

    An event (one ``event_id``) follows one (source, alert type) from ``new`` through ``update``s to
    ``clear``; ``seq`` counts its messages from 1. ``reason`` says why this message exists (``raised``,
    ``severity``, ``defect``, ``renotify``, ``acknowledged``, ``flapping``, ``unsilenced``, ``recovered``,
    ``no_data``). ``silenced``: decided while an operator's silence covers it, so it is stored but not
    published. ``defect``: the classifier's verdict (``DefectPrediction.as_dict()``); ``top_features``:
    (feature name, contribution) of the latest hot window, largest first. Payload:
    ``agent/schemas/alert.schema.json``.
    """

    event_id: str
    seq: int
    state: AlertState
    reason: str
    alert_type: str
    source: Source
    severity: str
    model_id: str
    model_version: str
    score: float
    threshold: float
    peak_score: float
    window_start_ns: int
    window_end_ns: int
    first_detected_ns: int
    time_ns: int
    defect: Mapping[str, object] | None = None
    top_features: tuple[tuple[str, float], ...] = ()
    adapter: str | None = None
    acknowledged_by: str | None = None
    silenced: bool = False
    flapping: bool = False
