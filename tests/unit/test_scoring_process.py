"""The scoring worker in a process of its own: a real child process, the agent's side recorded.

The child builds its models, alert engine and state from the config as the agent does; what it sends back
(publications, acknowledgements, points, raw-data releases, metrics) is received here by recording stand-ins
for the broker and the ingest worker, with the real raw-vibration policy.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from agent.bootstrap import build_agent, build_scoring_side, build_stages
from agent.config import Config, parse_config
from agent.metrics import Metrics
from agent.records import Message, SampleBlock, ScoringItem, Source
from agent.runtime.defect import ShaftSpeeds
from agent.runtime.scoring_process import BatchQueue, ScoringProcess
from agent.spool.codec import Entry, Kind
from agent.storage.points import RawVibrationPolicy
from pdm_tools.simulator.machine import Fault, SimulatedMachine, fleet_profile

REPO = Path(__file__).resolve().parents[2]
BLOCK = 2048
SOURCE = Source.of(site="s1", line="l1", machine="m01", sensor="vibration")
WAIT_S = 60.0


def _config(tmp_path: Path, **extra: object) -> Config:
    data: dict[str, object] = {
        "agent": {"id": "sp-test", "heartbeat_s": 60, "scoring_process": True},
        "spool": {"path": str(tmp_path / "spool.db")},
        "storage": {"raw_vibration": {"mode": "around_alerts", "keep_blocks": 3}},
        "inference": {"models": [{"path": str(REPO / "models/vibration_anomaly"), "sensors": ["vibration"]}]},
        "alerts": {
            "default": {"raise_n": 2, "raise_m": 3, "clear_after": 3, "cooldown_s": 0, "renotify_s": 0},
            "commands": {"auth": "none"},
        },
        **extra,
    }
    return parse_config(data)


class RecordingBroker:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.acked: list[int] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.published.append((topic, payload))

    def ack(self, mid: int, qos: int) -> None:
        self.acked.append(mid)

    def ack_batch(self, acks: Sequence[tuple[int, int]]) -> None:
        self.acked.extend(mid for mid, _ in acks)


class RecordingSink:
    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.released: list[list[SampleBlock]] = []

    def append_entries(self, entries: Sequence[Entry]) -> None:
        self.entries.extend(entries)

    def store_raw(self, blocks: Sequence[SampleBlock]) -> None:
        self.released.append(list(blocks))


class Harness:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.stages = build_stages(config, Metrics())  # the agent's windower, as ingest uses it
        self.windows: queue.Queue[ScoringItem] = queue.Queue(maxsize=1000)
        self.commands: queue.Queue[Message] = queue.Queue()
        self.broker = RecordingBroker()
        self.sink = RecordingSink()
        self.raw = RawVibrationPolicy("around_alerts", keep_blocks=3)
        self.process = ScoringProcess(
            config,
            windows=self.windows,
            commands=self.commands,
            speeds=ShaftSpeeds("rpm", None),
            sink=self.sink,
            raw=self.raw,
            broker=self.broker,
            metrics=self.metrics,
            build_side=build_scoring_side,
        )

    def feed(self, blocks: Sequence[SampleBlock]) -> int:
        windows = self.stages.feed(blocks)
        for window in windows:
            self.windows.put(window)
        return len(windows)

    def alerts(self) -> list[dict]:
        return [json.loads(p) for t, p in self.broker.published if t.startswith("pdm/sp-test/alerts/")]


def _blocks(first: int, count: int, fault: bool) -> list[SampleBlock]:
    profile = fleet_profile(0, seed=42)
    rate = profile.rate_hz
    faults = [Fault(profile.name, "bearing_outer", 0.0, 1e9)] if fault else []
    machine = SimulatedMachine(profile, faults, seed=1)
    t0_ns = time.time_ns() - 600 * 10**9
    step_ns = round(BLOCK * 1e9 / rate)
    return [
        SampleBlock(SOURCE, t0_ns + k * step_ns, rate, machine.vibration(k * BLOCK / rate, BLOCK).astype(np.float32))
        for k in range(first, first + count)
    ]


def _wait(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {WAIT_S:.0f} s: {what}")
        time.sleep(0.05)


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(_config(tmp_path))
    h.process.start()
    yield h
    h.process.stop(10.0)


def test_the_child_scores_the_windows_and_its_points_and_alerts_come_back(harness: Harness) -> None:
    held = _blocks(0, 3, fault=False)
    for block in held:
        harness.raw.decide(block)
        harness.raw.hold(block)  # as the ingest side does for the blocks it holds
    n = harness.feed(_blocks(3, 12, fault=True))
    _wait(lambda: any(a["state"] == "new" for a in harness.alerts()), "an alert raised in the child")
    _wait(lambda: harness.metrics.get("windows.scored") == n, f"{n} windows scored (relayed metric)")
    new = next(a for a in harness.alerts() if a["state"] == "new")
    assert (new["machine"], new["alert_type"]) == ("m01", "vibration-anomaly")
    assert harness.process.is_alive()
    # The raw evidence is released on the agent's side, where the blocks are held.
    _wait(lambda: harness.sink.released != [], "the alert's raw-data release")
    assert [b.start_ns for b in harness.sink.released[0]] == [b.start_ns for b in held]
    # Features and scores come back as spool entries for the ingest thread's transaction.
    _wait(lambda: any(e.kind == Kind.LINES and b"alert," in e.body for e in harness.sink.entries), "alert points")
    kinds = {e.kind for e in harness.sink.entries}
    assert {Kind.FEATURES, Kind.LINES} <= kinds
    scores = sum(e.body.count(b"anomaly_score,") for e in harness.sink.entries if e.kind == Kind.LINES)
    assert scores == n


def test_a_command_is_applied_in_the_child_and_acknowledged_after_it(harness: Harness) -> None:
    harness.feed(_blocks(0, 12, fault=True))
    _wait(lambda: any(a["state"] == "new" for a in harness.alerts()), "an alert raised in the child")
    event_id = next(a["event_id"] for a in harness.alerts() if a["state"] == "new")
    body = json.dumps({"command": "ack", "event_id": event_id, "by": "maria"}).encode()
    harness.commands.put(Message("pdm/sp-test/commands", body, qos=1, mid=4242, received_ns=time.time_ns()))
    _wait(lambda: 4242 in harness.broker.acked, "the command's acknowledgement")
    acked = [a for a in harness.alerts() if a.get("reason") == "acknowledged"]
    assert [(a["event_id"], a["acknowledged_by"]) for a in acked] == [(event_id, "maria")]
    # Saved before the acknowledgement: the state file the child wrote names the acknowledgement.
    state = (Path(harness.config.spool.path).parent / "alert_state.json").read_text()
    assert "maria" in state


def test_a_killed_child_is_started_again_and_scoring_goes_on(harness: Harness) -> None:
    first = harness.feed(_blocks(0, 4, fault=False))
    _wait(lambda: harness.metrics.get("windows.scored") == first, "the first windows scored")
    process = harness.process._process
    assert process is not None and process.pid is not None
    os.kill(process.pid, signal.SIGKILL)
    _wait(lambda: harness.metrics.get("scoring.process_restarts") == 1, "a restart counted")
    _wait(lambda: harness.metrics.get("scoring.process") == 1 and harness.process.is_alive(), "the new child up")
    more = harness.feed(_blocks(4, 4, fault=False))
    _wait(lambda: harness.metrics.get("windows.scored") == first + more, "scoring after the restart")


def test_the_windows_a_dying_child_held_are_counted_as_dropped(harness: Harness) -> None:
    """Every window handed to the scoring side is either scored or counted: none vanish with a child."""
    child = harness.process._process
    assert child is not None and child.pid is not None
    os.kill(child.pid, signal.SIGSTOP)  # it takes what the pipe holds and scores nothing
    fed = harness.feed(_blocks(0, 40, fault=False))
    _wait(lambda: harness.windows.qsize() < fed, "windows handed to the stopped child")
    os.kill(child.pid, signal.SIGKILL)
    _wait(lambda: harness.metrics.get("scoring.process_restarts") == 1, "a restart counted")

    def accounted() -> float:
        return harness.metrics.get("windows.scored") + harness.metrics.get("windows.dropped", reason="scoring_down")

    _wait(lambda: accounted() == fed, f"{fed} windows scored or counted dropped")
    assert harness.metrics.get("windows.dropped", reason="scoring_down") > 0
    _wait(lambda: harness.process.is_alive(), "the new child up")
    dropped, scored = harness.metrics.get("windows.dropped"), harness.metrics.get("windows.scored")
    more = harness.feed(_blocks(40, 4, fault=False))
    _wait(lambda: harness.metrics.get("windows.scored") == scored + more, "the new child's windows scored")
    assert harness.metrics.get("windows.dropped") == dropped


def test_the_child_stops_by_itself_when_the_agent_goes_away(tmp_path: Path) -> None:
    """A killed agent closes its end of the pipes: the child must not outlive it."""
    h = Harness(_config(tmp_path))
    h.process.start()
    child = h.process._process
    assert child is not None and child.is_alive()
    h.process._stopping.set()  # no restart: this is the agent going away, not the child
    for conn in (h.process._to_child, h.process._from_child):
        assert conn is not None
        conn.close()
    relay = h.process._supervisor
    assert relay is not None
    relay.join(WAIT_S)  # it waits for the child's end (and, told the agent is stopping, starts no other)
    assert not relay.is_alive()
    assert not child.is_alive()
    assert child.exitcode == 0


def test_a_child_that_cannot_build_its_models_fails_the_start(tmp_path: Path) -> None:
    """The model changed on disk between the agent's load and the child's: the start fails with the reason."""
    model = tmp_path / "model"
    shutil.copytree(REPO / "models/vibration_anomaly", model)
    config = _config(tmp_path, inference={"models": [{"path": str(model), "sensors": ["vibration"]}]})
    h = Harness(config)  # the agent's side has loaded it
    manifest = model / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"sha256": "', '"sha256": "0'))
    with pytest.raises(RuntimeError, match=r"scoring process failed to start: .*sha256"):
        h.process.start()
    assert not h.process.is_alive()


def test_what_the_scoring_process_cannot_take_yet_is_refused_at_build(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"camera\.enabled"):
        build_agent(_config(tmp_path, camera={"enabled": True}))


def test_a_batch_goes_into_the_childs_queue_whole_and_waits_for_room() -> None:
    q: BatchQueue[int] = BatchQueue(maxsize=4)
    q.put_many([1, 2, 3])
    second = threading.Thread(target=q.put_many, args=([4, 5],), daemon=True)
    second.start()
    second.join(0.3)
    assert second.is_alive() and q.qsize() == 3  # 3 + 2 > 4: it waits, and puts none of its items
    assert q.get() == 1
    second.join(WAIT_S)
    assert not second.is_alive()
    assert [q.get_nowait() for _ in range(q.qsize())] == [2, 3, 4, 5]
    q.put_many(list(range(10)))  # an empty queue takes a batch larger than its bound
    assert q.qsize() == 10
