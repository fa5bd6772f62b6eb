"""Agent configuration: a YAML file validated once, at start, before any connection.

Every section is a frozen dataclass; the loader walks the type hints, so an unknown key, a wrong type
or a value out of range is refused with its key path (``storage.v1.database: expected a string``).
String values may reference environment variables as ``${NAME}`` or ``${NAME:-default}``; this is how
secrets stay out of the file. Relative paths are resolved against the directory of the config file.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from agent.decode.topic import TopicTemplate

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(ValueError):
    """Invalid configuration; ``path`` is the dotted key path, ``reason`` what is wrong with it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path or '<root>'}: {reason}")
        self.path = path
        self.reason = reason


def _positive(path: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(path, f"must be > 0, got {value}")


@dataclass(frozen=True)
class AgentSection:
    id: str = "edge-01"
    """Agent identity: used in MQTT topics (``pdm/{id}/...``), the client id and self-metrics."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    heartbeat_s: float = 10.0
    """Interval of the heartbeat (counters on MQTT and in InfluxDB)."""
    shutdown_timeout_s: float = 10.0
    """How long a stop may take to flush the spool to InfluxDB before exiting."""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.id):
            raise ConfigError("agent.id", "only letters, digits, '_', '.', '-' are allowed (it is a topic level)")
        _positive("agent.heartbeat_s", self.heartbeat_s)
        _positive("agent.shutdown_timeout_s", self.shutdown_timeout_s)


@dataclass(frozen=True)
class MqttSection:
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str | None = None
    """Defaults to ``pdm-agent-{agent.id}``; must be stable for the persistent session."""
    protocol: Literal["5", "3.1.1"] = "5"
    username: str | None = None
    password: str | None = None
    keepalive_s: int = 30
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 30.0
    session_expiry_s: int = 86_400
    topic_template: str = "factory/{site}/{line}/{machine}/{sensor}"
    subscriptions: tuple[str, ...] = ()
    """Topic filters; empty means the one derived from the template (placeholders become ``+``)."""
    qos: Literal[0, 1] = 1
    base_topic: str = "pdm/{agent_id}"
    max_payload_bytes: int = 1_048_576
    max_future_s: float = 86_400.0
    """Device timestamps further than this in the future (vs arrival) are rejected."""

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError("mqtt.port", f"must be 1..65535, got {self.port}")
        _positive("mqtt.keepalive_s", self.keepalive_s)
        _positive("mqtt.reconnect_min_s", self.reconnect_min_s)
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ConfigError("mqtt.reconnect_max_s", "must be >= mqtt.reconnect_min_s")
        _positive("mqtt.max_payload_bytes", self.max_payload_bytes)
        try:
            TopicTemplate(self.topic_template)
        except ValueError as exc:
            raise ConfigError("mqtt.topic_template", str(exc)) from None


@dataclass(frozen=True)
class InfluxV1Section:
    database: str = "pdm"
    retention_policy: str | None = None
    username: str | None = None
    password: str | None = None
    create_database: bool = True
    """Issue ``CREATE DATABASE`` at start (idempotent); turn off when the user may not."""


@dataclass(frozen=True)
class InfluxV2Section:
    org: str = "pdm"
    bucket: str = "pdm"
    token: str | None = None


@dataclass(frozen=True)
class RawVibrationSection:
    mode: Literal["all", "every_n", "around_alerts", "none"] = "every_n"
    """Which raw vibration blocks are stored: all, one block in ``every_n``, the blocks around an alert, none."""
    every_n: int = 10
    keep_blocks: int = 10
    """For ``around_alerts``: blocks kept before an alert and stored after it."""

    def __post_init__(self) -> None:
        _positive("storage.raw_vibration.every_n", self.every_n)
        _positive("storage.raw_vibration.keep_blocks", self.keep_blocks)


@dataclass(frozen=True)
class StorageSection:
    api: Literal["v1", "v2"] = "v1"
    url: str = "http://127.0.0.1:8086"
    v1: InfluxV1Section = field(default_factory=InfluxV1Section)
    v2: InfluxV2Section = field(default_factory=InfluxV2Section)
    batch_size: int = 5000
    flush_interval_s: float = 1.0
    timeout_s: float = 10.0
    backoff_min_s: float = 0.5
    backoff_max_s: float = 30.0
    raw_vibration: RawVibrationSection = field(default_factory=RawVibrationSection)

    def __post_init__(self) -> None:
        if not re.match(r"https?://", self.url):
            raise ConfigError("storage.url", f"must start with http:// or https://, got {self.url!r}")
        _positive("storage.batch_size", self.batch_size)
        _positive("storage.flush_interval_s", self.flush_interval_s)
        _positive("storage.timeout_s", self.timeout_s)
        if self.backoff_max_s < self.backoff_min_s:
            raise ConfigError("storage.backoff_max_s", "must be >= storage.backoff_min_s")


@dataclass(frozen=True)
class SpoolSection:
    path: Path = Path("spool.db")
    max_rows: int = 20_000_000
    drop_policy: Literal["oldest", "newest"] = "oldest"

    def __post_init__(self) -> None:
        _positive("spool.max_rows", self.max_rows)


@dataclass(frozen=True)
class ModelEntry:
    path: Path
    """Directory holding ``manifest.json`` and the ONNX file it names."""
    sensors: tuple[str, ...]
    """Glob patterns on the ``sensor`` tag of the sources this model scores."""

    def __post_init__(self) -> None:
        if not self.sensors:
            raise ConfigError("inference.models[].sensors", "needs at least one pattern")


@dataclass(frozen=True)
class InferenceSection:
    models: tuple[ModelEntry, ...] = ()
    threads: int = 1
    """ONNX Runtime intra-op threads per session."""
    max_batch: int = 256
    """Windows ready at the same time are scored together, up to this many per run."""

    def __post_init__(self) -> None:
        _positive("inference.threads", self.threads)
        _positive("inference.max_batch", self.max_batch)


@dataclass(frozen=True)
class AlertsSection:
    raise_after_windows: int = 2
    """Consecutive windows above the threshold before an alert is raised."""
    clear_after_windows: int = 5
    """Consecutive windows at or below the threshold before a raised alert is cleared."""

    def __post_init__(self) -> None:
        _positive("alerts.raise_after_windows", self.raise_after_windows)
        _positive("alerts.clear_after_windows", self.clear_after_windows)


@dataclass(frozen=True)
class QueuesSection:
    messages_max: int = 10_000
    """Received MQTT messages waiting for decoding; when full, the MQTT thread waits (backpressure)."""
    windows_max: int = 2_000
    """Windows waiting for scoring; when full for ``put_timeout_s``, the window is dropped and counted."""
    put_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        _positive("queues.messages_max", self.messages_max)
        _positive("queues.windows_max", self.windows_max)


@dataclass(frozen=True)
class Config:
    agent: AgentSection = field(default_factory=AgentSection)
    mqtt: MqttSection = field(default_factory=MqttSection)
    storage: StorageSection = field(default_factory=StorageSection)
    spool: SpoolSection = field(default_factory=SpoolSection)
    inference: InferenceSection = field(default_factory=InferenceSection)
    alerts: AlertsSection = field(default_factory=AlertsSection)
    queues: QueuesSection = field(default_factory=QueuesSection)


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, substitute ``${ENV}`` references, validate; raise ``ConfigError`` on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{path} is not valid YAML: {exc}") from exc
    return parse_config(data or {}, base_dir=path.parent, environ=os.environ if environ is None else environ)


def parse_config(data: Any, base_dir: Path = Path("."), environ: Mapping[str, str] | None = None) -> Config:
    """Validate an already parsed mapping (tests build configs this way)."""
    ctx = _Context(base_dir=base_dir, environ=os.environ if environ is None else environ)
    config = ctx.build(Config, data, "")
    assert isinstance(config, Config)
    return config


@dataclass
class _Context:
    base_dir: Path
    environ: Mapping[str, str]

    def build(self, cls: type, data: Any, path: str) -> Any:
        if not isinstance(data, Mapping):
            raise ConfigError(path, f"expected a mapping, got {_kind(data)}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            where = f"{path}.{unknown[0]}" if path else str(unknown[0])
            raise ConfigError(where, f"unknown key (allowed: {', '.join(sorted(fields))})")
        kwargs = {}
        for name, value in data.items():
            kwargs[name] = self.convert(hints[name], value, f"{path}.{name}" if path else name)
        for name, f in fields.items():
            if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{path}.{name}" if path else name, "is required")
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            # Sections inside lists do not know their index; put the real path back.
            if "[]" in exc.path:
                raise ConfigError(f"{path}.{exc.path.rsplit('.', 1)[-1]}", exc.reason) from None
            raise

    def convert(self, hint: Any, value: Any, path: str) -> Any:
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if origin in (typing.Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            inner = [a for a in args if a is not type(None)]
            return self.convert(inner[0], value, path)
        if origin is Literal:
            value = self.expand(value, path) if isinstance(value, str) else value
            if isinstance(value, (int, float)) and not isinstance(value, bool) and str(value) in args:
                value = str(value)
            if value not in args or isinstance(value, bool):
                choices = ", ".join(repr(a) for a in args)
                raise ConfigError(path, f"must be one of {choices}, got {value!r}")
            return value
        if origin is tuple:
            if not isinstance(value, list):
                raise ConfigError(path, f"expected a list, got {_kind(value)}")
            return tuple(self.convert(args[0], item, f"{path}[{i}]") for i, item in enumerate(value))
        if dataclasses.is_dataclass(hint):
            return self.build(hint, value, path)  # type: ignore[arg-type]
        if hint is bool:
            if not isinstance(value, bool):
                raise ConfigError(path, f"expected true or false, got {_kind(value)}")
            return value
        if hint is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(path, f"expected an integer, got {_kind(value)}")
            return value
        if hint is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(path, f"expected a number, got {_kind(value)}")
            return float(value)
        if hint is str:
            if not isinstance(value, str):
                raise ConfigError(path, f"expected a string, got {_kind(value)}")
            return self.expand(value, path)
        if hint is Path:
            if not isinstance(value, str):
                raise ConfigError(path, f"expected a path string, got {_kind(value)}")
            p = Path(self.expand(value, path)).expanduser()
            return p if p.is_absolute() else (self.base_dir / p).resolve()
        raise TypeError(f"config field {path} has unsupported type {hint!r}")

    def expand(self, value: str, path: str) -> str:
        def repl(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in self.environ:
                return self.environ[name]
            if default is not None:
                return default
            raise ConfigError(path, f"environment variable {name} is not set")

        return _ENV_REF.sub(repl, value)


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), f"{type(value).__name__} {value!r}"
    )
