"""``mqtt``: the broker connection, its TLS and credentials, the inbound topics and the payload decoder."""

from __future__ import annotations

import ssl
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator, model_validator

from agent.config.base import (
    ConfigPath,
    EnvChoice,
    EnvInt,
    EnvStr,
    Section,
    StrictIntChoice,
    StrList,
    expand_env,
    readable,
    registry_key,
    registry_schema,
    secret_from_file,
)
from agent.config.errors import Problems
from agent.decode.registry import DECODERS
from agent.decode.topic import TopicTemplate
from agent.ingest.settings import OutboundSettings


def _protocol(value: Any, info: ValidationInfo) -> Any:
    """YAML reads ``protocol: 5`` as a number."""
    value = expand_env(value, info)
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


class MqttTlsSection(Section):
    enabled: bool = Field(
        False,
        description="Connect with TLS 1.2+ (brokers usually listen on 8883 for it). Off: plaintext, refused when "
        "mqtt.require_tls is true.",
    )
    ca_file: ConfigPath | None = Field(
        None,
        description="PEM file of the CA(s) that signed the broker's certificate; null = the system trust store.",
    )
    cert_file: ConfigPath | None = Field(
        None,
        description="Client certificate (PEM), only for brokers that require one (require_certificate true); "
        "needs key_file.",
    )
    key_file: ConfigPath | None = Field(
        None,
        description="Unencrypted private key (PEM) of cert_file; make it readable by the agent's user only.",
    )
    insecure_skip_verify: bool = Field(
        False,
        description="Accept any broker certificate and host name: encrypted but NOT authenticated. Tests only.",
    )

    @model_validator(mode="after")
    def _check(self) -> MqttTlsSection:
        problems = Problems()
        files = {"ca_file": self.ca_file, "cert_file": self.cert_file, "key_file": self.key_file}
        if not self.enabled:
            # Half a TLS setup is a mistake, not a wish for plaintext.
            for name, value in {**files, "insecure_skip_verify": self.insecure_skip_verify or None}.items():
                if value is not None:
                    problems.add(name, "is set but mqtt.tls.enabled is false")
            problems.check()
            return self
        if (self.cert_file is None) != (self.key_file is None):
            missing = "key_file" if self.key_file is None else "cert_file"
            problems.add(missing, "cert_file and key_file go together: give both or neither")
        for name, file in files.items():
            if file is not None and (why := readable(file)) is not None:
                problems.add(name, why)
        if not problems.items:
            _check_tls_files(self, problems)
        problems.check()
        return self


def _check_tls_files(tls: MqttTlsSection, problems: Problems) -> None:
    """Load the PEM files once, so that a wrong file is refused at start with its key path."""
    encrypted = False

    def encrypted_key() -> bytes:
        nonlocal encrypted
        encrypted = True  # asked for a password: never prompt, refuse
        raise ValueError("encrypted key")

    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if tls.ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(tls.ca_file))
        except (ssl.SSLError, ValueError) as exc:
            problems.add("ca_file", f"{tls.ca_file} holds no usable PEM certificate: {exc}")
    if tls.cert_file is not None:
        try:
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file), password=encrypted_key)
        except (ssl.SSLError, ValueError) as exc:
            if encrypted:
                problems.add("key_file", "is encrypted; give an unencrypted key readable by the agent only")
            else:
                reason = getattr(exc, "reason", None) or exc
                problems.add("cert_file", f"cannot load {tls.cert_file} with key {tls.key_file}: {reason}")


class DecoderSection(Section):
    type: Annotated[str, EnvChoice, registry_key(DECODERS), registry_schema(DECODERS)] = Field(
        "json_v1",
        description="The payload decoder, a registry key: json_v1 = the JSON payloads of the README "
        "(schema version 1); sparkplug_b = a Sparkplug B 3.0 primary host (docs/sparkplug.md).",
    )
    host_id: EnvStr | None = Field(
        None,
        description="sparkplug_b: the host application id; the agent's STATE topic is spBv1.0/STATE/{host_id} "
        "(retained, with the matching will). Required for sparkplug_b.",
    )
    group_ids: StrList = Field(
        (),
        description="sparkplug_b: the Sparkplug groups taken in (one filter spBv1.0/{group}/# each); empty = all.",
    )
    reorder_timeout_s: float = Field(
        2.0,
        gt=0,
        description="sparkplug_b: how long a seq gap or an unknown alias may wait to resolve before the agent "
        "asks the edge node for a rebirth (NCMD Node Control/Rebirth).",
    )
    sensor: EnvStr = Field(
        "process",
        description="sparkplug_b: the sensor tag of the readings (models and windows are chosen by it).",
    )

    @model_validator(mode="after")
    def _check(self) -> DecoderSection:
        problems = Problems()
        if self.type == "sparkplug_b" and not self.host_id:
            problems.add("host_id", "is required for the sparkplug_b decoder (its STATE topic)")
        for group in self.group_ids:
            if not group or any(c in group for c in "+#/"):
                problems.add("group_ids", f"{group!r} is not a Sparkplug group id (no '/', '+' or '#')")
        for name in ("host_id", "sensor"):
            value = getattr(self, name)
            if value is not None and (not value or any(c in value for c in "+#/")):
                problems.add(name, f"{value!r} must be one topic level (no '/', '+' or '#')")
        problems.check()
        return self


class ShardSection(Section):
    count: int = Field(
        1,
        ge=1,
        le=1024,
        description="Agents sharing this plant's machines (all with the same subscriptions); 1 = this agent owns all.",
    )
    index: int = Field(
        0,
        ge=0,
        description="This agent's share, 0..count-1: it stores and scores the machines whose rendezvous hash it "
        "wins and acknowledges the others (docs/scale_out.md).",
    )

    @model_validator(mode="after")
    def _check(self) -> ShardSection:
        if self.index >= self.count:
            problems = Problems()
            problems.add("index", f"must be below count ({self.count})")
            problems.check()
        return self


class MqttSection(Section):
    host: EnvStr = Field("127.0.0.1", description="Broker host.")
    port: EnvInt = Field(1883, ge=1, le=65535, description="Broker port (1883 plaintext, usually 8883 with TLS).")
    client_id: EnvStr | None = Field(
        None,
        description="MQTT client id; null = pdm-agent-{agent.id}. Keep it stable: the persistent session hangs on it.",
    )
    protocol: Annotated[Literal["5", "3.1.1"], BeforeValidator(_protocol)] = Field(
        "5", description='MQTT protocol version: "5" or "3.1.1".'
    )
    username: EnvStr | None = Field(None, description="Broker user, e.g. ${PDM_MQTT_USERNAME}.")
    password: EnvStr | None = Field(
        None,
        repr=False,
        description="Broker password; better ${PDM_MQTT_PASSWORD} or password_file. Never logged, not in repr.",
    )
    password_file: ConfigPath | None = Field(
        None,
        description="A file holding the password (one line, read once at start), e.g. /run/secrets/mqtt; "
        "exclusive with password.",
    )
    require_tls: bool = Field(
        False,
        description="Refuse to start unless tls.enabled: credentials and data never cross the network in plaintext.",
    )
    tls: MqttTlsSection = Field(default_factory=MqttTlsSection, description="TLS to the broker.")
    keepalive_s: int = Field(30, gt=0, description="MQTT keepalive, seconds.")
    reconnect_min_s: float = Field(1.0, gt=0, description="First reconnect delay; doubles after each failure ...")
    reconnect_max_s: float = Field(30.0, gt=0, description="... up to this cap (>= reconnect_min_s).")
    session_expiry_s: int = Field(
        86_400,
        ge=0,
        description="MQTT 5: how long the broker keeps our session (and queued QoS 1 messages) while we are away.",
    )
    silence_timeout_s: float = Field(
        0.0,
        ge=0,
        description="Liveness watchdog: reconnect when no message arrived for this long while connected; 0 = off.",
    )
    topic_template: EnvStr = Field(
        "factory/{site}/{line}/{machine}/{sensor}",
        description="Each {name} is one topic level and becomes an InfluxDB tag; {machine} and {sensor} are required.",
    )
    subscriptions: StrList = Field(
        (),
        description="Topic filters; empty = the one derived from the template (placeholders become +).",
    )
    qos: Annotated[Literal[0, 1], StrictIntChoice] = Field(
        1,
        description="Subscription QoS (1 = at least once; readings are acknowledged once stored in the spool).",
    )
    base_topic: EnvStr = Field(
        "pdm/{agent_id}",
        description="Prefix of everything the agent publishes: status, heartbeat, alerts, state, deadletter.",
    )
    max_payload_bytes: int = Field(
        1_048_576, gt=0, description="Larger payloads are rejected to the dead-letter topic."
    )
    max_future_s: float = Field(
        86_400.0, ge=0, description="Device timestamps further than this ahead of arrival are rejected."
    )
    max_fields_per_message: int = Field(
        64, gt=0, description="A fields payload with more fields is rejected (dead letter too_many_fields)."
    )
    max_field_keys_per_machine: int = Field(
        256,
        gt=0,
        description="Distinct field names one machine may use over time; a message bringing one more is rejected "
        "(dead letter field_keys). The names known are kept in field_keys.json beside the spool.",
    )
    max_field_keys: int = Field(
        4096,
        gt=0,
        description="Distinct field names of all machines together (field keys of the reading measurement), likewise.",
    )
    decoder: DecoderSection = Field(
        default_factory=DecoderSection, description="How payloads are decoded into readings and sample blocks."
    )
    shard: ShardSection = Field(
        default_factory=ShardSection,
        description="Several agents for one plant: each owns a disjoint share of the machines by a hash of the "
        "machine id, with all their windows and alert state.",
    )
    outbound: OutboundSettings = Field(
        default_factory=OutboundSettings,
        description="Priorities and bounds of what the agent publishes: alerts first, dead letters beyond a rate "
        "summarised (agent.ingest.outbound).",
    )

    @field_validator("topic_template")
    @classmethod
    def _template(cls, value: str) -> str:
        TopicTemplate(value)  # ValueError: what is wrong with it
        return value

    @model_validator(mode="after")
    def _check(self) -> MqttSection:
        problems = Problems()
        if self.reconnect_max_s < self.reconnect_min_s:
            problems.add("reconnect_max_s", "must be >= mqtt.reconnect_min_s")
        if self.require_tls and not self.tls.enabled:
            problems.add(
                "require_tls",
                "is true but mqtt.tls.enabled is false: refusing a plaintext connection to the broker "
                "(enable mqtt.tls or set require_tls: false)",
            )
        secret_from_file(self, "password", "password_file", problems)
        for topic_filter in self.subscriptions:
            if topic_filter.startswith("$share/"):
                problems.add(
                    "subscriptions",
                    f"{topic_filter!r} is a shared subscription: the broker hands each message to one member "
                    "(Mosquitto round-robin), which splits a machine's stream across agents and breaks its windows "
                    "and alert state; give every agent the same plain filters and mqtt.shard (count, index)",
                )
        problems.check()
        return self
