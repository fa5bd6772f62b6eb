"""Envelope evidence (the ``envelope_evidence`` feature group): which defect's lines stand above their local
background, whatever the signal's amplitude, the shaft speed and the rig's resonance; spec compatibility."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.features.bearing import (
    DEFAULT_GROUPS,
    BearingFeatureSpec,
    _line_bins,
    _local_peak_db,
    _squared_envelope_spectra,
    bearing_features,
)

SPEC = BearingFeatureSpec(groups=("band_shares", "envelope_evidence"))
EVIDENCE = BearingFeatureSpec(groups=("envelope_evidence",))
MULT = dict(SPEC.frequencies)
SHIPPED_MANIFEST = Path(__file__).resolve().parents[2] / "models" / "defect_classifier" / "manifest.json"


def faulty(
    defect: str,
    rpm: float,
    rate_hz: float,
    seed: int = 0,
    resonance_hz: float = 3000.0,
    modulation: float = 0.4,
) -> np.ndarray:
    """One window of impacts at ``defect``'s frequency ringing a resonance, amplitude-modulated as the physics
    says (inner race by the shaft, ball by the cage), in noise."""
    rng = np.random.default_rng(seed)
    n = SPEC.window_samples
    shaft = rpm / 60
    x = 0.05 * rng.standard_normal(n) + 0.05 * np.sin(2 * np.pi * shaft * np.arange(n) / rate_hz)
    ring_t = np.arange(int(0.003 * rate_hz)) / rate_hz
    ring = np.exp(-2 * np.pi * resonance_hz * 0.05 * ring_t) * np.sin(2 * np.pi * resonance_hz * ring_t)
    ball = defect.startswith("bsf")  # "bsf_even": impacts at 2 x BSF, on both races once per spin
    period = 1 / ((2 * MULT["bsf"] if defect == "bsf_even" else MULT[defect]) * shaft)
    for t0 in np.arange(rng.uniform(0, period), n / rate_hz, period):
        depth = {
            "bpfi": modulation * np.cos(2 * np.pi * shaft * t0),
            "bsf": modulation * np.cos(2 * np.pi * MULT["ftf"] * shaft * t0),
        }
        i = round(t0 * rate_hz)
        x[i : i + len(ring)] += (1 + depth.get("bsf" if ball else defect, 0.0)) * ring[: n - i]
    return x


def named(spec: BearingFeatureSpec, x: np.ndarray, rate_hz: float, rpm: float) -> dict[str, float]:
    row = bearing_features(spec, x[None], np.array([rate_hz]), np.array([rpm]))[0]
    return dict(zip(spec.feature_names(), row.tolist(), strict=True))


@pytest.mark.parametrize(
    ("defect", "rpm", "rate_hz", "resonance_hz"),
    [
        ("bpfi", 1797.0, 12000.0, 3000.0),
        ("bpfo", 1797.0, 12000.0, 1200.0),
        ("bpfi", 1200.0, 10240.0, 4200.0),
        ("bpfo", 2400.0, 10240.0, 2000.0),
        ("bsf", 1750.0, 12000.0, 3500.0),
        ("bsf_even", 1797.0, 12000.0, 2500.0),
    ],
)
def test_the_defect_whose_impacts_ring_wins_its_relative_evidence(
    defect: str, rpm: float, rate_hz: float, resonance_hz: float
) -> None:
    v = named(EVIDENCE, faulty(defect, rpm, rate_hz, resonance_hz=resonance_hz), rate_hz, rpm)
    own = "bsf" if defect == "bsf_even" else defect  # a ball's evidence is the stronger of its two families
    for variant in ("w", "r"):
        assert v[f"rel{variant}_{own}"] > 4.0, v  # its lines stand 4 dB clearer than the next defect's
        others = [c for c in ("bpfi", "bpfo", "bsf") if c != own]
        assert all(v[f"rel{variant}_{c}"] < 0 for c in others)


# A ball's sidebands are weaker evidence: a 4096-sample window at 12 kHz holds only ~4 cage turns.
@pytest.mark.parametrize(("defect", "gain_db"), [("bpfi", 3.0), ("bsf", 1.0)])
def test_load_zone_modulation_shows_in_the_sidebands(defect: str, gain_db: float) -> None:
    """An inner-race defect passes the load zone once per shaft turn, a ball once per cage turn."""
    steady, modulated = (
        named(EVIDENCE, faulty(defect, 1797.0, 12000.0, modulation=depth), 12000.0, 1797.0) for depth in (0.0, 0.8)
    )
    for variant in ("w", "r"):
        key = f"ev{variant}_{defect}_sidebands"
        assert modulated[key] > steady[key] + gain_db, (steady[key], modulated[key])


def test_evidence_does_not_depend_on_the_amplitude() -> None:
    x = faulty("bpfo", 1772.0, 12000.0, seed=4)
    small, large = (bearing_features(SPEC, g * x[None], np.array([12000.0]), np.array([1772.0])) for g in (1.0, 40.0))
    np.testing.assert_allclose(small, large, rtol=1e-9, atol=1e-9)


def test_evidence_follows_the_given_rpm() -> None:
    x = faulty("bpfo", 1500.0, 12000.0, seed=2)
    right = named(EVIDENCE, x, 12000.0, 1500.0)
    wrong = named(EVIDENCE, x, 12000.0, 1800.0)
    assert right["evw_bpfo"] > wrong["evw_bpfo"] + 6.0


def test_noise_gives_no_defect_a_clear_lead() -> None:
    x = np.random.default_rng(7).standard_normal((8, SPEC.window_samples))
    out = bearing_features(EVIDENCE, x, np.full(8, 12000.0), np.full(8, 1797.0))
    names = EVIDENCE.feature_names()
    for c in ("bpfi", "bpfo", "bsf"):
        assert np.median(out[:, names.index(f"relw_{c}")]) < 3.0


def test_rows_at_different_speeds_and_rates_in_one_call_match_single_calls() -> None:
    xs = [faulty("bpfi", 1797.0, 12000.0, seed=1), faulty("bpfo", 1200.0, 10240.0, seed=2)]
    rates, rpms = np.array([12000.0, 10240.0]), np.array([1797.0, 1200.0])
    together = bearing_features(SPEC, np.stack(xs), rates, rpms)
    for i, x in enumerate(xs):
        np.testing.assert_allclose(together[i], bearing_features(SPEC, x[None], rates[i : i + 1], rpms[i : i + 1])[0])


def test_constant_window_gives_finite_evidence() -> None:
    out = bearing_features(SPEC, np.ones((2, SPEC.window_samples)), np.full(2, 12000.0), np.full(2, 1797.0))
    assert np.isfinite(out).all()
    names = SPEC.feature_names()
    assert out[0, names.index("evw_bpfi")] == 0.0 and out[0, names.index("relr_bsf")] == 0.0


def test_evidence_bands_above_nyquist_are_refused() -> None:
    spec = BearingFeatureSpec(groups=("envelope_evidence",), evidence_bands_hz=((500, 6000),))
    with pytest.raises(ValueError, match="6000 Hz need a sampling rate of at least 12000 Hz"):
        bearing_features(spec, np.zeros((1, spec.window_samples)), np.array([10240.0]), np.array([1797.0]))


def test_version_one_spec_keeps_its_hash() -> None:
    """Adding the groups must not change the text, and so the hash, of the version-1 specs in manifests built
    before (the hash below is the shipped classifier's before issue 21)."""
    assert BearingFeatureSpec().spec_hash() == "a59282d94ba547d8a250c085e4184d6f7999590b15a3f1e2dbc6e04267a3d674"
    assert "groups" not in BearingFeatureSpec().to_dict()
    assert BearingFeatureSpec.from_dict(BearingFeatureSpec().to_dict()).groups == DEFAULT_GROUPS


def test_shipped_classifier_uses_the_envelope_evidence() -> None:
    """Shipped once its features cost about what version 1's do on the alert path (docs/results_cwru.md)."""
    manifest = json.loads(SHIPPED_MANIFEST.read_text(encoding="utf-8"))
    spec = BearingFeatureSpec.from_dict(manifest["feature_spec"])
    assert spec == SPEC and manifest["feature_spec_hash"] == SPEC.spec_hash()
    assert manifest["feature_names"] == list(SPEC.feature_names())


def test_evidence_spec_round_trips_with_its_own_hash() -> None:
    d = json.loads(json.dumps(SPEC.to_dict()))
    assert d["groups"] == ["band_shares", "envelope_evidence"]
    assert BearingFeatureSpec.from_dict(d) == SPEC
    assert SPEC.spec_hash() != BearingFeatureSpec().spec_hash()
    assert SPEC.n_features == 10 + 2 * (6 + 2 + 3 + 1)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("groups", ("time", "spectral_magic"), "groups must be distinct names out of"),
        ("groups", (), "groups must be distinct names out of"),
        ("evidence_bands_hz", ((3000, 2000),), "evidence_bands_hz must be non-empty"),
    ],
)
def test_bad_groups_or_evidence_bands_are_named(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BearingFeatureSpec(**{field: value})  # type: ignore[arg-type]


def _squared_envelope_spectrum_n_points(x: np.ndarray, rate_hz: float, lo: float, hi: float) -> tuple:
    """The definition, at the window's full rate: ideal band-pass, analytic signal of ``n`` points, its
    squared modulus' kurtosis and the amplitude spectrum of that, mean removed and Hann-windowed."""
    n = len(x)
    spectrum = np.fft.rfft(x)
    freqs = np.fft.rfftfreq(n) * rate_hz
    full = np.zeros(n, dtype=complex)
    full[: n // 2 + 1] = 2 * np.where((freqs >= lo) & (freqs < hi), spectrum, 0)
    squared = np.abs(np.fft.ifft(full)) ** 2
    kurtosis = np.mean(squared**2) / np.mean(squared) ** 2
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)
    return np.abs(np.fft.rfft((squared - squared.mean()) * hann)), kurtosis


@pytest.mark.parametrize(("rate_hz", "seed"), [(12000.0, 0), (10240.0, 1), (25600.0, 2)])
def test_envelopes_at_the_bands_own_rate_equal_the_full_rate_computation(rate_hz: float, seed: int) -> None:
    """The analytic signal of each band is computed from its own lines only (an FFT of ~2K points, not n):
    every line of the squared envelope's spectrum and its kurtosis are those of the n-point definition."""
    x = faulty("bpfi", 1797.0, rate_hz, seed=seed) + 0.3 * np.random.default_rng(seed).standard_normal(4096)
    variants = np.fft.rfft(x)[None, None, :]  # one variant, one row
    n = len(x)
    for which, _rows, spectra, kurtosis in _squared_envelope_spectra(SPEC, variants, n, np.array([rate_hz])):
        for j, b in enumerate(which):
            reference, kurt = _squared_envelope_spectrum_n_points(x, rate_hz, *SPEC.evidence_bands_hz[b])
            ours = spectra[0, j, 0]
            assert len(ours) < len(reference)  # the point: a shorter transform ...
            top = np.abs(reference).max()
            np.testing.assert_allclose(ours, reference[: len(ours)], atol=1e-9 * top)  # ... the same lines
            np.testing.assert_allclose(reference[len(ours) :], 0.0, atol=1e-9 * top)  # nothing beyond them
            assert kurtosis[0, j, 0] == pytest.approx(kurt, rel=1e-9)


def test_local_background_is_the_median_of_each_lines_own_bins() -> None:
    rng = np.random.default_rng(3)
    ses = rng.exponential(size=(3, 2, 600))
    targets = np.array([1.0, 3.585, 5.415, 9.43, 10.83])
    df, shaft = np.array([2.93, 2.5]), np.array([29.95, 20.0])
    index, zone, background = _line_bins(df, shaft, targets, 600)
    db = _local_peak_db(ses, index, zone, background)
    for b, r, i in np.ndindex(db.shape):
        near = ses[b, r, index[r, i]]
        peak, level = near[zone[r, i]].max(), np.median(near[background[r, i]])
        assert db[b, r, i] == pytest.approx(20 * np.log10(peak / level), abs=1e-12)
        # The zone holds the line, the background the bins around it up to max(10 bins, shaft / 2, 2 zones).
        f = targets[i] * shaft[r]
        assert np.all(np.abs(index[r, i][zone[r, i]] * df[r] - f) <= max(1.5 * df[r], 0.02 * f))
    assert len(np.unique(background.sum(axis=2))) > 1  # lines of different widths, odd and even counts
