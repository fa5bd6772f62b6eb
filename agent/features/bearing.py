"""Bearing-defect features of a vibration window at a known shaft speed: the defect classifier's inputs.

Training (``pdm_tools.training.defect_train``, ``pdm_tools.evaluation.cwru``) and serving
(``agent.inference.classifier``) both call ``extract_bearing_matrix``; ``BearingFeatureSpec`` fixes the
window, the bands and the bearing geometry, and its ``spec_hash()`` goes into the classifier's manifest.

Unlike ``agent.features.extract``, these features need the shaft speed (``rpm``) of each window, because
the bearing characteristic frequencies are multiples of it: ``f = multiplier * rpm / 60``. The features
therefore follow speed changes, and a model trained at 1730-1800 rpm sees comparable inputs at another
speed. They also take the sampling rate of each window (12 kHz on CWRU, 10240 Hz in the simulator).

Definitions (``x``: the samples of one window, ``n`` of them, float64, mean removed first):

- time domain: ``log10_rms = log10(rms + 1e-12)``; ``crest_factor = max|x| / rms``; ``kurtosis``
  (Pearson, 3 for a Gaussian); ``skewness``; ``shape_factor = rms / mean|x|``;
  ``impulse_factor = max|x| / mean|x|`` (ratios are 0 for a constant window);
- ``band_rel_{lo}_{hi}hz = log10(P_band / P_total + 1e-12)``: the share of each band in the power of
  all the bands (``P_total``, their sum; powers from the Hann-windowed one-sided periodogram of
  ``agent.features.vibration.band_powers``), so it depends neither on the signal's amplitude nor on the
  power above the last edge (which the sampling rate decides);
- envelope spectrum, per envelope band ``[lo, hi)`` (index ``b``): the window's FFT is kept in that band
  only (an ideal band-pass around the structural resonances that bearing impacts ring), turned into the
  analytic signal (positive frequencies doubled, inverse FFT) whose modulus is the envelope; the envelope,
  mean removed and Hann-windowed, is transformed again: ``E(f)`` is its amplitude spectrum. Then, for each
  characteristic frequency ``c`` (``shaft`` = 1, ``bpfi``, ``bpfo``, ``bsf``, ``ftf``) and harmonic
  ``h = 1..harmonics``::

      env{b}_{c}_{h}x = log10((max E over |f - h*f_c| <= tol) / median(E over the reference range) + 1e-12)
      tol = max(tolerance_bins * fs / n, tolerance_rel * h * f_c)

  with the reference range ``[0.5 * f_shaft, 1.2 * harmonics * max_c f_c]`` (clipped to the envelope
  band's width). A defect that strikes at ``f_c`` makes the peaks at its harmonics stand far above the
  envelope's median level; the ratio does not depend on the amplitude of the signal;
  ``env{b}_kurtosis`` is the Pearson kurtosis of the band-passed signal (impulsiveness in that band).

- envelope evidence (group ``envelope_evidence``, issue 21: what transfers between physically different
  bearings, scaled so that neither the damage size nor the load sets it). For two variants of the window,
  ``w`` pre-whitened (every FFT line set to unit magnitude, phase kept: cepstral pre-whitening, so the
  rig's resonances and the impact strength drop out) and ``r`` raw, and for each evidence band (a fixed
  grid of 1000-3000 Hz bands over 500-5000 Hz): band-pass, squared Hilbert envelope, its Hann-windowed
  amplitude spectrum ``S``. Each line ``f`` gets ``20 log10(peak / background)`` in dB: the largest ``S``
  within ``max(1.5 bins, 2 %)`` of ``f`` against the median of ``S`` over the other bins within
  ``max(10 bins, half the shaft frequency)`` of it (its *local* background). Per variant ``v``::

      ev{v}_{c}            best band of the mean dB over harmonics h = 1..harmonics of h * f_c; also
                           ev{v}_bsf_even over h * 2 BSF (a ball defect strikes both races per spin)
      ev{v}_{c}_sidebands  the same over h * f_c ± modulation: BPFI ± shaft (an inner race turns with the
                           shaft through the load zone), BSF ± FTF (a ball with the cage)
      rel{v}_{c}           for BPFI, BPFO, BSF: ev{v}_{c} minus the largest ev{v} of the other two (which
                           defect the envelope favours, whatever its overall level); a ball's ev is the
                           larger of ev{v}_bsf and ev{v}_bsf_even
      kurt{v}_best         log10 of the largest envelope kurtosis E|z|^4 / (E|z|^2)^2 over the bands
                           (z: the band's analytic signal; Antoni's spectral kurtosis plus 2)

  The best band is chosen per window from the window alone (a kurtogram-lite), so nothing is tuned on a
  dataset. Every evidence column is invariant to the signal's amplitude. Each band's envelope is computed at
  the band's own rate (its lines shifted to 0 Hz, an FFT of ``L >= 2K + 1`` points for ``K`` lines instead
  of ``n``: the same values up to rounding, 1e-13 on CWRU); where a line's bins lie beyond the envelope's
  bandwidth (the band's width: e.g. 6 x BSF above 1000 Hz at more than ~2100 rpm) the spectrum there is 0,
  where the full-rate computation held rounding noise.
- ``groups`` selects and orders the column groups (``time``, ``band_shares``, ``envelope_peaks``,
  ``envelope_evidence``); the default, the first three, is the version-1 feature vector.

All arithmetic is float64, results float32. Non-finite samples, a bad rate or rpm, or an envelope band
above the Nyquist frequency raise ``ValueError``. Numpy only.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from agent.features.vibration import band_powers
from agent.records import Window

# Bump whenever a change to this module changes any feature value or name for the same spec.
BEARING_FEATURE_CODE_VERSION: Final = 1
KIND: Final = "bearing"

# SKF 6205-2RS JEM (CWRU drive end), as multiples of the shaft frequency.
SKF_6205: Final = (("bpfi", 5.4152), ("bpfo", 3.5848), ("bsf", 4.7135), ("ftf", 0.39828))

TIME_STATS: Final = ("log10_rms", "crest_factor", "kurtosis", "skewness", "shape_factor", "impulse_factor")
# Column groups, in extraction order. The first three are the version-1 features (every spec before
# ``groups`` existed had exactly these); ``envelope_evidence`` is the scale-free evidence of issue 21.
GROUPS: Final = ("time", "band_shares", "envelope_peaks", "envelope_evidence")
DEFAULT_GROUPS: Final = GROUPS[:3]
# Evidence bands: a fixed grid of 1000, 2000 and 3000 Hz wide bands over 500-5000 Hz, half-overlapping
# (a "kurtogram-lite"); the evidence of each frequency family is its best band, chosen per window from
# the window alone, so nothing is tuned on a dataset. 5000 Hz keeps 10.24 kHz sensors in range.
EVIDENCE_BANDS_HZ: Final = (
    *((lo, lo + 1000.0) for lo in range(500, 4001, 500)),
    *((lo, lo + 2000.0) for lo in range(500, 2501, 1000)),
    (500.0, 3500.0),
    (2000.0, 5000.0),
)
# The defect families compared by ``rel_*`` and the sideband families (carrier, modulation): an inner
# race turns with the shaft, a ball with the cage (FTF).
DEFECTS: Final = ("bpfi", "bpfo", "bsf")
SIDEBANDS: Final = (("bpfi", "shaft"), ("bsf", "ftf"))
# Background of an evidence peak: the bins within max(this many bins, half the shaft frequency) of it.
BACKGROUND_BINS: Final = 10
_EPS: Final = 1e-12
_KEYS: Final = (
    "kind",
    "window_samples",
    "hop_samples",
    "channels",
    "band_edges_hz",
    "envelope_bands_hz",
    "harmonics",
    "tolerance_bins",
    "tolerance_rel",
    "multipliers",
    "version",
)
# Keys added after version 1: written only when they differ from their default (``groups``) so that the
# specs of models built before keep their text and hash; read when present.
_OPTIONAL_KEYS: Final = ("groups", "evidence_bands_hz")


@dataclass(frozen=True)
class BearingFeatureSpec:
    """What the defect classifier consumes; versioned and hashed into its manifest.

    ``band_edges_hz``: whole hertz, increasing; ``envelope_bands_hz``: ``(lo, hi)`` pairs; both must lie
    below the Nyquist frequency of every window (checked at extraction). ``multipliers``: the bearing's
    characteristic frequencies as ``(name, multiple of shaft speed)``. Invalid values raise ``ValueError``.
    """

    window_samples: int = 4096
    hop_samples: int = 2048
    channels: tuple[str, ...] = ("value",)
    band_edges_hz: tuple[float, ...] = (0, 250, 500, 1000, 1500, 2000, 2500, 3000, 3500, 4000, 5000)
    envelope_bands_hz: tuple[tuple[float, float], ...] = ((500, 2500), (2500, 5000))
    harmonics: int = 3
    tolerance_bins: float = 1.5
    tolerance_rel: float = 0.02
    multipliers: tuple[tuple[str, float], ...] = SKF_6205
    version: int = BEARING_FEATURE_CODE_VERSION
    groups: tuple[str, ...] = DEFAULT_GROUPS
    evidence_bands_hz: tuple[tuple[float, float], ...] = EVIDENCE_BANDS_HZ

    def __post_init__(self) -> None:
        def fail(field: str, why: str) -> None:
            raise ValueError(f"bearing feature spec: {field} {why}, got {getattr(self, field)!r}")

        if not _is_int(self.window_samples) or not 256 <= self.window_samples <= 1 << 20:
            fail("window_samples", "must be an integer in [256, 1048576]")
        if not _is_int(self.hop_samples) or not 1 <= self.hop_samples <= self.window_samples:
            fail("hop_samples", "must be an integer in [1, window_samples]")
        if len(self.channels) != 1 or not all(isinstance(c, str) and c for c in self.channels):
            fail("channels", "must be exactly one channel name")
        edges = tuple(float(e) for e in self.band_edges_hz)
        if len(edges) < 2 or any(b <= a for a, b in itertools.pairwise(edges)) or edges[0] < 0:
            fail("band_edges_hz", "must be at least two increasing, non-negative edges")
        if any(e != int(e) for e in edges):
            fail("band_edges_hz", "must be whole hertz")
        bands = tuple((float(lo), float(hi)) for lo, hi in self.envelope_bands_hz)
        if not bands or any(not 0 < lo < hi or lo != int(lo) or hi != int(hi) for lo, hi in bands):
            fail("envelope_bands_hz", "must be non-empty (lo, hi) pairs of whole hertz with 0 < lo < hi")
        if not _is_int(self.harmonics) or not 1 <= self.harmonics <= 10:
            fail("harmonics", "must be an integer in [1, 10]")
        for name in ("tolerance_bins", "tolerance_rel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e3:
                fail(name, "must be a non-negative number")
        mults = tuple((str(n), float(m)) for n, m in self.multipliers)
        if not mults or any(not n.isidentifier() or not m > 0 for n, m in mults):
            fail("multipliers", "must be (identifier, positive multiple of shaft speed) pairs")
        if len({n for n, _ in mults}) != len(mults) or "shaft" in {n for n, _ in mults}:
            fail("multipliers", "must have unique names other than 'shaft'")
        if not _is_int(self.version) or self.version < 1:
            fail("version", "must be a positive integer")
        groups = tuple(self.groups)
        if not groups or any(g not in GROUPS for g in groups) or len(set(groups)) != len(groups):
            fail("groups", f"must be distinct names out of {list(GROUPS)}")
        evidence = tuple((float(lo), float(hi)) for lo, hi in self.evidence_bands_hz)
        if not evidence or any(not 0 < lo < hi or lo != int(lo) or hi != int(hi) for lo, hi in evidence):
            fail("evidence_bands_hz", "must be non-empty (lo, hi) pairs of whole hertz with 0 < lo < hi")
        # Normalise so that equal specs written with ints or floats hash alike.
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "band_edges_hz", edges)
        object.__setattr__(self, "envelope_bands_hz", bands)
        object.__setattr__(self, "tolerance_bins", float(self.tolerance_bins))
        object.__setattr__(self, "tolerance_rel", float(self.tolerance_rel))
        object.__setattr__(self, "multipliers", mults)
        object.__setattr__(self, "groups", tuple(g for g in GROUPS if g in groups))
        object.__setattr__(self, "evidence_bands_hz", evidence)

    @property
    def frequencies(self) -> tuple[tuple[str, float], ...]:
        """Characteristic frequencies evaluated in the envelope spectrum, shaft speed first."""
        return (("shaft", 1.0), *self.multipliers)

    def feature_names(self) -> tuple[str, ...]:
        """Names of the features in extraction order (the columns of ``extract_bearing_matrix``)."""
        return _feature_names(self)

    @property
    def n_features(self) -> int:
        return len(self.feature_names())

    @property
    def top_frequency_hz(self) -> float:
        """The highest frequency any used band reaches: the sampling rate must be at least twice it."""
        tops = [self.band_edges_hz[-1]]
        if "envelope_peaks" in self.groups:
            tops += [hi for _, hi in self.envelope_bands_hz]
        if "envelope_evidence" in self.groups:
            tops += [hi for _, hi in self.evidence_bands_hz]
        return max(tops)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``from_dict(to_dict())`` gives back an equal spec."""
        extra: dict[str, Any] = {}
        if self.groups != DEFAULT_GROUPS:
            extra = {"groups": list(self.groups), "evidence_bands_hz": [list(b) for b in self.evidence_bands_hz]}
        return {
            "kind": KIND,
            "window_samples": self.window_samples,
            "hop_samples": self.hop_samples,
            "channels": list(self.channels),
            "band_edges_hz": list(self.band_edges_hz),
            "envelope_bands_hz": [list(b) for b in self.envelope_bands_hz],
            "harmonics": self.harmonics,
            "tolerance_bins": self.tolerance_bins,
            "tolerance_rel": self.tolerance_rel,
            "multipliers": [[n, m] for n, m in self.multipliers],
            "version": self.version,
            **extra,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BearingFeatureSpec:
        """Strict inverse of ``to_dict``: unknown or missing keys and invalid values raise ``ValueError``."""
        if not isinstance(d, Mapping):
            raise ValueError(f"bearing feature spec must be a mapping, got {type(d).__name__}")
        unknown = sorted(str(k) for k in d if k not in _KEYS + _OPTIONAL_KEYS)
        missing = [k for k in _KEYS if k not in d]
        if unknown or missing:
            raise ValueError(f"bearing feature spec: unknown key(s) {unknown}, missing key(s) {missing}")
        if d["kind"] != KIND:
            raise ValueError(f"bearing feature spec: kind must be {KIND!r}, got {d['kind']!r}")
        try:
            return cls(
                window_samples=d["window_samples"],
                hop_samples=d["hop_samples"],
                channels=tuple(d["channels"]),
                band_edges_hz=tuple(d["band_edges_hz"]),
                envelope_bands_hz=tuple((lo, hi) for lo, hi in d["envelope_bands_hz"]),
                harmonics=d["harmonics"],
                tolerance_bins=d["tolerance_bins"],
                tolerance_rel=d["tolerance_rel"],
                multipliers=tuple((n, m) for n, m in d["multipliers"]),
                version=d["version"],
                groups=tuple(d.get("groups", DEFAULT_GROUPS)),
                evidence_bands_hz=tuple((lo, hi) for lo, hi in d.get("evidence_bands_hz", EVIDENCE_BANDS_HZ)),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bearing feature spec: {exc}") from exc

    def canonical_json(self) -> str:
        """The exact text that ``spec_hash`` digests: sorted keys, no spaces."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)

    def spec_hash(self) -> str:
        """sha256 hex digest of ``canonical_json()`` (the version is part of it)."""
        return hashlib.sha256(self.canonical_json().encode("utf-8")).hexdigest()

    @property
    def is_supported(self) -> bool:
        return self.version == BEARING_FEATURE_CODE_VERSION

    def require_supported(self) -> None:
        if not self.is_supported:
            raise ValueError(
                f"bearing feature spec version {self.version} is not computed by this agent's feature code "
                f"(version {BEARING_FEATURE_CODE_VERSION}): retrain the classifier with this agent version"
            )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@functools.lru_cache(maxsize=64)
def _feature_names(spec: BearingFeatureSpec) -> tuple[str, ...]:
    names: list[str] = []
    if "time" in spec.groups:
        names += TIME_STATS
    if "band_shares" in spec.groups:
        names += [f"band_rel_{int(lo)}_{int(hi)}hz" for lo, hi in itertools.pairwise(spec.band_edges_hz)]
    if "envelope_peaks" in spec.groups:
        for b in range(len(spec.envelope_bands_hz)):
            names.append(f"env{b}_kurtosis")
            names += [f"env{b}_{c}_{h}x" for c, _ in spec.frequencies for h in range(1, spec.harmonics + 1)]
    if "envelope_evidence" in spec.groups:
        for variant in _VARIANTS:
            names += [f"ev{variant}_{c}" for c in _families(spec)]
            names += [f"ev{variant}_{c}_sidebands" for c, _ in _sidebands(spec)]
            names += [f"rel{variant}_{c}" for c in _defects(spec)]
            names.append(f"kurt{variant}_best")
    return tuple(names)


# Evidence variants: ``w`` of the pre-whitened window, ``r`` of the raw one.
_VARIANTS: Final = ("w", "r")


def _families(spec: BearingFeatureSpec) -> tuple[str, ...]:
    """Line families of the evidence: every characteristic frequency, and ``bsf_even`` (2, 4, 6 ... x BSF: a
    ball defect strikes both races once per spin, so the even harmonics of BSF often carry it)."""
    names = tuple(c for c, _ in spec.frequencies)
    return (*names, "bsf_even") if "bsf" in names else names


def _sidebands(spec: BearingFeatureSpec) -> tuple[tuple[str, str], ...]:
    known = {c for c, _ in spec.frequencies}
    return tuple((c, s) for c, s in SIDEBANDS if c in known and s in known)


def _defects(spec: BearingFeatureSpec) -> tuple[str, ...]:
    present = tuple(c for c in DEFECTS if c in dict(spec.multipliers))
    return present if len(present) >= 2 else ()


def extract_bearing_matrix(
    spec: BearingFeatureSpec, windows: Sequence[Window], rpm: float | Sequence[float] | np.ndarray
) -> np.ndarray:
    """Bearing features of vibration windows: float32 ``(len(windows), spec.n_features)``.

    ``rpm``: the shaft speed of all windows (a number) or of each window (a sequence). Raises
    ``ValueError`` if a window does not match the spec (kind, channels, length, rate) or holds
    non-finite values.
    """
    spec.require_supported()
    rpms = np.asarray(rpm, dtype=np.float64)
    if rpms.ndim > 1 or (rpms.ndim == 1 and len(rpms) != len(windows)):
        raise ValueError(f"rpm must be one number or one per window ({len(windows)}), got shape {rpms.shape}")
    rpms = np.broadcast_to(rpms, (len(windows),))
    if not windows:
        return np.empty((0, spec.n_features), dtype=np.float32)
    for i, w in enumerate(windows):
        where = f"window {i} ({w.source})"
        if w.kind != "vibration" or tuple(w.channels) != spec.channels:
            raise ValueError(f"{where}: needs a vibration window of channels {list(spec.channels)}")
        if w.data.shape != (1, spec.window_samples):
            raise ValueError(f"{where}: data shape {w.data.shape} is not (1, {spec.window_samples})")
        if w.rate_hz is None:
            raise ValueError(f"{where}: a vibration window needs rate_hz")
    x = np.stack([w.data[0] for w in windows]).astype(np.float64, copy=False)
    rates = np.array([w.rate_hz for w in windows], dtype=np.float64)
    return bearing_features(spec, x, rates, rpms).astype(np.float32)


def bearing_features(spec: BearingFeatureSpec, x: np.ndarray, rate_hz: np.ndarray, rpm: np.ndarray) -> np.ndarray:
    """Features of ``x`` float64 ``(m, n)`` sampled at ``rate_hz`` ``(m,)`` at shaft speeds ``rpm`` ``(m,)``.

    Returns float64 ``(m, spec.n_features)`` in the order of ``spec.feature_names()``.
    """
    x = np.asarray(x, dtype=np.float64)
    m, n = x.shape
    rate_hz = np.broadcast_to(np.asarray(rate_hz, dtype=np.float64), (m,))
    rpm = np.broadcast_to(np.asarray(rpm, dtype=np.float64), (m,))
    if not np.isfinite(x).all():
        raise ValueError(f"{int((~np.isfinite(x).all(axis=1)).sum())} window(s) hold non-finite values")
    if not (np.isfinite(rate_hz).all() and (rate_hz > 0).all()):
        raise ValueError(f"rate_hz must be finite and > 0, got {np.unique(rate_hz).tolist()}")
    if not (np.isfinite(rpm).all() and (rpm > 0).all()):
        raise ValueError(f"rpm must be finite and > 0, got {np.unique(rpm).tolist()}")
    top = spec.top_frequency_hz
    if top > float(rate_hz.min()) / 2:
        raise ValueError(
            f"bands up to {top:g} Hz need a sampling rate of at least {2 * top:g} Hz, got {rate_hz.min():g} Hz"
        )
    # Chunks of ~1 MiB of samples keep the FFT temporaries in cache.
    rows = max(1, (1 << 17) // n)
    if m > rows:
        return np.concatenate(
            [
                bearing_features(spec, x[i : i + rows], rate_hz[i : i + rows], rpm[i : i + rows])
                for i in range(0, m, rows)
            ]
        )
    x = x - x.mean(axis=1, keepdims=True)
    parts = []
    if "time" in spec.groups:
        parts.append(_time_stats(x))
    if "band_shares" in spec.groups:
        power = band_powers(x, rate_hz, spec.band_edges_hz)
        total = power.sum(axis=1, keepdims=True)
        share = np.divide(power, total, out=np.zeros_like(power), where=total > 0)
        parts.append(np.log10(share + _EPS))
    spectrum = np.fft.rfft(x, axis=1)
    freqs = np.fft.rfftfreq(n)[None, :] * rate_hz[:, None]  # (m, n_bins)
    if "envelope_peaks" in spec.groups:
        for lo, hi in spec.envelope_bands_hz:
            passed, envelope = _band_envelope(spectrum, freqs, n, lo, hi)
            parts.append(_kurtosis(passed)[:, None])
            envelope -= envelope.mean(axis=1, keepdims=True)
            env_spectrum = np.abs(np.fft.rfft(envelope * _hann(n), axis=1))
            parts.append(_peak_ratios(spec, env_spectrum, rate_hz, rpm, n, hi - lo))
    if "envelope_evidence" in spec.groups:
        parts.append(_envelope_evidence(spec, spectrum, n, rate_hz, rpm))
    return np.concatenate(parts, axis=1)


def band_envelope(x: np.ndarray, rate_hz: float, lo_hz: float, hi_hz: float) -> tuple[np.ndarray, np.ndarray]:
    """Band-pass ``x`` ``(m, n)`` to ``[lo_hz, hi_hz)`` (FFT mask) and take its Hilbert envelope.

    Returns ``(band_passed, envelope)``, both float64 ``(m, n)``. The envelope of a carrier amplitude-modulated
    inside the band is its modulation: ``(1 + 0.5 cos 2π·50t) · cos 2π·1000t`` has envelope ``1 + 0.5 cos 2π·50t``.

    >>> t = np.arange(1200) / 12000.0
    >>> modulation = 1 + 0.5 * np.cos(2 * np.pi * 50 * t)
    >>> _, env = band_envelope((modulation * np.cos(2 * np.pi * 1000 * t))[None], 12000.0, 500, 2000)
    >>> bool(np.allclose(env[0], modulation))
    True
    """
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    n = x.shape[1]
    freqs = np.fft.rfftfreq(n)[None, :] * float(rate_hz)
    return _band_envelope(np.fft.rfft(x, axis=1), freqs, n, lo_hz, hi_hz)


def _band_envelope(
    spectrum: np.ndarray, freqs: np.ndarray, n: int, lo: float, hi: float
) -> tuple[np.ndarray, np.ndarray]:
    band = np.where((freqs >= lo) & (freqs < hi), spectrum, 0.0)
    passed = np.fft.irfft(band, n=n, axis=1)
    return passed, np.abs(_analytic(band, n))


def _analytic(band: np.ndarray, n: int) -> np.ndarray:
    """The analytic signal ``(m, n)`` complex of the one-sided spectra ``band`` ``(m, n // 2 + 1)``."""
    full = np.zeros((band.shape[0], n), dtype=np.complex128)
    full[:, : band.shape[1]] = 2.0 * band  # negative frequencies dropped, positive doubled
    if n % 2 == 0:
        full[:, n // 2] /= 2.0  # the Nyquist bin is its own mirror (always outside a band below Nyquist)
    return np.fft.ifft(full, axis=1)


def _time_stats(d: np.ndarray) -> np.ndarray:
    """``TIME_STATS`` of each mean-removed row of ``d`` ``(m, n)``.

    >>> _time_stats(np.array([[1.0, -1.0, 1.0, -1.0]])).round(6).tolist()
    [[0.0, 1.0, 1.0, 0.0, 1.0, 1.0]]
    """
    rms = np.sqrt(np.mean(d * d, axis=1))
    peak = np.abs(d).max(axis=1)
    mean_abs = np.abs(d).mean(axis=1)
    m2 = rms * rms
    varies = m2 > (1e-10 * np.maximum(peak, _EPS)) ** 2
    m3 = np.mean(d**3, axis=1)
    skew = np.divide(m3, m2**1.5, out=np.zeros_like(m2), where=varies)
    crest = np.divide(peak, rms, out=np.zeros_like(rms), where=varies)
    shape = np.divide(rms, mean_abs, out=np.zeros_like(rms), where=varies)
    impulse = np.divide(peak, mean_abs, out=np.zeros_like(rms), where=varies)
    return np.stack([np.log10(rms + _EPS), crest, _kurtosis(d), skew, shape, impulse], axis=1)


def _kurtosis(x: np.ndarray) -> np.ndarray:
    """Pearson kurtosis of each row (0 for a constant row)."""
    d = x - x.mean(axis=1, keepdims=True)
    m2 = np.mean(d * d, axis=1)
    m4 = np.mean(d**4, axis=1)
    scale = np.abs(d).max(axis=1)
    return np.divide(m4, m2 * m2, out=np.zeros_like(m2), where=m2 > (1e-10 * np.maximum(scale, _EPS)) ** 2)


def _peak_ratios(
    spec: BearingFeatureSpec, env_spectrum: np.ndarray, rate_hz: np.ndarray, rpm: np.ndarray, n: int, width: float
) -> np.ndarray:
    """``env{b}_{c}_{h}x`` of each row of the envelope amplitude spectrum ``(m, n // 2 + 1)``."""
    m, n_bins = env_spectrum.shape
    out = np.empty((m, len(spec.frequencies) * spec.harmonics), dtype=np.float64)
    top_multiple = max(mult for _, mult in spec.frequencies) * spec.harmonics
    for i in range(m):
        df = rate_hz[i] / n
        shaft = rpm[i] / 60.0
        ref_lo = max(1, math.floor(0.5 * shaft / df))
        ref_hi = min(n_bins, math.ceil(min(1.2 * top_multiple * shaft, width) / df) + 1)
        level = float(np.median(env_spectrum[i, ref_lo:ref_hi])) if ref_hi > ref_lo else 0.0
        row = env_spectrum[i]
        j = 0
        for _, mult in spec.frequencies:
            for h in range(1, spec.harmonics + 1):
                f = h * mult * shaft
                tol = max(spec.tolerance_bins * df, spec.tolerance_rel * f)
                lo = max(0, math.ceil((f - tol) / df))
                hi = min(n_bins, math.floor((f + tol) / df) + 1)
                peak = float(row[lo:hi].max()) if hi > lo else 0.0
                out[i, j] = math.log10(peak / level + _EPS) if level > 0 else 0.0
                j += 1
    return out


def _envelope_evidence(
    spec: BearingFeatureSpec, spectrum: np.ndarray, n: int, rate_hz: np.ndarray, rpm: np.ndarray
) -> np.ndarray:
    """The ``ev*``, ``ev*_sidebands``, ``rel*`` and ``kurt*_best`` columns of both variants (``_VARIANTS``
    order, see the module docstring) from the rows' spectra ``(m, n // 2 + 1)``."""
    m = spectrum.shape[0]
    magnitude = np.abs(spectrum)
    floor = _EPS * magnitude.max(axis=1, keepdims=True)
    whitened = np.divide(spectrum, magnitude, out=np.zeros_like(spectrum), where=magnitude > floor)
    variants = np.stack((whitened, spectrum))  # the order of _VARIANTS
    targets, slices = _evidence_targets(spec)
    index, zone, background = _line_bins(rate_hz / n, rpm / 60.0, targets, n // 2 + 1)
    n_bins = int(index.max()) + 1
    bands = len(spec.evidence_bands_hz)
    ratios = np.empty((len(variants), bands, m, len(targets)))
    kurt = np.empty((len(variants), bands, m))
    for which, rows, spectra, kurtosis in _squared_envelope_spectra(spec, variants, n, rate_hz):
        if spectra.shape[-1] < n_bins:  # lines beyond the envelope's bandwidth: nothing there
            spectra = np.concatenate([spectra, np.zeros((*spectra.shape[:-1], n_bins - spectra.shape[-1]))], -1)
        v, b, r, _ = spectra.shape
        at = (slice(None), which[:, None], rows[None, :])
        ratios[at] = _local_peak_db(
            spectra[..., :n_bins].reshape(v * b, r, n_bins), index[rows], zone[rows], background[rows]
        ).reshape(v, b, r, len(targets))
        kurt[at] = kurtosis
    columns = []
    for v in range(len(variants)):
        # Per family: the mean over its lines in each band, then the best band.
        families = np.stack([ratios[v, :, :, sl].mean(axis=2) for sl in slices], axis=2).max(axis=0)
        column = {c: families[:, j] for j, c in enumerate(_families(spec))}
        # A ball's evidence is the stronger of its two families.
        defect = {c: np.maximum(column[c], column["bsf_even"]) if c == "bsf" else column[c] for c in _defects(spec)}
        rel = [defect[c] - np.max([defect[o] for o in defect if o != c], axis=0) for c in defect]
        columns += [families, *(r[:, None] for r in rel), np.log10(kurt[v].max(axis=0))[:, None]]
    return np.concatenate(columns, axis=1)


def _squared_envelope_spectra(
    spec: BearingFeatureSpec, variants: np.ndarray, n: int, rate_hz: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per variant and evidence band, the amplitude spectrum of the Hann-windowed squared envelope on the
    window's ``rate / n`` grid, and the envelope kurtosis ``E|z|^4 / (E|z|^2)^2``. ``variants``: one-sided
    spectra ``(variants, m, n // 2 + 1)``. Yields groups of bands and rows (those of one sampling rate):
    ``(bands, rows, spectra (variants, bands, rows, bins), kurtosis (variants, bands, rows))``.

    The band's analytic signal ``z`` is computed at the band's own rate: its ``K`` lines, shifted down to 0 Hz
    (``|z|`` does not change), go through an inverse FFT of ``L >= 2K + 1`` points instead of ``n``. ``|z|^2``
    has lines up to ``K - 1`` only, so its ``L`` samples, times the Hann window's, hold every line of the
    ``n``-point computation exactly (no aliasing): the same spectrum (bins ``0 .. L // 2``, scaled back) and
    kurtosis up to rounding, at a fraction of the cost. Beyond bin ``K`` the ``n``-point spectrum holds
    rounding noise only.
    """
    n_variants = variants.shape[0]
    for rate in np.unique(rate_hz):
        rows = np.flatnonzero(rate_hz == rate)
        freqs = np.fft.rfftfreq(n) * rate
        by_length: dict[int, list[tuple[int, int, int]]] = {}
        for b, (lo, hi) in enumerate(spec.evidence_bands_hz):
            lines = np.flatnonzero((freqs >= lo) & (freqs < hi))
            first, k = (int(lines[0]), len(lines)) if len(lines) else (0, 0)
            by_length.setdefault(_fft_length(2 * k + 1), []).append((b, first, k))
        for length, members in by_length.items():
            shifted = np.zeros((n_variants, len(members), len(rows), length), dtype=np.complex128)
            for j, (_, first, k) in enumerate(members):
                shifted[:, j, :, :k] = variants[:, rows, first : first + k]
            z = np.fft.ifft(shifted, axis=-1)
            squared = z.real * z.real + z.imag * z.imag
            power = squared.mean(axis=-1)
            # E|z|^4 / (E|z|^2)^2: 2 for Gaussian noise, 1 for a steady tone, large for impacts (spectral kurtosis + 2).
            fourth = (squared * squared).mean(axis=-1)
            kurtosis = np.divide(fourth, power * power, out=np.ones_like(power), where=power > 0)
            squared -= power[..., None]
            squared *= _hann(length)
            # Scaled to the n-point computation's amplitudes (the analytic signal doubles the band's lines).
            spectra = np.abs(np.fft.rfft(squared, axis=-1)) * (4.0 * length / n)
            yield np.array([b for b, _, _ in members]), rows, spectra, kurtosis


@functools.lru_cache(maxsize=64)
def _fft_length(size: int) -> int:
    """The smallest ``2^a 3^b 5^c`` at least ``size`` (sizes numpy's FFT does fastest).

    >>> [_fft_length(s) for s in (1, 683, 1367, 2049)]
    [1, 720, 1440, 2160]
    """
    best = 1 << max(0, (size - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            p = p35
            while p < size:
                p *= 2
            best = min(best, p)
            p35 *= 3
        p5 *= 5
    return best


@functools.lru_cache(maxsize=16)
def _evidence_targets(spec: BearingFeatureSpec) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Lines of the evidence, as multiples of the shaft frequency, and the slice of each family in them:
    harmonics ``h = 1..harmonics`` of every family of ``_families``, then ``h * carrier ± modulation`` of
    every sideband family."""
    mult = dict(spec.frequencies)
    lines: list[float] = []
    slices = []
    for c in _families(spec):
        f = 2 * mult["bsf"] if c == "bsf_even" else mult[c]
        slices.append(slice(len(lines), len(lines) + spec.harmonics))
        lines += [h * f for h in range(1, spec.harmonics + 1)]
    for carrier, modulation in _sidebands(spec):
        slices.append(slice(len(lines), len(lines) + 2 * spec.harmonics))
        lines += [h * mult[carrier] + s * mult[modulation] for h in range(1, spec.harmonics + 1) for s in (-1, 1)]
    return np.array(lines), tuple(slices)


def _local_peak_db(ses: np.ndarray, index: np.ndarray, zone: np.ndarray, background: np.ndarray) -> np.ndarray:
    """``20 log10(peak / local background)`` of each line in the spectra ``ses`` ``(bands, rows, bins)``:
    ``(bands, rows, lines)``; ``index``, ``zone``, ``background``: ``_line_bins`` of the rows.

    Peak: the largest bin of the line's zone; background: the median of its background bins. 0 dB where the
    background is 0.

    >>> ses = np.ones((1, 1, 200)); ses[0, 0, 100] = 10.0
    >>> bins = _line_bins(np.array([1.0]), np.array([100.0]), np.array([1.0, 0.5]), 200)
    >>> _local_peak_db(ses, *bins).round(3).tolist()
    [[[20.0, 0.0]]]
    """
    rows = np.arange(ses.shape[1])[:, None, None]
    near = ses[:, rows, index]  # (bands, rows, lines, width)
    peak = np.where(zone, near, -np.inf).max(axis=3)
    # The median of each line's own background bins: sorted with the other bins last, the middle one (odd
    # count) or the mean of the middle two (even), as np.median.
    ordered = np.sort(np.where(background, near, np.inf), axis=3)
    count = background.sum(axis=2)
    low = np.take_along_axis(ordered, np.broadcast_to(((count - 1) // 2)[None, ..., None], (*peak.shape, 1)), 3)
    high = np.take_along_axis(ordered, np.broadcast_to((count // 2)[None, ..., None], (*peak.shape, 1)), 3)
    level = (low[..., 0] + high[..., 0]) / 2.0
    ratio = np.divide(peak, level, out=np.ones_like(peak), where=level > 0)
    return 20.0 * np.log10(np.maximum(ratio, _EPS))


def _line_bins(
    df: np.ndarray, shaft: np.ndarray, targets: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bins around each line ``targets * shaft`` of each row (bins ``df`` Hz apart, ``n_bins`` of them):
    ``index`` ``(rows, lines, width)`` and the masks of the line's peak zone and its background in it.

    Zone: within ``max(1.5 bins, 2 %)`` of the line; background: the other bins within
    ``max(BACKGROUND_BINS bins, half the shaft frequency, twice the zone)``. A line beyond the spectrum gets
    one peak bin equal to its one background bin (0 dB).
    """
    df, shaft = df[:, None, None], shaft[:, None, None]
    f = targets[None, :, None] * shaft
    tol = np.maximum(1.5 * df, 0.02 * f)
    width = np.maximum(np.maximum(BACKGROUND_BINS * df, 0.5 * shaft), 2 * tol)
    first = np.maximum(1, np.ceil((f - width) / df)).astype(np.int64)
    last = np.minimum(n_bins, np.floor((f + width) / df).astype(np.int64) + 1)
    count = last - first
    bins = first + np.arange(max(2, int(count.max())))
    valid = bins < last
    zone = valid & (np.abs(bins * df - f) <= tol)
    bad = (~zone.any(axis=2) | (zone == valid).all(axis=2))[..., None]
    slot = np.arange(bins.shape[2])
    index = np.where(bad, 1, np.where(valid, bins, 1))
    zone = np.where(bad, slot == 0, zone)
    background = np.where(bad, slot == 1, valid & ~zone)
    return index, zone, background


@functools.lru_cache(maxsize=16)
def _hann(n: int) -> np.ndarray:
    w = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)
    w.setflags(write=False)
    return w
