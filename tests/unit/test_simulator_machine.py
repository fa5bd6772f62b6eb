"""The simulated machine: deterministic, continuous, and faults leave their physical signature."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pdm_tools.simulator.machine import (
    BEARING_KINDS,
    Fault,
    MachineProfile,
    ParameterError,
    SimulatedMachine,
    fleet_profile,
    machine_name,
)

PROFILE = MachineProfile(name="m01")
RATE = PROFILE.rate_hz


def kurtosis(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64) - np.mean(x)
    return float(np.mean(x**4) / np.mean(x**2) ** 2)


def envelope_spectrum(x: np.ndarray, rate_hz: float, band_hz: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Amplitude spectrum of the envelope of ``x`` band-passed around the structural resonance."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    spectrum = np.fft.fft(x - x.mean())
    freqs = np.fft.fftfreq(n, 1 / rate_hz)
    # Analytic signal restricted to the band: keep positive frequencies in the band, doubled.
    analytic = np.where((freqs >= band_hz[0]) & (freqs <= band_hz[1]), 2 * spectrum, 0)
    envelope = np.abs(np.fft.ifft(analytic))
    amplitude = np.abs(np.fft.rfft(envelope - envelope.mean())) / n
    return np.fft.rfftfreq(n, 1 / rate_hz), amplitude


def reading(machine: SimulatedMachine, t_s: float) -> dict[str, float]:
    values = machine.process(t_s)
    assert values is not None
    return values


def amplitude_at(x: np.ndarray, rate_hz: float, hz: float) -> float:
    """Peak amplitude of the sinusoid near ``hz`` (Hann window, +-1 bin)."""
    window = np.hanning(len(x))
    spectrum = np.abs(np.fft.rfft(x * window)) * 2 / window.sum()
    freqs = np.fft.rfftfreq(len(x), 1 / rate_hz)
    near = np.abs(freqs - hz) <= 1.5 * (freqs[1] - freqs[0])
    return float(spectrum[near].max())


def test_same_seed_gives_identical_data_and_other_seeds_or_machines_do_not() -> None:
    faults = [Fault("m01", "bearing_inner", start_s=1.0, ramp_s=2.0)]
    a = SimulatedMachine(PROFILE, faults, seed=7)
    b = SimulatedMachine(PROFILE, faults, seed=7)
    assert np.array_equal(a.vibration(2.0, 4096), b.vibration(2.0, 4096))
    assert a.process(3.0) == b.process(3.0)
    other_seed = SimulatedMachine(PROFILE, faults, seed=8)
    assert not np.array_equal(a.vibration(2.0, 4096), other_seed.vibration(2.0, 4096))
    other_machine = SimulatedMachine(dataclasses.replace(PROFILE, name="m02"), seed=7)
    assert not np.array_equal(SimulatedMachine(PROFILE, seed=7).vibration(0, 512), other_machine.vibration(0, 512))


def test_vibration_blocks_tile_exactly_into_one_continuous_signal() -> None:
    # Impacts ring across block boundaries and the fault ramps during the span: blocks of any size
    # must still concatenate into exactly the signal of one long call.
    machine = SimulatedMachine(PROFILE, [Fault("m01", "bearing_outer", start_s=0.3, ramp_s=0.5)], seed=3)
    whole = machine.vibration(0.25, 12 * 1000)
    for block in (1000, 777, 2048):
        starts = range(0, len(whole), block)
        parts = [machine.vibration(0.25 + s / RATE, min(block, len(whole) - s)) for s in starts]
        assert np.array_equal(np.concatenate(parts), whole)


def test_vibration_is_float32_in_g_with_a_plausible_healthy_level() -> None:
    x = SimulatedMachine(PROFILE, seed=1).vibration(5.0, 10240)
    assert x.dtype == np.float32 and x.shape == (10240,)
    rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
    expected = np.sqrt(PROFILE.shaft_g**2 * (1 + PROFILE.harmonic_2x**2) / 2 + PROFILE.noise_g**2)
    assert rms == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("kind", BEARING_KINDS)
def test_bearing_fault_puts_envelope_energy_at_its_defect_frequency(kind: str) -> None:
    seconds = 4
    faulty = SimulatedMachine(PROFILE, [Fault("m01", kind, start_s=0.0, severity=0.5, ramp_s=0.0)], seed=2)
    healthy = SimulatedMachine(PROFILE, seed=2)
    band = (PROFILE.resonance_hz - 800, PROFILE.resonance_hz + 800)
    freqs, env = envelope_spectrum(faulty.vibration(10.0, int(seconds * RATE)), RATE, band)
    _, env_healthy = envelope_spectrum(healthy.vibration(10.0, int(seconds * RATE)), RATE, band)
    defect_hz = PROFILE.defect_hz(kind)
    search = (freqs > 5) & (freqs < 400)
    peak_hz = freqs[search][np.argmax(env[search])]
    assert abs(peak_hz - defect_hz) <= 2 * (freqs[1] - freqs[0])
    at_defect = np.abs(freqs - defect_hz) <= 2 * (freqs[1] - freqs[0])
    assert env[at_defect].max() > 10 * env_healthy[at_defect].max()


def test_bearing_outer_fault_raises_kurtosis_and_grows_over_its_ramp() -> None:
    fault = Fault("m01", "bearing_outer", start_s=10.0, severity=1.0, ramp_s=20.0)
    machine = SimulatedMachine(PROFILE, [fault], seed=4)
    n = int(2 * RATE)
    # Before its start a fault changes nothing: labelled data stay healthy up to the ground-truth time.
    assert np.array_equal(machine.vibration(5.0, n), SimulatedMachine(PROFILE, seed=4).vibration(5.0, n))
    before = kurtosis(machine.vibration(5.0, n))
    early = machine.vibration(12.0, n).astype(np.float64)
    late = machine.vibration(40.0, n).astype(np.float64)
    assert before < 3.2  # sinusoids + gaussian noise: not impulsive
    assert kurtosis(late) > 2 * before
    assert np.sqrt(np.mean(late**2)) > np.sqrt(np.mean(early**2))
    assert np.max(np.abs(late)) > 2 * np.max(np.abs(early))


def test_imbalance_raises_the_shaft_1x_amplitude() -> None:
    n = int(4 * RATE)
    healthy = SimulatedMachine(PROFILE, seed=5).vibration(20.0, n)
    faulty = SimulatedMachine(PROFILE, [Fault("m01", "imbalance", 10.0, severity=0.5, ramp_s=0)], seed=5)
    x = faulty.vibration(20.0, n)
    one_x = PROFILE.shaft_hz
    assert amplitude_at(healthy, RATE, one_x) == pytest.approx(PROFILE.shaft_g, rel=0.1)
    assert amplitude_at(x, RATE, one_x) == pytest.approx(3 * PROFILE.shaft_g, rel=0.1)
    # 2x is untouched: imbalance is a once-per-revolution force.
    assert amplitude_at(x, RATE, 2 * one_x) == pytest.approx(amplitude_at(healthy, RATE, 2 * one_x), rel=0.1)


def test_overheating_ramps_temperature_up_and_raises_current() -> None:
    fault = Fault("m01", "overheating", start_s=100.0, end_s=300.0, severity=1.0, ramp_s=60.0)
    machine = SimulatedMachine(PROFILE, [fault], seed=6)
    healthy = SimulatedMachine(PROFILE, seed=6)
    assert machine.process(99.0) == healthy.process(99.0)
    assert machine.process(301.0) == healthy.process(301.0)
    mid, full, base = reading(machine, 130.0), reading(machine, 200.0), reading(healthy, 200.0)
    assert full["temperature"] - base["temperature"] == pytest.approx(25.0)
    assert 10.0 < mid["temperature"] - reading(healthy, 130.0)["temperature"] < 15.0
    assert full["current"] == pytest.approx(base["current"] * 1.15, rel=0.02)
    assert full["pressure"] == base["pressure"]


def test_process_dropout_returns_none_and_vibration_dropout_stops_publishing() -> None:
    faults = [
        Fault("m01", "dropout", start_s=10.0, end_s=20.0, sensor="process"),
        Fault("m01", "dropout", start_s=30.0, sensor="vibration"),
    ]
    machine = SimulatedMachine(PROFILE, faults, seed=1)
    assert machine.process(9.0) is not None
    assert machine.process(10.0) is None and machine.process(19.5) is None
    assert machine.process(20.0) is not None
    assert machine.publishes("vibration", 29.9) and not machine.publishes("vibration", 30.0)
    assert machine.publishes("process", 30.0)
    assert machine.vibration(31.0, 16).shape == (16,)  # the signal exists; the gateway drops it


def test_stuck_sensors_repeat_the_value_at_fault_start() -> None:
    faults = [
        Fault("m01", "sensor_stuck", start_s=1.0, end_s=2.0, sensor="vibration"),
        Fault("m01", "sensor_stuck", start_s=50.0, sensor="process"),
    ]
    machine = SimulatedMachine(PROFILE, faults, seed=9)
    x = machine.vibration(0.5, int(2 * RATE))  # 0.5 s .. 2.5 s
    stuck = x[int(0.5 * RATE) : int(1.5 * RATE)]
    assert np.all(stuck == stuck[0])
    assert np.unique(x[: int(0.5 * RATE)]).size > 1000 and np.unique(x[int(1.5 * RATE) :]).size > 1000
    frozen = machine.process(50.0)
    assert machine.process(80.0) == frozen and machine.process(120.0) == frozen
    assert machine.process(49.0) != frozen


def test_healthy_machine_is_statistically_stationary() -> None:
    # An anomaly model trained on the first minutes must not see later healthy data as new.
    machine = SimulatedMachine(PROFILE, seed=11)
    n = int(RATE)
    rms = [np.sqrt(np.mean(machine.vibration(t, n).astype(np.float64) ** 2)) for t in range(0, 3600, 300)]
    kurt = [kurtosis(machine.vibration(t, n)) for t in range(0, 3600, 300)]
    assert np.ptp(rms) / np.mean(rms) < 0.05
    assert np.ptp(kurt) < 0.3
    temps = np.array([reading(machine, float(t))["temperature"] for t in range(0, 3600, 10)])
    assert np.ptp(temps) < 2.0
    first, second = temps[: len(temps) // 2], temps[len(temps) // 2 :]
    assert abs(first.mean() - second.mean()) < 0.5


def test_active_faults_follow_start_and_end() -> None:
    fault = Fault("m01", "imbalance", start_s=5.0, end_s=8.0)
    machine = SimulatedMachine(PROFILE, [fault], seed=0)
    assert machine.active_faults(4.99) == []
    assert machine.active_faults(5.0) == [fault]
    assert machine.active_faults(8.0) == []


def test_fleet_profiles_differ_a_little_and_do_not_depend_on_fleet_size() -> None:
    fleet = [fleet_profile(i, seed=42) for i in range(4)]
    assert [p.name for p in fleet] == ["m01", "m02", "m03", "m04"] == [machine_name(i) for i in range(4)]
    assert len({p.rpm for p in fleet}) == 4
    assert all(abs(p.rpm / PROFILE.rpm - 1) <= 0.01 for p in fleet)
    assert fleet_profile(2, seed=42) == fleet[2]
    assert fleet_profile(2, seed=42, vary=False) == MachineProfile(name="m03")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kind": "bearing_cage"}, "kind"),
        ({"severity": 1.5}, "severity"),
        ({"end_s": 1.0}, "end_s"),
        ({"kind": "dropout"}, "sensor"),
        ({"kind": "imbalance", "sensor": "process"}, "sensor"),
        ({"start_s": float("nan")}, "start_s"),
    ],
)
def test_invalid_fault_names_the_field(kwargs: dict[str, object], field: str) -> None:
    values: dict[str, object] = {"machine": "m01", "kind": "bearing_outer", "start_s": 2.0} | kwargs
    with pytest.raises(ParameterError) as info:
        Fault(**values)  # type: ignore[arg-type]
    assert info.value.field == field


def test_invalid_profile_names_the_field() -> None:
    with pytest.raises(ParameterError, match=r"^resonance_hz: must be below Nyquist"):
        MachineProfile(name="m01", rate_hz=4000.0)
    with pytest.raises(ParameterError, match=r"^rpm: must be > 0"):
        MachineProfile(name="m01", rpm=0)


def test_fault_for_another_machine_is_refused() -> None:
    with pytest.raises(ValueError, match="m02"):
        SimulatedMachine(PROFILE, [Fault("m02", "imbalance", 0.0)])
