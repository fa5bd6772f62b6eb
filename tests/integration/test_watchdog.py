"""The MQTT liveness watchdog (``silence_timeout_s``) against a real Mosquitto.

A connection can be up and yet deliver nothing: the broker hangs (here: SIGSTOP), a bridge upstream
died, a TCP connection is half-open and keepalive has not noticed yet (it takes 1.5 keepalive periods).
The watchdog turns "no message for ``silence_timeout_s``" into a reconnect, and the connection must then
deliver again without any manual step.
"""

from __future__ import annotations

import os
import queue
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.ingest.mqtt import MqttConnection
from agent.ingest.settings import MqttSettings
from agent.metrics import Metrics
from agent.records import Message
from pdm_tools.dev import services as devservices
from pdm_tools.dev.services import Service

pytestmark = pytest.mark.integration

TIMEOUT_S = 20.0


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Service]:
    try:
        service = devservices.start_mosquitto(tmp_path / "mosquitto")
    except devservices.ServiceError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield service
    if service.process is not None and service.alive():
        os.kill(service.process.pid, signal.SIGCONT)  # a stopped broker would not act on SIGTERM
    service.stop()


@pytest.fixture
def publisher() -> Iterator[Callable[[Service], paho.Client]]:
    made: list[paho.Client] = []

    def make(broker: Service) -> paho.Client:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"gateway-{uuid.uuid4().hex[:8]}")
        client.connect(broker.host, broker.port, keepalive=60)
        client.loop_start()
        made.append(client)
        return client

    yield make
    for client in made:
        client.disconnect()
        client.loop_stop()


@pytest.fixture
def connection() -> Iterator[Callable[..., tuple[MqttConnection, queue.Queue[Message], Metrics]]]:
    made: list[MqttConnection] = []

    def make(broker: Service, prefix: str, silence_timeout_s: float) -> tuple[MqttConnection, queue.Queue, Metrics]:
        inbox: queue.Queue[Message] = queue.Queue()
        metrics = Metrics()
        settings = MqttSettings(
            host=broker.host,
            port=broker.port,
            client_id=f"{prefix}-agent",
            subscriptions=(f"{prefix}/in/#",),
            keepalive_s=60,  # so that only the watchdog can notice the silence within the test
            reconnect_min_s=0.1,
            reconnect_max_s=0.5,
            silence_timeout_s=silence_timeout_s,
        )
        conn = MqttConnection(settings, inbox.put, metrics)
        made.append(conn)
        conn.start()
        assert conn.wait_connected(TIMEOUT_S) and conn.wait_subscribed(TIMEOUT_S)
        return conn, inbox, metrics

    yield make
    for conn in made:
        conn.stop()


def publish(client: paho.Client, topic: str, payload: bytes) -> None:
    info = client.publish(topic, payload, qos=1)
    info.wait_for_publish(TIMEOUT_S)
    assert info.is_published()


def receive(inbox: queue.Queue[Message], payload: bytes) -> Message:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        try:
            message = inbox.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            pytest.fail(f"{payload!r} not received within {TIMEOUT_S:.0f} s")
        if message.payload == payload:
            return message


def test_hung_broker_is_noticed_by_the_watchdog_and_the_connection_recovers(
    own_broker: Service, connection, publisher, prefix: str
) -> None:
    conn, inbox, metrics = connection(own_broker, prefix, silence_timeout_s=1.0)
    gateway = publisher(own_broker)
    publish(gateway, f"{prefix}/in/a", b"before")
    receive(inbox, b"before")
    assert own_broker.process is not None

    os.kill(own_broker.process.pid, signal.SIGSTOP)  # the TCP connection stays up; nothing flows
    try:
        wait_until(lambda: metrics.get("mqtt.watchdog_reconnects") >= 1, "the watchdog to fire", timeout_s=5.0)
        wait_until(lambda: not conn.is_connected, "the forced disconnect")
        time.sleep(1.0)  # while the broker hangs, the reconnect waits for its CONNACK
        assert not conn.is_connected
    finally:
        os.kill(own_broker.process.pid, signal.SIGCONT)

    assert conn.wait_connected(TIMEOUT_S), "did not reconnect after the broker resumed"
    assert conn.wait_subscribed(TIMEOUT_S)
    publish(gateway, f"{prefix}/in/b", b"after")
    receive(inbox, b"after")
    assert metrics.get("mqtt.connects") >= 2
    assert metrics.get("mqtt.disconnects") >= 1


def test_silent_subscription_forces_reconnects_and_traffic_still_arrives_afterwards(
    mosquitto: Service, connection, publisher, prefix: str
) -> None:
    conn, inbox, metrics = connection(mosquitto, prefix, silence_timeout_s=0.5)
    wait_until(lambda: metrics.get("mqtt.watchdog_reconnects") >= 2, "two forced reconnects")
    wait_until(lambda: metrics.get("mqtt.connects") >= 3, "the reconnects")
    assert conn.wait_connected(TIMEOUT_S) and conn.wait_subscribed(TIMEOUT_S)
    publish(publisher(mosquitto), f"{prefix}/in/x", b"hello")
    receive(inbox, b"hello")


def test_steady_traffic_keeps_the_watchdog_quiet(mosquitto: Service, connection, publisher, prefix: str) -> None:
    conn, inbox, metrics = connection(mosquitto, prefix, silence_timeout_s=2.0)
    gateway = publisher(mosquitto)
    for i in range(20):  # 4 s of traffic, one message every 0.2 s (10 per silence period)
        publish(gateway, f"{prefix}/in/x", str(i).encode())
        time.sleep(0.2)
    receive(inbox, b"19")
    assert metrics.get("mqtt.watchdog_reconnects") == 0
    assert metrics.get("mqtt.connects") == 1
    assert conn.is_connected


def test_watchdog_is_off_by_default_and_needs_subscriptions() -> None:
    assert MqttSettings(client_id="a").silence_timeout_s == 0
    with pytest.raises(ValueError, match="silence_timeout_s needs subscriptions"):
        MqttSettings(client_id="a", silence_timeout_s=5.0)
    with pytest.raises(ValueError, match=r"silence_timeout_s\n  Input should be greater than or equal to 0"):
        MqttSettings(client_id="a", subscriptions=("x/#",), silence_timeout_s=-1.0)
