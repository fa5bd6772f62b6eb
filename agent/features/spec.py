"""The feature specification: what a model was trained on, versioned and hashed into its manifest.

A ``FeatureSpec`` fixes the window (length and hop, in samples), the channels and, for vibration, the
frequency bands. Together with ``FEATURE_CODE_VERSION`` it determines the feature vector exactly, so
``spec_hash()`` is what a model manifest records and what serving checks before scoring.

Feature names (valid InfluxDB field names: letters, digits, underscore, starting with a letter):

- vibration: ``rms, peak, crest_factor, kurtosis, skewness, std, mean`` then one ``band_{lo}_{hi}hz``
  per pair of consecutive band edges (edges are whole hertz);
- process: for each channel, in spec order, ``{ch}_mean, {ch}_std, {ch}_slope, {ch}_min, {ch}_max,
  {ch}_last``.

The definitions of each feature are in ``agent.features.extract``.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

logger = logging.getLogger(__name__)

# Bump whenever a change to the feature code changes any feature value or name for the same spec:
# models trained with another version are then refused instead of silently getting different inputs.
FEATURE_CODE_VERSION: Final = 1

FeatureKind = Literal["vibration", "process"]
KINDS: Final[tuple[str, ...]] = get_args(FeatureKind)

# An upper bound on window length that keeps one buffered window per source small on the edge box
# (4 Mi samples = 32 MiB as float64; at 10 kHz that is ~7 minutes of vibration).
MAX_WINDOW_SAMPLES: Final = 1 << 22

VIBRATION_STATS: Final = ("rms", "peak", "crest_factor", "kurtosis", "skewness", "std", "mean")
PROCESS_STATS: Final = ("mean", "std", "slope", "min", "max", "last")

# InfluxDB reserves names that start with "_" (``_field``, ``_time``, ...), so names start with a letter.
_NAME_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]*")

_REQUIRED_KEYS: Final = ("kind", "window_samples", "hop_samples", "channels")
_OPTIONAL_KEYS: Final = ("band_edges_hz", "version")


def band_name(lo_hz: float, hi_hz: float) -> str:
    """Feature name of the band ``[lo_hz, hi_hz)``.

    >>> band_name(0.0, 100.0)
    'band_0_100hz'
    """
    return f"band_{int(lo_hz)}_{int(hi_hz)}hz"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class FeatureSpec:
    """Window and feature definition shared by training and serving.

    ``window_samples``/``hop_samples`` count samples for vibration and readings for process data.
    ``band_edges_hz``: vibration only; whole hertz, strictly increasing, ``>= 0``; ``k + 1`` edges give
    ``k`` bands (empty: no band features). Band edges are checked against the Nyquist frequency only at
    extraction, when the sampling rate is known.
    ``version``: the feature code version the spec was written for; any positive integer is accepted
    so that a manifest from another agent version can be loaded and refused with a clear message by
    ``require_supported()`` (extraction calls it too).

    Invalid values raise ``ValueError`` naming the field.
    """

    kind: FeatureKind
    window_samples: int
    hop_samples: int
    channels: tuple[str, ...]
    band_edges_hz: tuple[float, ...] = ()
    version: int = FEATURE_CODE_VERSION

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"feature spec: kind must be one of {list(KINDS)}, got {self.kind!r}")
        if not _is_int(self.window_samples) or not 2 <= self.window_samples <= MAX_WINDOW_SAMPLES:
            raise ValueError(
                f"feature spec: window_samples must be an integer in [2, {MAX_WINDOW_SAMPLES}], "
                f"got {self.window_samples!r}"
            )
        if not _is_int(self.hop_samples) or not 1 <= self.hop_samples <= self.window_samples:
            raise ValueError(
                "feature spec: hop_samples must be an integer in [1, window_samples="
                f"{self.window_samples}], got {self.hop_samples!r}"
            )
        self._check_channels()
        self._check_band_edges()
        if not _is_int(self.version) or self.version < 1:
            raise ValueError(f"feature spec: version must be a positive integer, got {self.version!r}")
        names = self.feature_names()
        if len(set(names)) != len(names):  # cannot happen with valid channels; guards future edits
            raise ValueError(f"feature spec: duplicate feature names in {names}")

    def _check_channels(self) -> None:
        channels = self.channels
        if not isinstance(channels, tuple) or not all(isinstance(c, str) for c in channels):
            raise ValueError(f"feature spec: channels must be a tuple of strings, got {channels!r}")
        if not channels:
            raise ValueError("feature spec: channels must not be empty")
        bad = [c for c in channels if not _NAME_RE.fullmatch(c)]
        if bad:
            raise ValueError(
                f"feature spec: channel names must start with a letter and contain only letters, "
                f"digits and '_' (they become InfluxDB field names), got {bad}"
            )
        if len(set(channels)) != len(channels):
            raise ValueError(f"feature spec: duplicate channels in {list(channels)}")
        if self.kind == "vibration" and len(channels) != 1:
            raise ValueError(f"feature spec: a vibration spec has exactly one channel, got {list(channels)}")

    def _check_band_edges(self) -> None:
        edges = self.band_edges_hz
        if not isinstance(edges, tuple):
            raise ValueError(f"feature spec: band_edges_hz must be a tuple of numbers, got {edges!r}")
        if self.kind == "process":
            if edges:
                raise ValueError("feature spec: band_edges_hz is only allowed for kind 'vibration'")
            return
        if not edges:
            return
        if len(edges) < 2:
            raise ValueError(f"feature spec: band_edges_hz needs at least two edges, got {list(edges)}")
        for edge in edges:
            if (
                isinstance(edge, bool)
                or not isinstance(edge, int | float)
                or not math.isfinite(edge)
                or edge < 0
                or edge != int(edge)
            ):
                raise ValueError(f"feature spec: band_edges_hz must be whole, finite, non-negative hertz, got {edge!r}")
        if any(b <= a for a, b in itertools.pairwise(edges)):
            raise ValueError(f"feature spec: band_edges_hz must be strictly increasing, got {list(edges)}")
        # Normalise to floats so that (0, 100) and (0.0, 100.0) are the same spec with the same hash.
        object.__setattr__(self, "band_edges_hz", tuple(float(e) for e in edges))

    @property
    def bands_hz(self) -> tuple[tuple[float, float], ...]:
        """The ``(lo, hi)`` pairs of consecutive band edges."""
        edges = self.band_edges_hz
        return tuple(itertools.pairwise(edges))

    def feature_names(self) -> tuple[str, ...]:
        """Names of the features in extraction order (the columns of ``extract_matrix``)."""
        return _feature_names(self)

    @property
    def n_features(self) -> int:
        return len(self.feature_names())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``from_dict(to_dict())`` gives back an equal spec."""
        return {
            "kind": self.kind,
            "window_samples": self.window_samples,
            "hop_samples": self.hop_samples,
            "channels": list(self.channels),
            "band_edges_hz": list(self.band_edges_hz),
            "version": self.version,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureSpec:
        """Strict inverse of ``to_dict``: unknown or missing keys and invalid values raise ``ValueError``.

        ``band_edges_hz`` defaults to none and ``version`` to ``FEATURE_CODE_VERSION``.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"feature spec must be a mapping, got {type(d).__name__}")
        unknown = sorted(str(k) for k in d if k not in _REQUIRED_KEYS + _OPTIONAL_KEYS)
        if unknown:
            raise ValueError(
                f"feature spec: unknown key(s) {unknown}; allowed: {list(_REQUIRED_KEYS + _OPTIONAL_KEYS)}"
            )
        missing = [k for k in _REQUIRED_KEYS if k not in d]
        if missing:
            raise ValueError(f"feature spec: missing required key(s) {missing}")
        channels = d["channels"]
        if not isinstance(channels, list | tuple):
            raise ValueError(f"feature spec: channels must be a list of strings, got {channels!r}")
        edges = d.get("band_edges_hz", ())
        if not isinstance(edges, list | tuple):
            raise ValueError(f"feature spec: band_edges_hz must be a list of numbers, got {edges!r}")
        return cls(
            kind=d["kind"],
            window_samples=d["window_samples"],
            hop_samples=d["hop_samples"],
            channels=tuple(channels),
            band_edges_hz=tuple(edges),
            version=d.get("version", FEATURE_CODE_VERSION),
        )

    def canonical_json(self) -> str:
        """The exact text that ``spec_hash`` digests: sorted keys, no spaces."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)

    def spec_hash(self) -> str:
        """sha256 hex digest of ``canonical_json()`` (the version is part of it)."""
        return _spec_hash(self)

    @property
    def is_supported(self) -> bool:
        """Whether this agent's feature code computes the features this spec was written for."""
        return self.version == FEATURE_CODE_VERSION

    def require_supported(self) -> None:
        """Raise ``ValueError`` if the spec was written for another feature code version."""
        if not self.is_supported:
            raise ValueError(
                f"feature spec version {self.version} is not supported by this agent's feature code "
                f"(version {FEATURE_CODE_VERSION}): retrain the model with this agent version"
            )


@functools.lru_cache(maxsize=256)
def _feature_names(spec: FeatureSpec) -> tuple[str, ...]:
    if spec.kind == "vibration":
        return VIBRATION_STATS + tuple(band_name(lo, hi) for lo, hi in spec.bands_hz)
    return tuple(f"{ch}_{stat}" for ch in spec.channels for stat in PROCESS_STATS)


@functools.lru_cache(maxsize=256)
def _spec_hash(spec: FeatureSpec) -> str:
    return hashlib.sha256(spec.canonical_json().encode("utf-8")).hexdigest()
