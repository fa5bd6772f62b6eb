"""`make demo-camera`: a camera defect alerted end to end, without the dataset.

A real Mosquitto and InfluxDB (started here on free ports, or ``PDM_MQTT_HOST`` / ``PDM_INFLUX_URL``), the
agent as ``pdm-agent run`` with ``camera.enabled`` and the image model, and ``pdm-agent simulate camera``
publishing generated frames of one NEU class (``--defect``, default scratches) from ``cam-01``, plus two bad
images (a truncated PNG and a GIF). Prints what each stage saw: images received, stored and classified,
the bad ones dead-lettered with their reason, the ``surface-defect`` alert with its class and the image it
points to, fetched from the agent by its URL and checked against the published bytes' sha256.

The model is the shipped ``models/surface_defect`` when it is there; otherwise an untrained stand-in of the
same contract (seeded, in the work dir), so that the pipeline can be shown on any checkout: the class it
names then means nothing, the alert path is the same. Exit code 0 when the alert came with a fetchable
image of the camera, every image was received and every classified one stored.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml

from agent import schema
from agent.storage.influx_v1 import InfluxV1Sink
from pdm_tools.datasets.neu import CLASS_NAMES
from pdm_tools.dev.demo import REPO, _kill_if_running, _services

SHIPPED_MODEL = REPO / "models" / "surface_defect"
CAMERA = "cam-01"
BAD_IMAGES = 2


class Listener:
    """Alerts, dead letters and the heartbeat of the agent, as a separate MQTT client sees them."""

    def __init__(self, host: str, port: int, agent_id: str) -> None:
        self.base = f"pdm/{agent_id}"
        self.alerts: list[dict[str, Any]] = []
        self.dead_letters: list[dict[str, Any]] = []
        self.heartbeat: dict[str, Any] = {}
        self.online = threading.Event()
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"demo-camera-{os.getpid()}")
        self._client.on_connect = lambda c, *_: c.subscribe(f"{self.base}/#", qos=1)
        self._client.on_message = self._on_message
        self._client.connect(host, port)
        self._client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        body = json.loads(msg.payload)
        if "/alerts/" in msg.topic:
            self.alerts.append(body)
        elif msg.topic.endswith("/deadletter"):
            self.dead_letters.append(body)
        elif msg.topic.endswith("/heartbeat"):
            self.heartbeat = body.get("fields", {})
        elif msg.topic.endswith("/status") and body.get("state") == "online":
            self.online.set()

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def _model(workdir: Path) -> tuple[Path, str]:
    if (SHIPPED_MODEL / "manifest.json").is_file():
        return SHIPPED_MODEL, "the shipped models/surface_defect"
    from agent.images.preprocess import ImageSpec
    from pdm_tools.images.cnn import Cnn
    from pdm_tools.images.export import write_model_dir

    stand_in = workdir / "surface_defect_stand_in"
    write_model_dir(
        Cnn.init((4, 8), len(CLASS_NAMES), seed=1).to_onnx(64, CLASS_NAMES), stand_in, ImageSpec(64), CLASS_NAMES
    )
    return (
        stand_in,
        "an UNTRAINED stand-in (models/surface_defect is not built: pdm-agent train --model surface-defect)",
    )


def _config(
    path: Path, host: str, port: int, url: str, database: str, workdir: Path, model: Path, trained: bool
) -> str:
    data = yaml.safe_load((REPO / "config" / "agent.yaml").read_text())
    agent_id = f"demo-camera-{os.getpid()}"
    data["agent"].update(id=agent_id, heartbeat_s=1, log_level="INFO")
    data["health"] = {"enabled": True, "host": "127.0.0.1", "port": 0}
    data["mqtt"].update(host=host, port=port)
    data["storage"].update(url=url, flush_interval_s=0.5)
    data["storage"]["v1"]["database"] = database
    data["spool"]["path"] = str(workdir / "spool.db")
    for entry in [*data["inference"]["models"], data["inference"]["defect"]]:
        entry["path"] = str((REPO / "config" / entry["path"]).resolve())
    # Six classes: an untrained model's top class has at least 1/6; every NEU class is a defect.
    data["camera"].update(enabled=True, model={"type": "image-classifier", "path": str(model)})
    data["camera"]["min_confidence"] = 0.5 if trained else 0.15
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return agent_id


def _bad_images(host: str, port: int) -> None:
    from pdm_tools.images import synth

    png = synth.encode(synth.generate("scratches", seed=99, size=64), "png")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"demo-camera-bad-{os.getpid()}")
    client.connect(host, port)
    client.loop_start()
    topic = f"factory/s1/l1/{CAMERA}/camera"
    for payload in (png[: len(png) // 2], b"GIF89a" + bytes(64)):
        client.publish(topic, payload, qos=1).wait_for_publish(10)
    client.loop_stop()
    client.disconnect()


def _count(sink: InfluxV1Sink, query: str) -> int:
    return sum(int(v[1] or 0) for s in sink.query(query) for v in s.get("values", []))


def run(defect: str, count: int, rate: float, workdir: Path) -> int:
    with ExitStack() as stack:
        host, port, url = stack.enter_context(_services(workdir))
        model, model_text = _model(workdir)
        database = f"pdm_demo_camera_{os.getpid()}"
        config = workdir / "agent.yaml"
        agent_id = _config(config, host, port, url, database, workdir, model, model == SHIPPED_MODEL)
        print(f"demo-camera: broker mqtt://{host}:{port}, InfluxDB {url} database {database}, work dir {workdir}")
        print(f"demo-camera: image model: {model_text}")
        listener = Listener(host, port, agent_id)
        stack.callback(listener.close)
        log = (workdir / "agent.log").open("w")
        stack.callback(log.close)
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(config)], stdout=log, stderr=log
        )
        stack.callback(_kill_if_running, agent)
        if not listener.online.wait(60):
            raise RuntimeError(f"the agent did not come online; see {workdir / 'agent.log'}")
        truth = workdir / "ground_truth.jsonl"
        print(
            f"demo-camera: agent online; {CAMERA} publishes {count} generated '{defect}' frames "
            f"and {BAD_IMAGES} bad ones"
        )
        _bad_images(host, port)
        sim = subprocess.run(
            [
                sys.executable,
                "-m",
                "agent",
                "simulate",
                "camera",
                "--host",
                host,
                "--port",
                str(port),
                "--count",
                str(count),
                "--rate",
                str(rate),
                "--classes",
                defect,
                "--ground-truth",
                str(truth),
                "--json",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        if sim.returncode != 0:
            raise RuntimeError(f"camera simulator failed ({sim.returncode}): {sim.stderr[-2000:]}")
        published = {json.loads(line)["sha256"] for line in truth.read_text().splitlines()}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
            listener.heartbeat.get("ingest_messages", 0) >= count + BAD_IMAGES
            and listener.heartbeat.get("spool_depth", 1) == 0
            and listener.alerts
        ):
            time.sleep(0.5)
        image_ok, image_text = _fetch(listener.alerts, published)
        agent.send_signal(signal.SIGTERM)
        exit_code = agent.wait(60)
        sink = InfluxV1Sink(url=url, database=database, retention_policy=None, username=None, password=None)
        stored = _count(sink, f'SELECT count("{schema.IMAGE_SHA256_FIELD}") FROM "{schema.IMAGE}"')
        inspected = sink.query(
            f'SELECT count("{schema.DEFECT_PROBABILITY_FIELD}") FROM "{schema.INSPECTION}" '
            f'GROUP BY "{schema.INSPECTION_CLASS_TAG}"'
        )
        by_class = {s["tags"][schema.INSPECTION_CLASS_TAG]: int(s["values"][0][1]) for s in inspected}
        codes = sorted(d.get("code", "?") for d in listener.dead_letters)
        camera_alerts = [a for a in listener.alerts if a.get("alert_type") == "surface-defect"]
        print()
        print("=== pdm-agent camera demo summary ===")
        print(f"images published (simulator)       : {count} '{defect}' + {BAD_IMAGES} bad")
        print(f"images received by the agent       : {int(listener.heartbeat.get('images_received', 0))}")
        print(f"bad images dead-lettered           : {len(codes)} ({', '.join(codes)})")
        print(f"image references in InfluxDB       : {stored}")
        print(f"inspections in InfluxDB by class   : {json.dumps(by_class, sort_keys=True)}")
        for a in camera_alerts:
            print(
                f"  - alert {a['state']:6} {a['reason']:9} {a['machine']}/{a['sensor']} {a['severity']} "
                f"class {a['defect']['defect']} (p={a['defect']['probability']:.2f}), "
                f"image {a['image']['sha256'][:12]}…"
            )
        print(f"alert image fetched from the agent : {image_text}")
        good = bool(camera_alerts) and image_ok and stored == count and sum(by_class.values()) == count
        good = good and len(codes) == BAD_IMAGES and exit_code == 0
        print(f"result                             : {'OK' if good else 'FAILED'}")
        if not good:
            print(f"agent log tail:\n{(workdir / 'agent.log').read_text()[-3000:]}")
        return 0 if good else 1
    raise AssertionError("unreachable")


def _fetch(alerts: list[dict[str, Any]], published: set[str]) -> tuple[bool, str]:
    """GET the first camera alert's image URL; whether its bytes are one of the published images."""
    for alert in alerts:
        image = alert.get("image")
        if not image:
            continue
        with urllib.request.urlopen(image["url"], timeout=10) as response:
            data = response.read()
            kind = response.headers["Content-Type"]
        digest = hashlib.sha256(data).hexdigest()
        ok = digest == image["sha256"] and digest in published
        verdict = "sha256 matches a published image" if ok else "MISMATCH"
        return ok, f"{image['url']} → {len(data)} bytes {kind} ({verdict})"
    return False, "no alert with an image"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--defect", default="scratches", choices=CLASS_NAMES, help="class of the frames (default scratches)"
    )
    parser.add_argument("--count", type=int, default=12, help="frames to publish (default 12)")
    parser.add_argument("--rate", type=float, default=4.0, help="frames per second (default 4)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pdm-demo-camera-") as workdir:
        return run(args.defect, args.count, args.rate, Path(workdir))


if __name__ == "__main__":
    sys.exit(main())
