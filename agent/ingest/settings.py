"""Settings of the MQTT adapter, validated when built (pydantic), so that a bad value fails at start and
not at the first reconnect. The composition root fills them from the config's ``mqtt`` section; tests
build them directly."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class MqttTls(BaseModel):
    """TLS of the broker connection (TLS 1.2 or later)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ca_file: Path | None = Field(
        None, description="PEM file of the CA(s) the broker's certificate must chain to; None: the system trust store."
    )
    cert_file: Path | None = Field(None, description="Client certificate (PEM), for brokers that require one.")
    key_file: Path | None = Field(None, description="Unencrypted private key (PEM) of cert_file.")
    insecure_skip_verify: bool = Field(
        False, description="Check neither the certificate nor the host name: encrypted, not authenticated (tests)."
    )

    def context(self) -> ssl.SSLContext:
        """The client context; ``ValueError`` naming the file when one cannot be loaded."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.ca_file is not None:
            try:
                context.load_verify_locations(cafile=str(self.ca_file))
            except (OSError, ValueError) as exc:
                raise ValueError(f"MqttTls.ca_file: cannot load {self.ca_file}: {exc}") from None
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("MqttTls.cert_file: cert_file and key_file go together")
        if self.cert_file is not None:
            try:
                context.load_cert_chain(str(self.cert_file), str(self.key_file), password=_no_key_password)
            except (OSError, ValueError) as exc:
                raise ValueError(f"MqttTls.cert_file: cannot load {self.cert_file} / {self.key_file}: {exc}") from None
        if self.insecure_skip_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


def _no_key_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for the passphrase of an encrypted key.
    raise ValueError("the private key is encrypted; the agent needs an unencrypted key")


class MqttSettings(BaseModel):
    """Connection settings of ``agent.ingest.mqtt.MqttConnection``."""

    # Errors name the field and the reason, never the input: it may hold the password.
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    host: str = Field("127.0.0.1", min_length=1, description="Broker host.")
    port: int = Field(1883, gt=0, lt=65536, strict=True, description="Broker port.")
    client_id: str = Field(
        "", description="Stable across restarts: the broker keeps the session (and unacknowledged messages) under it."
    )
    protocol: Literal["5", "3.1.1"] = Field("5", description="MQTT protocol version.")
    username: str | None = Field(None, description="Broker user.")
    password: str | None = Field(None, description="Broker password; never logged, masked in repr.")
    tls: MqttTls | None = Field(None, description="TLS settings; None: plaintext TCP.")
    require_tls: bool = Field(False, description="Refuse settings without tls: plaintext is never attempted.")
    keepalive_s: int = Field(30, gt=0, le=65535, strict=True, description="MQTT keepalive in seconds.")
    reconnect_min_s: float = Field(1.0, gt=0, description="First reconnect delay; doubles after each failure.")
    reconnect_max_s: float = Field(30.0, gt=0, description="Cap of the reconnect delay.")
    subscriptions: tuple[str, ...] = Field((), description="Topic filters subscribed to on every connect.")
    qos: Literal[0, 1] = Field(1, description="QoS of the subscriptions; 1 = at least once, manual acknowledgement.")
    subscriptions_file: Path | None = Field(
        None,
        description="Remembers the filters subscribed in the persistent session (agent.ingest.remembered), so "
        "that a filter no longer configured is unsubscribed at the next connect; None: not remembered.",
    )
    clean_start: bool = Field(False, description="Start without the broker's stored session.")
    session_expiry_s: int = Field(
        86_400, ge=0, le=0xFFFFFFFF, strict=True, description="MQTT 5: how long the broker keeps the session."
    )
    status_topic: str | None = Field(None, description="Retained online/offline status with the last will; None: off.")
    online_payload: bytes = Field(b'{"v":1,"state":"online"}', description="Status payload while connected.")
    offline_payload: bytes = Field(b'{"v":1,"state":"offline"}', description="Status payload; also the last will.")
    max_queued_messages: int = Field(
        10_000, gt=0, description="Outgoing messages paho keeps while disconnected; beyond it publish fails (counted)."
    )
    stop_timeout_s: float = Field(
        5.0, gt=0, description="How long stop() waits for the offline status to be confirmed."
    )
    silence_timeout_s: float = Field(
        0.0, ge=0, strict=True, description="Reconnect when connected but silent this long; 0 turns the watchdog off."
    )

    @field_validator("subscriptions", mode="before")
    @classmethod
    def _filters(cls, value: object) -> object:
        if (
            isinstance(value, str)
            or not isinstance(value, list | tuple)
            or not all(isinstance(s, str) and s for s in value)
        ):
            raise ValueError(f"must be a tuple of non-empty topic filters, got {value!r}")
        return value

    @field_validator("status_topic")
    @classmethod
    def _status_topic(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(c in value for c in "+#")):
            raise ValueError(f"must be a topic name without wildcards, got {value!r}")
        return value

    @model_validator(mode="after")
    def _together(self) -> Self:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(f"reconnect_max_s must be >= reconnect_min_s ({self.reconnect_min_s})")
        if not self.clean_start and not self.client_id:
            raise ValueError("client_id is required for a persistent session (clean_start false)")
        if self.password is not None and self.username is None:
            raise ValueError("password needs a username")
        if self.require_tls and self.tls is None:
            raise ValueError("require_tls is true but tls is not configured: refusing a plaintext connection")
        if self.silence_timeout_s and not self.subscriptions:
            raise ValueError("silence_timeout_s needs subscriptions: without them no message is expected")
        return self

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, ("***" if name == "password" and value is not None else value)


class OutboundSettings(BaseModel):
    """Priorities and bounds of what the agent publishes (``agent.ingest.outbound.Outbound``); config key
    ``mqtt.outbound``.

    Every message waits in the queue of its kind (alert > control > status > dead letter); at most ``window``
    of them are in the MQTT client at a time, so a flood of one kind never fills the client's own queue and
    never delays a more urgent kind by more than ``window`` messages.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    window: int = Field(
        100,
        gt=0,
        le=1000,
        description="Messages handed to the MQTT client and not yet confirmed by the broker (PUBACK), at most; "
        "the rest wait in the agent's queues, most urgent first. Keep it well below max_queued_messages.",
    )
    alerts_max: int = Field(
        10_000,
        gt=0,
        description="Alerts waiting for the broker (e.g. while it is away); beyond it the oldest is dropped "
        "(counted). Sent before anything else.",
    )
    control_max: int = Field(
        1_000,
        gt=0,
        description="Command replies and retained machine states waiting; beyond it the oldest is dropped "
        "(counted). A newer state of a machine replaces the waiting one.",
    )
    status_max: int = Field(
        100,
        gt=0,
        description="Heartbeats and other retained status waiting; only the latest per topic is kept.",
    )
    deadletter_max: int = Field(
        1_000,
        gt=0,
        description="Dead letters waiting; a rejection that finds no room goes into the next summary instead.",
    )
    deadletter_rate_per_s: float = Field(
        20.0,
        gt=0,
        description="Rejected messages reported one by one on the dead-letter topic, on average per second; "
        "beyond it (and deadletter_burst) they are counted per reason and reported in a summary.",
    )
    deadletter_burst: int = Field(
        100, gt=0, description="Rejections reported one by one in a burst before deadletter_rate_per_s applies."
    )
    deadletter_summary_interval_s: float = Field(
        10.0,
        gt=0,
        description="How often a summary of the rejections not reported one by one is published (only when "
        "there were some): counts per reason over the interval.",
    )
