"""A simulated rotating machine (motor-driven pump on rolling bearings): vibration and process values.

Pure and deterministic: every value is a function of (profile, faults, seed, absolute time since the
start of the run). Blocks of any size starting anywhere therefore tile into one continuous signal, and
a rerun with the same seed reproduces a run bit for bit.

Vibration (acceleration, g) = shaft 1x and 2x + broadband noise + bearing-defect impacts, each impact
ringing the structural resonance (an exponentially decaying sinusoid), as seen on real accelerometers.
Bearing defect frequencies are the classic multipliers of the shaft frequency (defaults: the SKF 6205
of the CWRU bearing data set).

The profile and fault records stay in one module with the signal model (a little over 400 lines): they are
checked against the same fault kinds, sensors and constants the model renders, and the simulator, the
training data, the tests and the benchmarks import them together from here.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from pdm_tools.simulator import noise

BEARING_KINDS = ("bearing_outer", "bearing_inner", "bearing_ball")
FAULT_KINDS = (*BEARING_KINDS, "imbalance", "overheating", "sensor_stuck", "dropout")
SENSORS = ("vibration", "process")
PROCESS_FIELDS = ("temperature", "current", "pressure", "rpm")

# Sensor that each fault kind shows up on; sensor_stuck and dropout name it explicitly.
_IMPLIED_SENSOR = {kind: "vibration" for kind in (*BEARING_KINDS, "imbalance")} | {"overheating": "process"}

# At full severity the 1x amplitude is 1 + 4 = 5 times the healthy one (well into ISO 10816 zone D).
_IMBALANCE_GAIN = 4.0
_OVERHEAT_C = 25.0
_OVERHEAT_CURRENT = 0.15
# Rolling elements slip, so impacts are not exactly periodic: ±1 % of the period, uniform.
_IMPACT_JITTER = 0.01
# Impact-to-impact amplitude spread (relative std).
_IMPACT_SPREAD = 0.15
# Depth of the amplitude modulation of inner-race (shaft rate) and ball (cage rate) impacts.
_MODULATION_DEPTH = 0.7
# An impact's ring is rendered for this many decay time constants (exp(-10) ~ 5e-5 of its peak).
_RING_TIME_CONSTANTS = 10.0
# Process values are drawn on a 1 ms grid: the same reading time always gives the same values.
_PROCESS_GRID_HZ = 1000.0

# Independent noise streams (see ``noise``); bearing streams are offset by the fault's index.
_S_VIBRATION = 1
_S_TEMPERATURE = 2
_S_CURRENT = 3
_S_PRESSURE = 4
_S_FAULT_BASE = 100


class ParameterError(ValueError):
    """An invalid profile or fault parameter; ``field`` names it so a config loader can give a key path."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


# Profile fields that may be zero (a noiseless or perfectly steady machine); all others must be > 0.
_MAY_BE_ZERO = frozenset(
    {"harmonic_2x", "noise_g", "temperature_noise_c", "current_noise_a", "pressure_noise_bar", "rpm_wander"}
)


@dataclass(frozen=True, slots=True)
class MachineProfile:
    """Nominal behaviour of one healthy machine. Units are in the names; amplitudes in g."""

    name: str
    rpm: float = 1797.0
    rate_hz: float = 10240.0
    temperature_c: float = 55.0
    current_a: float = 12.0
    pressure_bar: float = 3.0
    shaft_g: float = 0.05
    harmonic_2x: float = 0.25
    noise_g: float = 0.02
    temperature_noise_c: float = 0.05
    current_noise_a: float = 0.05
    pressure_noise_bar: float = 0.01
    rpm_wander: float = 0.002
    bpfi: float = 5.4152
    bpfo: float = 3.5848
    bsf: float = 4.7135
    ftf: float = 0.39828
    resonance_hz: float = 3000.0
    resonance_damping: float = 0.05
    impact_g: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ParameterError("name", f"expected a non-empty string, got {self.name!r}")
        for f in dataclasses.fields(self):
            if f.name == "name":
                continue
            value = getattr(self, f.name)
            _check_number(f.name, value, minimum=0.0, strict=f.name not in _MAY_BE_ZERO)
            # YAML gives ints for round numbers; store floats so equal profiles compare and print alike.
            object.__setattr__(self, f.name, float(value))
        if self.rpm_wander >= 0.05:
            raise ParameterError("rpm_wander", f"must be < 0.05 (relative), got {self.rpm_wander}")
        if self.resonance_damping >= 1:
            raise ParameterError("resonance_damping", f"must be < 1 (damping ratio), got {self.resonance_damping}")
        if self.resonance_hz >= self.rate_hz / 2:
            raise ParameterError(
                "resonance_hz", f"must be below Nyquist ({self.rate_hz / 2} Hz), got {self.resonance_hz}"
            )

    @property
    def shaft_hz(self) -> float:
        return self.rpm / 60.0

    def defect_hz(self, kind: str) -> float:
        """Nominal characteristic frequency of a bearing fault kind (Hz)."""
        multiplier = {"bearing_outer": self.bpfo, "bearing_inner": self.bpfi, "bearing_ball": self.bsf}
        if kind not in multiplier:
            raise ValueError(f"not a bearing fault kind: {kind!r}")
        return multiplier[kind] * self.shaft_hz


@dataclass(frozen=True, slots=True)
class Fault:
    """A fault injected into one machine from ``start_s`` to ``end_s`` (None: to the end), run time.

    Bearing, imbalance and overheating faults grow linearly from nothing at ``start_s`` to ``severity``
    at ``start_s + ramp_s``; sensor_stuck and dropout act fully at once on ``sensor``. For the other
    kinds ``sensor`` is filled in with the sensor the fault shows up on.
    """

    machine: str
    kind: str
    start_s: float
    end_s: float | None = None
    severity: float = 1.0
    sensor: str | None = None
    ramp_s: float = 10.0

    def __post_init__(self) -> None:
        if not isinstance(self.machine, str) or not self.machine:
            raise ParameterError("machine", f"expected a non-empty string, got {self.machine!r}")
        if self.kind not in FAULT_KINDS:
            raise ParameterError("kind", f"expected one of {', '.join(FAULT_KINDS)}, got {self.kind!r}")
        _check_number("start_s", self.start_s, minimum=0.0)
        if self.end_s is not None:
            _check_number("end_s", self.end_s, minimum=0.0)
            if self.end_s <= self.start_s:
                raise ParameterError("end_s", f"must be after start_s ({self.start_s}), got {self.end_s}")
        _check_number("severity", self.severity, minimum=0.0)
        if not 0 < self.severity <= 1:
            raise ParameterError("severity", f"must be in (0, 1], got {self.severity}")
        _check_number("ramp_s", self.ramp_s, minimum=0.0)
        if self.kind in ("sensor_stuck", "dropout"):
            object.__setattr__(self, "ramp_s", 0.0)  # they act at once; keep the record truthful
        for name in ("start_s", "end_s", "severity", "ramp_s"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, float(value))
        implied = _IMPLIED_SENSOR.get(self.kind)
        if implied is None:
            if self.sensor not in SENSORS:
                raise ParameterError(
                    "sensor", f"{self.kind} needs sensor one of {', '.join(SENSORS)}, got {self.sensor!r}"
                )
        elif self.sensor is None:
            object.__setattr__(self, "sensor", implied)
        elif self.sensor != implied:
            raise ParameterError("sensor", f"{self.kind} affects {implied!r}, got {self.sensor!r}")

    def active(self, t_s: float) -> bool:
        return self.start_s <= t_s and (self.end_s is None or t_s < self.end_s)

    def level(self, t_s: np.ndarray) -> np.ndarray:
        """Severity at each time (float64, same shape): 0 outside the fault, linear ramp at first."""
        t = np.asarray(t_s, dtype=np.float64)
        inside = t >= self.start_s
        if self.end_s is not None:
            inside &= t < self.end_s
        if self.ramp_s == 0:
            return np.where(inside, self.severity, 0.0)
        growth = np.clip((t - self.start_s) / self.ramp_s, 0.0, 1.0)
        return np.where(inside, self.severity * growth, 0.0)


def _check_number(field: str, value: object, minimum: float, strict: bool = False) -> None:
    """A finite real number >= ``minimum`` (> if ``strict``); bool is refused although it is an int."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ParameterError(field, f"expected a finite number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise ParameterError(field, f"must be {'>' if strict else '>='} {minimum:g}, got {value}")


def machine_name(index: int) -> str:
    """Name of the ``index``-th machine (0-based): ``m01``, ``m02``, ..."""
    return f"m{index + 1:02d}"


def fleet_profile(index: int, seed: int, base: MachineProfile | None = None, vary: bool = True) -> MachineProfile:
    """Profile of machine ``index`` of a fleet of nominally identical machines.

    Real units of one type differ a little (slip, mounting, sensor placement, cooling), so with ``vary``
    each one gets small deterministic offsets from ``base``; the same (index, seed) always gives the same
    machine, whatever the fleet size.
    """
    name = machine_name(index)
    base = dataclasses.replace(base, name=name) if base is not None else MachineProfile(name=name)
    if not vary:
        return base
    rng = np.random.default_rng([seed % 2**63, index, 0x5EED])

    def scaled(value: float, spread: float) -> float:
        return float(value * rng.uniform(1 - spread, 1 + spread))

    return dataclasses.replace(
        base,
        rpm=scaled(base.rpm, 0.01),
        temperature_c=float(base.temperature_c + rng.uniform(-4.0, 4.0)),
        current_a=scaled(base.current_a, 0.08),
        pressure_bar=scaled(base.pressure_bar, 0.05),
        shaft_g=scaled(base.shaft_g, 0.3),
        harmonic_2x=scaled(base.harmonic_2x, 0.4),
        noise_g=scaled(base.noise_g, 0.2),
        resonance_hz=min(scaled(base.resonance_hz, 0.1), 0.45 * base.rate_hz),
    )


class SimulatedMachine:
    """Signals of one machine under a set of faults; ``seed`` and the machine name pick the noise."""

    def __init__(self, profile: MachineProfile, faults: Iterable[Fault] = (), seed: int = 0) -> None:
        self.profile = profile
        self.faults = tuple(faults)
        for fault in self.faults:
            if fault.machine != profile.name:
                raise ValueError(f"fault for machine {fault.machine!r} given to machine {profile.name!r}")
        name_id = zlib.crc32(profile.name.encode("utf-8"))
        self._key = noise.key(seed, name_id)
        # Static random parameters (phases, wander) come from a seeded generator once, at construction.
        rng = np.random.default_rng([seed % 2**63, name_id])
        self._f0 = profile.shaft_hz
        # Speed wander: three slow sinusoids whose peaks add up to rpm_wander (stationary, so a healthy
        # machine never drifts away from its training data).
        self._wander_amp = profile.rpm_wander * rng.dirichlet(np.ones(3))
        self._wander_hz = rng.uniform(0.02, 0.2, 3)
        self._wander_phase = rng.uniform(0.0, 2 * np.pi, 3)
        self._phase_1x, self._phase_2x = rng.uniform(0.0, 2 * np.pi, 2)
        # Slow load variation of the process (periods of minutes), again stationary.
        self._load_hz = 1.0 / rng.uniform(180.0, 900.0, 2)
        self._load_phase = rng.uniform(0.0, 2 * np.pi, 2)
        # Where each bearing defect sits (fraction of a defect period) and its modulation phase.
        self._fault_offset = rng.uniform(0.0, 1.0, len(self.faults))
        self._fault_mod_phase = rng.uniform(0.0, 2 * np.pi, len(self.faults))
        self._decay = 2 * np.pi * profile.resonance_hz * profile.resonance_damping
        self._stuck_values: dict[int, float] = {}

    # -- public API ------------------------------------------------------------------------------------

    def vibration(self, t0_s: float, n: int) -> np.ndarray:
        """Acceleration (g), float32 ``(n,)``, of samples ``round(t0_s * rate_hz) + 0..n-1``."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rate = self.profile.rate_hz
        i0 = round(t0_s * rate)
        index = np.arange(i0, i0 + n, dtype=np.int64)
        x = self._vibration_signal(index)
        for number, fault in enumerate(self.faults):
            if fault.kind == "sensor_stuck" and fault.sensor == "vibration":
                stuck = fault.level(index / rate) > 0
                if stuck.any():
                    x[stuck] = self._stuck_vibration(number, fault)
        return x.astype(np.float32)

    def process(self, t_s: float) -> dict[str, float] | None:
        """Temperature (C), current (A), pressure (bar) at ``t_s``; None during a process dropout."""
        if not self.publishes("process", t_s):
            return None
        for fault in self.faults:
            if fault.kind == "sensor_stuck" and fault.sensor == "process" and fault.active(t_s):
                return self._process_values(fault.start_s)
        return self._process_values(t_s)

    def publishes(self, sensor: str, t_s: float) -> bool:
        """False while a dropout fault silences ``sensor`` (the gateway then publishes nothing)."""
        return not any(f.kind == "dropout" and f.sensor == sensor and f.active(t_s) for f in self.faults)

    def active_faults(self, t_s: float) -> list[Fault]:
        return [f for f in self.faults if f.active(t_s)]

    # -- vibration -------------------------------------------------------------------------------------

    def _revolutions(self, t: np.ndarray) -> np.ndarray:
        """Shaft revolutions since t=0: the integral of the wandering speed, in closed form."""
        w = 2 * np.pi * self._wander_hz
        turns = t.copy()
        for amp, omega, phase in zip(self._wander_amp, w, self._wander_phase, strict=True):
            turns += amp / omega * (np.sin(omega * t + phase) - np.sin(phase))
        return self._f0 * turns

    def _shaft_hz(self, t: np.ndarray) -> np.ndarray:
        w = 2 * np.pi * self._wander_hz
        factor = np.ones_like(t)
        for amp, omega, phase in zip(self._wander_amp, w, self._wander_phase, strict=True):
            factor += amp * np.cos(omega * t + phase)
        return self._f0 * factor

    def _time_of(self, revolutions: np.ndarray) -> np.ndarray:
        """Inverse of ``_revolutions`` (Newton; the wander is below 5 %, so a few steps are exact)."""
        t = revolutions / self._f0
        for _ in range(4):
            t = t - (self._revolutions(t) - revolutions) / self._shaft_hz(t)
        return t

    def _vibration_signal(self, index: np.ndarray) -> np.ndarray:
        p = self.profile
        t = index / p.rate_hz
        theta = 2 * np.pi * self._revolutions(t)
        gain = np.ones_like(t)
        for fault in self.faults:
            if fault.kind == "imbalance":
                gain += _IMBALANCE_GAIN * fault.level(t)
        x = p.shaft_g * gain * np.sin(theta + self._phase_1x)
        x += p.shaft_g * p.harmonic_2x * np.sin(2 * theta + self._phase_2x)
        x += p.noise_g * noise.normal(self._key, _S_VIBRATION, index)
        for number, fault in enumerate(self.faults):
            if fault.kind in BEARING_KINDS:
                x += self._impacts(number, fault, index)
        return x

    def _impacts(self, number: int, fault: Fault, index: np.ndarray) -> np.ndarray:
        """Resonance rings of the bearing-defect impacts that reach samples ``index``."""
        p = self.profile
        n = len(index)
        out = np.zeros(n)
        if n == 0:
            return out
        rate = p.rate_hz
        ring_s = _RING_TIME_CONSTANTS / self._decay
        t_first, t_last = index[0] / rate, index[-1] / rate
        lo = max(t_first - ring_s, fault.start_s)
        hi = t_last if fault.end_s is None else min(t_last, fault.end_s)
        if hi < lo:
            return out
        multiplier = {"bearing_outer": p.bpfo, "bearing_inner": p.bpfi, "bearing_ball": p.bsf}[fault.kind]
        offset = self._fault_offset[number]
        # Impact k happens when the shaft has turned (k + offset) / multiplier revolutions; one extra
        # impact on each side covers the jitter.
        bounds = self._revolutions(np.array([lo, hi])) * multiplier - offset
        k = np.arange(math.floor(bounds[0]) - 1, math.ceil(bounds[1]) + 2, dtype=np.int64)
        t_k = self._time_of((k + offset) / multiplier)
        stream = _S_FAULT_BASE + 4 * number
        t_k += _IMPACT_JITTER / (multiplier * self._f0) * (2 * noise.uniform(self._key, stream, k) - 1)
        amplitude = p.impact_g * fault.level(t_k)
        amplitude *= np.maximum(0.0, 1 + _IMPACT_SPREAD * noise.normal(self._key, stream + 1, k))
        if fault.kind != "bearing_outer":
            # The outer race is fixed in the load zone; an inner-race defect turns with the shaft and a
            # ball with the cage, so their impacts are amplitude-modulated at those rates.
            mod_turns = self._revolutions(t_k) * (1.0 if fault.kind == "bearing_inner" else p.ftf)
            swing = 0.5 * (1 + np.cos(2 * np.pi * mod_turns + self._fault_mod_phase[number]))
            amplitude *= 1 - _MODULATION_DEPTH + _MODULATION_DEPTH * swing
        keep = (amplitude > 0) & (t_k <= t_last) & (t_k > t_first - ring_s)
        t_k, amplitude = t_k[keep], amplitude[keep]
        if len(t_k) == 0:
            return out
        ring_len = math.ceil(ring_s * rate) + 1
        sample = np.ceil(t_k * rate).astype(np.int64)[:, None] + np.arange(ring_len)[None, :]
        tau = sample / rate - t_k[:, None]
        ring = amplitude[:, None] * np.exp(-self._decay * tau) * np.sin(2 * np.pi * p.resonance_hz * tau)
        position = sample - index[0]
        inside = (position >= 0) & (position < n)
        out += np.bincount(position[inside], weights=ring[inside], minlength=n)
        return out

    def _stuck_vibration(self, number: int, fault: Fault) -> float:
        """The reading the sensor froze at: the signal at the first sample of the fault."""
        if number not in self._stuck_values:
            first = np.array([math.ceil(fault.start_s * self.profile.rate_hz)], dtype=np.int64)
            self._stuck_values[number] = float(self._vibration_signal(first)[0])
        return self._stuck_values[number]

    # -- process ---------------------------------------------------------------------------------------

    def _process_values(self, t_s: float) -> dict[str, float]:
        p = self.profile
        index = np.array([round(t_s * _PROCESS_GRID_HZ)], dtype=np.int64)
        t = np.array([t_s])
        loads = [np.sin(2 * np.pi * hz * t_s + ph) for hz, ph in zip(self._load_hz, self._load_phase, strict=True)]
        overheat = sum((f.level(t)[0] for f in self.faults if f.kind == "overheating"), 0.0)
        temperature = p.temperature_c + 0.4 * loads[0] + _OVERHEAT_C * overheat
        temperature += p.temperature_noise_c * noise.normal(self._key, _S_TEMPERATURE, index)[0]
        current = p.current_a * (1 + 0.01 * loads[0]) * (1 + _OVERHEAT_CURRENT * overheat)
        current += p.current_noise_a * noise.normal(self._key, _S_CURRENT, index)[0]
        pressure = p.pressure_bar * (1 + 0.005 * loads[1])
        pressure += p.pressure_noise_bar * noise.normal(self._key, _S_PRESSURE, index)[0]
        # The gateway also reports shaft speed (a tachometer or the drive): the defect classifier's bearing
        # frequencies follow it.
        rpm = 60.0 * self._shaft_hz(t)[0]
        return {
            "temperature": float(temperature),
            "current": float(current),
            "pressure": float(pressure),
            "rpm": float(rpm),
        }
