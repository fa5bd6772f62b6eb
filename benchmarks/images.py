"""Camera images through the live agent: images per second scored, next to bare ONNX Runtime, and what they
cost the rest of the pipeline.

``python -m benchmarks.images [--images N] [--json PATH]`` starts Mosquitto and InfluxDB 1.x (free ports, a
temporary folder), then:

1. **bare**: ``pdm_tools.images.measure.bare_throughput``: the image model alone on one ONNX Runtime thread,
   preprocessing included, on the same 200 × 200 frames: the ceiling;
2. **live**: an agent subprocess (``benchmarks.harness.AgentProcess``: the shipped config, every stage on)
   with the camera on; ``N`` PNG frames published as fast as the harness publisher can (QoS 1, 1000 in
   flight), timed from the first publish until the agent's heartbeat counts ``N`` images scored; the
   agent's CPU seconds over the same span give the rate per core (the agent's threads share it);
3. **cost**: the benchmark's reference machine workload (``benchmarks.workload.Fleet``, process readings
   and vibration blocks in real time) for ``--cost-s`` seconds, once alone and once with a camera at
   ``--camera-rate`` images per second beside it: the agent's CPU, the readings stored, the windows
   scored, in both runs.

The image model is ``--model`` (default ``models/surface_defect``); without one, an untrained stand-in of
the same architecture's contract is built (the figures then describe the pipeline, not the shipped model).
Numbers describe this machine under its load at the time; run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks.harness import REPO, AgentProcess, Publisher
from benchmarks.workload import Event, Fleet
from pdm_tools.dev import services as devservices
from pdm_tools.images import synth
from pdm_tools.images.measure import bare_throughput

SHIPPED = REPO / "models" / "surface_defect"
SIDE = 200
TOPIC = "factory/s1/l1/cam-{:02d}/camera"


class CameraAgent(AgentProcess):
    """The harness's agent with the camera on (``model``: the image classifier's folder)."""

    model: Path = SHIPPED

    def write_config(self) -> Path:
        path = super().write_config()
        data = yaml.safe_load(path.read_text())
        data["camera"].update(enabled=True, model={"type": "image-classifier", "path": str(self.model)})
        data["queues"]["windows_max"] = 100_000  # a burst of images is the point: queue it, do not drop it
        self._config = data
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path


def frames(n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` generated 200 × 200 frames, the six classes in turn."""
    names = synth.CLASS_NAMES
    return [synth.generate(names[i % len(names)], seed=seed * 100_003 + i, size=SIDE) for i in range(n)]


def stand_in_model(workdir: Path) -> Path:
    from agent.images.preprocess import ImageSpec
    from pdm_tools.images.cnn import Cnn
    from pdm_tools.images.export import write_model_dir

    model_dir = workdir / "surface_defect_stand_in"
    net = Cnn.init((8, 16, 32), len(synth.CLASS_NAMES), seed=0)
    write_model_dir(net.to_onnx(64, synth.CLASS_NAMES), model_dir, ImageSpec(64), synth.CLASS_NAMES)
    return model_dir


def live(agent: CameraAgent, host: str, port: int, payloads: list[bytes], timeout_s: float) -> dict[str, Any]:
    """Publish ``payloads`` as fast as possible; seconds and agent CPU until all are scored."""
    publisher = Publisher(host, port, "images")
    events = [Event(0.0, TOPIC.format(i % 4 + 1), p) for i, p in enumerate(payloads)]
    before = agent.wait_heartbeat(timeout_s=5).get("images_scored", 0.0)
    cpu0 = agent.cpu_s()
    start = time.perf_counter()
    publish_s = publisher.publish(events, speed=None)
    publisher.close()
    scored = before
    unscored0 = agent.counters.get("images_unscored", 0.0)
    unscored = unscored0
    while time.perf_counter() - start < timeout_s:
        fields = agent.wait_heartbeat(timeout_s=2)
        scored, unscored = fields.get("images_scored", 0.0), fields.get("images_unscored", 0.0)
        # A burst beyond camera.max_pending_bytes is stored but not scored (counted): done when all are counted.
        if scored - before + unscored - unscored0 >= len(payloads):
            break
    elapsed = time.perf_counter() - start
    cpu = agent.cpu_s() - cpu0
    done = int(scored - before)
    return {
        "images": len(payloads),
        "scored": done,
        "unscored_backlog": int(unscored - unscored0),
        "publish_s": round(publish_s, 2),
        "seconds": round(elapsed, 2),
        "images_per_s": round(done / elapsed, 1),
        "agent_cpu_s": round(cpu, 2),
        "images_per_cpu_s": round(done / cpu, 1) if cpu else None,
        "payload_kb": round(sum(map(len, payloads)) / len(payloads) / 1024, 1),
    }


def cost(agent: AgentProcess, host: str, port: int, seconds: float, images: list[bytes], rate: float) -> dict[str, Any]:
    """The reference workload for ``seconds`` in real time, with ``images`` at ``rate`` per second beside it."""
    fleet = Fleet(machines=20, vibration_machines=2)
    events = fleet.events(0.0, seconds)
    camera_events = [Event(i / rate, TOPIC.format(1), images[i % len(images)]) for i in range(int(seconds * rate))]
    h0 = agent.wait_heartbeat(timeout_s=5)
    cpu0 = agent.cpu_s()
    start = time.perf_counter()
    threads = [threading.Thread(target=_publish, args=(host, port, "fleet", events))]
    if camera_events:
        threads.append(threading.Thread(target=_publish, args=(host, port, "camera", camera_events)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = len(events) + len(camera_events) + h0.get("ingest_messages", 0.0)
    caught_up = agent.wait_caught_up(int(expected), timeout_s=120)
    elapsed = time.perf_counter() - start
    h1 = agent.wait_heartbeat(timeout_s=5)
    cpu = agent.cpu_s() - cpu0

    def delta(name: str) -> int:
        return int(h1.get(name, 0.0) - h0.get(name, 0.0))

    return {
        "seconds": round(elapsed, 1),
        "caught_up_s": None if caught_up is None else round(caught_up, 1),
        "messages": len(events) + len(camera_events),
        "camera_images": len(camera_events),
        "agent_cpu_percent": round(100 * cpu / elapsed, 1),
        "readings": delta("ingest_readings"),
        "windows_scored": delta("windows_scored"),
        "images_scored": delta("images_scored"),
        "windows_dropped": delta("windows_dropped"),
        "decode_errors": delta("decode_errors"),
    }


def _publish(host: str, port: int, name: str, events: list[Event]) -> None:
    publisher = Publisher(host, port, name)
    try:
        publisher.publish(events, speed=1.0)
    finally:
        publisher.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="frames for the live and bare rates (default 1000)")
    parser.add_argument(
        "--model", type=Path, default=SHIPPED, help="image model folder (default models/surface_defect)"
    )
    parser.add_argument("--cost-s", type=float, default=30.0, help="seconds of each cost run (default 30)")
    parser.add_argument("--camera-rate", type=float, default=10.0, help="images/s beside the workload (default 10)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()
    results: dict[str, Any] = {"cpu_count": os.cpu_count(), "frame": f"{SIDE}x{SIDE} PNG, generated"}
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pdm-bench-images-")))
        broker = devservices.start_mosquitto(workdir / "mosquitto")
        stack.callback(broker.stop)
        influx = devservices.start_influxdb_v1(workdir / "influxdb")
        stack.callback(influx.stop)
        model = args.model
        if not (model / "manifest.json").is_file():
            print(f"images: no model in {model}; an UNTRAINED stand-in is used", file=sys.stderr)
            model = stand_in_model(workdir)
        results["model"] = str(model.relative_to(REPO) if model.is_relative_to(REPO) else model.name)
        grays = frames(args.images)
        payloads = [synth.encode(g, "png") for g in grays]
        results["bare"] = bare_throughput(model, grays, batch=16)
        print(f"images: bare ONNX Runtime: {results['bare']['images_per_s']} images/s", file=sys.stderr)

        agent = CameraAgent(workdir, broker.host, broker.port, influx.url, "images")
        agent.model = model
        agent.start()
        try:
            results["live"] = live(agent, broker.host, broker.port, payloads, timeout_s=600)
            print(f"images: live agent: {json.dumps(results['live'])}", file=sys.stderr)
            results["cost_without_images"] = cost(agent, broker.host, broker.port, args.cost_s, payloads, 0.0)
            results["cost_with_images"] = cost(agent, broker.host, broker.port, args.cost_s, payloads, args.camera_rate)
        finally:
            results["agent_exit_code"] = agent.stop()
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
