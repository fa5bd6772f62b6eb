"""Camera images through the ingest worker built by the composition root (fakes for the spool and broker):
bytes into the store, a reference into the spool before the acknowledgement, pixels queued within their byte
bound, bad images dead-lettered and counted."""

from __future__ import annotations

import hashlib
import io
import queue
from pathlib import Path

import numpy as np
from PIL import Image

from agent.bootstrap import Models, build_image_store, build_ingest, build_stages
from agent.config import parse_config
from agent.inference.router import ModelRouter
from agent.metrics import Metrics
from agent.records import ImageFrame, Message
from agent.runtime.inspection import PendingImages
from tests.unit.test_pipeline import FakeBroker, FakeSpool, Journal

TOPIC = "factory/s1/l1/cam-1/camera"


def _png(seed: int, side: int = 32) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def _worker(tmp_path: Path, max_pending_bytes: int = 1_000_000):  # type: ignore[no-untyped-def]
    config = parse_config(
        {
            "spool": {"path": str(tmp_path / "spool.db")},
            "queues": {"put_timeout_s": 0.01},
            "camera": {"enabled": True, "max_pending_bytes": max_pending_bytes},
        }
    )
    metrics = Metrics()
    stages = build_stages(config, metrics, Models(ModelRouter([]), classifier=None, registry=None))
    journal = Journal()
    spool, broker = FakeSpool(journal), FakeBroker(journal)
    windows: queue.Queue = queue.Queue()
    store = build_image_store(config, metrics)
    assert store is not None and stages.inspection is not None
    worker = build_ingest(
        config, stages, metrics, messages=queue.Queue(), windows=windows, spool=spool, broker=broker, images=store
    )
    return worker, journal, spool, broker, windows, store, metrics


def _message(mid: int, payload: bytes) -> Message:
    return Message(TOPIC, payload, 1, mid, 1_790_000_000 * 10**9)


def test_an_image_is_stored_referenced_in_the_spool_then_acknowledged_and_queued_without_its_bytes(
    tmp_path: Path,
) -> None:
    worker, journal, spool, _, windows, store, metrics = _worker(tmp_path)
    data = _png(1)
    worker.process([_message(1, data)])
    sha = hashlib.sha256(data).hexdigest()
    got = store.read(sha)
    assert got is not None and got.data == data
    (line,) = spool.lines
    assert line.startswith("image,") and f'sha256="{sha}"' in line and "stored=true" in line
    assert journal.events[-2:] == [("append", 1), ("ack", 1)]
    frame = windows.get_nowait()
    assert isinstance(frame, ImageFrame) and frame.payload == b"" and frame.gray.shape == (32, 32)
    assert metrics.get("images.received") == 1


def test_images_beyond_the_pending_byte_bound_are_stored_but_not_queued(tmp_path: Path) -> None:
    worker, _, spool, _, windows, store, metrics = _worker(tmp_path, max_pending_bytes=32 * 32 + 10)
    worker.process([_message(1, _png(1)), _message(2, _png(2))])
    assert windows.qsize() == 1
    assert metrics.get("images.unscored", reason="backlog") == 1
    assert len(store) == 2 and len(spool.lines) == 2


def test_bad_images_are_dead_lettered_counted_and_acknowledged(tmp_path: Path) -> None:
    worker, journal, spool, broker, windows, _, metrics = _worker(tmp_path)
    good = _png(3)
    worker.process([_message(1, good[:40]), _message(2, b"GIF89a" + bytes(32)), _message(3, good)])
    codes = sorted(body["code"] for topic, body in broker.published if topic.endswith("/deadletter"))
    assert codes == ["truncated", "unsupported_format"]
    assert metrics.get("decode.errors", reason="truncated") == 1
    assert [e for e in journal.events if e[0] == "ack"] == [("ack", 1), ("ack", 2), ("ack", 3)]
    assert windows.qsize() == 1 and len(spool.lines) == 1


def test_pending_images_are_bounded_in_bytes() -> None:
    pending = PendingImages(100)
    assert pending.take(60) and not pending.take(50) and pending.take(40)
    pending.give_back(60)
    assert pending.bytes == 40 and pending.take(60)


def test_the_camera_alert_type_raises_no_no_data_events_unless_configured(tmp_path: Path) -> None:
    from agent.bootstrap import rulebook

    default = rulebook(parse_config({"camera": {"enabled": True}}))
    assert default.rule("surface-defect").no_data_after_s == 0
    assert default.rule("vibration-anomaly").no_data_after_s == default.default.no_data_after_s
    configured = parse_config(
        {"camera": {"enabled": True}, "alerts": {"types": {"surface-defect": {"no_data_after_s": 300}}}}
    )
    assert rulebook(configured).rule("surface-defect").no_data_after_s == 300
