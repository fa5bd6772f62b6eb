"""Commissioning baseline: label-free fit on a machine's first steps, causal scoring, ONNX export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.commissioning import (
    BaselineBank,
    CommissioningBaseline,
    CommissioningConfig,
    DetectorConfig,
    StepScore,
    fit_detector,
)
from agent.commissioning.detector import long_run_scale
from pdm_tools.models.commissioning_export import build_onnx, export_models, window_rows
from pdm_tools.quantization import static as q

N_TRAIN = 400
SHIFT_AT = 700
NS = 1_000_000_000


def _process(n: int = 1000, seed: int = 0, shift: float = 0.0) -> np.ndarray:
    """4 channels: noisy flow-like, vibration-like, a slow AR(1) temperature, a pressure; offsets and scales
    differ. From ``SHIFT_AT`` on, channel 0 drops by ``shift`` of its standard deviation."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4))
    temp = np.zeros(n)
    for t in range(1, n):
        temp[t] = 0.98 * temp[t - 1] + rng.normal(scale=0.2)
    x[:, 2] = temp
    x = x * np.array([0.5, 0.02, 1.0, 0.1]) + np.array([32.0, 0.03, 70.0, 1.0])
    x[SHIFT_AT:, 0] -= shift * 0.5
    return x


def _feed(baseline: CommissioningBaseline, x: np.ndarray) -> list[StepScore | None]:
    return [baseline.update(row, i * NS) for i, row in enumerate(x)]


def test_no_score_during_commissioning_then_every_step_scored() -> None:
    baseline = CommissioningBaseline(CommissioningConfig(commissioning_steps=N_TRAIN))
    out = _feed(baseline, _process(n=N_TRAIN + 50))
    assert all(r is None for r in out[:N_TRAIN])
    assert all(isinstance(r, StepScore) for r in out[N_TRAIN:])
    assert baseline.phase == "monitoring" and baseline.steps_seen == N_TRAIN
    first = out[N_TRAIN]
    assert first is not None and first.phase == "monitoring" and first.time_ns == N_TRAIN * NS


def test_injected_shift_is_detected_after_commissioning_and_normal_steps_are_quiet() -> None:
    baseline = CommissioningBaseline(CommissioningConfig(commissioning_steps=N_TRAIN))
    out = _feed(baseline, _process(shift=6.0))
    flags = np.array([r is not None and r.is_anomalous for r in out])
    k = baseline.config.detector.smoothing_steps
    assert not flags[N_TRAIN:SHIFT_AT].any(), "false alarm before the shift"
    assert flags[SHIFT_AT + k :].all(), "shift not held as anomalous once the window is full of it"
    assert flags[SHIFT_AT : SHIFT_AT + k].any()


def test_threshold_comes_from_commissioning_data_only() -> None:
    normal = _process(seed=1)
    shifted = _process(seed=1, shift=20.0)
    a, b = CommissioningBaseline(), CommissioningBaseline()
    _feed(a, normal)
    _feed(b, shifted)  # same first 400 steps, very different afterwards
    assert a.detector is not None and b.detector is not None
    assert a.detector.threshold == b.detector.threshold
    det = fit_detector(normal[:N_TRAIN], DetectorConfig())
    k = det.smoothing_steps
    assert det.threshold == pytest.approx(2.4 * np.max(det.score_series(normal[:N_TRAIN])[k - 1 :]))
    assert a.detector.threshold == pytest.approx(det.threshold)


def test_streaming_equals_vectorized_scores() -> None:
    x = _process(shift=4.0, seed=3)
    baseline = CommissioningBaseline()
    out = _feed(baseline, x)
    assert baseline.detector is not None
    streamed = np.array([r.score for r in out[N_TRAIN:] if r is not None])
    vectorized = baseline.detector.score_series(x)[N_TRAIN:]
    np.testing.assert_allclose(streamed, vectorized, rtol=1e-12, atol=1e-12)
    flags = np.array([r.is_anomalous for r in out[N_TRAIN:] if r is not None])
    np.testing.assert_array_equal(flags, vectorized > baseline.detector.threshold)


def test_score_is_causal() -> None:
    x = _process(seed=4)
    y = x.copy()
    y[800:] += 100.0  # changing the future must not change the past
    det = fit_detector(x[:N_TRAIN])
    np.testing.assert_array_equal(det.score_series(x)[:800], det.score_series(y)[:800])


def test_slow_channel_gets_a_wider_band_than_its_short_run_std() -> None:
    x = _process(n=N_TRAIN)
    scale = long_run_scale(x, 0.99)
    std = x.std(axis=0)
    assert scale[2] > 3 * std[2]  # AR(1) with ρ ≈ 0.98
    assert scale[0] == pytest.approx(std[0], rel=0.2)  # white noise


def test_time_based_commissioning() -> None:
    config = CommissioningConfig(commissioning_s=100.0)
    baseline = CommissioningBaseline(config)
    x = _process(n=300)
    out = [baseline.update(row, i * 2 * NS) for i, row in enumerate(x)]  # one step every 2 s
    assert baseline.phase == "monitoring"  # steps at 0, 2, 4, ... s: step 50 (t = 100 s) completes it
    assert out[50] is None and isinstance(out[51], StepScore)


@pytest.mark.parametrize(
    ("step", "time_ns", "match"),
    [
        (np.zeros(3), 10 * NS, "channels"),
        (np.array([np.nan, 0, 0, 0]), 10 * NS, "NaN"),
        (np.zeros((2, 2)), 10 * NS, "1-D"),
        (np.zeros(4), 0, "not later"),
    ],
)
def test_bad_steps_are_refused_without_changing_state(step: np.ndarray, time_ns: int, match: str) -> None:
    baseline = CommissioningBaseline()
    baseline.update(np.zeros(4), 0)
    with pytest.raises(ValueError, match=match):
        baseline.update(step, time_ns)
    assert baseline.steps_seen == 1


def test_config_is_validated_and_strict() -> None:
    with pytest.raises(ValueError, match="unknown key"):
        CommissioningConfig.from_dict({"commissioning_step": 400})
    with pytest.raises(ValueError, match="commissioning_steps"):
        CommissioningConfig(commissioning_steps=10)
    with pytest.raises(ValueError, match="threshold_factor"):
        DetectorConfig(threshold_factor=0)
    cfg = CommissioningConfig.from_dict({"commissioning_steps": 200, "smoothing_steps": 10})
    assert cfg.commissioning_steps == 200 and cfg.detector.smoothing_steps == 10
    assert CommissioningConfig.from_dict(cfg.to_dict()) == cfg


def test_bank_keeps_one_baseline_per_machine() -> None:
    bank = BaselineBank(CommissioningConfig(commissioning_steps=50, detector=DetectorConfig(smoothing_steps=5)))
    x = _process(n=60)
    for i, row in enumerate(x):
        bank.update("m1", row, i * NS)
        if i < 10:
            bank.update("m2", row * 2, i * NS)
    m1, m2 = bank.get("m1"), bank.get("m2")
    assert len(bank) == 2 and m1 is not None and m2 is not None
    assert m1.phase == "monitoring" and m2.phase == "commissioning"
    bank.reset("m1")
    assert bank.get("m1") is None


def test_onnx_export_matches_numpy_and_int8_keeps_decisions(tmp_path: Path) -> None:
    x = _process(shift=6.0, seed=5)
    det = fit_detector(x[:N_TRAIN])
    k = det.smoothing_steps
    rows = window_rows(x, k)
    reference = det.score_series(x)[k - 1 :]
    build_onnx(det)  # passes the full checker
    paths = export_models(det, x[:N_TRAIN], tmp_path, range_factor=8.0)
    fp32 = q.run_scores(q.session(paths["fp32"]), rows)
    np.testing.assert_allclose(fp32, reference, rtol=1e-4, atol=1e-4)
    int8 = q.run_scores(q.session(paths["int8"]), rows)
    agree = np.mean((int8 > det.threshold) == (reference > det.threshold))
    assert agree > 0.97
