"""MQTT test clients shared by the integration tests: a recording subscriber and a QoS 1 publisher."""

import json
import threading
import time

import paho.mqtt.client as mqtt


class Subscriber:
    """A separate MQTT client that records what the agent publishes (JSON payloads, decoded)."""

    def __init__(self, host: str, port: int, topics: list[str]) -> None:
        self.messages: list = []
        self.arrived = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sub-{time.monotonic_ns()}")
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        for topic in topics:
            self.client.subscribe(topic, qos=1)
        self.client.loop_start()

    def _entry(self, msg):
        return msg.topic, json.loads(msg.payload)

    def _on_message(self, client, userdata, msg) -> None:
        with self.arrived:
            self.messages.append(self._entry(msg))
            self.arrived.notify_all()

    def wait_for(self, predicate, timeout_s: float = 20.0) -> list:
        with self.arrived:
            self.arrived.wait_for(lambda: predicate(self.messages), timeout_s)
            return list(self.messages)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class RawRecorder(Subscriber):
    """A ``Subscriber`` that keeps payloads as bytes (protobuf too) with their retain flag; ``wait_for``
    fails the test when the predicate is not met in time."""

    def _entry(self, msg):
        return msg.topic, bytes(msg.payload), bool(msg.retain)

    def wait_for(self, predicate, timeout_s: float = 30.0) -> list:
        with self.arrived:
            assert self.arrived.wait_for(lambda: predicate(self.messages), timeout_s), self.messages
            return list(self.messages)

    def on(self, topic: str) -> list[bytes]:
        with self.arrived:
            return [payload for t, payload, _ in self.messages if t == topic]


def publish(mosquitto, items: list[tuple[str, bytes]]) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{time.monotonic_ns()}")
    client.connect(mosquitto.host, mosquitto.port)
    client.loop_start()
    for topic, payload in items:
        client.publish(topic, payload, qos=1).wait_for_publish(10)
    client.loop_stop()
    client.disconnect()
