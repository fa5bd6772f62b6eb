"""The health endpoint: ``/healthz``, ``/readyz`` and Prometheus ``/metrics`` on the stdlib HTTP server.

- ``GET /healthz``: 200 while the process answers and every liveness check passes (the worker threads are
  alive), else 503. An orchestrator restarts the agent on repeated 503s.
- ``GET /readyz``: 200 when every readiness check passes (broker connected, models loaded, spool
  writable), else 503. Not ready is not dead: the agent recovers by itself (reconnects, the disk frees up).
- Both answer JSON: ``{"status": "ok"|"failing", "checks": {"mqtt": {"ok": true}, "spool": {"ok": false,
  "error": "..."}}}``. A check is a callable without arguments returning a truthy value when it passes;
  one that raises fails, with ``"TypeName: message"`` as its error; one that returns a mapping passes unless
  its ``ok`` is false, and its items are shown (the sinks check: each sink's backlog). Checks run on the
  request's thread and should be quick (they are called for every request).
- ``GET /metrics``: the registry of the ``Metrics`` (``agent/metrics.py``) in the Prometheus text format,
  as ``prometheus_client.generate_latest`` writes it.
- ``GET /images/{sha256}``: a camera image from the image store (``agent.images.store``; only when camera
  images are taken in): 200 with its own content type, 404 when unknown or evicted, 400 for a name that is
  no lowercase hex sha256. Content-addressed, so cacheable forever. Unauthenticated like the rest of the
  endpoint: keep ``health.host`` on the box or behind a proxy that authenticates (docs/security.md).
- Anything else: 404; a method other than GET or HEAD: 501 (the stdlib's answer).

Threads: ``start()`` binds the socket (so a taken port fails the start, naming ``health.port``) and serves
from a daemon thread; each request gets its own daemon thread (``ThreadingHTTPServer``), so a slow check or
client does not block the others. ``stop()`` closes the socket and joins the serving thread. A failing
check or renderer never ends the server: the request gets an error status and the exception is logged.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import sys
import threading
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.config import Config
from agent.images.store import SHA256_HEX, ImageStore
from agent.metrics import Metrics

logger = logging.getLogger(__name__)

Check = Callable[[], object]
"""Passes when it returns a truthy value; fails when it returns a falsy one or raises."""

_REQUEST_TIMEOUT_S = 10.0  # a client that sends nothing does not keep a thread forever
IMAGES_PATH = "/images/"


def run_checks(checks: Mapping[str, Check]) -> tuple[bool, dict[str, dict[str, Any]]]:
    """Run every check; whether all passed, and each one's state (with the error of one that raised).

    >>> run_checks({"a": lambda: True, "b": lambda: 1 / 0})
    (False, {'a': {'ok': True}, 'b': {'ok': False, 'error': 'ZeroDivisionError: division by zero'}})
    """
    states: dict[str, dict[str, Any]] = {}
    for name, check in checks.items():
        try:
            result = check()
            # A check may say more than pass or fail (the sinks check: each sink's backlog): a mapping's items
            # go into its state, with its "ok".
            states[name] = (
                {**result, "ok": bool(result.get("ok", True))} if isinstance(result, Mapping) else {"ok": bool(result)}
            )
        except Exception as exc:
            logger.debug("health check %s raised", name, exc_info=True)
            states[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return all(s["ok"] for s in states.values()), states


class HealthServer:
    """Serves the health endpoint of one agent (see the module docstring); ``start`` once, ``stop`` once."""

    def __init__(
        self,
        metrics: Metrics,
        readiness: Mapping[str, Check],
        host: str = "127.0.0.1",
        port: int = 9108,
        liveness: Mapping[str, Check] | None = None,
        images: ImageStore | None = None,
    ) -> None:
        self.metrics = metrics
        self.images = images
        self.readiness = dict(readiness)
        self.liveness = dict(liveness or {})
        self.host = host
        self._port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port once started (the chosen one when configured as 0), else the configured one."""
        return self._server.server_address[1] if self._server is not None else self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Bind and serve from a daemon thread; ``OSError`` naming ``health.port`` (or ``health.host``) if not."""
        if self._server is not None:
            raise RuntimeError("HealthServer already started")
        handler = type("_BoundHandler", (_Handler,), {"health": self})
        server_class = _Server6 if ":" in self.host else _Server  # an IPv6 address such as "::"
        try:
            server = server_class((self.host, self._port), handler)
        except OSError as exc:
            # An unknown name or an address of no interface is the host's fault; anything else (in use,
            # privileged port) the port's.
            bad_host = isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL
            key = "health.host" if bad_host else "health.port"
            raise OSError(exc.errno, f"{key}: cannot serve on {self.host}:{self._port}: {exc.strerror or exc}") from exc
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="health-http", daemon=True)
        self._thread.start()
        logger.info("health endpoint on %s (/healthz, /readyz, /metrics)", self.url)

    def stop(self) -> None:
        """Stop serving and close the socket; requests in progress finish on their own threads. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> HealthServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The stdlib prints the traceback to stderr; route it to the log instead.
        # Called from inside socketserver's ``except Exception``, so the exception is at hand.
        logger.error("health endpoint: error while serving %s", client_address, exc_info=sys.exc_info())


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    health: HealthServer  # set on the subclass that HealthServer.start builds
    timeout = _REQUEST_TIMEOUT_S
    server_version = "pdm-agent"

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, send_body: bool) -> None:
        path = urlsplit(self.path).path
        cache = "no-store"
        try:
            if path == "/healthz":
                status, content_type, body = _checks_response(self.health.liveness)
            elif path == "/readyz":
                status, content_type, body = _checks_response(self.health.readiness)
            elif path == "/metrics":
                status = HTTPStatus.OK
                content_type = CONTENT_TYPE_LATEST
                body = generate_latest(self.health.metrics.registry)
            elif path.startswith(IMAGES_PATH) and self.health.images is not None:
                status, content_type, body = _image_response(self.health, path[len(IMAGES_PATH) :])
                if status == HTTPStatus.OK:
                    cache = "public, max-age=31536000, immutable"  # content-addressed: never changes
            else:
                status, content_type = HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8"
                body = b"not found: try /healthz, /readyz or /metrics\n"
        except Exception:
            logger.exception("health endpoint: %s failed", path)
            status, content_type, body = HTTPStatus.INTERNAL_SERVER_ERROR, "text/plain; charset=utf-8", b"error\n"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # The stdlib writes every request to stderr; a scrape every few seconds belongs at DEBUG.
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("health endpoint: %s %s", self.address_string(), format % args)


def _checks_response(checks: Mapping[str, Check]) -> tuple[HTTPStatus, str, bytes]:
    ok, states = run_checks(checks)
    body = json.dumps({"status": "ok" if ok else "failing", "checks": states}, sort_keys=True) + "\n"
    return (HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE), "application/json", body.encode()


def _image_response(health: HealthServer, name: str) -> tuple[HTTPStatus, str, bytes]:
    text = "text/plain; charset=utf-8"
    assert health.images is not None
    if not SHA256_HEX.fullmatch(name):
        health.metrics.inc("images.fetched", result="bad_request")
        return HTTPStatus.BAD_REQUEST, text, b"not an image name: /images/{sha256 as 64 lowercase hex digits}\n"
    image = health.images.read(name)
    if image is None:
        health.metrics.inc("images.fetched", result="not_found")
        return HTTPStatus.NOT_FOUND, text, b"no such image (never received, or evicted by the store's caps)\n"
    health.metrics.inc("images.fetched", result="ok")
    return HTTPStatus.OK, image.content_type, image.data


def build_health_server(
    config: Config,
    metrics: Metrics,
    readiness: Mapping[str, Check],
    liveness: Mapping[str, Check] | None = None,
    images: ImageStore | None = None,
) -> HealthServer | None:
    """The health server of ``config.health`` (not started), or None when it is disabled; ``images``: the
    store that ``/images/{sha256}`` serves."""
    if not config.health.enabled:
        return None
    return HealthServer(
        metrics, readiness, host=config.health.host, port=config.health.port, liveness=liveness, images=images
    )
