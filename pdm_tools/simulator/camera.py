"""A simulated inspection camera (``pdm-agent simulate camera``): images over MQTT, with their ground truth.

Each image goes to ``factory/{site}/{line}/{machine}/camera`` (the agent's default camera template) as the
raw file bytes, or with ``--envelope`` as the JSON envelope (``{"v":1,"ts","encoding","data","metadata"}``,
the true class in the metadata). Where the images come from:

- ``--images DIR``: the files of a NEU-style folder (``<class>_<n>.jpg``, e.g. ``../shared/datasets/neu``),
  published as they are, in a seeded random order; the class is the file name's;
- otherwise generated frames (``pdm_tools.images.synth``: seeded textures imitating the NEU classes), so
  that the demo and the tests need no dataset.

``--ground-truth PATH`` writes one JSON line per image: ``time``, ``topic``, ``machine``, ``sha256`` (of the
payload's image bytes, as in the agent's ``image`` and ``inspection`` points), ``class``, ``file``.
Published with QoS 1 through the simulator's publisher (acknowledgements awaited at the end); exit code 0
when every image was acknowledged, 1 when not or the broker is unreachable, 2 on a bad option.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pdm_tools.datasets.neu import CLASS_NAMES, DatasetError, image_files
from pdm_tools.images import synth
from pdm_tools.simulator.config import BrokerConfig
from pdm_tools.simulator.publisher import GatewayError, MqttPublisher, Publisher

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "factory/{site}/{line}/{machine}/camera"


@dataclass(frozen=True)
class Shot:
    """One image to publish: its bytes, format and true class; ``file`` when it comes from a folder."""

    data: bytes
    format: str
    truth: str
    file: str = ""


@dataclass
class CameraStats:
    """What a run published (``--json`` prints it)."""

    published: int = 0
    unacked: int = 0
    failed: int = 0
    by_class: dict[str, int] | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="MQTT broker host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=1883, help="MQTT broker port (default 1883)")
    parser.add_argument("--count", type=int, default=20, metavar="N", help="images to publish (default 20)")
    parser.add_argument(
        "--rate", type=float, default=5.0, metavar="PER_S", help="images per second, all cameras (default 5)"
    )
    parser.add_argument("--machines", type=int, default=1, metavar="N", help="cameras cam-01..cam-NN (default 1)")
    parser.add_argument("--site", default="s1", help="site tag (default s1)")
    parser.add_argument("--line", default="l1", help="line tag (default l1)")
    parser.add_argument(
        "--images",
        metavar="DIR",
        help="publish the files of a NEU-style folder (<class>_<n>.jpg); default: generated frames",
    )
    parser.add_argument(
        "--classes",
        default="",
        metavar="A,B",
        help=f"only these classes (default all of {', '.join(CLASS_NAMES)})",
    )
    parser.add_argument("--size", type=int, default=synth.SIZE, help="generated frames: pixels per side (default 200)")
    parser.add_argument(
        "--format", choices=("png", "jpeg", "bmp"), default="png", help="generated frames: file format (default png)"
    )
    parser.add_argument("--envelope", action="store_true", help="publish the JSON envelope instead of raw bytes")
    parser.add_argument("--seed", type=int, default=0, help="random seed: same seed, same images (default 0)")
    parser.add_argument("--ground-truth", metavar="PATH", help="write each image's true class as JSON lines")
    parser.add_argument("--json", action="store_true", help="print what was published as JSON at the end")


def main(args: argparse.Namespace) -> int:
    """Run the camera simulator; see the module docstring for the exit codes."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        classes = _classes(args.classes)
        if args.count < 1 or args.rate <= 0 or args.machines < 1:
            raise ValueError("--count and --machines must be >= 1 and --rate > 0")
        shots = list(_shots(args, classes))
    except (ValueError, DatasetError) as exc:
        print(f"simulate camera: {exc}", file=sys.stderr)
        return 2
    broker = BrokerConfig(host=args.host, port=args.port, client_id=f"pdm-camera-{args.seed}")
    try:
        stats = run(shots, MqttPublisher(broker, qos=1), args, broker.connect_timeout_s, broker.ack_timeout_s)
    except GatewayError as exc:
        print(f"simulate camera: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(asdict(stats), sort_keys=True))
    if stats.unacked or stats.failed:
        print(f"simulate camera: {stats.unacked} images unacknowledged, {stats.failed} failed", file=sys.stderr)
        return 1
    return 0


def run(
    shots: Sequence[Shot], publisher: Publisher, args: argparse.Namespace, connect_s: float, ack_s: float
) -> CameraStats:
    """Publish ``shots`` round-robin over the cameras at ``args.rate``; the ground truth as it goes."""
    stop = threading.Event()
    stats = CameraStats(by_class={})
    truth = open(args.ground_truth, "w", encoding="utf-8") if args.ground_truth else None  # noqa: SIM115
    publisher.connect(connect_s)
    try:
        start = time.monotonic()
        for i, shot in enumerate(shots):
            delay = start + i / args.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            machine = f"cam-{i % args.machines + 1:02d}"
            topic = DEFAULT_TEMPLATE.format(site=args.site, line=args.line, machine=machine)
            now_ns = time.time_ns()
            payload = _envelope(shot, i, now_ns) if args.envelope else shot.data
            if not publisher.publish(topic, payload, False, stop):
                stats.failed += 1
                continue
            stats.published += 1
            assert stats.by_class is not None
            stats.by_class[shot.truth] = stats.by_class.get(shot.truth, 0) + 1
            if truth is not None:
                record = {
                    "time_ns": now_ns,
                    "topic": topic,
                    "machine": machine,
                    "sha256": hashlib.sha256(shot.data).hexdigest(),
                    "class": shot.truth,
                    "file": shot.file,
                }
                truth.write(json.dumps(record) + "\n")
        stats.unacked = publisher.wait_for_acks(ack_s)
    finally:
        publisher.close()
        if truth is not None:
            truth.close()
    stats.failed += publisher.counters().failed
    return stats


def _classes(text: str) -> tuple[str, ...]:
    if not text:
        return CLASS_NAMES
    chosen = tuple(c.strip() for c in text.split(",") if c.strip())
    unknown = [c for c in chosen if c not in CLASS_NAMES]
    if unknown or not chosen:
        raise ValueError(f"--classes: unknown {unknown or text!r}; choose among {', '.join(CLASS_NAMES)}")
    return chosen


def _shots(args: argparse.Namespace, classes: Sequence[str]) -> Iterator[Shot]:
    """``args.count`` images, cycling through the chosen classes (generated) or a shuffled folder."""
    rng = np.random.default_rng(args.seed)
    if args.images:
        files = [(path, CLASS_NAMES[label]) for path, label in image_files(Path(args.images))]
        files = [(path, name) for path, name in files if name in classes]
        if not files:
            raise ValueError(f"--images {args.images}: no image of the classes {', '.join(classes)}")
        order = rng.permutation(len(files))
        for i in range(args.count):
            path, name = files[int(order[i % len(files)])]
            fmt = "jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else path.suffix.lower().lstrip(".")
            yield Shot(path.read_bytes(), fmt, name, path.name)
        return
    for i in range(args.count):
        name = classes[i % len(classes)]
        frame = synth.generate(name, seed=args.seed * 100_003 + i, size=args.size)
        yield Shot(synth.encode(frame, args.format), args.format, name)


def _envelope(shot: Shot, seq: int, now_ns: int) -> bytes:
    body = {
        "v": 1,
        "ts_ns": now_ns,
        "encoding": shot.format,
        "data": base64.b64encode(shot.data).decode("ascii"),
        "metadata": {"truth": shot.truth, "seq": seq},
    }
    return json.dumps(body, separators=(",", ":")).encode()
