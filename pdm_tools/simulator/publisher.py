"""MQTT side of the gateway: paho-mqtt 2.x, QoS 1 with acknowledgements tracked, retry on full queue.

Acknowledgements are tracked by message id in ``on_publish`` rather than with
``MQTTMessageInfo.wait_for_publish``: a QoS 1 message published while the connection is down gets
``MQTT_ERR_NO_CONN`` but stays queued in paho and is sent after the reconnect, and ``wait_for_publish``
would raise for it although it will be delivered.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from pdm_tools.simulator.config import BrokerConfig

logger = logging.getLogger(__name__)

_RETRY_FIRST_S = 0.01
_RETRY_MAX_S = 1.0


class GatewayError(RuntimeError):
    """The gateway cannot run, e.g. the broker cannot be reached at start."""


@dataclass(frozen=True, slots=True)
class PublisherCounters:
    """``retries``: publish attempts repeated (paho queue full or no connection for QoS 0);
    ``failed``: messages given up (stop requested while retrying, or an unexpected error);
    ``rejected``: acknowledged by the broker with a failure reason code (MQTT 5)."""

    retries: int = 0
    failed: int = 0
    rejected: int = 0
    disconnects: int = 0


class Publisher(Protocol):
    """What the gateway needs from MQTT. One thread (the gateway's) calls every method, in the order
    ``connect`` once, ``publish`` any number of times, ``wait_for_acks``, ``close`` once."""

    def connect(self, timeout_s: float) -> None:
        """Connect or raise ``GatewayError``; reconnecting after a later loss is the publisher's job."""

    def publish(self, topic: str, payload: bytes, retain: bool, stop: threading.Event) -> bool:
        """Hand one message over; retries while the outgoing queue is full. False if given up."""

    def wait_for_acks(self, timeout_s: float) -> int:
        """Wait until every QoS > 0 message is acknowledged; returns how many still are not."""

    def close(self) -> None: ...

    def counters(self) -> PublisherCounters: ...


class MqttPublisher:
    """``Publisher`` over paho-mqtt with its network loop in a background thread (``loop_start``)."""

    def __init__(self, broker: BrokerConfig, qos: int) -> None:
        self._broker = broker
        self._qos = qos
        protocol = mqtt.MQTTv5 if broker.protocol == "mqttv5" else mqtt.MQTTv311
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=broker.client_id, protocol=protocol
        )
        client.max_inflight_messages_set(broker.max_inflight)
        # A bounded queue turns a slow or absent broker into back-pressure (counted retries) instead of
        # unbounded memory growth.
        client.max_queued_messages_set(broker.max_queued)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self._client = client
        self._connected = threading.Event()
        self._lock = threading.Condition()
        self._pending: set[int] = set()
        # Acks that arrived before ``publish`` returned and the mid was recorded as pending.
        self._early: set[int] = set()
        self._closing = False
        self._ever_connected = False
        self._last_error = "no answer"
        self._retries = 0
        self._failed = 0
        self._rejected = 0
        self._disconnects = 0

    def connect(self, timeout_s: float) -> None:
        host, port = self._broker.host, self._broker.port
        self._client.connect_async(host, port, keepalive=self._broker.keepalive_s)
        self._client.loop_start()
        if not self._connected.wait(timeout_s):
            self._closing = True
            self._client.disconnect()
            self._client.loop_stop()
            raise GatewayError(
                f"cannot connect to MQTT broker {host}:{port} within {timeout_s:g} s ({self._last_error})"
            )

    def publish(self, topic: str, payload: bytes, retain: bool, stop: threading.Event) -> bool:
        delay = _RETRY_FIRST_S
        while True:
            info = self._client.publish(topic, payload, qos=self._qos, retain=retain)
            rc = info.rc
            # With QoS > 0, NO_CONN means "queued, sent after the reconnect".
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS or (rc == MQTTErrorCode.MQTT_ERR_NO_CONN and self._qos):
                if self._qos:
                    self._track(info.mid)
                return True
            if rc not in (MQTTErrorCode.MQTT_ERR_QUEUE_SIZE, MQTTErrorCode.MQTT_ERR_NO_CONN):
                with self._lock:
                    self._failed += 1
                logger.error("publish to %s failed: %s", topic, mqtt.error_string(rc))
                return False
            with self._lock:
                self._retries += 1
            if stop.wait(delay):
                with self._lock:
                    self._failed += 1
                return False
            delay = min(delay * 2, _RETRY_MAX_S)

    def wait_for_acks(self, timeout_s: float) -> int:
        with self._lock:
            self._lock.wait_for(lambda: not self._pending, timeout_s)
            return len(self._pending)

    def close(self) -> None:
        self._closing = True
        self._client.disconnect()
        self._client.loop_stop()

    def counters(self) -> PublisherCounters:
        with self._lock:
            return PublisherCounters(self._retries, self._failed, self._rejected, self._disconnects)

    def _track(self, mid: int) -> None:
        with self._lock:
            if mid in self._early:
                self._early.discard(mid)
            else:
                self._pending.add(mid)

    # -- paho callbacks (network thread) ---------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self._last_error = f"refused: {reason}"
            logger.warning("MQTT broker refused the connection: %s", reason)
            return
        if self._ever_connected:
            logger.info("reconnected to MQTT broker %s:%s", self._broker.host, self._broker.port)
        else:
            logger.info("connected to MQTT broker %s:%s", self._broker.host, self._broker.port)
        self._ever_connected = True
        self._connected.set()

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._last_error = "unreachable"

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._connected.clear()
        if self._closing:
            return
        with self._lock:
            self._disconnects += 1
        logger.warning("disconnected from MQTT broker (%s); paho reconnects and resends", reason)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        if not self._qos:
            return
        with self._lock:
            if reason.is_failure:
                self._rejected += 1
                logger.warning("broker rejected message %s: %s", mid, reason)
            if mid in self._pending:
                self._pending.discard(mid)
                if not self._pending:
                    self._lock.notify_all()
            else:
                self._early.add(mid)
