"""The local service launcher: services start on free ports, restart in place, and never outlive a test."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from agent.storage.influx_v1 import InfluxV1Sink
from pdm_tools.dev import services as devservices
from pdm_tools.dev.services import Service, ServiceError

pytestmark = pytest.mark.integration


def _connects(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def test_session_services_are_up(mosquitto: Service, influxdb_v1: Service, victoria_metrics: Service) -> None:
    assert mosquitto.alive() and mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"
    with urllib.request.urlopen(f"{influxdb_v1.url}/ping", timeout=10) as response:
        assert response.status == 204
        assert response.headers["X-Influxdb-Version"].startswith("1.")
    with urllib.request.urlopen(f"{victoria_metrics.url}/health", timeout=10) as response:
        assert response.read().strip() == b"OK"


def test_mosquitto_accepts_an_mqtt_client(mosquitto: Service) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="devservices-test")
    assert client.connect(mosquitto.host, mosquitto.port, keepalive=10) == mqtt.MQTT_ERR_SUCCESS
    client.disconnect()


def test_stop_ends_the_process_and_frees_the_port(tmp_path: Path) -> None:
    service = devservices.start_mosquitto(tmp_path)
    pid_process = service.process
    service.stop()
    service.stop()  # idempotent
    assert pid_process is not None and pid_process.poll() is not None
    assert not service.alive()
    assert not _connects(service.port)


def test_context_manager_stops_the_service(tmp_path: Path) -> None:
    with devservices.start_victoria_metrics(tmp_path) as vm:
        assert vm.alive()
    assert not vm.alive()
    assert not _connects(vm.port)


def test_influxdb_restarts_on_the_same_port_with_its_data(tmp_path: Path) -> None:
    with devservices.start_influxdb_v1(tmp_path) as influx:
        sink = InfluxV1Sink(influx.url, "keep", timeout_s=10.0)
        sink.create_database()
        sink.write(["m v=1 1", "m v=2 2"])
        port = influx.port
        influx.restart()
        assert influx.alive() and influx.port == port
        assert sink.query("SELECT count(v) FROM m")[0]["values"][0][1] == 2
        sink.close()
    assert (tmp_path / "influxdb.conf").exists()


def test_a_bad_configuration_fails_with_the_log_tail_and_leaves_no_process(tmp_path: Path) -> None:
    with pytest.raises(ServiceError, match="bogus_option") as info:
        devservices.start_mosquitto(tmp_path, extra_conf="bogus_option true")
    assert "exited with status" in str(info.value)
    assert not [s for s in devservices.running() if s.workdir == tmp_path]  # nothing left to stop


def test_a_taken_port_is_reported(tmp_path: Path, mosquitto: Service) -> None:
    with pytest.raises(ServiceError, match="address already in use"):
        devservices.start_mosquitto(tmp_path, port=mosquitto.port)
    assert mosquitto.alive()


def test_starting_a_running_service_again_is_refused(mosquitto: Service) -> None:
    with pytest.raises(ServiceError, match="already running"):
        mosquitto.start()


def test_a_missing_binary_names_the_debian_package() -> None:
    with pytest.raises(ServiceError, match=r"apt-get install -y victoria-metrics-nonexistent"):
        devservices.require_binary("no-such-binary-xyz", "victoria-metrics-nonexistent")


def test_services_die_with_a_killed_parent(tmp_path: Path) -> None:
    script = (
        "import os, signal, sys\n"
        "from pdm_tools.dev import services as devservices\n"
        f"s = devservices.start_mosquitto({str(tmp_path)!r})\n"
        "print(s.process.pid, s.port, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"  # no atexit, no cleanup: only the kernel can help
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=Path(__file__).parents[2], capture_output=True, text=True, check=False
    )
    assert proc.returncode == -9, proc.stderr
    pid, port = (int(x) for x in proc.stdout.split())
    deadline = time.monotonic() + 30.0
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)
    assert not _connects(port)


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_free_port_can_be_bound() -> None:
    port = devservices.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_mosquitto_logs_to_a_file_in_its_work_dir(mosquitto: Service) -> None:
    assert mosquitto.log_path is not None
    assert "running" in mosquitto.log_path.read_text()
