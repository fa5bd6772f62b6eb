"""Bearing features: envelope peaks at the defect frequencies that follow the shaft speed, spec contract."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal
import scipy.stats

from agent.features.bearing import (
    BearingFeatureSpec,
    band_envelope,
    bearing_features,
    extract_bearing_matrix,
)
from agent.records import Source, Window

SPEC = BearingFeatureSpec()
BPFO = dict(SPEC.multipliers)["bpfo"]


def impacts(defect_hz: float, rate_hz: float, n: int, seed: int = 0, resonance_hz: float = 3000.0) -> np.ndarray:
    """Impacts every ``1 / defect_hz`` s, each ringing a resonance, plus white noise (g)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / rate_hz
    x = 0.05 * rng.standard_normal(n)
    ring_t = np.arange(int(0.004 * rate_hz)) / rate_hz
    ring = np.exp(-2 * np.pi * resonance_hz * 0.05 * ring_t) * np.sin(2 * np.pi * resonance_hz * ring_t)
    for t0 in np.arange(rng.uniform(0, 1 / defect_hz), t[-1], 1 / defect_hz):
        i = round(t0 * rate_hz)
        x[i : i + len(ring)] += ring[: n - i]
    return x


def named(row: np.ndarray, spec: BearingFeatureSpec = SPEC) -> dict[str, float]:
    return dict(zip(spec.feature_names(), row.tolist(), strict=True))


def one_x_peaks(values: dict[str, float], band: int) -> dict[str, float]:
    return {c: values[f"env{band}_{c}_1x"] for c, _ in SPEC.frequencies}


@pytest.mark.parametrize(("rpm", "rate_hz"), [(1797.0, 12000.0), (1200.0, 12000.0), (2400.0, 10240.0)])
def test_outer_race_impacts_peak_at_bpfo_times_shaft_speed(rpm: float, rate_hz: float) -> None:
    x = impacts(BPFO * rpm / 60, rate_hz, SPEC.window_samples)
    values = named(bearing_features(SPEC, x[None], np.array([rate_hz]), np.array([rpm]))[0])
    peaks = one_x_peaks(values, band=1)  # the 2500-5000 Hz band holds the 3 kHz resonance
    assert max(peaks, key=lambda c: peaks[c]) == "bpfo"
    assert peaks["bpfo"] > 1.0  # more than 10x the envelope spectrum's median level
    assert values["env1_bpfo_2x"] > 0.7 and values["env1_bpfo_3x"] > 0.5


def test_bpfo_feature_follows_the_given_rpm() -> None:
    rate = 12000.0
    x = impacts(BPFO * 1500 / 60, rate, SPEC.window_samples)[None]
    right = named(bearing_features(SPEC, x, np.array([rate]), np.array([1500.0]))[0])
    wrong = named(bearing_features(SPEC, x, np.array([rate]), np.array([1800.0]))[0])
    assert right["env1_bpfo_1x"] > wrong["env1_bpfo_1x"] + 0.7


def test_noise_has_no_envelope_peaks() -> None:
    x = np.random.default_rng(1).standard_normal((4, SPEC.window_samples))
    out = bearing_features(SPEC, x, np.full(4, 12000.0), np.full(4, 1797.0))
    peaks = [out[:, SPEC.feature_names().index(f"env1_{c}_1x")] for c, _ in SPEC.frequencies]
    assert np.max(peaks) < 0.8


def test_band_envelope_matches_scipy_hilbert() -> None:
    x = impacts(100.0, 12000.0, 4096, seed=3)
    passed, env = band_envelope(x[None], 12000.0, 2500, 5000)
    freqs = np.fft.rfftfreq(4096, 1 / 12000.0)
    reference = np.fft.irfft(np.where((freqs >= 2500) & (freqs < 5000), np.fft.rfft(x), 0), n=4096)
    np.testing.assert_allclose(passed[0], reference, atol=1e-12)
    np.testing.assert_allclose(env[0], np.abs(scipy.signal.hilbert(reference)), atol=1e-10)


def test_time_statistics_match_scipy() -> None:
    x = impacts(107.0, 12000.0, SPEC.window_samples, seed=5)
    values = named(bearing_features(SPEC, x[None], np.array([12000.0]), np.array([1797.0]))[0])
    d = x - x.mean()
    assert values["kurtosis"] == pytest.approx(scipy.stats.kurtosis(x, fisher=False), rel=1e-9)
    assert values["skewness"] == pytest.approx(scipy.stats.skew(x), rel=1e-9)
    assert values["log10_rms"] == pytest.approx(np.log10(np.sqrt(np.mean(d**2))), rel=1e-9)
    assert values["crest_factor"] == pytest.approx(np.abs(d).max() / np.sqrt(np.mean(d**2)), rel=1e-9)


def test_band_shares_add_up_to_one_and_ignore_the_amplitude() -> None:
    x = np.random.default_rng(2).standard_normal((1, SPEC.window_samples))
    row = named(bearing_features(SPEC, x, np.array([10240.0]), np.array([1800.0]))[0])
    louder = named(bearing_features(SPEC, 30 * x, np.array([10240.0]), np.array([1800.0]))[0])
    shares = [10**v for k, v in row.items() if k.startswith("band_rel_")]
    assert sum(shares) == pytest.approx(1.0, abs=1e-9)
    assert all(louder[k] == pytest.approx(v, abs=1e-9) for k, v in row.items() if k.startswith("band_rel_"))


def test_extract_from_windows_at_the_simulator_rate() -> None:
    rate = 10240.0
    windows = [
        Window(
            source=Source.of(machine="m01", sensor="vibration"),
            kind="vibration",
            start_ns=0,
            end_ns=1,
            channels=("value",),
            data=impacts(BPFO * rpm / 60, rate, SPEC.window_samples)[None],
            times_s=np.arange(SPEC.window_samples) / rate,
            rate_hz=rate,
        )
        for rpm in (1500.0, 1800.0)
    ]
    out = extract_bearing_matrix(SPEC, windows, [1500.0, 1800.0])
    assert out.shape == (2, SPEC.n_features) and out.dtype == np.float32
    assert np.isfinite(out).all()
    bpfo = SPEC.feature_names().index("env1_bpfo_1x")
    assert (out[:, bpfo] > 1.0).all()


def test_extract_refuses_a_rate_below_the_bands() -> None:
    x = np.zeros((1, SPEC.window_samples))
    with pytest.raises(ValueError, match="sampling rate of at least 10000 Hz"):
        bearing_features(SPEC, x, np.array([8000.0]), np.array([1800.0]))
    with pytest.raises(ValueError, match="rpm"):
        bearing_features(SPEC, x + 1, np.array([12000.0]), np.array([0.0]))


def test_constant_window_gives_finite_zero_ratios() -> None:
    out = bearing_features(SPEC, np.ones((1, SPEC.window_samples)), np.array([12000.0]), np.array([1800.0]))
    assert np.isfinite(out).all()


def test_spec_round_trips_and_hash_is_stable() -> None:
    again = BearingFeatureSpec.from_dict(SPEC.to_dict())
    assert again == SPEC and again.spec_hash() == SPEC.spec_hash()
    assert BearingFeatureSpec(band_edges_hz=(0, 2500, 5000)).spec_hash() != SPEC.spec_hash()
    assert len(SPEC.feature_names()) == SPEC.n_features == len(set(SPEC.feature_names()))


def test_spec_from_dict_rejects_unknown_keys_and_other_kinds() -> None:
    with pytest.raises(ValueError, match="unknown key"):
        BearingFeatureSpec.from_dict({**SPEC.to_dict(), "extra": 1})
    with pytest.raises(ValueError, match="kind"):
        BearingFeatureSpec.from_dict({**SPEC.to_dict(), "kind": "vibration"})
    with pytest.raises(ValueError, match="envelope_bands_hz"):
        BearingFeatureSpec(envelope_bands_hz=((3000, 2000),))
