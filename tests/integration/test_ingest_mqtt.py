"""The paho-mqtt adapter against a real Mosquitto: delivery, manual acks, status and last will, reconnects.

Tests that stop, restart or reconfigure a broker start their own (``devservices.start_mosquitto``); the
others share the session's ``mosquitto``. Every wait is an event wait with a generous timeout.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.ingest.mqtt import MqttConnection
from agent.ingest.paho_buffered import BufferedClient
from agent.ingest.settings import MqttSettings
from agent.metrics import Metrics
from agent.records import Message
from pdm_tools.dev import services as devservices
from pdm_tools.dev.services import Service

pytestmark = pytest.mark.integration

TIMEOUT_S = 20.0
REPO = Path(__file__).resolve().parents[2]


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.02)


class Inbox:
    """The ``on_message`` callback of a connection under test: it only enqueues, like the agent's."""

    def __init__(self) -> None:
        self.messages: queue.Queue[Message] = queue.Queue()

    def __call__(self, message: Message) -> None:
        self.messages.put(message)

    def get(self, what: str = "a message") -> Message:
        try:
            return self.messages.get(timeout=TIMEOUT_S)
        except queue.Empty:
            pytest.fail(f"no {what} within {TIMEOUT_S:.0f} s")


class Observer:
    """A plain paho client on the side (the gateway, an alert consumer): publishes and records messages."""

    def __init__(self, broker: Service, *filters: str) -> None:
        self.received: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self._subscribed = queue.Queue[int]()
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"observer-{uuid.uuid4().hex[:8]}")
        client.on_message = lambda _c, _u, msg: self.received.put(msg)
        client.on_subscribe = lambda _c, _u, mid, _rc, _p: self._subscribed.put(mid)
        client.connect(broker.host, broker.port)
        client.loop_start()
        self.client = client
        if filters:
            _, mid = client.subscribe([(f, 1) for f in filters])
            assert self._subscribed.get(timeout=TIMEOUT_S) == mid

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(TIMEOUT_S)
        assert info.is_published()

    def next(self, topic: str | None = None) -> paho.MQTTMessage:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            try:
                msg = self.received.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"observer: nothing on {topic or 'its subscriptions'} within {TIMEOUT_S:.0f} s")
            if topic is None or msg.topic == topic:
                return msg

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def prefix() -> str:
    """Every test gets its own topics (aiomqtt's habit), so retained messages never leak between tests."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Service]:
    """A broker this test may stop and restart."""
    try:
        service = devservices.start_mosquitto(tmp_path / "mosquitto")
    except devservices.ServiceError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield service
    service.stop()


@pytest.fixture
def observers() -> Iterator[Callable[..., Observer]]:
    made: list[Observer] = []

    def make(broker: Service, *filters: str) -> Observer:
        made.append(Observer(broker, *filters))
        return made[-1]

    yield make
    for observer in made:
        observer.close()


@pytest.fixture
def connections() -> Iterator[Callable[..., MqttConnection]]:
    """Builds connections and stops whatever a test left running."""
    made: list[MqttConnection] = []

    def make(broker: Service, on_message: Callable[[Message], None], metrics: Metrics | None = None, **kw: object):
        settings = MqttSettings(
            host=broker.host,
            port=broker.port,
            reconnect_min_s=0.1,
            reconnect_max_s=1.0,
            **kw,  # type: ignore[arg-type]
        )
        conn = MqttConnection(settings, on_message, metrics or Metrics())
        made.append(conn)
        return conn

    yield make
    for conn in made:
        conn.stop()


def start_and_wait(conn: MqttConnection) -> None:
    conn.start()
    assert conn.wait_connected(TIMEOUT_S), "not connected"
    assert conn.wait_subscribed(TIMEOUT_S), "not subscribed"


# --- delivery ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_messages_from_another_client_arrive_as_message_objects(
    mosquitto: Service, connections, observers, prefix: str, protocol: str
) -> None:
    inbox, metrics = Inbox(), Metrics()
    conn = connections(
        mosquitto,
        inbox,
        metrics,
        client_id=f"{prefix}-agent",
        protocol=protocol,
        subscriptions=(f"{prefix}/+/+/+/+",),
    )
    start_and_wait(conn)
    assert conn.is_connected
    gateway = observers(mosquitto)
    before_ns = time.time_ns()
    gateway.publish(f"{prefix}/b/l1/press-7/process", b'{"value":61.2}', qos=1)
    gateway.publish(f"{prefix}/b/l1/press-7/vibration", b"\x00\xffbinary", qos=0)

    first, second = inbox.get(), inbox.get()
    assert (first.topic, first.payload, first.qos, first.retained) == (
        f"{prefix}/b/l1/press-7/process",
        b'{"value":61.2}',
        1,
        False,
    )
    assert first.mid > 0
    assert before_ns <= first.received_ns <= time.time_ns()
    assert (second.topic, second.payload, second.qos) == (
        f"{prefix}/b/l1/press-7/vibration",
        b"\x00\xffbinary",
        0,
    )
    conn.ack(first.mid, first.qos)
    conn.ack(second.mid, second.qos)  # QoS 0: nothing to acknowledge, not an error
    assert metrics.get("mqtt.messages") == 2
    assert metrics.get("mqtt.acks") == 1
    assert metrics.get("mqtt.acks_stale") == 0
    assert metrics.get("mqtt.connects") == 1


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_unacknowledged_message_is_redelivered_and_acknowledged_one_is_not(
    mosquitto: Service, connections, observers, prefix: str, protocol: str
) -> None:
    # The pipeline acknowledges only once readings are durable: a message that was handed over but not
    # acknowledged before the agent went away must come back on the next connection (same client id).
    topic_filter = f"{prefix}/#"
    settings = {"client_id": f"{prefix}-agent", "protocol": protocol, "subscriptions": (topic_filter,)}
    gateway = observers(mosquitto)

    first = Inbox()
    conn = connections(mosquitto, first, **settings)
    start_and_wait(conn)
    gateway.publish(f"{prefix}/m/s", b"1")
    delivered = first.get()
    assert (delivered.payload, delivered.dup) == (b"1", False)
    conn.stop()  # without acknowledging

    second = Inbox()
    conn = connections(mosquitto, second, **settings)
    start_and_wait(conn)
    again = second.get("redelivery")
    # The broker marks it a redelivery (DUP) with the packet id of the first delivery: what
    # agent.spool.arrivals needs to give a timestamp-less reading its first arrival time again.
    assert (again.payload, again.dup) == (b"1", True)
    assert again.mid & 0xFFFF == delivered.mid & 0xFFFF
    conn.ack(again.mid, again.qos)
    conn.stop()

    third = Inbox()
    conn = connections(mosquitto, third, **settings)
    start_and_wait(conn)
    gateway.publish(f"{prefix}/m/s", b"marker")
    # Redeliveries come right after the CONNACK, before new messages: the marker proves there was none.
    assert third.get().payload == b"marker"


# --- subscriptions across restarts ------------------------------------------------------------------------


def _two_deliveries(inbox: Inbox, gateway: Observer, topic: str) -> list[bytes]:
    """Publish 1 then 2 and return the first two payloads received: [1, 2] once per message, [1, 1] when
    every message arrives once per matching filter."""
    gateway.publish(topic, b"1")
    gateway.publish(topic, b"2")
    return [inbox.get().payload, inbox.get().payload]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_filter_dropped_from_the_configuration_leaves_the_persistent_session(
    mosquitto: Service, connections, observers, prefix: str, protocol: str, tmp_path: Path
) -> None:
    state = tmp_path / "mqtt_subscriptions.json"
    wide, narrow = f"{prefix}/#", f"{prefix}/+/+"
    settings = {"client_id": f"{prefix}-agent", "protocol": protocol, "subscriptions_file": state}
    gateway = observers(mosquitto)
    conn = connections(mosquitto, Inbox(), subscriptions=(wide, narrow), **settings)
    start_and_wait(conn)
    conn.stop()
    assert json.loads(state.read_text())["filters"] == sorted([wide, narrow])

    inbox, metrics = Inbox(), Metrics()
    conn = connections(mosquitto, inbox, metrics, subscriptions=(narrow,), **settings)
    start_and_wait(conn)  # the UNSUBSCRIBE goes before the SUBSCRIBE: done once subscribed
    assert _two_deliveries(inbox, gateway, f"{prefix}/m/s") == [b"1", b"2"]
    assert metrics.get("mqtt.stale_unsubscribed") == 1
    assert json.loads(state.read_text())["filters"] == [narrow]


def test_without_remembered_filters_the_session_delivers_once_per_filter(
    mosquitto: Service, connections, observers, prefix: str
) -> None:
    """The fault the remembered filters repair (issue 22), shown on the same broker."""
    wide, narrow = f"{prefix}/#", f"{prefix}/+/+"
    gateway = observers(mosquitto)
    conn = connections(mosquitto, Inbox(), client_id=f"{prefix}-agent", subscriptions=(wide, narrow))
    start_and_wait(conn)
    conn.stop()
    inbox = Inbox()
    conn = connections(mosquitto, inbox, client_id=f"{prefix}-agent", subscriptions=(narrow,))
    start_and_wait(conn)
    assert _two_deliveries(inbox, gateway, f"{prefix}/m/s") == [b"1", b"1"]


# --- status and last will ----------------------------------------------------------------------------------


def test_status_is_retained_online_and_offline_after_stop(
    mosquitto: Service, connections, observers, prefix: str
) -> None:
    status = f"{prefix}/status"
    conn = connections(
        mosquitto,
        Inbox(),
        client_id=f"{prefix}-agent",
        status_topic=status,
        online_payload=b"online",
        offline_payload=b"offline",
    )
    start_and_wait(conn)
    # A consumer that subscribes later still sees the status: it is retained.
    late = observers(mosquitto, status).next(status)
    assert (late.payload, late.retain) == (b"online", True)

    watcher = observers(mosquitto, status)
    assert watcher.next(status).payload == b"online"
    conn.stop()
    assert not conn.is_connected
    assert watcher.next(status).payload == b"offline"
    retained = observers(mosquitto, status).next(status)
    assert (retained.payload, retained.retain) == (b"offline", True)


def test_status_payload_builder_is_called_for_each_status(
    mosquitto: Service, connections, observers, prefix: str
) -> None:
    status = f"{prefix}/status"
    calls: list[str] = []

    def build(state: str) -> bytes:
        calls.append(state)
        return f"{state}-{len(calls)}".encode()

    conn = MqttConnection(
        MqttSettings(host=mosquitto.host, port=mosquitto.port, client_id=f"{prefix}-a", status_topic=status),
        Inbox(),
        Metrics(),
        status_payload=build,
    )
    try:
        start_and_wait(conn)
        assert observers(mosquitto, status).next(status).payload.startswith(b"online-")
    finally:
        conn.stop()
    assert observers(mosquitto, status).next(status).payload.startswith(b"offline-")
    assert calls.count("online") == 1
    assert calls.count("offline") >= 2  # the will (built before the connection) and the stop


_AGENT_SCRIPT = textwrap.dedent(
    """
    import sys, threading
    from agent.ingest.mqtt import MqttConnection
    from agent.ingest.settings import MqttSettings
    from agent.metrics import Metrics

    host, port, client_id, status = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    settings = MqttSettings(host=host, port=port, client_id=client_id, status_topic=status,
                            online_payload=b"online", offline_payload=b"offline")
    MqttConnection(settings, lambda message: None, Metrics()).start()
    threading.Event().wait()
    """
)


def test_last_will_sets_offline_when_the_agent_process_dies(
    mosquitto: Service, observers, prefix: str, tmp_path: Path
) -> None:
    status = f"{prefix}/status"
    watcher = observers(mosquitto, status)
    script = tmp_path / "agent_proc.py"
    script.write_text(_AGENT_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, str(script), mosquitto.host, str(mosquitto.port), f"{prefix}-agent", status],
        env=env,
        cwd=REPO,
    )
    try:
        assert watcher.next(status).payload == b"online"
        proc.send_signal(signal.SIGKILL)  # no DISCONNECT is sent: the broker must publish the will
        proc.wait(TIMEOUT_S)
        offline = watcher.next(status)
        assert offline.payload == b"offline"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    retained = observers(mosquitto, status).next(status)
    assert (retained.payload, retained.retain) == (b"offline", True)


# --- broker outages -----------------------------------------------------------------------------------------


def test_reconnects_and_resubscribes_after_the_broker_restarts(
    own_broker: Service, connections, observers, prefix: str
) -> None:
    inbox, metrics = Inbox(), Metrics()
    status = f"{prefix}/status"
    conn = connections(
        own_broker,
        inbox,
        metrics,
        client_id=f"{prefix}-agent",
        subscriptions=(f"{prefix}/in/#",),
        status_topic=status,
        online_payload=b"online",
        offline_payload=b"offline",
    )
    start_and_wait(conn)
    observers(own_broker).publish(f"{prefix}/in/a", b"before")
    unacked = inbox.get()
    assert unacked.payload == b"before"

    own_broker.stop()
    wait_until(lambda: not conn.is_connected, "the connection to notice the broker is gone")
    assert metrics.get("mqtt.disconnects") == 1
    # QoS 1 publishes while disconnected are kept and sent after the reconnect.
    queued = conn.publish(f"{prefix}/out", b"queued", qos=1, retain=True)
    assert queued.rc == paho.MQTT_ERR_SUCCESS

    own_broker.start()  # same port; no persistence, so the broker forgot the session and subscriptions
    assert conn.wait_connected(TIMEOUT_S), "did not reconnect"
    assert conn.wait_subscribed(TIMEOUT_S), "did not re-subscribe"
    queued.wait_for_publish(TIMEOUT_S)
    assert queued.is_published()
    assert metrics.get("mqtt.connects") == 2

    watcher = observers(own_broker, status, f"{prefix}/out")
    retained = {msg.topic: msg.payload for msg in (watcher.next(), watcher.next())}
    assert retained == {status: b"online", f"{prefix}/out": b"queued"}
    observers(own_broker).publish(f"{prefix}/in/b", b"after")
    after = inbox.get()
    assert after.payload == b"after"

    # The restarted broker numbers packets from 1 again: the old message's packet id now belongs to "after".
    # Acknowledging the old message must not acknowledge "after" before it is durable.
    assert after.mid & 0xFFFF == unacked.mid & 0xFFFF
    assert after.mid != unacked.mid
    conn.ack(unacked.mid, unacked.qos)
    assert (metrics.get("mqtt.acks_stale"), metrics.get("mqtt.acks")) == (1, 0)
    conn.ack(after.mid, after.qos)
    assert (metrics.get("mqtt.acks_stale"), metrics.get("mqtt.acks")) == (1, 1)


def test_broker_down_at_start_is_retried_until_it_is_up(tmp_path: Path, connections, observers, prefix: str) -> None:
    port = devservices.free_port()
    inbox, metrics = Inbox(), Metrics()
    nobody = SimpleNamespace(host=devservices.HOST, port=port)
    conn = connections(nobody, inbox, metrics, client_id=f"{prefix}-agent", subscriptions=(f"{prefix}/#",))
    conn.start()  # must not raise
    wait_until(lambda: metrics.get("mqtt.connect_failures", reason="unreachable") >= 2, "two failed attempts")
    assert not conn.is_connected

    broker = devservices.start_mosquitto(tmp_path / "mosquitto", port=port)
    try:
        assert conn.wait_connected(TIMEOUT_S)
        assert conn.wait_subscribed(TIMEOUT_S)
        observers(broker).publish(f"{prefix}/x", b"hello")
        assert inbox.get().payload == b"hello"
        conn.stop()
    finally:
        broker.stop()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_refused_connection_is_counted_and_never_marked_connected(
    tmp_path: Path, connections, prefix: str, protocol: str
) -> None:
    broker = devservices.start_mosquitto(tmp_path / "mosquitto", extra_conf="allow_anonymous false")
    try:
        metrics = Metrics()
        conn = connections(broker, Inbox(), metrics, client_id=f"{prefix}-agent", protocol=protocol)
        conn.start()
        # MQTT 5 CONNACK reason 0x87 and 3.1.1 return code 5 both arrive as "Not authorized".
        wait_until(
            lambda: metrics.get("mqtt.connect_failures", reason="not_authorized") >= 2,
            "two refused attempts (it keeps retrying with backoff)",
        )
        assert not conn.is_connected
        assert not conn.wait_connected(0.01)
        assert metrics.get("mqtt.connects") == 0
        assert metrics.get("mqtt.connected") == 0
        conn.stop()
    finally:
        broker.stop()


# --- settings (no broker needed; kept beside the adapter's other tests) -------------------------------------


def test_settings_repr_masks_the_password() -> None:
    settings = MqttSettings(client_id="a", username="agent", password="s3cret-pw")
    assert "s3cret-pw" not in repr(settings)
    assert "password='***'" in repr(settings)
    assert "username='agent'" in repr(settings)
    assert "password=None" in repr(MqttSettings(client_id="a"))


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"client_id": ""}, "client_id is required for a persistent session"),
        ({"client_id": "a", "port": 0}, "port\n  Input should be greater than 0"),
        ({"client_id": "a", "protocol": "3.1"}, "protocol\n  Input should be '5' or '3.1.1'"),
        ({"client_id": "a", "qos": 2}, "qos\n  Input should be 0 or 1"),
        ({"client_id": "a", "reconnect_min_s": 5, "reconnect_max_s": 1}, "reconnect_max_s must be >="),
        ({"client_id": "a", "subscriptions": "a/#"}, "subscriptions\n  Value error, must be a tuple"),
        (
            {"client_id": "a", "status_topic": "pdm/+/status"},
            "status_topic\n  Value error, must be a topic name without wildcards",
        ),
        ({"client_id": "a", "password": "s3cret-pw"}, "password needs a username"),
    ],
)
def test_bad_settings_are_refused_with_the_field_name(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        MqttSettings(**kwargs)  # type: ignore[arg-type]
    assert fragment in str(info.value)
    assert "for MqttSettings" in str(info.value)
    assert "s3cret-pw" not in str(info.value)  # errors never echo the input (it may hold the password)


def test_buffered_reads_deliver_every_message_whole_and_in_order(
    mosquitto: Service, connections, observers, prefix: str
) -> None:
    """paho's small reads are served from 64 KiB socket reads (agent/ingest/paho_buffered.py): packets that
    straddle two reads, a message larger than a read, and hundreds queued at once all arrive intact."""
    inbox, metrics = Inbox(), Metrics()
    conn = connections(mosquitto, inbox, metrics, client_id=f"{prefix}-agent", subscriptions=(f"{prefix}/#",))
    start_and_wait(conn)
    client = conn._client
    assert isinstance(client, BufferedClient)
    sizes = [1, 170, 11_000, 3, 200_000, 70_000, 127, 128, 16_383, 16_384, 5] * 40
    payloads = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
    gateway = observers(mosquitto)
    infos = [gateway.client.publish(f"{prefix}/m/{i % 7}", p, qos=1) for i, p in enumerate(payloads)]
    for info in infos:
        info.wait_for_publish(TIMEOUT_S)
    got = []
    for _ in payloads:
        message = inbox.get(f"message {len(got)} of {len(payloads)}")
        conn.ack(message.mid, message.qos)
        got.append(message)
    assert [m.payload for m in got] == payloads
    assert [m.topic for m in got] == [f"{prefix}/m/{i % 7}" for i in range(len(payloads))]
    assert metrics.get("mqtt.acks") == len(payloads)
    # Fewer socket reads than messages: the small ones came several to a read.
    assert 0 < client.socket_reads < len(payloads)
    assert client.buffered_bytes() == 0


def test_bytes_of_a_closed_connection_are_not_parsed_after_a_reconnect() -> None:
    """What was buffered from a connection that closed is dropped with it, never read as the next one's."""
    client = BufferedClient(CallbackAPIVersion.VERSION2, client_id="buffer-reset")
    client._rbuf, client._rpos = b"\x30\x05half", 2
    assert client.buffered_bytes() == 4
    client._sock_close()
    assert client.buffered_bytes() == 0


def test_a_batch_of_acknowledgements_acknowledges_exactly_its_messages(
    mosquitto: Service, connections, observers, prefix: str
) -> None:
    """``ack_batch`` (one wake-up of paho's loop for the whole batch): the acknowledged messages are not
    redelivered on the next connection, the one left out is."""
    settings = {"client_id": f"{prefix}-agent", "subscriptions": (f"{prefix}/#",)}
    gateway = observers(mosquitto)
    first, metrics = Inbox(), Metrics()
    conn = connections(mosquitto, first, metrics, **settings)
    start_and_wait(conn)
    for i in range(15):  # within the broker's window of unacknowledged messages (20)
        gateway.publish(f"{prefix}/m/s", str(i).encode())
    got = [first.get() for _ in range(15)]
    conn.ack_batch([(m.mid, m.qos) for m in got if m.payload != b"7"])
    wait_until(lambda: metrics.get("mqtt.acks") == 14, "14 acknowledgements")
    conn.stop()

    second = Inbox()
    conn = connections(mosquitto, second, **settings)
    start_and_wait(conn)
    again = second.get("the one redelivery")
    assert (again.payload, again.dup) == (b"7", True)
    conn.ack_batch([(again.mid, again.qos)])
    gateway.publish(f"{prefix}/m/s", b"marker")
    assert second.get().payload == b"marker"  # redeliveries come first: nothing else came back
