"""Sink error classification and request shape, against a scripted in-process HTTP server.

Statuses that a real database rarely produces on demand (429 with Retry-After, 413, 503, 401) are
checked here; the real InfluxDB and VictoriaMetrics paths are in tests/integration/test_storage_influx.py.
"""

from __future__ import annotations

import base64
import doctest
import http.server
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from agent.storage import influx_v1
from agent.storage.base import PermanentWriteError, QueryError, RetryableWriteError, classify_status
from agent.storage.influx_v1 import InfluxV1Sink
from agent.storage.influx_v2 import InfluxV2Sink
from pdm_tools.dev.services import free_port

SECRET = "s3cr3t-Pa55"


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeServer:
    url: str
    status: int = 204
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)


@pytest.fixture
def server() -> Iterator[FakeServer]:
    state = FakeServer(url="")

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            parts = urllib.parse.urlsplit(self.path)
            state.requests.append(
                Recorded(
                    self.command,
                    parts.path,
                    urllib.parse.parse_qs(parts.query),
                    dict(self.headers),
                    self.rfile.read(length),
                )
            )
            self.send_response(state.status)
            for key, value in state.headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(state.body)))
            self.end_headers()
            self.wfile.write(state.body)

        do_GET = do_POST = _handle

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


def test_doctests_pass() -> None:
    assert doctest.testmod(influx_v1).failed == 0


@pytest.mark.parametrize(
    ("status", "kind", "rejects_data"),
    [
        (500, RetryableWriteError, None),
        (502, RetryableWriteError, None),
        (503, RetryableWriteError, None),
        (408, RetryableWriteError, None),
        (429, RetryableWriteError, None),
        (400, PermanentWriteError, True),
        (413, PermanentWriteError, True),
        (422, PermanentWriteError, True),
        (401, PermanentWriteError, False),
        (403, PermanentWriteError, False),
        (404, PermanentWriteError, False),
    ],
)
def test_status_classification(status: int, kind: type, rejects_data: bool | None) -> None:
    error = classify_status(status, b'{"error":"something"}', None, "write")
    assert type(error) is kind
    assert error.status == status
    if rejects_data is not None:
        assert error.rejects_data is rejects_data  # type: ignore[attr-defined]
    assert str(error) == f"write: HTTP {status}: something"


def test_error_body_message_is_extracted_from_v1_and_v2_bodies_and_truncated() -> None:
    v2_body = b'{"code":"invalid","message":"bad line"}'
    assert str(classify_status(400, v2_body, None, "w")) == "w: HTTP 400: bad line"
    assert str(classify_status(400, b"plain text\n", None, "w")) == "w: HTTP 400: plain text"
    long = str(classify_status(400, b"x" * 5000, None, "w"))
    assert len(long) < 600 and long.endswith("...")


def test_v1_write_request_shape_and_basic_auth(server: FakeServer) -> None:
    sink = InfluxV1Sink(server.url, "plant db", retention_policy="raw", username="agent", password=SECRET)
    sink.write(["m v=1 1", "m v=2 2"])
    sink.write(["m v=3 3"])  # the keep-alive connection is reused
    sink.close()
    first = server.requests[0]
    assert (first.method, first.path) == ("POST", "/write")
    assert first.query == {"db": ["plant db"], "rp": ["raw"], "precision": ["ns"]}
    assert first.body == b"m v=1 1\nm v=2 2"
    assert first.headers["Authorization"] == "Basic " + base64.b64encode(f"agent:{SECRET}".encode()).decode()
    assert all(SECRET not in str(r.query) for r in server.requests)  # never in the URL
    assert len(server.requests) == 2


def test_v1_credentials_in_the_url_are_used_but_never_shown(server: FakeServer) -> None:
    url = server.url.replace("http://", f"http://agent:{SECRET}@")
    sink = InfluxV1Sink(url, "db")
    server.status, server.body = 401, b'{"error":"authorization failed"}'
    with pytest.raises(PermanentWriteError) as info:
        sink.write(["m v=1 1"])
    assert not info.value.rejects_data
    assert SECRET not in str(info.value) and SECRET not in repr(sink)
    assert server.requests[0].headers["Authorization"].startswith("Basic ")


def test_v1_429_is_retryable_with_retry_after(server: FakeServer) -> None:
    server.status, server.headers = 429, {"Retry-After": "7"}
    with pytest.raises(RetryableWriteError) as info:
        InfluxV1Sink(server.url, "db").write(["m v=1 1"])
    assert info.value.retry_after_s == 7.0


def test_v1_413_rejects_the_data(server: FakeServer) -> None:
    server.status, server.body = 413, b'{"error":"Request Entity Too Large"}'
    with pytest.raises(PermanentWriteError) as info:
        InfluxV1Sink(server.url, "db").write(["m v=1 1"])
    assert info.value.rejects_data and info.value.status == 413


def test_v1_connection_refused_is_retryable() -> None:
    with pytest.raises(RetryableWriteError, match="ConnectionRefused"):
        InfluxV1Sink(f"http://127.0.0.1:{free_port()}", "db", timeout_s=2.0).write(["m v=1 1"])


def test_v1_query_returns_series_of_all_statements(server: FakeServer) -> None:
    server.status = 200
    server.body = (
        b'{"results":[{"statement_id":0,"series":[{"name":"m","columns":["time","count_v"],"values":[[0,3]]}]},'
        b'{"statement_id":1}]}'
    )
    series = InfluxV1Sink(server.url, "db").query("SELECT count(*) FROM m; SELECT * FROM nothing")
    assert series == [{"name": "m", "columns": ["time", "count_v"], "values": [[0, 3]]}]
    assert server.requests[0].method == "GET"
    assert server.requests[0].query["epoch"] == ["ns"]


def test_v1_statement_error_raises_query_error(server: FakeServer) -> None:
    server.status, server.body = 200, b'{"results":[{"statement_id":0,"error":"database not found: x"}]}'
    with pytest.raises(QueryError, match="database not found"):
        InfluxV1Sink(server.url, "x").query("SELECT * FROM m")


def test_v1_create_database_quotes_the_name(server: FakeServer) -> None:
    server.status, server.body = 200, b'{"results":[{"statement_id":0}]}'
    InfluxV1Sink(server.url, 'odd "name"').create_database()
    assert server.requests[0].method == "POST"
    assert server.requests[0].query["q"] == ['CREATE DATABASE "odd \\"name\\""']


def test_v1_rejects_urls_that_are_not_http() -> None:
    with pytest.raises(ValueError, match="http"):
        InfluxV1Sink("influx://localhost:8086", "db")


def test_v2_write_request_shape_and_token(server: FakeServer) -> None:
    sink = InfluxV2Sink(server.url, org="plant", bucket="pdm", token=SECRET, timeout_s=5.0)
    sink.write(["m v=1 1", "m v=2 2"])
    sink.close()
    (request,) = server.requests
    assert (request.method, request.path) == ("POST", "/api/v2/write")
    assert request.query == {"org": ["plant"], "bucket": ["pdm"], "precision": ["ns"]}
    assert request.body == b"m v=1 1\nm v=2 2"
    assert request.headers["Authorization"] == f"Token {SECRET}"


@pytest.mark.parametrize(
    ("status", "kind", "rejects_data"),
    [
        (400, PermanentWriteError, True),
        (401, PermanentWriteError, False),
        (404, PermanentWriteError, False),
        (503, RetryableWriteError, None),
        (429, RetryableWriteError, None),
    ],
)
def test_v2_errors_are_classified_without_the_token(
    server: FakeServer, status: int, kind: type, rejects_data: bool | None
) -> None:
    server.status, server.body = status, b'{"code":"x","message":"refused"}'
    server.headers = {"Content-Type": "application/json", "Retry-After": "3"}
    sink = InfluxV2Sink(server.url, org="plant", bucket="pdm", token=SECRET, timeout_s=5.0)
    with pytest.raises(kind) as info:
        sink.write(["m v=1 1"])
    sink.close()
    error: Any = info.value
    assert error.status == status
    assert str(info.value).endswith(f"HTTP {status}: refused")
    assert SECRET not in str(info.value) and SECRET not in repr(sink)
    if rejects_data is not None:
        assert error.rejects_data is rejects_data
    else:
        assert error.retry_after_s == 3.0


def test_v2_connection_refused_is_retryable() -> None:
    sink = InfluxV2Sink(f"http://127.0.0.1:{free_port()}", org="o", bucket="b", token=SECRET, timeout_s=2.0)
    with pytest.raises(RetryableWriteError, match="refused") as info:
        sink.write(["m v=1 1"])
    assert SECRET not in str(info.value)
    sink.close()
