"""``agent`` (identity, logging, heartbeat), ``queues`` between the threads, ``health`` (HTTP endpoint)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator

from agent.config.base import EnvChoice, EnvInt, EnvStr, Section

_AGENT_ID = r"[A-Za-z0-9_.-]+"


class AgentSection(Section):
    id: EnvStr = Field(
        "edge-01",
        description="Agent identity: one MQTT topic level (pdm/{id}/...), the default client id and the InfluxDB "
        "tag agent_id; letters, digits, '_', '.' and '-'.",
        json_schema_extra={"pattern": f"^{_AGENT_ID}$"},
    )
    log_level: Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR"], EnvChoice] = Field(
        "INFO", description="DEBUG, INFO, WARNING or ERROR."
    )
    log_format: Annotated[Literal["text", "json"], EnvChoice] = Field(
        "text",
        description="text (for people) or json (one object per line: time, level, logger, thread, msg, exc; for "
        "log shippers). The --log-format option overrides it.",
    )
    heartbeat_s: float = Field(
        10.0,
        gt=0,
        description="Seconds between heartbeats (counters on MQTT pdm/{id}/heartbeat and in InfluxDB).",
    )
    shutdown_timeout_s: float = Field(
        10.0,
        gt=0,
        description="On SIGTERM, how long to drain the queues and flush the spool to InfluxDB before exiting.",
    )
    switch_interval_ms: float = Field(
        1.0,
        gt=0,
        le=100,
        description="Python's thread switch interval (sys.setswitchinterval) in the agent process: how long a "
        "thread that wants the interpreter lock waits before it asks the holder to let go. Python's 5 ms default "
        "made the ingest thread wait long for the lock after each spool statement and acknowledgement; 0.1 ms "
        "(the default until 2026-12-05) forced so many hand-overs between the MQTT, ingest and scoring threads "
        "that a backlog drain ran 20-25 % slower and the alert tail was longer than at 1 ms (docs/dataplane.md).",
    )
    scoring_process: bool = Field(
        False,
        description="Score in a process of its own (features, models, alert engine), so that it does not share "
        "the interpreter lock with MQTT and ingest: the agent then uses a second core for scoring "
        "(docs/dataplane.md). Not yet with camera images (refused at start).",
    )

    @field_validator("id")
    @classmethod
    def _topic_level(cls, value: str) -> str:
        if not re.fullmatch(_AGENT_ID, value):
            raise ValueError("only letters, digits, '_', '.', '-' are allowed (it is a topic level)")
        return value


class QueuesSection(Section):
    messages_max: int = Field(
        10_000,
        gt=0,
        description="Received messages waiting to be decoded; when full the MQTT thread waits (backpressure).",
    )
    messages_max_bytes: int = Field(
        16 * 1024 * 1024,
        gt=0,
        description="Payload bytes of the received messages waiting to be decoded, together (16 MiB: a few ingest "
        "batches of vibration blocks); when this or messages_max is reached the MQTT thread waits.",
    )
    windows_max: int = Field(
        2_000,
        gt=0,
        description="Windows waiting to be scored; when full for put_timeout_s a window is dropped and counted.",
    )
    put_timeout_s: float = Field(
        5.0, ge=0, description="Seconds the ingest worker waits for room in the windows queue."
    )


class HealthSection(Section):
    enabled: bool = Field(True, description="Serve /healthz, /readyz and Prometheus /metrics over HTTP.")
    host: EnvStr = Field(
        "127.0.0.1",
        min_length=1,
        description="Listen address: 127.0.0.1 keeps it on the box; 0.0.0.0 lets a Prometheus server elsewhere "
        "scrape it.",
    )
    port: EnvInt = Field(9108, ge=0, le=65535, description="TCP port; 0 = any free port (logged at start).")


class HomeAssistantSection(Section):
    enabled: bool = Field(
        False,
        description="Announce the agent and each machine to Home Assistant by MQTT discovery (retained configs "
        "under discovery_prefix): a machine becomes a device with its alert state and anomaly scores as "
        "entities.",
    )
    discovery_prefix: EnvStr = Field(
        "homeassistant",
        min_length=1,
        pattern=r"^[^+#]+$",
        description="Home Assistant's MQTT discovery prefix (its default is homeassistant).",
    )
    scores_interval_s: float = Field(
        10.0,
        ge=0,
        description="Each machine's latest anomaly scores go to Home Assistant (retained on "
        "pdm/{id}/scores/{machine}, one sensor entity per sensor and model) at most this often, in seconds; "
        "0 = no score entities.",
    )
