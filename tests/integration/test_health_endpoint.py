"""The health endpoint over real HTTP, and its checks against a real Spool, Mosquitto and InfluxDB 1.6.7.

Every server listens on a free port (``port=0``); every wait is a poll with a generous timeout, never a
timing assertion.
"""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from agent import schema
from agent.bootstrap import build_agent
from agent.config import parse_config
from agent.health.selfmetrics import agent_fields
from agent.health.server import HealthServer, build_health_server
from agent.ingest.mqtt import MqttConnection
from agent.ingest.settings import MqttSettings
from agent.metrics import Metrics
from agent.spool.sqlite import Spool
from agent.storage.influx_v1 import InfluxV1Sink
from agent.storage.line_protocol import format_point
from pdm_tools.dev import services as devservices
from pdm_tools.dev.services import Service

pytestmark = pytest.mark.integration

TIMEOUT_S = 20.0
REPO = Path(__file__).resolve().parents[2]


def get(url: str, method: str = "GET") -> tuple[int, str, bytes]:
    """Status, content type and body; error statuses are answers too, not exceptions."""
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], exc.read()


def get_json(url: str) -> tuple[int, dict]:
    status, content_type, body = get(url)
    assert content_type == "application/json"
    return status, json.loads(body)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {TIMEOUT_S:.0f} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def servers() -> Iterator[Callable[..., HealthServer]]:
    """Starts health servers on free ports and stops them after the test."""
    made: list[HealthServer] = []

    def make(metrics: Metrics, readiness: dict, liveness: dict | None = None) -> HealthServer:
        server = HealthServer(metrics, readiness, host="127.0.0.1", port=0, liveness=liveness)
        server.start()
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


# --- the endpoint -----------------------------------------------------------------------------------------


def test_healthz_readyz_and_metrics_answer_on_a_free_port(servers: Callable[..., HealthServer]) -> None:
    metrics = Metrics()
    metrics.inc("ingest.messages", 7)
    metrics.inc("decode.errors", reason="bad_json")
    metrics.observe("inference.seconds", 0.003, model="vibration-anomaly")
    state = {"mqtt": False, "spool": True}
    server = servers(metrics, {name: (lambda n=name: state[n]) for name in state})
    assert server.port != 0

    assert get_json(f"{server.url}/healthz") == (200, {"status": "ok", "checks": {}})
    assert get_json(f"{server.url}/readyz") == (
        503,
        {"status": "failing", "checks": {"mqtt": {"ok": False}, "spool": {"ok": True}}},
    )
    state["mqtt"] = True
    status, body = get_json(f"{server.url}/readyz")
    assert (status, body["status"]) == (200, "ok")

    status, content_type, text = get(f"{server.url}/metrics")
    assert (status, content_type) == (200, CONTENT_TYPE_LATEST)
    lines = text.decode().splitlines()
    assert "pdm_ingest_messages_total 7.0" in lines
    assert 'pdm_decode_errors_total{reason="bad_json"} 1.0' in lines
    assert 'pdm_inference_seconds_count{model="vibration-anomaly"} 1.0' in lines
    assert 'pdm_inference_seconds_bucket{le="0.005",model="vibration-anomaly"} 1.0' in lines
    assert "pdm_mqtt_connected 0.0" in lines  # from the start, before any connection
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}
    assert all(f.documentation for f in families.values())
    assert "process_resident_memory_bytes" in families and "process_cpu_seconds" in families


def test_other_paths_are_404_and_head_and_query_strings_work(servers: Callable[..., HealthServer]) -> None:
    server = servers(Metrics(), {})
    assert get(f"{server.url}/")[0] == 404
    assert get(f"{server.url}/metrics/extra")[0] == 404
    assert get(f"{server.url}/readyz?verbose=1")[0] == 200
    status, _, body = get(f"{server.url}/healthz", method="HEAD")
    assert (status, body) == (200, b"")
    assert get(f"{server.url}/metrics", method="POST")[0] == 501


def test_a_check_that_raises_fails_readiness_with_its_error_and_the_server_keeps_serving(
    servers: Callable[..., HealthServer],
) -> None:
    def broken() -> bool:
        raise OSError("disk on fire")

    server = servers(Metrics(), {"spool": broken, "models": lambda: True})
    for _ in range(3):
        status, body = get_json(f"{server.url}/readyz")
        assert status == 503
        assert body["checks"] == {"spool": {"ok": False, "error": "OSError: disk on fire"}, "models": {"ok": True}}
    assert get(f"{server.url}/healthz")[0] == 200


def test_healthz_fails_when_a_worker_thread_has_died(servers: Callable[..., HealthServer]) -> None:
    release = threading.Event()
    worker = threading.Thread(target=release.wait, daemon=True)
    worker.start()
    server = servers(Metrics(), {}, liveness={"ingest": worker.is_alive})
    assert get_json(f"{server.url}/healthz")[0] == 200
    release.set()
    worker.join()
    assert get_json(f"{server.url}/healthz") == (503, {"status": "failing", "checks": {"ingest": {"ok": False}}})


def test_a_taken_port_fails_the_start_naming_the_config_key() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = HealthServer(Metrics(), {}, host="127.0.0.1", port=taken.getsockname()[1])
        with pytest.raises(OSError, match=r"health\.port: cannot serve on 127\.0\.0\.1"):
            server.start()


def test_an_address_of_no_interface_fails_the_start_naming_the_host() -> None:
    server = HealthServer(Metrics(), {}, host="192.0.2.1", port=0)  # TEST-NET-1: never a local address
    with pytest.raises(OSError, match=r"health\.host: cannot serve on 192\.0\.2\.1"):
        server.start()


def test_stop_frees_the_port_and_is_idempotent() -> None:
    server = HealthServer(Metrics(), {}, port=0)
    server.start()
    port = server.port
    server.stop()
    server.stop()
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))  # nothing listens there any more


# --- readiness against real components --------------------------------------------------------------------


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Service]:
    """A broker this test may stop and restart (the shared one must stay up)."""
    try:
        service = devservices.start_mosquitto(tmp_path / "mosquitto")
    except devservices.ServiceError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield service
    service.stop()


def test_readyz_follows_the_broker_going_away_and_coming_back(
    own_broker: Service, tmp_path: Path, servers: Callable[..., HealthServer]
) -> None:
    metrics = Metrics()
    spool = Spool(tmp_path / "spool.db", max_bytes=1 << 20, max_points=1000, metrics=metrics)
    conn = MqttConnection(
        MqttSettings(
            host=own_broker.host,
            port=own_broker.port,
            client_id=f"health-{time.monotonic_ns()}",
            reconnect_min_s=0.1,
            reconnect_max_s=0.5,
        ),
        on_message=lambda _message: None,
        metrics=metrics,
    )
    server = servers(metrics, {"mqtt": lambda: conn.is_connected, "spool": spool.check_writable})
    try:
        conn.start()
        assert conn.wait_connected(TIMEOUT_S)
        spool.append_lines(["m v=1 1"])
        assert get_json(f"{server.url}/readyz")[0] == 200

        own_broker.stop()
        wait_until(lambda: get_json(f"{server.url}/readyz")[0] == 503, "readyz to report the broker gone")
        status, body = get_json(f"{server.url}/readyz")
        assert body["checks"] == {"mqtt": {"ok": False}, "spool": {"ok": True}}
        assert "pdm_mqtt_connected 0.0" in get(f"{server.url}/metrics")[2].decode().splitlines()

        own_broker.start()  # same port
        wait_until(lambda: get_json(f"{server.url}/readyz")[0] == 200, "readyz to report the broker back")
        metrics_text = get(f"{server.url}/metrics")[2].decode()
        assert "pdm_mqtt_connected 1.0" in metrics_text.splitlines()
        assert "pdm_mqtt_connects_total 2.0" in metrics_text.splitlines()
        assert "pdm_spool_oldest_age_seconds " in metrics_text  # the line spooled above is still waiting

        spool.close()
        status, body = get_json(f"{server.url}/readyz")
        assert status == 503
        assert body["checks"]["spool"]["ok"] is False and "closed" in body["checks"]["spool"]["error"]
    finally:
        conn.stop()
        spool.close()


def test_metrics_say_disconnected_while_the_broker_is_unreachable_from_the_start(
    servers: Callable[..., HealthServer],
) -> None:
    metrics = Metrics()
    conn = MqttConnection(
        MqttSettings(
            host=devservices.HOST,
            port=devservices.free_port(),  # nobody listens
            client_id=f"health-{time.monotonic_ns()}",
            reconnect_min_s=0.1,
            reconnect_max_s=0.5,
        ),
        on_message=lambda _message: None,
        metrics=metrics,
    )
    server = servers(metrics, {"mqtt": lambda: conn.is_connected})
    try:
        conn.start()
        wait_until(lambda: metrics.get("mqtt.connect_failures", reason="unreachable") >= 2, "two failed attempts")
        assert get_json(f"{server.url}/readyz")[0] == 503
        lines = get(f"{server.url}/metrics")[2].decode().splitlines()
        assert "pdm_mqtt_connected 0.0" in lines
        assert "pdm_mqtt_connects_total 0.0" in lines
        assert any(line.startswith('pdm_mqtt_connect_failures_total{reason="unreachable"} ') for line in lines)
    finally:
        conn.stop()


def test_a_built_agent_is_ready_when_started_and_its_self_metrics_reach_influxdb(
    mosquitto: Service, influxdb_v1: Service, influx_db_name: str, tmp_path: Path
) -> None:
    """The wiring proposed for the composition root, on a real agent: checks, /metrics, the ``agent`` point."""
    config = parse_config(
        {
            "agent": {"id": f"health-{time.monotonic_ns()}", "heartbeat_s": 60},
            "mqtt": {"host": mosquitto.host, "port": mosquitto.port, "subscriptions": ["factory/#"]},
            "storage": {"url": influxdb_v1.url, "v1": {"database": influx_db_name}, "flush_interval_s": 0.2},
            "spool": {"path": str(tmp_path / "spool.db")},
            "inference": {"models": [{"path": str(REPO / "models/vibration_anomaly"), "sensors": ["vibration"]}]},
            "health": {"port": 0},
        },
        environ={},
    )
    agent = build_agent(config)
    server = build_health_server(
        config,
        agent.metrics,
        readiness={
            "mqtt": lambda: agent.mqtt.is_connected,
            "models": lambda: len(agent.router.models) == len(config.inference.models),
            "spool": agent.spool.check_writable,
        },
        liveness={
            "ingest": agent.ingest.is_alive,
            "scoring": agent.scoring.is_alive,
            "writer": lambda: agent.writer.alive,
        },
    )
    assert server is not None
    server.start()
    try:
        assert get_json(f"{server.url}/healthz")[0] == 503  # built, not started: no worker runs yet
        agent.start()
        assert agent.mqtt.wait_connected(TIMEOUT_S)
        wait_until(lambda: get_json(f"{server.url}/readyz")[0] == 200, "the started agent to be ready")
        status, body = get_json(f"{server.url}/healthz")
        assert (status, sorted(body["checks"])) == (200, ["ingest", "scoring", "writer"])

        # The self-metrics point, as the heartbeat writes it, through the spool and the writer.
        now_ns = time.time_ns()
        fields = agent_fields(agent.metrics.collect())
        agent.spool.append_lines([format_point(schema.AGENT, {schema.TAG_AGENT_ID: config.agent.id}, fields, now_ns)])
        assert agent.writer.flush(TIMEOUT_S)
        fields = agent_fields(agent.metrics.collect())
        assert fields["storage_write_seconds_count"] >= 1 and "storage_write_seconds_p99" in fields
        metrics_text = get(f"{server.url}/metrics")[2].decode()
        assert "pdm_storage_write_seconds_count " in metrics_text
        assert "pdm_spool_oldest_age_seconds 0.0" in metrics_text.splitlines()  # delivered: nothing waits

        sink = InfluxV1Sink(influxdb_v1.url, influx_db_name)
        try:
            rows = sink.query("SELECT mqtt_connects, mqtt_connected, spool_oldest_age_s FROM agent")  # no quoting
            assert rows and rows[0]["values"][0][1:] == [1.0, 1.0, 0.0]

            # The heartbeat as the composition root publishes it: retained on MQTT, and a point in InfluxDB.
            agent.publish_heartbeat()
            heartbeat = _next_message(mosquitto, agent.topics.heartbeat, after_ns=now_ns)
            # A consumer that subscribes later still gets it: the heartbeat is retained.
            late = _next_message(mosquitto, agent.topics.heartbeat, after_ns=now_ns)
            assert late.pop("retained") is True
            heartbeat.pop("retained")
            assert late == heartbeat
            assert (heartbeat["v"], heartbeat["agent_id"]) == (2, config.agent.id)
            fields = heartbeat["fields"]
            assert fields["mqtt_connects"] == 1 and fields["mqtt_connected"] == 1
            assert "spool_oldest_age_s" in fields and "storage_write_seconds_p99" in fields
            assert agent.writer.flush(TIMEOUT_S)
            points = sink.query("SELECT * FROM agent")
            assert points and len(points[0]["values"]) == 2  # this test's point and the heartbeat's
        finally:
            sink.close()
    finally:
        agent.stop()
        wait_until(lambda: get_json(f"{server.url}/readyz")[0] == 503, "the stopped agent to be not ready")
        server.stop()


def _next_message(broker: Service, topic: str, after_ns: int) -> dict:
    """The first message on ``topic`` with ``time_ns`` >= ``after_ns``, read by a new subscriber."""
    received: queue.Queue[dict] = queue.Queue()

    def on_message(_client: paho.Client, _userdata: object, msg: paho.MQTTMessage) -> None:
        received.put({**json.loads(msg.payload), "retained": bool(msg.retain)})

    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"watch-{time.monotonic_ns()}")
    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.subscribe(topic, qos=1)
    client.loop_start()
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            body = received.get(timeout=max(0.01, deadline - time.monotonic()))
            if body["time_ns"] >= after_ns:
                return body
    finally:
        client.loop_stop()
        client.disconnect()


def test_an_ipv6_listen_address_works() -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    with HealthServer(Metrics(), {}, host="::1", port=0) as server:
        assert server.url.startswith("http://[::1]:")
        assert get_json(f"{server.url}/readyz")[0] == 200
