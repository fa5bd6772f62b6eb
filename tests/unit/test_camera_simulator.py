"""The camera simulator: what it publishes decodes in the agent's camera decoder, with its ground truth."""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agent.decode.base import DecoderContext
from agent.decode.image import ImageDecoder, camera_template
from agent.records import ImageFrame, Message
from pdm_tools.simulator import camera
from pdm_tools.simulator.publisher import PublisherCounters


class FakePublisher:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def connect(self, timeout_s: float) -> None:
        pass

    def publish(self, topic: str, payload: bytes, retain: bool, stop: threading.Event) -> bool:
        self.sent.append((topic, payload))
        return True

    def wait_for_acks(self, timeout_s: float) -> int:
        return 0

    def close(self) -> None:
        pass

    def counters(self) -> PublisherCounters:
        return PublisherCounters()


def _args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    camera.add_arguments(parser)
    return parser.parse_args(["--rate", "1000", "--ground-truth", str(tmp_path / "truth.jsonl"), *extra])


def _run(args: argparse.Namespace) -> tuple[FakePublisher, list[dict[str, object]]]:
    publisher = FakePublisher()
    shots = list(camera._shots(args, camera._classes(args.classes)))
    stats = camera.run(shots, publisher, args, 1.0, 1.0)
    assert stats.published == args.count and not stats.failed
    truth = [json.loads(line) for line in Path(args.ground_truth).read_text().splitlines()]
    return publisher, truth


@pytest.mark.parametrize("envelope", [False, True])
def test_generated_images_decode_in_the_agent_with_the_ground_truth_sha256(tmp_path: Path, envelope: bool) -> None:
    args = _args(tmp_path, "--count", "6", "--machines", "2", "--size", "64", *(["--envelope"] if envelope else []))
    publisher, truth = _run(args)
    decoder = ImageDecoder(DecoderContext(camera_template(camera.DEFAULT_TEMPLATE)))
    classes = []
    for (topic, payload), record in zip(publisher.sent, truth, strict=True):
        (frame,) = decoder.decode(Message(topic, payload, 1, 1, int(record["time_ns"])))  # type: ignore[call-overload]
        assert isinstance(frame, ImageFrame)
        assert frame.sha256 == record["sha256"] and frame.source.machine == record["machine"]
        assert (frame.width, frame.height) == (64, 64)
        if envelope:
            assert frame.metadata["truth"] == record["class"]
        classes.append(record["class"])
    assert classes == list(camera.CLASS_NAMES)
    assert {t for t, _ in publisher.sent} == {"factory/s1/l1/cam-01/camera", "factory/s1/l1/cam-02/camera"}


def test_the_same_seed_gives_the_same_images(tmp_path: Path) -> None:
    first, _ = _run(_args(tmp_path, "--count", "3", "--size", "48", "--seed", "4"))
    again, _ = _run(_args(tmp_path, "--count", "3", "--size", "48", "--seed", "4"))
    other, _ = _run(_args(tmp_path, "--count", "3", "--size", "48", "--seed", "5"))
    assert [p for _, p in first.sent] == [p for _, p in again.sent] != [p for _, p in other.sent]


def test_a_folder_of_neu_files_is_published_with_the_class_of_each_name(tmp_path: Path) -> None:
    folder = tmp_path / "neu"
    folder.mkdir()
    for name in ("scratches_1.jpg", "scratches_2.jpg", "patches_1.jpg"):
        Image.fromarray(np.full((40, 40), 90, dtype=np.uint8)).save(folder / name, "JPEG")
    args = _args(tmp_path, "--images", str(folder), "--count", "3", "--classes", "scratches")
    publisher, truth = _run(args)
    assert {r["class"] for r in truth} == {"scratches"}
    assert {str(r["file"]) for r in truth} == {"scratches_1.jpg", "scratches_2.jpg"}
    assert all(p == (folder / str(r["file"])).read_bytes() for (_, p), r in zip(publisher.sent, truth, strict=True))


def test_bad_options_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert camera.main(_args(tmp_path, "--classes", "rust")) == 2
    assert "unknown" in capsys.readouterr().err
    assert camera.main(_args(tmp_path, "--images", str(tmp_path / "nowhere"))) == 2
