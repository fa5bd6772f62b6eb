"""The gateway against a real Mosquitto: what a subscriber receives is exactly what was published."""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from pdm_tools.simulator.cli import add_arguments
from pdm_tools.simulator.cli import main as cli_main
from pdm_tools.simulator.config import SimulatorConfig, config_from_dict
from pdm_tools.simulator.gateway import Gateway
from pdm_tools.simulator.machine import SimulatedMachine
from pdm_tools.simulator.publisher import MqttPublisher

pytestmark = pytest.mark.integration

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
# Bounded waits for processes and deliveries; they never decide a test's outcome by elapsed time.
WAIT_S = 15.0


@dataclass(frozen=True)
class _Broker:
    host: str
    port: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _private_mosquitto(folder: Path) -> Iterator[_Broker]:
    """A Mosquitto of our own, used only when tests/conftest.py provides no ``mosquitto`` fixture."""
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto is not installed (Debian package: mosquitto)")
    port = _free_port()
    conf = folder / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    log = (folder / "mosquitto.log").open("wb")
    process = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"mosquitto exited: {(folder / 'mosquitto.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("mosquitto did not start listening")
                time.sleep(0.05)
        yield _Broker("127.0.0.1", port)
    finally:
        process.terminate()
        try:
            process.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """The suite's ``mosquitto`` fixture if tests/conftest.py has one, else a private broker."""
    try:
        shared = request.getfixturevalue("mosquitto")
    except pytest.FixtureLookupError:
        shared = None
    if shared is not None:
        yield shared
        return
    with _private_mosquitto(tmp_path) as private:
        yield private


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


class Subscriber:
    """Collects every message under ``pattern`` (QoS 1)."""

    def __init__(self, host: str, port: int, pattern: str) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._changed = threading.Condition()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"test-sub-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self._client.on_connect = lambda c, u, f, rc, p: c.subscribe(pattern, qos=1)
        self._client.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect(host, port)
        self._client.loop_start()
        assert self._subscribed.wait(WAIT_S), "no SUBACK from the broker"

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._changed:
            self.messages.append((message.topic, bytes(message.payload), bool(message.retain)))
            self._changed.notify_all()

    def wait_for(self, count: int) -> list[tuple[str, bytes, bool]]:
        with self._changed:
            self._changed.wait_for(lambda: len(self.messages) >= count, WAIT_S)
            return list(self.messages)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class RecordingMqttPublisher(MqttPublisher):
    """The real publisher, also remembering what it handed to MQTT."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.published: list[tuple[str, bytes, bool]] = []

    def publish(self, topic: str, payload: bytes, retain: bool, stop: threading.Event) -> bool:
        ok = super().publish(topic, payload, retain, stop)
        if ok:
            self.published.append((topic, payload, retain))
        return ok


def make_config(broker: Any, tmp_path: Path, protocol: str) -> SimulatorConfig:
    site = f"it{uuid.uuid4().hex[:8]}"  # every test its own topic tree on a shared broker
    return config_from_dict(
        {
            "broker": {
                "host": broker.host,
                "port": broker.port,
                "client_id": f"sim-{site}",
                "protocol": protocol,
            },
            "topics": {"site": site},
            "duration_s": 3,
            "speed": 20,
            "seed": 1,
            "machines": {"count": 2},
            "faults": [
                {"machine": "m01", "kind": "bearing_outer", "start_s": 0.5, "ramp_s": 1},
                {"machine": "m02", "kind": "dropout", "sensor": "vibration", "start_s": 1, "end_s": 2},
            ],
            "ground_truth": {
                "path": str(tmp_path / "gt.jsonl"),
                "topic": f"factory/{site}/line1/_ground_truth",
            },
        }
    )


@pytest.mark.parametrize("protocol", ["mqttv5", "mqttv311"])
def test_subscriber_receives_exactly_what_the_gateway_published(broker: Any, tmp_path: Path, protocol: str) -> None:
    cfg = make_config(broker, tmp_path, protocol)
    prefix = f"factory/{cfg.topics.site}/line1"
    subscriber = Subscriber(broker.host, broker.port, f"{prefix}/#")
    publisher = RecordingMqttPublisher(cfg.broker, cfg.qos)
    try:
        stats = Gateway(cfg, publisher).run()
        received = subscriber.wait_for(stats.messages)
    finally:
        subscriber.close()

    assert (stats.unacked, stats.failed, stats.rejected) == (0, 0, 0)
    assert Counter((t, p) for t, p, _ in received) == Counter((t, p) for t, p, _ in publisher.published)
    per_topic = Counter(t for t, _, _ in received)
    assert per_topic == {
        f"{prefix}/m01/vibration": 15,
        f"{prefix}/m02/vibration": 10,  # 1 s of dropout = 5 blocks not published
        f"{prefix}/m01/process": 3,
        f"{prefix}/m02/process": 3,
        f"{prefix}/_ground_truth": 1,
    }
    assert stats.by_kind == {"vibration": 25, "process": 6, "ground_truth": 1}

    payloads: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for topic, payload, _ in received:
        payloads[topic].append(json.loads(payload))
    machines = {
        p.name: SimulatedMachine(p, [f for f in cfg.faults if f.machine == p.name], cfg.seed) for p in cfg.profiles()
    }
    for name, machine in machines.items():
        blocks = sorted(payloads[f"{prefix}/{name}/vibration"], key=lambda b: b["seq"])
        assert [b["seq"] for b in blocks] == list(range(len(blocks)))
        for b in blocks:
            samples = np.frombuffer(base64.b64decode(b["data"]), dtype="<f4")
            assert samples.shape == (cfg.vibration.block_samples,)
            t0_s = (b["ts_ns"] - stats.start_ns) / 1e9
            assert np.array_equal(samples, machine.vibration(t0_s, len(samples)))
        readings = sorted(payloads[f"{prefix}/{name}/process"], key=lambda r: r["seq"])
        assert [r["seq"] for r in readings] == [0, 1, 2]
        for r in readings:
            assert r["fields"] == machine.process((r["ts_ns"] - stats.start_ns) / 1e9)

    ground_truth = [json.loads(line) for line in (tmp_path / "gt.jsonl").read_text().splitlines()]
    assert payloads[f"{prefix}/_ground_truth"] == [{"v": 1, "run_start_ns": stats.start_ns, "faults": ground_truth}]
    assert [(g["machine"], g["kind"]) for g in ground_truth] == [("m01", "bearing_outer"), ("m02", "dropout")]


def test_ground_truth_is_retained_for_late_subscribers(broker: Any, tmp_path: Path) -> None:
    cfg = make_config(broker, tmp_path, "mqttv5")
    stats = Gateway(cfg).run()
    assert stats.unacked == 0
    topic = cfg.ground_truth.topic
    assert topic is not None
    late = Subscriber(broker.host, broker.port, topic)
    try:
        received = late.wait_for(1)
    finally:
        late.close()
    assert len(received) == 1
    got_topic, payload, retained = received[0]
    assert (got_topic, retained) == (topic, True)
    assert json.loads(payload)["run_start_ns"] == stats.start_ns


def test_command_line_run_publishes_and_writes_its_stats(broker: Any, tmp_path: Path) -> None:
    site = f"it{uuid.uuid4().hex[:8]}"
    config = tmp_path / "sim.yaml"
    config.write_text(f"topics: {{site: {site}}}\nbroker: {{client_id: sim-{site}}}\n")
    subscriber = Subscriber(broker.host, broker.port, f"factory/{site}/#")
    try:
        args = parse(
            "--config", str(config), "--host", broker.host, "--port", str(broker.port), "--duration", "2",
            "--speed", "50", "--machines", "1", "--fault", "m01:imbalance:1", "--stats-json",
            str(tmp_path / "stats.json"), "--ground-truth", str(tmp_path / "gt.jsonl"),
        )  # fmt: skip
        assert cli_main(args) == 0
        stats = json.loads((tmp_path / "stats.json").read_text())
        received = subscriber.wait_for(stats["messages"])
    finally:
        subscriber.close()
    assert (stats["messages"], stats["by_kind"], stats["unacked"]) == (12, {"vibration": 10, "process": 2}, 0)
    assert len(received) == 12
    assert json.loads((tmp_path / "gt.jsonl").read_text())["kind"] == "imbalance"


def test_main_reports_an_unreachable_broker_with_exit_code_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        config = tmp_path / "sim.yaml"
        config.write_text(f"broker: {{port: {port}, connect_timeout_s: 0.2}}\n")
        assert cli_main(parse("--config", str(config), "--stats-json", str(tmp_path / "stats.json"))) == 1
    assert f"cannot connect to MQTT broker 127.0.0.1:{port}" in capsys.readouterr().err
    assert not (tmp_path / "stats.json").exists()
