"""The sink seam: what the writer delivers line protocol to, and how a failed delivery is classified.

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

import http.client
import json
import logging
import urllib.parse
from typing import Protocol

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


class BodySink(Sink, Protocol):
    """A sink that also takes a batch already joined by newlines and encoded (``write_body``), so that the
    writer's preparing thread, not its sending thread, pays for the join; ``points`` is the line count."""

    def write_body(self, payload: bytes, points: int) -> None: ...


RETRYABLE_STATUSES = frozenset({408, 429})
STALE_CONNECTION_ERRORS = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)
DATA_REJECTED_STATUSES = frozenset({400, 413, 422})


def retry_after_s(value: str | None) -> float | None:
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
        return RetryableWriteError(message, status, retry_after_s(retry_after))
    return PermanentWriteError(message, status, rejects_data=status in DATA_REJECTED_STATUSES)


def safe_url(url: str) -> tuple[urllib.parse.SplitResult, str | None, str | None]:
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
