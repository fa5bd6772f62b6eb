"""The gateway's schedule and payloads, with an in-memory publisher instead of MQTT."""

from __future__ import annotations

import base64
import json
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.records import NS_PER_S
from pdm_tools.simulator.config import SimulatorConfig, config_from_dict
from pdm_tools.simulator.gateway import Gateway, sample_time_ns
from pdm_tools.simulator.machine import SimulatedMachine
from pdm_tools.simulator.publisher import GatewayError, PublisherCounters


class RecordingPublisher:
    """Keeps every message; ``full_for`` publish attempts answer "queue full" first."""

    def __init__(self, full_for: int = 0, stop_after: int | None = None) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.full_for = full_for
        self.stop_after = stop_after
        self.retries = 0
        self.closed = False

    def connect(self, timeout_s: float) -> None:
        pass

    def publish(self, topic: str, payload: bytes, retain: bool, stop: threading.Event) -> bool:
        while self.full_for > 0:
            self.full_for -= 1
            self.retries += 1
        self.messages.append((topic, payload, retain))
        if self.stop_after is not None and len(self.messages) >= self.stop_after:
            stop.set()
        return True

    def wait_for_acks(self, timeout_s: float) -> int:
        return 0

    def close(self) -> None:
        self.closed = True

    def counters(self) -> PublisherCounters:
        return PublisherCounters(retries=self.retries)


class UnreachablePublisher(RecordingPublisher):
    def connect(self, timeout_s: float) -> None:
        raise GatewayError("cannot connect")


def fast_config(**overrides: object) -> SimulatorConfig:
    document: dict[str, object] = {"duration_s": 3, "speed": 1e6, "seed": 5, "machines": {"count": 2}}
    document.update(overrides)
    return config_from_dict(document)


def by_topic(messages: list[tuple[str, bytes, bool]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for topic, payload, _ in messages:
        out[topic].append(json.loads(payload))
    return out


def test_publishes_every_block_and_reading_with_contiguous_seq_and_exact_device_times() -> None:
    cfg = fast_config()
    publisher = RecordingPublisher()
    stats = Gateway(cfg, publisher).run()
    topics = by_topic(publisher.messages)
    rate, block = 10240.0, cfg.vibration.block_samples
    assert sorted(topics) == [f"factory/site1/line1/{m}/{s}" for m in ("m01", "m02") for s in ("process", "vibration")]
    for machine in ("m01", "m02"):
        blocks = topics[f"factory/site1/line1/{machine}/vibration"]
        readings = topics[f"factory/site1/line1/{machine}/process"]
        assert len(blocks) == 3 * rate // block == 15
        assert len(readings) == 3
        assert [b["seq"] for b in blocks] == list(range(15))
        assert [r["seq"] for r in readings] == [0, 1, 2]
        assert [b["ts_ns"] - stats.start_ns for b in blocks] == [sample_time_ns(k * block, rate) for k in range(15)]
        assert [r["ts_ns"] - stats.start_ns for r in readings] == [0, NS_PER_S, 2 * NS_PER_S]
        assert all(b["encoding"] == "f32le" and b["rate_hz"] == rate for b in blocks)
        assert all(r["fields"].keys() == {"temperature", "current", "pressure", "rpm"} for r in readings)
    assert stats.by_kind == {"vibration": 30, "process": 6}
    assert stats.per_machine == {"m01": 18, "m02": 18}
    assert (stats.messages, stats.samples, stats.readings, stats.unacked) == (36, 30 * block, 6, 0)
    assert publisher.closed


def test_payload_samples_are_the_machine_signal() -> None:
    cfg = fast_config(faults=[{"machine": "m02", "kind": "bearing_ball", "start_s": 0.5, "ramp_s": 1}])
    publisher = RecordingPublisher()
    stats = Gateway(cfg, publisher).run()
    machine = SimulatedMachine(cfg.profiles()[1], cfg.faults, seed=cfg.seed)
    for block in by_topic(publisher.messages)["factory/site1/line1/m02/vibration"]:
        samples = np.frombuffer(base64.b64decode(block["data"]), dtype="<f4")
        first = round((block["ts_ns"] - stats.start_ns) * block["rate_hz"] / NS_PER_S)
        assert np.array_equal(samples, machine.vibration(first / block["rate_hz"], len(samples)))


def test_dropout_silences_the_sensor_without_a_seq_gap() -> None:
    faults = [
        {"machine": "m01", "kind": "dropout", "sensor": "vibration", "start_s": 1.0, "end_s": 2.0},
        {"machine": "m02", "kind": "dropout", "sensor": "process", "start_s": 1.0, "end_s": 2.0},
    ]
    publisher = RecordingPublisher()
    stats = Gateway(fast_config(faults=faults), publisher).run()
    topics = by_topic(publisher.messages)
    blocks = topics["factory/site1/line1/m01/vibration"]
    assert len(blocks) == 10 and [b["seq"] for b in blocks] == list(range(10))
    starts_s = [(b["ts_ns"] - stats.start_ns) / NS_PER_S for b in blocks]
    assert not any(1.0 <= t < 2.0 for t in starts_s)
    readings = topics["factory/site1/line1/m02/process"]
    assert [(r["ts_ns"] - stats.start_ns) // NS_PER_S for r in readings] == [0, 2]
    assert [r["seq"] for r in readings] == [0, 1]
    assert stats.suppressed == 5 + 1


def test_ground_truth_is_written_and_published_retained_in_device_time(tmp_path: Path) -> None:
    path = tmp_path / "out" / "gt.jsonl"
    cfg = fast_config(
        faults=[
            {"machine": "m02", "kind": "bearing_outer", "start_s": 1.5, "severity": 0.7},
            {"machine": "m01", "kind": "sensor_stuck", "sensor": "process", "start_s": 1, "end_s": 2},
        ],
        ground_truth={"path": str(path), "topic": "factory/site1/line1/_ground_truth"},
    )
    publisher = RecordingPublisher()
    stats = Gateway(cfg, publisher).run()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    start = stats.start_ns
    assert lines == [
        {"v": 1, "machine": "m02", "kind": "bearing_outer", "sensor": "vibration", "severity": 0.7,
         "ramp_s": 10.0, "start_ns": start + 1_500_000_000, "end_ns": None},
        {"v": 1, "machine": "m01", "kind": "sensor_stuck", "sensor": "process", "severity": 1.0,
         "ramp_s": 0.0, "start_ns": start + NS_PER_S, "end_ns": start + 2 * NS_PER_S},
    ]  # fmt: skip
    topic, payload, retain = publisher.messages[0]
    assert (topic, retain) == ("factory/site1/line1/_ground_truth", True)
    assert json.loads(payload) == {"v": 1, "run_start_ns": start, "faults": lines}
    assert stats.by_kind["ground_truth"] == 1


def test_i16le_blocks_saturate_like_an_adc_and_count_clipped_samples() -> None:
    cfg = fast_config(vibration={"encoding": "i16le", "scale": 0.000002})  # full scale +-0.066 g
    publisher = RecordingPublisher()
    stats = Gateway(cfg, publisher).run()
    block = by_topic(publisher.messages)["factory/site1/line1/m01/vibration"][0]
    counts = np.frombuffer(base64.b64decode(block["data"]), dtype="<i2")
    assert counts.max() == 32767 and counts.min() == -32767
    assert stats.clipped > 0


def test_stop_event_ends_the_run_early() -> None:
    publisher = RecordingPublisher(stop_after=5)
    stats = Gateway(fast_config(duration_s=None), publisher).run(threading.Event())
    assert stats.messages == 5 and len(publisher.messages) == 5 and publisher.closed


def test_retries_are_reported() -> None:
    publisher = RecordingPublisher(full_for=3)
    stats = Gateway(fast_config(), publisher).run()
    assert stats.retries == 3 and stats.messages == 36


def test_unreachable_broker_is_an_error_not_a_silent_run() -> None:
    with pytest.raises(GatewayError):
        Gateway(fast_config(), UnreachablePublisher()).run()
