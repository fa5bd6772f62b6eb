"""``storage`` (the InfluxDB sink and the writer) and ``spool`` (the local queue in front of it)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from agent.config.base import ConfigPath, EnvChoice, EnvStr, Section, registry_key, registry_schema, secret_from_file
from agent.config.errors import Problems
from agent.storage.registry import SINKS
from agent.storage.selection import AGGREGATES, POINT_KINDS, Aggregate, PointKind


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
    hold_max_bytes: int = Field(
        64 * 1024**2,
        gt=0,
        description="around_alerts: the blocks kept in memory for a possible alert hold at most this many bytes of "
        "samples in all (default 64 MiB); beyond it the blocks held longest are given up, counted in "
        "storage.raw_hold_evicted.",
    )
    release_points_s: float | None = Field(
        50_000.0,
        gt=0,
        description="around_alerts: released blocks are written to InfluxDB at most this many samples a second, "
        "waiting in the spool meanwhile, so that a storm of alerts does not take a core of the box (InfluxDB "
        "ingesting millions of samples) from the alerts that follow; null = as fast as the database takes them.",
    )


class SinkConnection(Section):
    """What every sink has: its type, where it is, and how its writer batches and retries."""

    type: Annotated[str, EnvChoice, registry_key(SINKS), registry_schema(SINKS)] = Field(
        "influx_v1",
        description="The sink, a registry key: influx_v1 = /write and InfluxQL (InfluxDB 1.x, the v1 "
        "compatibility API of 2.x/3.x), settings in v1; influx_v2 = influxdb-client (InfluxDB 2.x, 3.x, Cloud, "
        "1.8+, VictoriaMetrics), settings in v2.",
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
    writer_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="How much lower the writer process's CPU priority is than the agent's (Unix niceness "
        "added, 0-19): its work waits durably in the spool, an alert does not; 0 = the same priority.",
    )

    @model_validator(mode="after")
    def _check(self) -> SinkConnection:
        problems = Problems()
        if not re.match(r"https?://", self.url):
            problems.add("url", f"must start with http:// or https://, got {self.url!r}")
        elif self.require_tls and not self.url.startswith("https://"):
            problems.add("require_tls", "is true but url is not https://: refusing plaintext")
        if self.backoff_max_s < self.backoff_min_s:
            problems.add("backoff_max_s", "must be >= backoff_min_s")
        problems.check()
        return self


class ReadingsSelection(Section):
    mode: Annotated[Literal["none", "all", "downsample"], EnvChoice] = Field(
        "downsample",
        description="Process readings upstream: none, all (full resolution), or downsample (one point per "
        "series and interval_s with the aggregates, stamped at the interval's start).",
    )
    interval_s: float = Field(60.0, gt=0, description="downsample: the bucket length in seconds.")
    aggregates: list[Aggregate] = Field(
        default_factory=lambda: list(AGGREGATES),
        min_length=1,
        description="downsample: fields <field>_<aggregate> per bucket (plus n, the readings in it).",
    )
    grace_s: float = Field(
        60.0,
        ge=0,
        description="downsample: a bucket is written once a reading of its series falls in a later bucket, or "
        "once the newest reading time seen has passed its end by this much; a reading for a written bucket is "
        "late (counted, not sent).",
    )


class SelectSection(Section):
    kinds: list[PointKind] = Field(
        default_factory=lambda: list(POINT_KINDS),
        description="The agent's own points this sink gets: features, scores (anomaly scores, defect classes), "
        "alerts, alert_commands, heartbeat (the agent point).",
    )
    readings: ReadingsSelection = Field(
        default_factory=ReadingsSelection, description="Process readings: none, all, or downsampled."
    )
    raw_vibration: Annotated[Literal["none", "around_alerts", "all"], EnvChoice] = Field(
        "around_alerts",
        description="Raw vibration: none, around_alerts (the blocks an alert released, with "
        "storage.raw_vibration.mode around_alerts) or all (also the blocks the local sink stores as they come).",
    )


class UpstreamSection(SinkConnection):
    type: Annotated[str, EnvChoice, registry_key(SINKS), registry_schema(SINKS)] = Field(
        "influx_v2",
        description="The sink, a registry key (as storage.type); influx_v2 reaches InfluxDB 2.x/3.x, Cloud and "
        "VictoriaMetrics through the v2 write API.",
    )
    name: str = Field(
        pattern=r"^[a-z][a-z0-9_-]{0,31}$",
        description="The sink's name: its cursor in the spool and its sink label in the metrics (not local).",
    )
    url: EnvStr = Field(description="The upstream's base URL (http:// or https://).")
    max_backlog_bytes: int = Field(
        3 * 2**29,
        gt=0,
        description="Cap of this sink's backlog in bytes (default 1.5 GiB: a day at the demo's rate is 1.35 GB; "
        "below spool.max_bytes, so that it applies first): beyond it its "
        "oldest rows are passed over, moving only this sink's cursor (counted in sink.backlog_dropped_points, "
        "logged once a minute); the local sink's data is never touched.",
    )
    max_backlog_age_s: float = Field(
        7 * 86_400.0,
        gt=0,
        description="Cap of this sink's backlog in age (default 7 days): older rows are passed over the same way.",
    )
    rate_limit_points_s: float | None = Field(
        20_000.0,
        gt=0,
        description="At most this many points a second (catching up after an outage takes a bounded share of "
        "the link and the CPU); null = no limit.",
    )
    ready_max_lag_s: float | None = Field(
        None,
        gt=0,
        description="/readyz fails, naming this sink, while its oldest unsent row is older than this; null = "
        "its backlog never makes the agent unready (it is in /readyz's sinks check and the heartbeat anyway).",
    )
    select: SelectSection = Field(default_factory=SelectSection, description="What this sink gets of the spool.")


class StorageSection(SinkConnection):
    RENAMED: ClassVar[dict[str, str]] = {
        "api": "renamed to type (api: v1 is now type: influx_v1, api: v2 is type: influx_v2)"
    }

    raw_vibration: RawVibrationSection = Field(
        default_factory=RawVibrationSection,
        description="Which raw vibration samples are stored (10,000+ points a second per sensor).",
    )
    upstreams: list[UpstreamSection] = Field(
        default_factory=list,
        description="Further sinks, each with its own cursor in the spool, its own retries and backlog caps, "
        "and a selection of what it gets (the section above is the local sink, which gets everything).",
    )

    @model_validator(mode="after")
    def _names(self) -> StorageSection:
        problems = Problems()
        names = [u.name for u in self.upstreams]
        for i, name in enumerate(names):
            if name == "local":
                problems.add(f"upstreams[{i}].name", "local is the name of the storage section's own sink")
            elif name in names[:i]:
                problems.add(f"upstreams[{i}].name", f"{name!r} is used twice")
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
        description="raw_vibration around_alerts: how long a block held in memory for a possible alert can "
        "still be released by one; older held blocks are given up.",
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
