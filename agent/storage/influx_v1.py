"""Sink ``influx_v1``: the InfluxDB v1 HTTP API (``/write``, ``/query`` with InfluxQL).

InfluxDB 1.x and the v1 compatibility API of 2.x and 3.x; tested against InfluxDB 1.6.7. Lifecycle and
error classes: ``agent.storage.base``.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import threading
import urllib.parse
from typing import Any, Protocol

from agent.storage.base import (
    STALE_CONNECTION_ERRORS,
    QueryError,
    RetryableWriteError,
    classify_status,
    safe_url,
)

logger = logging.getLogger(__name__)


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
        parts, url_user, url_password = safe_url(url)
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
                    stale = isinstance(exc, STALE_CONNECTION_ERRORS)
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
        if lines:
            self.write_body("\n".join(lines).encode(), len(lines))

    def write_body(self, payload: bytes, points: int) -> None:
        """``write`` of lines already joined by newlines and encoded (the writer makes them off this thread)."""
        params = {"db": self.database, "precision": "ns"}
        if self.retention_policy:
            params["rp"] = self.retention_policy
        what = f"write of {points} lines to {self.url} db {self.database!r}"
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


class InfluxV1Options(Protocol):
    """The ``storage.v1`` settings this sink reads."""

    database: str
    retention_policy: str | None
    username: str | None
    password: str | None
    create_database: bool


class InfluxV1Settings(Protocol):
    """The ``storage`` settings this sink reads (``agent.config``'s storage section has them)."""

    url: str
    timeout_s: float

    @property
    def v1(self) -> InfluxV1Options: ...


def from_settings(settings: InfluxV1Settings) -> InfluxV1Sink:
    """The sink of ``storage.type: influx_v1``; creates the database now when asked and reachable."""
    v1 = settings.v1
    sink = InfluxV1Sink(
        url=settings.url,
        database=v1.database,
        retention_policy=v1.retention_policy,
        username=v1.username,
        password=v1.password,
        timeout_s=settings.timeout_s,
        create_database=v1.create_database,
    )
    if v1.create_database:
        try:
            sink.create_database()
        except Exception as exc:
            # The database may be down at start: the spool holds the data, and the sink creates the
            # database when a write finds it missing.
            logger.warning("could not create database %s now (%s); will create it on write", v1.database, exc)
    return sink
