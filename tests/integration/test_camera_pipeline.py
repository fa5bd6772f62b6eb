"""Camera images through the agent built by the composition root, against a real Mosquitto and InfluxDB 1.6.7:
images in, ``image`` and ``inspection`` points and a defect alert out (with a fetchable image), bad images
dead-lettered with their reason, process readings on the same connection still stored."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import struct
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from PIL import Image

from agent.bootstrap import build_agent
from agent.config import parse_config
from agent.decode.encode import encode_fields
from agent.images.preprocess import ImageSpec
from agent.storage.influx_v1 import InfluxV1Sink
from pdm_tools.images.cnn import Cnn
from pdm_tools.images.export import write_model_dir
from tests.integration.mqtt_helpers import Subscriber, publish

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ALERT_SCHEMA = json.loads((REPO / "agent" / "schemas" / "alert.schema.json").read_text())
CLASSES = ("crazing", "scratches", "patches")
TOPIC = "factory/s1/l1/cam-1/camera"


def _png(seed: int, size: int = 64) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def _bomb(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` gray pixels, with a few bytes of data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(16))) + chunk(b"IEND", b"")


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A tiny random network of the image-classifier contract (never shipped; weights from a seed)."""
    write_model_dir(Cnn.init((4, 8), len(CLASSES), seed=5).to_onnx(32, CLASSES), tmp_path / "m", ImageSpec(32), CLASSES)
    return tmp_path / "m"


@pytest.fixture
def camera_agent(mosquitto, influxdb_v1, influx_db_name, tmp_path, model_dir):
    agent_id = f"cam-{time.monotonic_ns()}"
    config = parse_config(
        {
            "agent": {"id": agent_id, "heartbeat_s": 60},
            "health": {"port": 0},
            "mqtt": {"host": mosquitto.host, "port": mosquitto.port},
            "storage": {"url": influxdb_v1.url, "v1": {"database": influx_db_name}, "flush_interval_s": 0.2},
            "spool": {"path": str(tmp_path / "spool.db")},
            "inference": {"models": [{"path": str(REPO / "models/process_anomaly"), "sensors": ["process"]}]},
            # Three classes: the top probability is at least 1/3, so with 0.3 every image is a defect image.
            "camera": {"enabled": True, "model": {"path": str(model_dir)}, "min_confidence": 0.3},
            "alerts": {"types": {"surface-defect": {"raise_n": 2, "raise_m": 3, "no_data_after_s": 0}}},
            "commissioning": {"enabled": False},
        }
    )
    agent = build_agent(config)
    sub = Subscriber(mosquitto.host, mosquitto.port, [f"pdm/{agent_id}/#"])
    agent.start()
    assert agent.mqtt.wait_subscribed(20)
    yield agent, sub
    agent.stop()
    sub.close()


def test_images_are_inspected_stored_and_a_defect_alerted_with_its_image(
    camera_agent, mosquitto, influxdb_v1, influx_db_name
):
    agent, sub = camera_agent
    agent_id = agent.config.agent.id
    images = [_png(i) for i in range(3)]
    envelope = json.dumps(
        {"v": 1, "encoding": "png", "data": base64.b64encode(images[2]).decode(), "metadata": {"part": "A-17"}}
    )
    publish(
        mosquitto,
        [
            (TOPIC, images[0]),
            (TOPIC, images[0][: len(images[0]) // 2]),  # truncated
            (TOPIC, b"GIF89a" + bytes(64)),  # a format the agent does not take
            (TOPIC, images[1]),
            (TOPIC, _bomb(5000, 5000)),
            (TOPIC, envelope.encode()),
            ("factory/s1/l1/m01/process", encode_fields({"temperature": 61.5}, ts_ns=time.time_ns() - 10**9)),
        ],
    )
    deadletter = f"pdm/{agent_id}/deadletter"
    alerts = f"pdm/{agent_id}/alerts/cam-1/camera"
    seen = sub.wait_for(
        lambda msgs: sum(t == deadletter for t, _ in msgs) >= 3 and any(t == alerts for t, _ in msgs), timeout_s=60
    )
    codes = sorted(body["code"] for topic, body in seen if topic == deadletter)
    assert codes == ["bad_dimensions", "truncated", "unsupported_format"]
    (alert,) = [body for topic, body in seen if topic == alerts]
    jsonschema.validate(alert, ALERT_SCHEMA)
    assert (alert["state"], alert["alert_type"], alert["v"]) == ("new", "surface-defect", 4)
    assert alert["defect"]["defect"] in CLASSES
    sha = alert["image"]["sha256"]
    shipped = {img for img in images if hashlib.sha256(img).hexdigest() == sha}
    assert len(shipped) == 1, "the alert names one of the published images"
    with urllib.request.urlopen(alert["image"]["url"], timeout=10) as response:
        assert response.headers["Content-Type"] == "image/png"
        assert response.read() == shipped.pop()
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(alert["image"]["url"].replace(sha, "0" * 64), timeout=10)
    assert missing.value.code == 404

    assert agent.writer.flush(20)
    sink = InfluxV1Sink(influxdb_v1.url, influx_db_name)
    stored = sink.query('SELECT "sha256", "stored", "width", "m_part" FROM "image" WHERE "machine" = \'cam-1\'')
    rows = stored[0]["values"]
    assert len(rows) == 3 and all(row[2] is True and row[3] == 64 for row in rows)
    assert [row[4] for row in rows].count("A-17") == 1
    inspected = sink.query(
        'SELECT "probability", "sha256" FROM "inspection" WHERE "machine" = \'cam-1\' GROUP BY "class"'
    )
    assert sum(len(series["values"]) for series in inspected) == 3
    assert {series["tags"]["class"] for series in inspected} <= set(CLASSES)
    readings = sink.query('SELECT "temperature" FROM "reading" WHERE "machine" = \'m01\'')
    assert readings[0]["values"][0][1] == 61.5
    assert agent.metrics.get("decode.errors") == 3
    assert agent.metrics.get("images.received") == 3
    assert agent.metrics.get("images.stored") == 3
    assert agent.metrics.get("images.scored", model="surface_defect") == 3
