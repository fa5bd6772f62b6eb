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
import ssl
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from agent.alerts.rules import AlertRule, RuleBook
from agent.commissioning.baseline import CommissioningConfig
from agent.commissioning.detector import DetectorConfig
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


def _readable_file(path: str, file: Path) -> None:
    """Refuse a missing or unreadable file at load time (not at the first connection attempt)."""
    try:
        with file.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(path, f"cannot read {file}: {exc.strerror}") from None


def _read_secret(path: str, file: Path) -> str:
    """The secret in ``file``: its one line without the line break. Errors name the file, never its content."""
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, f"cannot read {file}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, f"{file} is not UTF-8 text") from None
    secret = text.removesuffix("\n").removesuffix("\r")  # the newline that `echo` and editors add
    if not secret:
        raise ConfigError(path, f"{file} is empty")
    if "\n" in secret or "\r" in secret:
        raise ConfigError(path, f"{file} has more than one line; it must hold the secret only")
    return secret


def _secret_from_file(section: object, path: str, value_field: str, file_field: str) -> None:
    """Put the content of ``{file_field}`` into ``{value_field}`` of a frozen section (read once, at load)."""
    file = getattr(section, file_field)
    if file is None:
        return
    secret = _read_secret(f"{path}.{file_field}", file)
    current = getattr(section, value_field)
    if current is not None and current != secret:  # equal: dataclasses.replace() of a loaded section
        raise ConfigError(f"{path}.{file_field}", f"give either {path}.{value_field} or {path}.{file_field}, not both")
    object.__setattr__(section, value_field, secret)


@dataclass(frozen=True)
class MqttTlsSection:
    enabled: bool = False
    """Connect with TLS (usually port 8883). Off: plaintext, refused when ``mqtt.require_tls`` is true."""
    ca_file: Path | None = None
    """PEM file of the CA(s) that signed the broker's certificate; ``None`` uses the system trust store."""
    cert_file: Path | None = None
    """Client certificate (PEM) for brokers that require one (``require_certificate true``); with ``key_file``."""
    key_file: Path | None = None
    """Unencrypted private key (PEM) of ``cert_file``; keep it readable by the agent's user only."""
    insecure_skip_verify: bool = False
    """Accept any server certificate and host name: encrypted but not authenticated. Tests only."""

    def __post_init__(self) -> None:
        files = {name: getattr(self, name) for name in ("ca_file", "cert_file", "key_file")}
        if not self.enabled:
            # Half a TLS setup is a mistake, not a wish for plaintext.
            for name, value in {**files, "insecure_skip_verify": self.insecure_skip_verify or None}.items():
                if value is not None:
                    raise ConfigError(f"mqtt.tls.{name}", "is set but mqtt.tls.enabled is false")
            return
        if (self.cert_file is None) != (self.key_file is None):
            missing = "key_file" if self.key_file is None else "cert_file"
            raise ConfigError(f"mqtt.tls.{missing}", "cert_file and key_file go together: give both or neither")
        for name, value in files.items():
            if value is not None:
                _readable_file(f"mqtt.tls.{name}", value)
        _check_tls_files(self)


def _check_tls_files(tls: MqttTlsSection) -> None:
    """Load the PEM files once, so that a wrong file is refused at start with its key path."""

    def encrypted_key() -> bytes:
        raise ConfigError("mqtt.tls.key_file", "is encrypted; give an unencrypted key readable by the agent only")

    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if tls.ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(tls.ca_file))
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError("mqtt.tls.ca_file", f"{tls.ca_file} holds no usable PEM certificate: {exc}") from None
    if tls.cert_file is not None:
        try:
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file), password=encrypted_key)
        except ssl.SSLError as exc:
            raise ConfigError(
                "mqtt.tls.cert_file", f"cannot load {tls.cert_file} with key {tls.key_file}: {exc.reason or exc}"
            ) from None


@dataclass(frozen=True)
class MqttSection:
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str | None = None
    """Defaults to ``pdm-agent-{agent.id}``; must be stable for the persistent session."""
    protocol: Literal["5", "3.1.1"] = "5"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    """Broker password; better ``${ENV}`` or ``password_file``. Never logged, not in ``repr``."""
    password_file: Path | None = None
    """File holding the password (one line), read once at load; exclusive with ``password``."""
    tls: MqttTlsSection = field(default_factory=MqttTlsSection)
    require_tls: bool = False
    """Refuse to start without ``tls.enabled``: credentials and data never cross the network in plaintext."""
    keepalive_s: int = 30
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 30.0
    session_expiry_s: int = 86_400
    silence_timeout_s: float = 0.0
    """Liveness watchdog: reconnect when no message arrived for this long while connected; 0 = off."""
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
        if self.silence_timeout_s < 0:
            raise ConfigError("mqtt.silence_timeout_s", f"must be >= 0 (0 = off), got {self.silence_timeout_s}")
        if self.require_tls and not self.tls.enabled:
            raise ConfigError(
                "mqtt.require_tls",
                "is true but mqtt.tls.enabled is false: refusing a plaintext connection to the broker "
                "(enable mqtt.tls or set require_tls: false)",
            )
        _secret_from_file(self, "mqtt", "password", "password_file")
        try:
            TopicTemplate(self.topic_template)
        except ValueError as exc:
            raise ConfigError("mqtt.topic_template", str(exc)) from None


@dataclass(frozen=True)
class InfluxV1Section:
    database: str = "pdm"
    retention_policy: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    """Never logged, not in ``repr``; better ``${ENV}`` or ``password_file``."""
    password_file: Path | None = None
    """File holding the password (one line), read once at load; exclusive with ``password``."""
    create_database: bool = True
    """Issue ``CREATE DATABASE`` at start (idempotent); turn off when the user may not."""

    def __post_init__(self) -> None:
        _secret_from_file(self, "storage.v1", "password", "password_file")


@dataclass(frozen=True)
class InfluxV2Section:
    org: str = "pdm"
    bucket: str = "pdm"
    token: str | None = field(default=None, repr=False)
    """API token; never logged, not in ``repr``; better ``${ENV}`` or ``token_file``."""
    token_file: Path | None = None
    """File holding the token (one line), read once at load; exclusive with ``token``."""

    def __post_init__(self) -> None:
        _secret_from_file(self, "storage.v2", "token", "token_file")


@dataclass(frozen=True)
class RawVibrationSection:
    mode: Literal["all", "every_n", "around_alerts", "none"] = "around_alerts"
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
    require_tls: bool = False
    """Refuse a plaintext (http://) InfluxDB URL."""

    def __post_init__(self) -> None:
        if self.require_tls and not self.url.startswith("https://"):
            raise ConfigError("storage.require_tls", "is true but storage.url is not https://: refusing plaintext")
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


@dataclass(frozen=True, kw_only=True)
class ModelEntry:
    path: Path | None = None
    """Directory holding ``manifest.json`` and the ONNX file it names (pinned: loaded once, at start)."""
    model_id: str | None = None
    """Instead of ``path``: the model id, whose newest usable version in ``inference.models_dir`` runs."""
    sensors: tuple[str, ...]
    """Glob patterns on the ``sensor`` tag of the sources this model scores."""

    def __post_init__(self) -> None:
        if self.path is None and self.model_id is None:
            raise ConfigError("inference.models[].path", "is required (or model_id, to use inference.models_dir)")
        if self.path is not None and self.model_id is not None:
            raise ConfigError("inference.models[].model_id", "give either path or model_id, not both")
        if self.model_id is not None and not self.model_id.strip():
            raise ConfigError("inference.models[].model_id", "must not be empty")
        if not self.sensors:
            raise ConfigError("inference.models[].sensors", "needs at least one pattern")


@dataclass(frozen=True)
class DefectSection:
    path: Path | None = None
    """Directory of the defect classifier (manifest.json + ONNX); null = no defect classification."""
    model_id: str | None = None
    """Instead of ``path``: the classifier's model id, whose newest usable version in ``inference.models_dir`` runs."""
    sensors: tuple[str, ...] = ("vibration*",)
    """Glob patterns on the ``sensor`` tag of the vibration sources whose anomalous windows are classified."""
    speed_field: str = "rpm"
    """Field of the machine's process readings that carries the shaft speed in rpm (its latest value is used)."""
    default_rpm: float | None = None
    """Shaft speed used until a speed reading arrives; null = do not classify a machine of unknown speed."""

    def __post_init__(self) -> None:
        if self.path is not None and self.model_id is not None:
            raise ConfigError("inference.defect.model_id", "give either inference.defect.path or model_id, not both")
        if self.default_rpm is not None:
            _positive("inference.defect.default_rpm", self.default_rpm)


@dataclass(frozen=True)
class InferenceSection:
    models: tuple[ModelEntry, ...] = ()
    models_dir: Path | None = None
    """Model registry: each subdirectory with a ``manifest.json`` is one version of one model; entries that
    name a ``model_id`` run its highest usable version (``agent/inference/registry.py``)."""
    reload_interval_s: float = 10.0
    """How often ``models_dir`` is rescanned for new versions, swapped in without a restart; 0 = never."""
    threads: int = 1
    """ONNX Runtime intra-op threads per session."""
    max_batch: int = 256
    """Windows ready at the same time are scored together, up to this many per run."""
    defect: DefectSection = field(default_factory=DefectSection)
    """The defect classifier run on anomalous vibration windows."""

    def __post_init__(self) -> None:
        _positive("inference.threads", self.threads)
        _positive("inference.max_batch", self.max_batch)
        if self.reload_interval_s < 0:
            raise ConfigError("inference.reload_interval_s", f"must be >= 0 (0 disables), got {self.reload_interval_s}")
        if self.models_dir is not None and not self.models_dir.is_dir():
            raise ConfigError("inference.models_dir", f"{self.models_dir} is not a directory")
        if self.models_dir is None:
            for i, entry in enumerate(self.models):
                if entry.model_id is not None:
                    raise ConfigError(f"inference.models[{i}].model_id", "needs inference.models_dir to look it up in")
            if self.defect.model_id is not None:
                raise ConfigError("inference.defect.model_id", "needs inference.models_dir to look it up in")


@dataclass(frozen=True)
class AlertsSection:
    default: AlertRule = field(default_factory=AlertRule)
    """The rule of every alert type without its own entry in ``types`` (knobs: ``agent/alerts/rules.py``)."""
    types: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Rules by alert type (the model id, e.g. ``vibration-anomaly``): the keys that differ from ``default``."""
    state_path: Path | None = None
    """The alert engine's state file (open events, silences); default: ``alert_state.json`` beside the spool."""
    top_features: int = 5
    """Contributing features named in each alert (0 = none)."""

    def __post_init__(self) -> None:
        if self.top_features < 0 or self.top_features > 10:
            raise ConfigError("alerts.top_features", f"must be between 0 and 10, got {self.top_features}")
        self.rulebook()

    def rulebook(self) -> RuleBook:
        """The default rule and, per alert type, the default with that type's keys replaced."""
        by_type = {}
        for alert_type, overrides in self.types.items():
            merged = {**dataclasses.asdict(self.default), **overrides}
            # The loader validates the merged rule: key names, types and AlertRule's own checks, with paths.
            rule = _Context(base_dir=Path("."), environ={}).build(AlertRule, merged, f"alerts.types.{alert_type}")
            by_type[alert_type] = rule
        return RuleBook(self.default, by_type)


@dataclass(frozen=True)
class AdaptationAutoSection:
    enabled: bool = False
    """Adapt each machine's anomaly models at the end of its commissioning period (its first windows)."""
    windows: int = 400
    """Windows of a machine's normal operation to adapt on (the last 20 % are held out for its threshold)."""
    min_anomalous_fraction: float = 0.0
    """Adapt only when the base model flagged at least this fraction of them (0 = every machine)."""
    models: tuple[str, ...] = ()
    """Model ids to adapt automatically; empty = every anomaly model."""
    rank: int = 1
    """Rank r of the low-rank matrices A (fan_in x r) and B (r x fan_out)."""
    alpha: float = 2.0
    """Scale of the update: W + (alpha / rank) * A @ B."""
    layers: tuple[str, ...] = ()
    """Dense layers (MatMul node names) to adapt; empty = all of them."""
    refit_standardization: bool = False
    """Also use the machine's own input mean and scale (helps at another operating point; docs/adaptation.md)."""

    def __post_init__(self) -> None:
        if self.windows < 20:
            raise ConfigError("adaptation.auto.windows", f"must be >= 20, got {self.windows}")
        if not 0.0 <= self.min_anomalous_fraction <= 1.0:
            raise ConfigError("adaptation.auto.min_anomalous_fraction", "must be between 0 and 1")
        _positive("adaptation.auto.rank", self.rank)
        _positive("adaptation.auto.alpha", self.alpha)


@dataclass(frozen=True)
class AdaptationSection:
    enabled: bool = False
    """Serve per-machine LoRA adapters of the anomaly models (``dir/{model_id}/{machine}/adapter.json``)."""
    dir: Path | None = None
    """Where adapters are found and written (automatic mode, ``pdm-agent adapt``); default: ``adapters`` beside
    the spool."""
    reload_interval_s: float = 10.0
    """How often ``dir`` is rescanned for new or changed adapters; 0 = only at start and after training."""
    auto: AdaptationAutoSection = field(default_factory=AdaptationAutoSection)

    def __post_init__(self) -> None:
        if self.reload_interval_s < 0:
            raise ConfigError("adaptation.reload_interval_s", f"must be >= 0, got {self.reload_interval_s}")
        if self.auto.enabled and not self.enabled:
            raise ConfigError("adaptation.auto.enabled", "needs adaptation.enabled: true (adapters must be served)")


@dataclass(frozen=True)
class CommissioningSection:
    enabled: bool = False
    """Learn each machine's normal from its first readings on the device, then score every reading."""
    sensors: tuple[str, ...] = ("process*",)
    """Glob patterns on the ``sensor`` tag of the multi-field process readings to learn and score."""
    channels: tuple[str, ...] = ("temperature", "current", "pressure")
    """Field names forming one multivariate step, in this order; readings lacking one are counted and skipped."""
    commissioning_steps: int = 400
    """Readings learned before scoring starts (the SKAB protocol's 400 rows)."""
    commissioning_s: float | None = None
    """If set, commissioning ends at the first reading this many seconds after the first one instead."""
    smoothing_steps: int = 30
    """Length of the causal moving average of the standardized signals, in readings."""
    threshold_factor: float = 2.4
    """Threshold = this factor times the largest score seen during commissioning (label-free)."""

    def to_commissioning_config(self) -> CommissioningConfig:
        try:
            return CommissioningConfig(
                commissioning_steps=self.commissioning_steps,
                commissioning_s=self.commissioning_s,
                detector=DetectorConfig(smoothing_steps=self.smoothing_steps, threshold_factor=self.threshold_factor),
            )
        except ValueError as exc:
            raise ConfigError("commissioning", str(exc)) from None

    def __post_init__(self) -> None:
        if not self.channels:
            raise ConfigError("commissioning.channels", "needs at least one field name")
        self.to_commissioning_config()


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
class HealthSection:
    enabled: bool = True
    """Serve ``/healthz``, ``/readyz`` and Prometheus ``/metrics`` over HTTP."""
    host: str = "127.0.0.1"
    """Listen address: 127.0.0.1 keeps it on the box; 0.0.0.0 lets a Prometheus server elsewhere scrape it."""
    port: int = 9108
    """TCP port; 0 picks a free one (tests)."""

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("health.host", "must not be empty")
        if not 0 <= self.port < 65536:
            raise ConfigError("health.port", f"must be 0..65535 (0 = any free port), got {self.port}")


@dataclass(frozen=True)
class Config:
    agent: AgentSection = field(default_factory=AgentSection)
    mqtt: MqttSection = field(default_factory=MqttSection)
    storage: StorageSection = field(default_factory=StorageSection)
    spool: SpoolSection = field(default_factory=SpoolSection)
    inference: InferenceSection = field(default_factory=InferenceSection)
    alerts: AlertsSection = field(default_factory=AlertsSection)
    commissioning: CommissioningSection = field(default_factory=CommissioningSection)
    adaptation: AdaptationSection = field(default_factory=AdaptationSection)
    queues: QueuesSection = field(default_factory=QueuesSection)
    health: HealthSection = field(default_factory=HealthSection)


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
        except ValueError as exc:
            # Value classes of other modules (e.g. AlertRule) validate themselves with plain ValueErrors.
            raise ConfigError(path, str(exc)) from None

    def convert(self, hint: Any, value: Any, path: str) -> Any:
        if hint is Any:  # checked later by whoever reads it (e.g. AlertsSection.rulebook)
            return value
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
        if origin is dict:
            if not isinstance(value, Mapping):
                raise ConfigError(path, f"expected a mapping, got {_kind(value)}")
            out = {}
            for key, item in value.items():
                if not isinstance(key, str) or not key:
                    raise ConfigError(path, f"keys must be non-empty strings, got {key!r}")
                out[key] = self.convert(args[1], item, f"{path}.{key}")
            return out
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
