"""Start and stop real local services (Mosquitto, InfluxDB 1.x, VictoriaMetrics) for tests, demo, benchmarks.

Every service runs as a child process on a free 127.0.0.1 port, with its configuration, data and log
inside a given work directory, so nothing depends on a service that happens to be running on the
machine. ``Service.stop()`` terminates the process (SIGTERM, then SIGKILL after a timeout); an
``atexit`` hook stops whatever is still running when the interpreter exits normally, and a start that
fails stops its process before raising ``ServiceError`` with the tail of the service's log. Should this
process be killed outright, the kernel terminates the services too (``setpriv --pdeathsig``).
``Service.restart()`` starts the same command again on the same port and data directory (chaos tests
stop a database or broker and bring it back).

This module is development tooling: the agent itself never starts services. It stays whole (a little over
400 lines) because the three services are thin users of one piece of process machinery (launch, readiness,
parent-death signal, stop at exit), and tests, demo and benchmarks use all of it as one ``devservices`` API.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
DEFAULT_START_TIMEOUT_S = 30.0
DEFAULT_STOP_TIMEOUT_S = 10.0

# Debian package names, for the "what to install" message.
MOSQUITTO_PACKAGE = "mosquitto"
INFLUXDB_PACKAGE = "influxdb"
VICTORIA_METRICS_PACKAGE = "victoria-metrics"


class ServiceError(RuntimeError):
    """A local service could not be found, started or reached; the message says what to do."""


def require_binary(name: str, debian_package: str) -> str:
    """Absolute path of executable ``name`` (also searched in the sbin directories), or ``ServiceError``."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    path = shutil.which(name, path=search)
    if path is None:
        raise ServiceError(
            f"{name!r} was not found on PATH or in /usr/sbin: install the Debian package "
            f"{debian_package!r} (as root: `apt-get install -y {debian_package}`)"
        )
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


ReadyCheck = Callable[["Service"], bool]

_running: set[Service] = set()
_running_lock = threading.Lock()


@dataclass(eq=False)
class Service:
    """A running (or stopped) local service process; ``url`` is its base URL (``mqtt://`` for the broker)."""

    name: str
    host: str
    port: int
    url: str
    process: subprocess.Popen[bytes] | None
    workdir: Path
    argv: list[str] = field(default_factory=list, repr=False)
    log_path: Path | None = field(default=None, repr=False)
    ready: ReadyCheck | None = field(default=None, repr=False)
    start_timeout_s: float = field(default=DEFAULT_START_TIMEOUT_S, repr=False)
    extra_ports: tuple[int, ...] = field(default=(), repr=False)
    _output: IO[bytes] | None = field(default=None, repr=False)

    def alive(self) -> bool:
        """True while the process runs (it may still be starting)."""
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        """SIGTERM the process, then SIGKILL it if it has not exited after ``timeout_s``. Idempotent."""
        process = self.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("%s (pid %d) ignored SIGTERM for %.1f s: killing it", self.name, process.pid, timeout_s)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait()
        if self._output is not None:
            self._output.close()
            self._output = None
        with _running_lock:
            _running.discard(self)

    def start(self) -> None:
        """Start the process (again) with the same command, port and directories; wait until it is ready."""
        if self.alive():
            raise ServiceError(f"{self.name} is already running")
        for port in (self.port, *self.extra_ports):
            # Otherwise the readiness check could be answered by whoever already listens there.
            if not _port_free(self.host, port):
                raise ServiceError(f"cannot start {self.name}: {self.host}:{port}: address already in use")
        self._output = open(self._output_path(), "ab")  # noqa: SIM115 -- closed by stop()
        try:
            self.process = subprocess.Popen(
                _with_parent_death_signal(self.argv),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=self._output,
                stderr=subprocess.STDOUT,
            )
        except OSError as exc:
            self.stop()
            raise ServiceError(f"cannot start {self.name} ({self.argv[0]}): {exc}") from exc
        with _running_lock:
            _running.add(self)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def restart(self, stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        """Stop (if running) and start again on the same port and data directory."""
        self.stop(stop_timeout_s)
        self.start()

    def log_tail(self, lines: int = 30) -> str:
        """Last lines of the service's log and captured output, for error messages."""
        parts = []
        for path in dict.fromkeys(p for p in (self.log_path, self._output_path()) if p is not None):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            tail = "\n".join(text.splitlines()[-lines:])
            if tail:
                parts.append(f"--- {path} ---\n{tail}")
        return "\n".join(parts) or "(no log output)"

    def _output_path(self) -> Path:
        return self.workdir / f"{self.name}.out"

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        delay = 0.02
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise ServiceError(
                    f"{self.name} exited with status {self.process.returncode} while starting on port "
                    f"{self.port}:\n{self.log_tail()}"
                )
            if self.ready is None or self.ready(self):
                return
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"{self.name} did not become ready on port {self.port} "
                    f"within {self.start_timeout_s:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    def __enter__(self) -> Service:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _with_parent_death_signal(argv: list[str]) -> list[str]:
    """Have the kernel SIGTERM the service if this process dies without stopping it (kill -9, OOM).

    Uses util-linux ``setpriv --pdeathsig`` (Essential in Debian). The signal fires when the *thread*
    that started the child ends, so it is only armed for services started from the main thread.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None or threading.current_thread() is not threading.main_thread():
        return argv
    return [setpriv, "--pdeathsig", "TERM", *argv]


def running() -> list[Service]:
    """The services started by this process that have not been stopped."""
    with _running_lock:
        return list(_running)


@atexit.register
def stop_all() -> None:
    """Stop every service started by this process that is still running."""
    with _running_lock:
        services = list(_running)
    for service in services:
        service.stop()


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no obstacle
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _port_open(service: Service) -> bool:
    try:
        with socket.create_connection((service.host, service.port), timeout=0.5):
            return True
    except OSError:
        return False


def _http_status(service: Service, path: str) -> int | None:
    conn = http.client.HTTPConnection(service.host, service.port, timeout=1.0)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def _launch(
    name: str,
    workdir: Path,
    port: int | None,
    build: Callable[[int], tuple[list[str], Path | None, str, ReadyCheck, tuple[int, ...]]],
    attempts: int = 3,
) -> Service:
    """Start a service; when the port was chosen here and got taken meanwhile, retry on a fresh port."""
    workdir.mkdir(parents=True, exist_ok=True)
    last_error: ServiceError | None = None
    for _ in range(attempts if port is None else 1):
        chosen = port if port is not None else free_port()
        argv, log_path, url, ready, extra_ports = build(chosen)
        service = Service(
            name=name,
            host=HOST,
            port=chosen,
            url=url,
            process=None,
            workdir=workdir,
            argv=argv,
            log_path=log_path,
            ready=ready,
            extra_ports=extra_ports,
        )
        try:
            service.start()
        except ServiceError as exc:
            last_error = exc
            if "address already in use" not in str(exc).lower():
                raise
            logger.info("%s: port %d was taken meanwhile, retrying on another one", name, chosen)
            continue
        logger.info("%s started on %s (dir %s)", name, url, workdir)
        return service
    assert last_error is not None
    raise last_error


def start_mosquitto(
    workdir: Path | str,
    port: int | None = None,
    extra_conf: str = "",
    *,
    certfile: Path | str | None = None,
    keyfile: Path | str | None = None,
    cafile: Path | str | None = None,
    password_file: Path | str | None = None,
) -> Service:
    """Start a non-persistent Mosquitto broker listening on 127.0.0.1 only; anonymous unless told otherwise.

    ``certfile`` and ``keyfile`` (PEM) make the listener TLS-only (``cafile``: the CA that client
    certificates would be checked against; clients are not required to present one). ``password_file``
    (made with ``mosquitto_passwd``) turns anonymous access off: clients need a user name and password.
    """
    binary = require_binary("mosquitto", MOSQUITTO_PACKAGE)
    workdir = Path(workdir)
    if (certfile is None) != (keyfile is None):
        raise ServiceError("start_mosquitto: certfile and keyfile go together")

    # Started as root, mosquitto switches to the user "mosquitto", which cannot write into our work dir.
    run_as = f"user {pwd.getpwuid(os.geteuid()).pw_name}\n" if os.geteuid() == 0 else ""
    tls = ""
    if certfile is not None and keyfile is not None:
        tls = f"certfile {Path(certfile).resolve()}\nkeyfile {Path(keyfile).resolve()}\ntls_version tlsv1.2\n"
        if cafile is not None:
            tls += f"cafile {Path(cafile).resolve()}\nrequire_certificate false\n"
    auth = "allow_anonymous true\n"
    if password_file is not None:
        auth = f"allow_anonymous false\npassword_file {Path(password_file).resolve()}\n"

    def build(chosen: int) -> tuple[list[str], Path | None, str, ReadyCheck, tuple[int, ...]]:
        log_path = workdir / "mosquitto.log"
        conf_path = workdir / "mosquitto.conf"
        conf_path.write_text(
            f"listener {chosen} {HOST}\n"
            f"{tls}"
            f"{auth}"
            "persistence false\n"
            f"log_dest file {log_path}\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            "connection_messages true\n"
            f"{run_as}"
            f"{extra_conf}\n"
        )
        scheme = "mqtts" if certfile is not None else "mqtt"
        return [binary, "-c", str(conf_path)], log_path, f"{scheme}://{HOST}:{chosen}", _port_open, ()

    return _launch("mosquitto", workdir, port, build)


def start_influxdb_v1(workdir: Path | str, port: int | None = None) -> Service:
    """Start InfluxDB 1.x (Debian's 1.6.7: v1 HTTP API only) with its data under ``workdir``."""
    binary = require_binary("influxd", INFLUXDB_PACKAGE)
    workdir = Path(workdir)

    def build(chosen: int) -> tuple[list[str], Path | None, str, ReadyCheck, tuple[int, ...]]:
        rpc_port = free_port()  # backup/restore RPC; written into the config, so restart() reuses it
        conf_path = workdir / "influxdb.conf"
        # influxd 1.6 only logs to stderr, which start() sends to influxdb.out in the work dir.
        conf_path.write_text(
            "reporting-disabled = true\n"
            f'bind-address = "{HOST}:{rpc_port}"\n'
            "\n[meta]\n"
            f'  dir = "{workdir / "meta"}"\n'
            "  logging-enabled = false\n"
            "\n[data]\n"
            f'  dir = "{workdir / "data"}"\n'
            f'  wal-dir = "{workdir / "wal"}"\n'
            "  query-log-enabled = false\n"
            "\n[monitor]\n"
            "  store-enabled = false\n"
            "\n[http]\n"
            "  enabled = true\n"
            f'  bind-address = "{HOST}:{chosen}"\n'
            "  auth-enabled = false\n"
            "  log-enabled = true\n"
            "  suppress-write-log = true\n"
            "  pprof-enabled = false\n"
            "  unix-socket-enabled = false\n"
            "\n[logging]\n"
            '  level = "warn"\n'
            "  suppress-logo = true\n"
            "\n[continuous_queries]\n"
            "  log-enabled = false\n"
        )
        return (
            [binary, "run", "-config", str(conf_path)],
            None,
            f"http://{HOST}:{chosen}",
            lambda s: _http_status(s, "/ping") == 204,
            (rpc_port,),
        )

    return _launch("influxdb", workdir, port, build)


def start_victoria_metrics(workdir: Path | str, port: int | None = None) -> Service:
    """Start VictoriaMetrics (accepts InfluxDB line protocol, including the v2 ``/api/v2/write`` API)."""
    binary = require_binary("victoria-metrics", VICTORIA_METRICS_PACKAGE)
    workdir = Path(workdir)

    def build(chosen: int) -> tuple[list[str], Path | None, str, ReadyCheck, tuple[int, ...]]:
        argv = [
            binary,
            f"-storageDataPath={workdir / 'data'}",
            f"-httpListenAddr={HOST}:{chosen}",
            "-retentionPeriod=100y",  # tests write points at any time, also far in the past
            "-loggerLevel=WARN",
        ]
        return argv, None, f"http://{HOST}:{chosen}", lambda s: _http_status(s, "/health") == 200, ()

    return _launch("victoria-metrics", workdir, port, build)


def victoria_metrics_series(service: Service, match: str, expected_samples: int, timeout_s: float = 60.0) -> list[dict]:
    """Series matching the selector ``match`` once at least ``expected_samples`` are searchable (or the timeout).

    VictoriaMetrics names InfluxDB series ``{measurement}_{field}``; tags become labels. It acknowledges a
    write before the rows are searchable (they are buffered for about a second, and /internal/force_flush
    only flushes what has already reached the storage), hence the polling.
    """
    import json
    import urllib.parse
    import urllib.request

    query = urllib.parse.urlencode({"match[]": match, "start": "0"})
    deadline = time.monotonic() + timeout_s
    while True:
        urllib.request.urlopen(f"{service.url}/internal/force_flush", timeout=10).read()
        with urllib.request.urlopen(f"{service.url}/api/v1/export?{query}", timeout=10) as response:
            lines = response.read().decode().splitlines()
        series = [json.loads(line) for line in lines if line.strip()]
        if sum(len(s["values"]) for s in series) >= expected_samples or time.monotonic() > deadline:
            return series
        time.sleep(0.1)
