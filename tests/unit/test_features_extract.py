"""Feature extraction checked against numpy/scipy computed directly, one window and in batches."""

from __future__ import annotations

import dataclasses
import doctest
import itertools

import numpy as np
import pytest
from scipy import signal, stats

from agent.features import process as process_module
from agent.features import vibration as vibration_module
from agent.features.extract import extract, extract_matrix
from agent.features.spec import FEATURE_CODE_VERSION, FeatureSpec
from agent.features.vibration import BAND_POWER_EPS
from agent.records import NS_PER_S, Source, Window

RATE = 10240.0
EDGES = (0, 100, 500, 1000, 2000, 3000, 5000)
VIB = FeatureSpec("vibration", 4096, 2048, ("value",), EDGES)
PROC = FeatureSpec("process", 50, 10, ("temperature", "current", "pressure"))
SRC = Source.of(machine="m1", sensor="vibration")


def vib_window(x: np.ndarray, rate: float = RATE, source: Source = SRC) -> Window:
    n = len(x)
    return Window(
        source=source,
        kind="vibration",
        start_ns=0,
        end_ns=round((n - 1) * NS_PER_S / rate),
        channels=("value",),
        data=np.asarray(x, dtype=np.float64)[None, :],
        times_s=np.arange(n) / rate,
        rate_hz=rate,
    )


def proc_window(y: np.ndarray, t: np.ndarray, channels: tuple[str, ...] = PROC.channels) -> Window:
    return Window(
        source=Source.of(machine="m1", sensor="process"),
        kind="process",
        start_ns=0,
        end_ns=round(t[-1] * NS_PER_S),
        channels=channels,
        data=np.asarray(y, dtype=np.float64),
        times_s=np.asarray(t, dtype=np.float64),
    )


def features(spec: FeatureSpec, window: Window) -> dict[str, float]:
    fv = extract(spec, window)
    return dict(zip(fv.names, fv.values.tolist(), strict=True))


def band_power_reference(x: np.ndarray, rate: float, lo: float, hi: float, last: bool) -> float:
    """Band power from scipy's one-sided Hann periodogram (density), integrated over the band."""
    f, pxx = signal.periodogram(x, fs=rate, window="hann", detrend="constant", scaling="density")
    inside = (f >= lo) & ((f <= hi) if last else (f < hi))
    return float(pxx[inside].sum() * (f[1] - f[0]))


def sine(freq_hz: float, amplitude: float, n: int = 4096, rate: float = RATE, phase: float = 0.3) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * freq_hz * np.arange(n) / rate + phase)


def test_doctests_of_the_math_helpers_pass() -> None:
    results = [doctest.testmod(module) for module in (vibration_module, process_module)]
    assert sum(r.attempted for r in results) >= 5
    assert sum(r.failed for r in results) == 0


def test_vibration_statistics_match_numpy_and_scipy() -> None:
    rng = np.random.default_rng(1)
    x = rng.exponential(0.5, 4096) - 0.2  # skewed, heavy-tailed, non-zero mean
    f = features(VIB, vib_window(x))
    rms = np.sqrt(np.mean(x**2))
    expected = {
        "rms": rms,
        "peak": np.max(np.abs(x)),
        "crest_factor": np.max(np.abs(x)) / rms,
        "kurtosis": stats.kurtosis(x, fisher=False),
        "skewness": stats.skew(x),
        "std": np.std(x),
        "mean": np.mean(x),
    }
    for name, value in expected.items():
        assert f[name] == pytest.approx(value, rel=1e-5), name
    assert f["kurtosis"] > 3  # Pearson, not excess: an exponential has 9
    assert f["skewness"] > 1


def test_kurtosis_is_pearson_three_for_gaussian_noise() -> None:
    x = np.random.default_rng(2).normal(0, 1, 4096)
    assert features(VIB, vib_window(x))["kurtosis"] == pytest.approx(3.0, abs=0.25)


def test_peak_uses_the_absolute_value() -> None:
    x = np.zeros(4096)
    x[10] = -5.0
    x[20] = 2.0
    assert features(VIB, vib_window(x))["peak"] == 5.0


def test_band_powers_match_scipy_periodogram_integrated_over_each_band() -> None:
    x = np.random.default_rng(3).normal(0, 0.3, 4096) + 1.5 + sine(1500, 0.7)
    f = features(VIB, vib_window(x))
    bands = list(itertools.pairwise(EDGES))
    for j, (lo, hi) in enumerate(bands):
        ref = band_power_reference(x, RATE, lo, hi, last=j == len(bands) - 1)
        assert f[f"band_{lo}_{hi}hz"] == pytest.approx(np.log10(ref + BAND_POWER_EPS), abs=1e-5)


@pytest.mark.parametrize(("freq", "band"), [(250.0, "band_100_500hz"), (1234.5, "band_1000_2000hz")])
def test_pure_sine_lands_in_its_band_with_power_amplitude_squared_over_two(freq: float, band: str) -> None:
    amplitude = 2.0
    f = features(VIB, vib_window(sine(freq, amplitude)))
    assert 10 ** f[band] == pytest.approx(amplitude**2 / 2, rel=0.01)
    others = [v for k, v in f.items() if k.startswith("band_") and k != band]
    assert max(others) < np.log10(amplitude**2 / 2) - 4  # leakage below 1e-4 of the power


def test_band_power_does_not_depend_on_window_length() -> None:
    short = dataclasses.replace(VIB, window_samples=1024, hop_samples=512)
    p_long = features(VIB, vib_window(sine(1500, 1.0, n=4096)))["band_1000_2000hz"]
    p_short = features(short, vib_window(sine(1500, 1.0, n=1024)))["band_1000_2000hz"]
    assert p_short == pytest.approx(p_long, abs=0.005)
    assert 10**p_long == pytest.approx(0.5, rel=0.01)


def test_band_power_does_not_depend_on_sampling_rate() -> None:
    spec = dataclasses.replace(VIB, band_edges_hz=(1000, 2000))
    at_10k = features(spec, vib_window(sine(1500, 1.0, rate=10240.0), rate=10240.0))
    at_25k = features(spec, vib_window(sine(1500, 1.0, rate=25600.0), rate=25600.0))
    assert at_10k["band_1000_2000hz"] == pytest.approx(at_25k["band_1000_2000hz"], abs=0.005)


def test_bands_covering_zero_to_nyquist_add_up_to_the_hann_weighted_variance() -> None:
    spec = dataclasses.replace(VIB, band_edges_hz=(0, 1000, 5120))
    x = np.random.default_rng(4).normal(2.0, 1.0, 4096)
    f = features(spec, vib_window(x))
    total = 10 ** f["band_0_1000hz"] + 10 ** f["band_1000_5120hz"]
    w = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(4096) / 4096)
    assert total == pytest.approx(np.sum((x - x.mean()) ** 2 * w**2) / np.sum(w**2), rel=1e-5)


def test_the_last_band_includes_its_upper_edge() -> None:
    # 5120 Hz is the Nyquist bin of a 10240 Hz window: only a closed last band holds it.
    spec = dataclasses.replace(VIB, band_edges_hz=(4000, 5120))
    x = np.cos(np.pi * np.arange(4096))  # alternating +1/-1: all power at Nyquist
    assert features(spec, vib_window(x))["band_4000_5120hz"] > -1


@pytest.mark.parametrize("level", [0.0, 0.1, -3.7, 1e6])
def test_constant_vibration_gives_finite_defined_values(level: float) -> None:
    f = features(VIB, vib_window(np.full(4096, level)))
    assert all(np.isfinite(v) for v in f.values())
    assert f["kurtosis"] == 0.0
    assert f["skewness"] == 0.0
    assert f["std"] == pytest.approx(0.0, abs=1e-9 * max(1.0, abs(level)))
    assert f["mean"] == pytest.approx(level)
    assert f["crest_factor"] == (0.0 if level == 0.0 else pytest.approx(1.0))
    for name in VIB.feature_names()[7:]:
        assert f[name] == pytest.approx(np.log10(BAND_POWER_EPS), abs=1e-3), name


def test_small_but_real_variation_is_not_treated_as_constant() -> None:
    x = 1.0 + 1e-6 * np.random.default_rng(5).normal(size=4096)
    f = features(VIB, vib_window(x))
    assert f["kurtosis"] == pytest.approx(stats.kurtosis(x, fisher=False), rel=1e-4)


def test_process_features_match_numpy_with_irregular_times() -> None:
    rng = np.random.default_rng(6)
    t = np.cumsum(rng.uniform(0.5, 1.5, 50))
    t -= t[0]
    y = np.stack([60 + 0.05 * t + rng.normal(0, 0.1, 50), 12 - 0.2 * t, rng.normal(3, 0.01, 50)])
    f = features(PROC, proc_window(y, t))
    for i, ch in enumerate(PROC.channels):
        assert f[f"{ch}_mean"] == pytest.approx(y[i].mean(), rel=1e-6)
        assert f[f"{ch}_std"] == pytest.approx(y[i].std(), rel=1e-5)
        assert f[f"{ch}_slope"] == pytest.approx(np.polyfit(t, y[i], 1)[0], rel=1e-5, abs=1e-7)
        assert f[f"{ch}_min"] == pytest.approx(y[i].min(), rel=1e-6)
        assert f[f"{ch}_max"] == pytest.approx(y[i].max(), rel=1e-6)
        assert f[f"{ch}_last"] == pytest.approx(y[i][-1], rel=1e-6)
    assert f["current_slope"] == pytest.approx(-0.2, rel=1e-5)


def test_process_slope_is_per_second_of_window_time() -> None:
    spec = FeatureSpec("process", 3, 1, ("a",))
    f = features(spec, proc_window(np.array([[10.0, 11.0, 12.0]]), np.array([0.0, 60.0, 120.0]), ("a",)))
    assert f["a_slope"] == pytest.approx(1 / 60)


def test_constant_process_values_and_equal_times_give_finite_zeros() -> None:
    spec = FeatureSpec("process", 4, 1, ("a",))
    f = features(spec, proc_window(np.full((1, 4), 5.0), np.zeros(4), ("a",)))
    assert f == {"a_mean": 5.0, "a_std": 0.0, "a_slope": 0.0, "a_min": 5.0, "a_max": 5.0, "a_last": 5.0}


def test_extract_returns_a_float32_feature_vector_tagged_with_the_spec() -> None:
    window = vib_window(np.random.default_rng(7).normal(size=4096))
    fv = extract(VIB, window)
    assert fv.window is window
    assert fv.names == VIB.feature_names()
    assert fv.values.dtype == np.float32
    assert fv.values.shape == (VIB.n_features,)
    assert fv.spec_hash == VIB.spec_hash()


def test_extract_matrix_equals_row_by_row_extract_across_mixed_rates() -> None:
    rng = np.random.default_rng(8)
    windows = [
        vib_window(rng.normal(size=4096) + sine(300 * (i + 1), 0.5, rate=rate), rate=rate)
        for i, rate in enumerate([10240.0, 25600.0, 10240.0, 12800.0, 25600.0] * 20)
    ]
    matrix = extract_matrix(VIB, windows)
    assert matrix.dtype == np.float32
    assert matrix.shape == (100, VIB.n_features)
    rows = np.stack([extract(VIB, w).values for w in windows])
    np.testing.assert_array_equal(matrix, rows)
    assert len({tuple(r) for r in matrix.tolist()}) == 100  # rows are not copies of each other


def test_extract_matrix_equals_row_by_row_extract_for_process_windows() -> None:
    rng = np.random.default_rng(9)
    windows = []
    for _ in range(7):
        t = np.cumsum(rng.uniform(0.5, 1.5, 50))
        windows.append(proc_window(rng.normal(size=(3, 50)) + t, t - t[0]))
    matrix = extract_matrix(PROC, windows)
    np.testing.assert_array_equal(matrix, np.stack([extract(PROC, w).values for w in windows]))


def test_extract_matrix_of_no_windows_is_an_empty_float32_matrix() -> None:
    matrix = extract_matrix(PROC, [])
    assert matrix.shape == (0, PROC.n_features)
    assert matrix.dtype == np.float32


def _replace(window: Window, **changes: object) -> Window:
    return dataclasses.replace(window, **changes)  # type: ignore[arg-type]


GOOD_VIB = vib_window(np.random.default_rng(10).normal(size=4096))


@pytest.mark.parametrize(
    ("window", "message"),
    [
        (_replace(GOOD_VIB, kind="process"), "kind 'process' does not match"),
        (_replace(GOOD_VIB, channels=("x",)), r"channels \['x'\] do not match"),
        (vib_window(np.zeros(2048)), r"data shape \(1, 2048\) does not match the spec \(1, 4096\)"),
        (_replace(GOOD_VIB, times_s=np.zeros(10)), "times_s shape"),
        (_replace(GOOD_VIB, rate_hz=None), "needs a positive rate_hz"),
        (_replace(GOOD_VIB, rate_hz=0.0), "needs a positive rate_hz"),
        (vib_window(np.zeros(4096), rate=8000.0), "above the Nyquist frequency 4000 Hz"),
        (vib_window(np.r_[np.zeros(4095), np.nan]), "non-finite"),
    ],
)
def test_a_window_that_does_not_match_the_spec_is_refused(window: Window, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        extract_matrix(VIB, [GOOD_VIB, window])


def test_the_error_names_the_offending_window() -> None:
    with pytest.raises(ValueError, match=r"window 1 \(Source\(tags=\(\('machine', 'm1'\)"):
        extract_matrix(VIB, [GOOD_VIB, _replace(GOOD_VIB, kind="process")])


def test_process_window_with_other_channel_order_is_refused() -> None:
    t = np.arange(50.0)
    window = proc_window(np.zeros((3, 50)), t, channels=("current", "temperature", "pressure"))
    with pytest.raises(ValueError, match="do not match the spec"):
        extract(PROC, window)


def test_a_band_narrower_than_the_bin_spacing_is_refused() -> None:
    spec = dataclasses.replace(VIB, window_samples=256, hop_samples=256, band_edges_hz=(0, 10, 20, 100))
    with pytest.raises(ValueError, match="band 10-20 Hz holds no FFT bin"):
        extract(spec, vib_window(np.zeros(256)))


def test_a_spec_of_another_feature_code_version_is_refused() -> None:
    future = dataclasses.replace(VIB, version=FEATURE_CODE_VERSION + 1)
    with pytest.raises(ValueError, match="not supported"):
        extract(future, GOOD_VIB)


def test_overflowing_features_are_refused_rather_than_returned_as_inf() -> None:
    spec = FeatureSpec("process", 2, 1, ("a",))
    window = proc_window(np.array([[-3e38, 3e38]]), np.array([0.0, 1e-3]), ("a",))
    with pytest.raises(ValueError, match="overflow float32"):
        extract(spec, window)


def _proc_with(value: float, where: str) -> Window:
    y, t = np.ones((3, 50)), np.arange(50.0)
    if where == "values":
        y[1, 17] = value
    else:
        t[33] = value
    return proc_window(y, t)


@pytest.mark.parametrize(
    ("spec", "good", "bad"),
    [
        (VIB, GOOD_VIB, vib_window(np.r_[np.inf, np.zeros(4095)])),
        (VIB, GOOD_VIB, vib_window(np.r_[np.zeros(2000), -np.inf, np.zeros(2095)])),
        (PROC, _proc_with(1.0, "values"), _proc_with(np.nan, "values")),
        (PROC, _proc_with(1.0, "values"), _proc_with(np.inf, "values")),
        (PROC, _proc_with(1.0, "values"), _proc_with(np.nan, "times")),
    ],
)
def test_a_non_finite_sample_or_time_is_refused_naming_its_window(spec: FeatureSpec, good: Window, bad: Window) -> None:
    # Extraction checks the output once per batch; every modality must turn a non-finite input into a
    # non-finite row for this to hold.
    with pytest.raises(ValueError, match=r"^window 2 \(.*\) holds non-finite values$"):
        extract_matrix(spec, [good, good, bad, good])
