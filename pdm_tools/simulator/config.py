"""Configuration of the gateway simulator, loaded from YAML (``config/simulator.yaml``) and validated once.

The same engine as the agent's config (``agent.config``): frozen pydantic models with unknown keys refused,
strict types and a description on every field; ``SimulatorConfigError`` reports every problem at once,
each with its key path, e.g. ``faults[0].kind: must be one of ...``. The machine profile and fault values
are checked by ``MachineProfile`` and ``Fault`` themselves (``ParameterError`` names the field).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, Field, InstanceOf, ValidationError, field_validator, model_validator

from agent.config.base import Section, StrictIntChoice, read_yaml
from agent.config.errors import ConfigError, Problems, describe, errors_of, validate_model
from agent.decode.encode import BlockEncoding
from pdm_tools.simulator.machine import FAULT_KINDS, Fault, MachineProfile, ParameterError, fleet_profile, machine_name

_PROFILE_FIELDS = tuple(f.name for f in dataclasses.fields(MachineProfile) if f.name != "name")


_M = TypeVar("_M", bound=BaseModel)


class SimulatorConfigError(ConfigError):
    """Invalid simulator configuration; ``path`` is the key path (``broker.port``, ``faults[1].kind``)."""


class BrokerConfig(Section):
    """Where to publish, and how hard to try."""

    host: str = Field("127.0.0.1", min_length=1, description="MQTT broker host.")
    port: int = Field(1883, ge=1, le=65535, description="MQTT broker port.")
    client_id: str = Field("pdm-simulator", min_length=1, description="MQTT client id of the simulated gateway.")
    protocol: Literal["mqttv5", "mqttv311"] = Field("mqttv5", description="MQTT protocol: mqttv5 or mqttv311.")
    keepalive_s: int = Field(30, ge=1, description="MQTT keepalive, seconds.")
    connect_timeout_s: float = Field(
        10.0, gt=0, description="Give up at start when the broker does not answer within this time."
    )
    ack_timeout_s: float = Field(
        10.0, gt=0, description="At the end, wait this long for outstanding QoS 1 acknowledgements."
    )
    max_inflight: int = Field(100, ge=1, description="QoS 1 messages sent but not yet acknowledged, at most.")
    max_queued: int = Field(
        1000,
        ge=1,
        description="Messages waiting in the client (e.g. while disconnected); when full, publishing waits and "
        "retries.",
    )


class TopicsConfig(Section):
    """Topics are ``{prefix}/{site}/{line}/{machine}/{sensor}`` (the agent's default template)."""

    prefix: str = Field("factory", description="First topic level.")
    site: str = Field("site1", description="Site tag (second topic level).")
    line: str = Field("line1", description="Line tag (third topic level).")

    @field_validator("prefix", "site", "line")
    @classmethod
    def _topic_level(cls, value: str) -> str:
        if not value or any(c in value for c in "/+#"):
            raise ValueError(f"one topic level without '/', '+' or '#', got {value!r}")
        return value

    def topic(self, machine: str, sensor: str) -> str:
        return f"{self.prefix}/{self.site}/{self.line}/{machine}/{sensor}"


class MachinesConfig(Section):
    """``count`` machines named m01, m02, ...; ``defaults`` and per-machine ``profiles`` set profile fields.

    ``defaults`` apply to every machine before the fleet variation (``vary``); a machine's entry in
    ``profiles`` sets exact values after it.
    """

    count: int = Field(4, ge=1, le=99, description="Machines m01..mNN.")
    vary: bool = Field(
        True,
        description="Small deterministic machine-to-machine differences (speed, levels, resonance).",
    )
    defaults: dict[str, float] = Field(
        default_factory=dict,
        description="Profile fields for every machine, e.g. {rpm: 1480, rate_hz: 25600} (the fields of "
        "MachineProfile; units in the names, amplitudes in g).",
    )
    profiles: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Exact profile fields per machine, e.g. {m03: {rpm: 2960}}."
    )

    @model_validator(mode="after")
    def _check(self) -> MachinesConfig:
        problems = Problems()
        names = self.names()
        base = _profile("defaults", self.defaults, MachineProfile(name="m01"), problems)
        for name, values in self.profiles.items():
            if name not in names:
                problems.add(f"profiles.{name}", f"no such machine (count is {self.count}: {names[0]}..{names[-1]})")
            elif base is not None:
                _profile(f"profiles.{name}", values, dataclasses.replace(base, name=name), problems)
        problems.check()
        return self

    def names(self) -> tuple[str, ...]:
        return tuple(machine_name(i) for i in range(self.count))

    def build(self, seed: int) -> tuple[MachineProfile, ...]:
        """The machine profiles of a run with ``seed``."""
        base = MachineProfile(name="m01", **self.defaults)
        out = []
        for index, name in enumerate(self.names()):
            profile = fleet_profile(index, seed, base=base, vary=self.vary)
            overrides: dict[str, Any] = dict(self.profiles.get(name, {}))
            out.append(dataclasses.replace(profile, **overrides))
        return tuple(out)


def _profile(path: str, values: Mapping[str, float], base: MachineProfile, problems: Problems) -> MachineProfile | None:
    """``base`` with ``values`` set, or None with the problems added."""
    unknown = [key for key in values if key not in _PROFILE_FIELDS]
    for key in unknown:
        problems.add(f"{path}.{key}", f"unknown key (allowed: {', '.join(_PROFILE_FIELDS)})")
    if unknown:
        return None
    fields: dict[str, Any] = dict(values)
    try:
        return dataclasses.replace(base, **fields)
    except ParameterError as exc:
        problems.add(f"{path}.{exc.field}", exc.reason)
        return None


class VibrationConfig(Section):
    """One vibration message carries ``block_samples`` samples (the rate is in the machine profile)."""

    block_samples: int = Field(
        2048, ge=1, le=1_000_000, description="Samples per vibration message (0.2 s at 10240 Hz)."
    )
    encoding: BlockEncoding = Field(
        "f32le",
        description="json (list of numbers), f32le (base64 float32) or i16le (base64 int16, needs scale).",
    )
    scale: float | None = Field(None, gt=0, description="g per count; required with i16le, e.g. 0.0005.")

    @model_validator(mode="after")
    def _check(self) -> VibrationConfig:
        problems = Problems()
        if self.encoding == "i16le" and self.scale is None:
            problems.add("scale", "required with encoding i16le (g per count)")
        elif self.encoding != "i16le" and self.scale is not None:
            problems.add("scale", "only used with encoding i16le")
        problems.check()
        return self


class ProcessConfig(Section):
    period_s: float = Field(
        1.0, gt=0, description="One temperature/current/pressure reading per machine every period_s."
    )


class GroundTruthConfig(Section):
    """Where the injected faults are written (JSON lines) and, optionally, published retained."""

    path: str | None = Field(
        None,
        min_length=1,
        description="Injected faults as JSON lines in device time (start_ns, end_ns); null = none.",
    )
    topic: str | None = Field(
        None,
        min_length=1,
        description="Also publish them retained on this topic, e.g. factory/site1/line1/_ground_truth.",
    )

    @field_validator("topic")
    @classmethod
    def _no_wildcards(cls, value: str | None) -> str | None:
        if value is not None and ("+" in value or "#" in value):
            raise ValueError(f"wildcards are not allowed in a topic, got {value!r}")
        return value


class FaultConfig(Section):
    """One injected fault as written in the config: the types here, the values checked by ``Fault``."""

    machine: str = Field(description="Which machine (m01, m02, ...).")
    kind: str = Field(description=f"What fails: {', '.join(FAULT_KINDS)}.")
    start_s: float = Field(description="Fault begins (simulated seconds from the start of the run).")
    end_s: float | None = Field(None, description="Fault ends; null = until the end of the run.")
    severity: float = Field(1.0, description="Full severity, in (0, 1].")
    sensor: str | None = Field(
        None, description="vibration or process: required for sensor_stuck and dropout, implied otherwise."
    )
    ramp_s: float = Field(
        10.0, description="Grows linearly from 0 to severity over this time (bearing, imbalance, overheating)."
    )


def _fault(value: Any) -> Any:
    """A ``Fault`` from its mapping; each problem with its key below the list item."""
    if isinstance(value, Fault):
        return value
    problems = Problems()
    try:
        return Fault(**FaultConfig.model_validate(value).model_dump())
    except ValidationError as exc:
        problems.extend("", errors_of(exc, FaultConfig))
    except ParameterError as exc:
        problems.add(exc.field, exc.reason)
    raise problems.error()


def _faults(value: Any) -> Any:
    """The list of faults (null: none)."""
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        problems = Problems()
        problems.add("", f"expected a list of faults, got {describe(value)}")
        raise problems.error()
    return tuple(value)


class SimulatorConfig(Section):
    """The whole simulator configuration; ``duration_s`` None runs until stopped."""

    broker: BrokerConfig = Field(default_factory=BrokerConfig, description="Where to publish.")
    topics: TopicsConfig = Field(
        default_factory=TopicsConfig,
        description="Topics are {prefix}/{site}/{line}/{machine}/vibration and .../process.",
    )
    machines: MachinesConfig = Field(default_factory=MachinesConfig, description="The simulated machines.")
    vibration: VibrationConfig = Field(default_factory=VibrationConfig, description="Vibration messages.")
    process: ProcessConfig = Field(default_factory=ProcessConfig, description="Process messages.")
    ground_truth: GroundTruthConfig = Field(
        default_factory=GroundTruthConfig, description="Where the injected faults are recorded."
    )
    duration_s: float | None = Field(60.0, gt=0, description="Simulated seconds to run; null = until stopped (Ctrl-C).")
    speed: float = Field(
        1.0, gt=0, description="Time acceleration: 1 = real time, 10 = ten simulated seconds per wall second."
    )
    seed: int = Field(0, ge=0, description="Same seed, same machines and same data.")
    qos: Annotated[int, StrictIntChoice] = Field(1, ge=0, le=2, description="MQTT QoS of every message (0, 1 or 2).")
    faults: Annotated[tuple[Annotated[InstanceOf[Fault], BeforeValidator(_fault)], ...], BeforeValidator(_faults)] = (
        Field((), description="Injected faults; times are simulated seconds from the start of the run.")
    )

    @model_validator(mode="after")
    def _check(self) -> SimulatorConfig:
        problems = Problems()
        names = self.machines.names()
        for i, fault in enumerate(self.faults):
            if fault.machine not in names:
                problems.add(f"faults[{i}].machine", f"no such machine {fault.machine!r} (have {', '.join(names)})")
        problems.check()
        return self

    def profiles(self) -> tuple[MachineProfile, ...]:
        return self.machines.build(self.seed)


def load_config(path: str | Path) -> SimulatorConfig:
    """Read and validate a YAML file; ``SimulatorConfigError`` names the file or every key path."""
    data = read_yaml(Path(path), error=SimulatorConfigError)
    return config_from_dict({} if data is None else data)


def config_from_dict(data: object) -> SimulatorConfig:
    """Validate an already parsed document (a mapping, as in the YAML file)."""
    return validate_model(SimulatorConfig, data, error=SimulatorConfigError)


def replaced(model: _M, **changes: Any) -> _M:
    """A copy of ``model`` with ``changes``, validated again (``SimulatorConfigError`` with key paths)."""
    return validate_model(type(model), {**dict(model), **changes}, error=SimulatorConfigError)
