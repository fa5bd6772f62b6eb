"""Configuration of the gateway simulator, loaded from YAML (``config/simulator.yaml``) and validated once.

Self-contained on purpose: the simulator stands in for a third-party gateway, so it shares no config
code with the agent. Every section is a frozen dataclass whose ``__post_init__`` checks its values;
``load_config`` adds the structure checks (unknown keys, mappings) and prefixes every error with its key
path, e.g. ``faults[0].kind: expected one of ...``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agent.decode.encode import BLOCK_ENCODINGS, BlockEncoding
from pdm_tools.simulator.machine import Fault, MachineProfile, ParameterError, fleet_profile, machine_name

_PROFILE_FIELDS = tuple(f.name for f in dataclasses.fields(MachineProfile) if f.name != "name")
_FAULT_FIELDS = tuple(f.name for f in dataclasses.fields(Fault))


class SimulatorConfigError(ValueError):
    """Invalid simulator configuration; ``path`` is the key path (``broker.port``, ``faults[1].kind``)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason

    def under(self, prefix: str) -> SimulatorConfigError:
        """The same error seen from the enclosing section ``prefix``."""
        return SimulatorConfigError(_join(prefix, self.path), self.reason)


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Where to publish, and how hard to try."""

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = "pdm-simulator"
    protocol: str = "mqttv5"
    keepalive_s: int = 30
    connect_timeout_s: float = 10.0
    ack_timeout_s: float = 10.0
    max_inflight: int = 100
    max_queued: int = 1000

    def __post_init__(self) -> None:
        _check_str("host", self.host)
        _check_int("port", self.port, 1, 65535)
        _check_str("client_id", self.client_id)
        _check_choice("protocol", self.protocol, ("mqttv5", "mqttv311"))
        _check_int("keepalive_s", self.keepalive_s, 1)
        _check_positive("connect_timeout_s", self.connect_timeout_s)
        _check_positive("ack_timeout_s", self.ack_timeout_s)
        _check_int("max_inflight", self.max_inflight, 1)
        _check_int("max_queued", self.max_queued, 1)


@dataclass(frozen=True, slots=True)
class TopicsConfig:
    """Topics are ``{prefix}/{site}/{line}/{machine}/{sensor}`` (the agent's default template)."""

    prefix: str = "factory"
    site: str = "site1"
    line: str = "line1"

    def __post_init__(self) -> None:
        _check_topic_level("prefix", self.prefix)
        _check_topic_level("site", self.site)
        _check_topic_level("line", self.line)

    def topic(self, machine: str, sensor: str) -> str:
        return f"{self.prefix}/{self.site}/{self.line}/{machine}/{sensor}"


@dataclass(frozen=True, slots=True)
class MachinesConfig:
    """``count`` machines named m01, m02, ...; ``defaults`` and per-machine ``profiles`` set profile fields.

    ``defaults`` apply to every machine before the fleet variation (``vary``); a machine's entry in
    ``profiles`` sets exact values after it.
    """

    count: int = 4
    vary: bool = True
    defaults: Mapping[str, float] = field(default_factory=dict)
    profiles: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_int("count", self.count, 1, 99)
        if not isinstance(self.vary, bool):
            raise SimulatorConfigError("vary", f"expected true or false, got {self.vary!r}")
        _check_profile_fields("defaults", self.defaults, MachineProfile(name="m01"))
        if not isinstance(self.profiles, Mapping):
            raise SimulatorConfigError("profiles", "expected a mapping of machine name to profile fields")
        names = self.names()
        base = MachineProfile(name="m01", **self.defaults)
        for name, values in self.profiles.items():
            if name not in names:
                raise SimulatorConfigError(
                    f"profiles.{name}", f"no such machine (count is {self.count}: {names[0]}..{names[-1]})"
                )
            _check_profile_fields(f"profiles.{name}", values, dataclasses.replace(base, name=name))

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


@dataclass(frozen=True, slots=True)
class VibrationConfig:
    """One vibration message carries ``block_samples`` samples (the rate is in the machine profile)."""

    block_samples: int = 2048
    encoding: BlockEncoding = "f32le"
    scale: float | None = None

    def __post_init__(self) -> None:
        _check_int("block_samples", self.block_samples, 1, 1_000_000)
        _check_choice("encoding", self.encoding, BLOCK_ENCODINGS)
        if self.encoding == "i16le":
            if self.scale is None:
                raise SimulatorConfigError("scale", "required with encoding i16le (g per count)")
            _check_positive("scale", self.scale)
        elif self.scale is not None:
            raise SimulatorConfigError("scale", "only used with encoding i16le")


@dataclass(frozen=True, slots=True)
class ProcessConfig:
    period_s: float = 1.0

    def __post_init__(self) -> None:
        _check_positive("period_s", self.period_s)


@dataclass(frozen=True, slots=True)
class GroundTruthConfig:
    """Where the injected faults are written (JSON lines) and, optionally, published retained."""

    path: str | None = None
    topic: str | None = None

    def __post_init__(self) -> None:
        if self.path is not None:
            _check_str("path", self.path)
        if self.topic is not None:
            _check_str("topic", self.topic)
            if "+" in self.topic or "#" in self.topic:
                raise SimulatorConfigError("topic", f"wildcards are not allowed in a topic, got {self.topic!r}")


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """The whole simulator configuration; ``duration_s`` None runs until stopped."""

    broker: BrokerConfig = field(default_factory=BrokerConfig)
    topics: TopicsConfig = field(default_factory=TopicsConfig)
    machines: MachinesConfig = field(default_factory=MachinesConfig)
    vibration: VibrationConfig = field(default_factory=VibrationConfig)
    process: ProcessConfig = field(default_factory=ProcessConfig)
    ground_truth: GroundTruthConfig = field(default_factory=GroundTruthConfig)
    duration_s: float | None = 60.0
    speed: float = 1.0
    seed: int = 0
    qos: int = 1
    faults: tuple[Fault, ...] = ()

    def __post_init__(self) -> None:
        if self.duration_s is not None:
            _check_positive("duration_s", self.duration_s)
        _check_positive("speed", self.speed)
        _check_int("seed", self.seed, 0)
        _check_int("qos", self.qos, 0, 2)
        names = self.machines.names()
        for i, fault in enumerate(self.faults):
            if fault.machine not in names:
                raise SimulatorConfigError(
                    f"faults[{i}].machine", f"no such machine {fault.machine!r} (have {', '.join(names)})"
                )

    def profiles(self) -> tuple[MachineProfile, ...]:
        return self.machines.build(self.seed)


_SECTIONS: dict[str, type] = {
    "broker": BrokerConfig,
    "topics": TopicsConfig,
    "machines": MachinesConfig,
    "vibration": VibrationConfig,
    "process": ProcessConfig,
    "ground_truth": GroundTruthConfig,
}


def load_config(path: str | Path) -> SimulatorConfig:
    """Read and validate a YAML file; raises ``SimulatorConfigError`` naming the file or the key path."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except (OSError, yaml.YAMLError) as exc:
        raise SimulatorConfigError(str(path), f"cannot read simulator config: {exc}") from None
    return config_from_dict({} if data is None else data)


def config_from_dict(data: object) -> SimulatorConfig:
    """Validate an already parsed document (a mapping, as in the YAML file)."""
    mapping = _mapping("", data, tuple(f.name for f in dataclasses.fields(SimulatorConfig)))
    kwargs: dict[str, Any] = {}
    for key, value in mapping.items():
        if key in _SECTIONS:
            kwargs[key] = _section(_SECTIONS[key], key, value)
        elif key == "faults":
            kwargs[key] = faults_from_list(value)
        else:
            kwargs[key] = value
    return SimulatorConfig(**kwargs)


def faults_from_list(data: object, path: str = "faults") -> tuple[Fault, ...]:
    """Faults from a list of mappings with the fields of ``Fault``."""
    if data is None:
        return ()
    if not isinstance(data, list):
        raise SimulatorConfigError(path, f"expected a list of faults, got {type(data).__name__}")
    out = []
    for i, item in enumerate(data):
        item_path = f"{path}[{i}]"
        values = _mapping(item_path, item, _FAULT_FIELDS)
        for required in ("machine", "kind", "start_s"):
            if required not in values:
                raise SimulatorConfigError(_join(item_path, required), "required")
        try:
            out.append(Fault(**values))
        except ParameterError as exc:
            raise SimulatorConfigError(_join(item_path, exc.field), exc.reason) from None
    return tuple(out)


def _section(cls: type, path: str, data: object) -> Any:
    values = _mapping(path, {} if data is None else data, tuple(f.name for f in dataclasses.fields(cls)))
    try:
        return cls(**values)
    except SimulatorConfigError as exc:
        raise exc.under(path) from None


def _mapping(path: str, data: object, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise SimulatorConfigError(path, f"expected a mapping, got {type(data).__name__}")
    for key in data:
        if key not in allowed:
            raise SimulatorConfigError(_join(path, str(key)), f"unknown key (allowed: {', '.join(allowed)})")
    return dict(data)


def _check_profile_fields(path: str, values: object, base: MachineProfile) -> None:
    if not isinstance(values, Mapping):
        raise SimulatorConfigError(path, "expected a mapping of machine profile fields")
    for key in values:
        if key not in _PROFILE_FIELDS:
            raise SimulatorConfigError(_join(path, str(key)), f"unknown key (allowed: {', '.join(_PROFILE_FIELDS)})")
    try:
        dataclasses.replace(base, **values)
    except ParameterError as exc:
        raise SimulatorConfigError(_join(path, exc.field), exc.reason) from None


def _join(prefix: str, path: str) -> str:
    if not prefix:
        return path
    if not path:
        return prefix
    return f"{prefix}{path}" if path.startswith("[") else f"{prefix}.{path}"


def _check_str(path: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise SimulatorConfigError(path, f"expected a non-empty string, got {value!r}")


def _check_topic_level(path: str, value: object) -> None:
    _check_str(path, value)
    if any(c in str(value) for c in "/+#"):
        raise SimulatorConfigError(path, f"one topic level without '/', '+' or '#', got {value!r}")


def _check_choice(path: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SimulatorConfigError(path, f"expected one of {', '.join(choices)}, got {value!r}")


def _check_int(path: str, value: object, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SimulatorConfigError(path, f"expected an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise SimulatorConfigError(path, f"must be {bounds}, got {value}")


def _check_positive(path: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SimulatorConfigError(path, f"expected a finite number, got {value!r}")
    if value <= 0:
        raise SimulatorConfigError(path, f"must be > 0, got {value}")
