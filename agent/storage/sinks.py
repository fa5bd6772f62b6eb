"""InfluxDB sinks: deliver a batch of line-protocol lines, or say precisely why not.

Errors are classified where they arise (as Telegraf's InfluxDB outputs do):

- ``RetryableWriteError``: connection refused or reset, timeout, HTTP 408, 429 and 5xx. The batch is
  fine; the writer keeps it and retries later (``retry_after_s`` carries a server's ``Retry-After``).
- ``PermanentWriteError``: any other 4xx; the same request will never succeed. ``rejects_data`` tells
  the writer what to do:

  - ``True`` for 400 (bad line, field type conflict: the body names the line), 413 (too large) and
    422 (unprocessable, e.g. outside retention): the lines are at fault, so the writer splits the batch
    to isolate and dead-letter the bad ones;
  - ``False`` for 401, 403, 404 (credentials, permissions, missing database or bucket): the
    configuration is at fault, not the data, which stays in the spool until an operator fixes it.

Credentials go in the ``Authorization`` header only, never in URLs, messages, logs or ``repr``.

Lifecycle: the writer thread is the only caller of ``write``; ``close`` is called by the composition
root after the writer has stopped. ``query`` and ``create_database`` are for setup, tests and the demo.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import threading
import urllib.parse
from typing import Any, Protocol

logger = logging.getLogger(__name__)

BODY_EXCERPT_CHARS = 500


class WriteError(Exception):
    """A batch could not be delivered; ``status`` is the HTTP status when there was a response."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RetryableWriteError(WriteError):
    """Transient: the same batch may succeed later (connection, timeout, 408, 429, 5xx)."""

    def __init__(self, message: str, status: int | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message, status)
        self.retry_after_s = retry_after_s


class PermanentWriteError(WriteError):
    """The same request can never succeed; ``rejects_data``: the lines are at fault (else the setup is)."""

    def __init__(self, message: str, status: int | None = None, rejects_data: bool = True) -> None:
        super().__init__(message, status)
        self.rejects_data = rejects_data


class QueryError(Exception):
    """An InfluxQL statement failed (the server answered, with an error for the statement)."""


class Sink(Protocol):
    """Where the writer delivers lines.

    ``write`` is called from the writer thread only, with a non-empty batch; it returns once the
    database accepted the whole batch and raises ``RetryableWriteError`` or ``PermanentWriteError``
    otherwise (a partial write is reported as ``PermanentWriteError``; writing the accepted lines again is
    harmless, InfluxDB overwrites a point with the same series and timestamp). ``close`` is called once,
    after the last ``write``.
    """

    def write(self, lines: list[str]) -> None: ...

    def close(self) -> None: ...


RETRYABLE_STATUSES = frozenset({408, 429})
_STALE_CONNECTION_ERRORS = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)
DATA_REJECTED_STATUSES = frozenset({400, 413, 422})


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare for databases, the writer's own backoff applies


def _body_excerpt(body: bytes | str | None) -> str:
    """The server's error message: ``error`` (1.x) or ``message`` (2.x) of a JSON body, else the text."""
    if body is None:
        return ""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        for key in ("error", "message"):
            if isinstance(parsed.get(key), str):
                text = parsed[key]
                break
    text = text.strip()
    return text if len(text) <= BODY_EXCERPT_CHARS else text[:BODY_EXCERPT_CHARS] + "..."


def classify_status(status: int, body: bytes | str | None, retry_after: str | None, what: str) -> WriteError:
    """The error for an unsuccessful HTTP status of a write (``what`` names the target, without secrets)."""
    message = f"{what}: HTTP {status}: {_body_excerpt(body)}"
    if status >= 500 or status in RETRYABLE_STATUSES:
        return RetryableWriteError(message, status, _retry_after(retry_after))
    return PermanentWriteError(message, status, rejects_data=status in DATA_REJECTED_STATUSES)


def _safe_url(url: str) -> tuple[urllib.parse.SplitResult, str | None, str | None]:
    """The URL without user info (for messages), and the user and password it carried."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"InfluxDB URL must be http(s)://host[:port][/path], not {parts.scheme}://...")
    netloc = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    if ":" in parts.hostname:  # IPv6 literal
        netloc = f"[{parts.hostname}]" if parts.port is None else f"[{parts.hostname}]:{parts.port}"
    user = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password else None
    return parts._replace(netloc=netloc), user, password


class InfluxV1Sink:
    """InfluxDB v1 HTTP API (``/write``, ``/query``): InfluxDB 1.x and the v1 compatibility API of 2.x/3.x.

    One keep-alive connection (http.client, no extra dependency), reopened after any error. Basic auth
    when ``username`` is set (for 2.x compatibility: any user name and the token as password).
    """

    def __init__(
        self,
        url: str,
        database: str,
        retention_policy: str | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout_s: float = 10.0,
        create_database: bool = False,
    ) -> None:
        if not database:
            raise ValueError("database must not be empty")
        self.create_missing_database = create_database
        parts, url_user, url_password = _safe_url(url)
        self.url = parts.geturl().rstrip("/")
        self.database = database
        self.retention_policy = retention_policy or None
        self.timeout_s = timeout_s
        self._parts = parts
        user = username if username is not None else url_user
        secret = password if password is not None else url_password
        self._auth_header: str | None = None
        if user is not None:
            token = base64.b64encode(f"{user}:{secret or ''}".encode()).decode("ascii")
            self._auth_header = f"Basic {token}"
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None

    def __repr__(self) -> str:
        return f"InfluxV1Sink(url={self.url!r}, database={self.database!r}, rp={self.retention_policy!r})"

    def _new_connection(self) -> http.client.HTTPConnection:
        host = self._parts.hostname or ""
        if self._parts.scheme == "https":
            return http.client.HTTPSConnection(host, self._parts.port, timeout=self.timeout_s)
        return http.client.HTTPConnection(host, self._parts.port, timeout=self.timeout_s)

    def _request(
        self, method: str, path: str, params: dict[str, str], body: bytes | None, what: str
    ) -> tuple[int, bytes, str | None]:
        """``(status, body, Retry-After)``; transport failures become ``RetryableWriteError``."""
        target = f"{self._parts.path.rstrip('/')}{path}?{urllib.parse.urlencode(params)}"
        headers = {"Content-Type": "text/plain; charset=utf-8"} if body is not None else {}
        if self._auth_header:
            headers["Authorization"] = self._auth_header
        with self._lock:
            for attempt in (1, 2):
                reused = self._conn is not None
                if self._conn is None:
                    self._conn = self._new_connection()
                try:
                    self._conn.request(method, target, body=body, headers=headers)
                    response = self._conn.getresponse()
                    data = response.read()
                    if response.will_close:
                        self._close_connection()
                    return response.status, data, response.getheader("Retry-After")
                except (OSError, http.client.HTTPException) as exc:
                    self._close_connection()
                    stale = isinstance(exc, _STALE_CONNECTION_ERRORS)
                    if attempt == 1 and reused and stale:
                        continue  # the server closed an idle keep-alive connection: one fresh try
                    raise RetryableWriteError(f"{what}: {type(exc).__name__}: {exc}") from exc
        raise AssertionError("unreachable")

    def _close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def write(self, lines: list[str]) -> None:
        """POST the lines to ``/write`` (nanosecond precision); see ``Sink``."""
        if not lines:
            return
        params = {"db": self.database, "precision": "ns"}
        if self.retention_policy:
            params["rp"] = self.retention_policy
        what = f"write of {len(lines)} lines to {self.url} db {self.database!r}"
        payload = "\n".join(lines).encode()
        status, body, retry_after = self._request("POST", "/write", params, payload, what)
        if status == 404 and self.create_missing_database and b"database not found" in body:
            # The database was down at start (or lost its data): create it now rather than retry forever.
            logger.warning("database %r not found on %s; creating it", self.database, self.url)
            self.create_database()
            status, body, retry_after = self._request("POST", "/write", params, payload, what)
        if not 200 <= status < 300:
            raise classify_status(status, body, retry_after, what)

    def _query_results(self, influxql: str, database: str | None, method: str) -> list[dict[str, Any]]:
        params = {"q": influxql, "epoch": "ns"}
        if database:
            params["db"] = database
        what = f"query to {self.url}"
        status, body, retry_after = self._request(method, "/query", params, None, what)
        if not 200 <= status < 300:
            raise classify_status(status, body, retry_after, what)
        results = json.loads(body).get("results", [])
        for result in results:
            if "error" in result:
                raise QueryError(f"{influxql!r}: {result['error']}")
        return list(results)

    def create_database(self) -> None:
        """``CREATE DATABASE`` (idempotent in InfluxDB 1.x)."""
        self._query_results(f"CREATE DATABASE {quote_identifier(self.database)}", None, "POST")

    def query(self, influxql: str, database: str | None = None) -> list[dict[str, Any]]:
        """Run InfluxQL (reads: GET) on ``database`` (default: the sink's); the series of all statements.

        Each series is ``{"name": ..., "tags": {...} (with GROUP BY), "columns": [...], "values": [[...]]}``;
        times are epoch nanoseconds.
        """
        method = "GET" if influxql.lstrip().upper().startswith(("SELECT", "SHOW")) else "POST"
        results = self._query_results(influxql, database or self.database, method)
        return [series for result in results for series in result.get("series", [])]

    def close(self) -> None:
        with self._lock:
            self._close_connection()


def quote_identifier(name: str) -> str:
    r"""An InfluxQL double-quoted identifier.

    >>> print(quote_identifier('my "db"'))
    "my \"db\""
    """
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


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
        parts, _, _ = _safe_url(url)
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
        import urllib3
        from influxdb_client import WritePrecision
        from influxdb_client.rest import ApiException

        if not lines:
            return
        what = f"write of {len(lines)} lines to {self.url} bucket {self.bucket!r}"
        try:
            self._write_api.write(
                bucket=self.bucket,
                org=self.org,
                record="\n".join(lines),
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
