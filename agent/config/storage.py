"""``storage`` (the InfluxDB sink and the writer) and ``spool`` (the local queue in front of it)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from agent.config.base import ConfigPath, EnvChoice, EnvStr, Section, registry_key, registry_schema, secret_from_file
from agent.config.errors import Problems
from agent.storage.registry import SINKS


class InfluxV1Section(Section):
    database: EnvStr = Field("pdm", description="Database to write to.")
    retention_policy: EnvStr | None = Field(None, description="null = the database's default retention policy.")
    username: EnvStr | None = Field(None, description="InfluxDB user, e.g. ${PDM_INFLUX_USERNAME}.")
    password: EnvStr | None = Field(
        None,
        repr=False,
        description="InfluxDB password; better ${PDM_INFLUX_PASSWORD} or password_file. Never logged, not in repr.",
    )
    password_file: ConfigPath | None = Field(
        None,
        description="A file holding the password (one line, read once at start); exclusive with password.",
    )
    create_database: bool = Field(
        True,
        description="Run CREATE DATABASE at start (idempotent); set false if the user may not.",
    )

    @model_validator(mode="after")
    def _secret(self) -> InfluxV1Section:
        problems = Problems()
        secret_from_file(self, "password", "password_file", problems)
        problems.check()
        return self


class InfluxV2Section(Section):
    org: EnvStr = Field("pdm", description="Organization.")
    bucket: EnvStr = Field("pdm", description="Bucket.")
    token: EnvStr | None = Field(
        None,
        repr=False,
        description="API token, e.g. ${PDM_INFLUX_TOKEN}, or token_file. Never logged, not in repr.",
    )
    token_file: ConfigPath | None = Field(
        None,
        description="A file holding the token (one line, read once at start); exclusive with token.",
    )

    @model_validator(mode="after")
    def _secret(self) -> InfluxV2Section:
        problems = Problems()
        secret_from_file(self, "token", "token_file", problems)
        problems.check()
        return self


class RawVibrationSection(Section):
    mode: Annotated[Literal["all", "every_n", "around_alerts", "none"], EnvChoice] = Field(
        "around_alerts",
        description="Which raw vibration blocks are stored: all, one block in every_n, the blocks around an "
        "alert (around_alerts), or none.",
    )
    every_n: int = Field(10, gt=0, description="every_n: store one block in this many.")
    keep_blocks: int = Field(10, gt=0, description="around_alerts: blocks kept before an alert and stored after it.")


class StorageSection(Section):
    RENAMED: ClassVar[dict[str, str]] = {
        "api": "renamed to type (api: v1 is now type: influx_v1, api: v2 is type: influx_v2)"
    }

    type: Annotated[str, EnvChoice, registry_key(SINKS), registry_schema(SINKS)] = Field(
        "influx_v1",
        description="The sink, a registry key: influx_v1 = /write and InfluxQL (InfluxDB 1.x, the v1 "
        "compatibility API of 2.x/3.x), settings in v1; influx_v2 = influxdb-client (InfluxDB 2.x, 3.x, Cloud, "
        "1.8+), settings in v2.",
    )
    url: EnvStr = Field("http://127.0.0.1:8086", description="InfluxDB base URL (http:// or https://).")
    v1: InfluxV1Section = Field(default_factory=InfluxV1Section, description="Settings of type influx_v1.")
    v2: InfluxV2Section = Field(default_factory=InfluxV2Section, description="Settings of type influx_v2.")
    require_tls: bool = Field(False, description="Refuse a plaintext (http://) InfluxDB URL.")
    batch_size: int = Field(5000, gt=0, description="Points per write request.")
    flush_interval_s: float = Field(
        1.0, gt=0, description="Longest time a point waits in the spool before a write is attempted."
    )
    timeout_s: float = Field(10.0, gt=0, description="HTTP timeout of one write.")
    backoff_min_s: float = Field(
        0.5,
        gt=0,
        description="Retry delay after a retryable failure (timeout, connection refused, 429, 5xx) ...",
    )
    backoff_max_s: float = Field(
        30.0, gt=0, description="... doubling, with jitter, up to this cap (>= backoff_min_s)."
    )
    writer_process: bool = Field(
        True,
        description="Run the writer (line protocol and HTTP) in a process of its own, on the second core; "
        "false = a thread of the agent (single-core boxes, tests).",
    )
    raw_vibration: RawVibrationSection = Field(
        default_factory=RawVibrationSection,
        description="Which raw vibration samples are stored (10,000+ points a second per sensor).",
    )

    @model_validator(mode="after")
    def _check(self) -> StorageSection:
        problems = Problems()
        if not re.match(r"https?://", self.url):
            problems.add("url", f"must start with http:// or https://, got {self.url!r}")
        elif self.require_tls and not self.url.startswith("https://"):
            problems.add("require_tls", "is true but storage.url is not https://: refusing plaintext")
        if self.backoff_max_s < self.backoff_min_s:
            problems.add("backoff_max_s", "must be >= storage.backoff_min_s")
        problems.check()
        return self


class SpoolSection(Section):
    RENAMED: ClassVar[dict[str, str]] = {
        "max_rows": "replaced by max_points and max_bytes (the spool holds messages and blocks, not lines)"
    }

    path: ConfigPath = Field(
        Path("spool.db"),
        description="SQLite file (WAL): a log of what arrived, kept until every sink has confirmed it.",
    )
    max_bytes: int = Field(
        2 * 1024**3,
        gt=0,
        description="Cap in bytes of the spool's rows (default 2 GiB); beyond it drop_policy applies, every "
        "drop counted.",
    )
    max_points: int = Field(
        200_000_000,
        gt=0,
        description="Cap in points (a reading, a raw sample, a score ...); beyond it drop_policy applies.",
    )
    drop_policy: Annotated[Literal["oldest", "newest"], EnvChoice] = Field(
        "oldest", description="Which points go when the spool is full: oldest or newest."
    )
    hold_s: float = Field(
        120.0,
        gt=0,
        description="raw_vibration around_alerts: how long a block not yet stored stays in the spool, so that "
        "an alert can still release it.",
    )
    reserve_bytes: int = Field(
        32 * 1024**2,
        ge=0,
        description="Size of a reserve file kept beside the spool (default 32 MiB). When the disk fills up it is "
        "released, so that delivery, compaction and the agent's state files still have room while new messages "
        "wait at the broker; 0 = none.",
    )
    arrivals_max_age_s: float = Field(
        86_400.0,
        gt=0,
        description="How long the arrival time of a stored message without a device timestamp is kept, so that a "
        "redelivery of it is stored with the same time, not as a second point. At least mqtt.session_expiry_s.",
    )
    arrivals_max_rows: int = Field(
        1_000_000,
        gt=0,
        description="At most this many arrival records are kept (the newest; about 60 bytes each).",
    )
