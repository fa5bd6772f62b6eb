"""Sink ``influx_v2``: the InfluxDB v2 write API through ``influxdb-client``.

InfluxDB 2.x, 3.x, Cloud and 1.8+; tested against VictoriaMetrics, which accepts the v2 write API.
Lifecycle and error classes: ``agent.storage.base``.
"""

from __future__ import annotations

from typing import Protocol

from agent.storage.base import RetryableWriteError, classify_status, safe_url


class InfluxV2Sink:
    """InfluxDB v2 write API through ``influxdb-client`` (InfluxDB 2.x, 3.x, Cloud, 1.8+, VictoriaMetrics).

    Synchronous writes, no retries inside the client (``retries=False``, its default): retrying is the
    writer's job, with the spool behind it.
    """

    def __init__(self, url: str, org: str, bucket: str, token: str | None = None, timeout_s: float = 10.0) -> None:
        # Imported here so that the v1 path and the unit tests do not pay for the client's import.
        from influxdb_client import InfluxDBClient
        from influxdb_client.client.write_api import SYNCHRONOUS

        if not bucket:
            raise ValueError("bucket must not be empty")
        parts, _, _ = safe_url(url)
        self.url = parts.geturl().rstrip("/")
        self.org = org
        self.bucket = bucket
        self.timeout_s = timeout_s
        self._client = InfluxDBClient(url=self.url, token=token or "", org=org, timeout=int(timeout_s * 1000))
        self._write_api = self._client.write_api(write_options=SYNCHRONOUS)

    def __repr__(self) -> str:
        return f"InfluxV2Sink(url={self.url!r}, org={self.org!r}, bucket={self.bucket!r})"

    def write(self, lines: list[str]) -> None:
        """Write the lines with nanosecond precision; see ``Sink``."""
        if lines:
            self.write_body("\n".join(lines).encode(), len(lines))

    def write_body(self, payload: bytes, points: int) -> None:
        """``write`` of lines already joined by newlines and encoded (the writer makes them off this thread)."""
        import urllib3
        from influxdb_client import WritePrecision
        from influxdb_client.rest import ApiException

        what = f"write of {points} lines to {self.url} bucket {self.bucket!r}"
        try:
            self._write_api.write(
                bucket=self.bucket,
                org=self.org,
                record=payload,
                write_precision=WritePrecision.NS,  # type: ignore[arg-type]  # the constant is typed str
            )
        except ApiException as exc:
            status = int(exc.status or 0)
            retry_after = exc.headers.get("Retry-After") if exc.headers else None
            if status == 0:
                raise RetryableWriteError(f"{what}: no HTTP status: {exc.reason}") from None
            raise classify_status(status, exc.body, retry_after, what) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise RetryableWriteError(f"{what}: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        self._write_api.close()
        self._client.close()


class InfluxV2Options(Protocol):
    """The ``storage.v2`` settings this sink reads."""

    org: str
    bucket: str
    token: str | None


class InfluxV2Settings(Protocol):
    """The ``storage`` settings this sink reads (``agent.config``'s storage section has them)."""

    url: str
    timeout_s: float

    @property
    def v2(self) -> InfluxV2Options: ...


def from_settings(settings: InfluxV2Settings) -> InfluxV2Sink:
    """The sink of ``storage.type: influx_v2``."""
    v2 = settings.v2
    return InfluxV2Sink(url=settings.url, org=v2.org, bucket=v2.bucket, token=v2.token, timeout_s=settings.timeout_s)
