"""MQTT test clients shared by the integration tests: a recording subscriber and a QoS 1 publisher."""

import json
import threading
import time

import paho.mqtt.client as mqtt


class Subscriber:
    """A separate MQTT client that records what the agent publishes."""

    def __init__(self, host: str, port: int, topics: list[str]) -> None:
        self.messages: list[tuple[str, dict]] = []
        self.arrived = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sub-{time.monotonic_ns()}")
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        for topic in topics:
            self.client.subscribe(topic, qos=1)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        with self.arrived:
            self.messages.append((msg.topic, json.loads(msg.payload)))
            self.arrived.notify_all()

    def wait_for(self, predicate, timeout_s: float = 20.0) -> list[tuple[str, dict]]:
        with self.arrived:
            self.arrived.wait_for(lambda: predicate(self.messages), timeout_s)
            return list(self.messages)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def publish(mosquitto, items: list[tuple[str, bytes]]) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{time.monotonic_ns()}")
    client.connect(mosquitto.host, mosquitto.port)
    client.loop_start()
    for topic, payload in items:
        client.publish(topic, payload, qos=1).wait_for_publish(10)
    client.loop_stop()
    client.disconnect()
