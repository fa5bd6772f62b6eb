"""Commissioning baselines outlive a restart: saved atomically, versioned, tied to their spec, continued.

The regression these guard against (issue 22, item 3): restarted during a fault, the agent commissioned
again on the fault, cleared the open alert while the fault went on, and flagged every normal window after.
The real-process version is ``tests/integration/test_chaos_baseline.py``.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import queue
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.alerts.engine import AlertEngine
from agent.alerts.rules import AlertRule, RuleBook
from agent.bootstrap import build_scoring
from agent.commissioning import CommissioningBaseline, CommissioningConfig, DetectorConfig
from agent.commissioning.scorer import URGENT_MIN_INTERVAL_S, CommissioningScorer
from agent.commissioning.store import FORMAT_VERSION, BaselineStore
from agent.config import parse_config
from agent.inference.router import ModelRouter
from agent.metrics import Metrics
from agent.records import Message, Reading, Source
from tests.spool_support import wait_for
from tests.unit.test_pipeline import FakeBroker, FakeSpool, Journal, _stages

NS = 1_000_000_000
T0 = 1_790_000_000 * NS
CONFIG = CommissioningConfig(commissioning_steps=60, detector=DetectorConfig(smoothing_steps=5))
CHANNELS = ("temperature", "current", "pressure")
SOURCE = Source.of(site="s1", line="l1", machine="m01", sensor="process")


def _steps(n: int, seed: int = 0, offset: float = 0.0) -> np.ndarray:
    """``n`` process steps of a healthy machine; ``offset`` °C added to the temperature (an overheating)."""
    rng = np.random.default_rng(seed)
    x = np.array([55.0, 12.0, 3.0]) + rng.normal(size=(n, 3)) * np.array([0.3, 0.1, 0.02])
    x[:, 0] += offset
    return x


def _readings(x: np.ndarray, first: int) -> list[Reading]:
    return [
        Reading(SOURCE, T0 + (first + i) * NS, dict(zip(CHANNELS, map(float, row), strict=True)))
        for i, row in enumerate(x)
    ]


def _scorer(path: Path, metrics: Metrics | None = None, config: CommissioningConfig = CONFIG) -> CommissioningScorer:
    return CommissioningScorer(config, ["process"], CHANNELS, metrics or Metrics(), BaselineStore(path))


def _save(scorer: CommissioningScorer) -> None:
    """What the scoring worker's saver does at stop (synchronously here)."""
    document = scorer.snapshot(force=True)
    assert document is not None and scorer.store is not None
    scorer.store.save(document)


def _saved(path: Path, steps: int) -> CommissioningScorer:
    """A scorer that has seen ``steps`` healthy steps of ``SOURCE``, saved to ``path``."""
    scorer = _scorer(path)
    for r in _readings(_steps(steps), 0):
        scorer.score(r)
    _save(scorer)
    return scorer


# --- the baseline's own state --------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [0, 3, 30, 59, 60, 61, 90])
def test_a_baseline_continued_from_its_state_scores_exactly_like_one_never_interrupted(cut: int) -> None:
    x = np.vstack([_steps(100), _steps(40, seed=1, offset=3.0)])
    uninterrupted = CommissioningBaseline(CONFIG)
    expected = [uninterrupted.update(row, T0 + i * NS) for i, row in enumerate(x)]
    first = CommissioningBaseline(CONFIG)
    got = [first.update(row, T0 + i * NS) for i, row in enumerate(x[:cut])]
    # Through JSON, as on disk.
    second = CommissioningBaseline.from_state(json.loads(json.dumps(first.to_state())), CONFIG)
    assert second.phase == first.phase and second.steps_seen == first.steps_seen
    got += [second.update(row, T0 + (cut + i) * NS) for i, row in enumerate(x[cut:])]
    assert got == expected


def test_a_restored_baseline_refuses_steps_it_has_already_seen() -> None:
    baseline = CommissioningBaseline(CONFIG)
    for i, row in enumerate(_steps(10)):
        baseline.update(row, T0 + i * NS)
    restored = CommissioningBaseline.from_state(baseline.to_state(), CONFIG)
    with pytest.raises(ValueError, match="not later than the previous one"):
        restored.update(_steps(1)[0], T0 + 9 * NS)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda s: s.pop("detector"), "incomplete or malformed"),
        (lambda s: s.update(phase="commissioning"), "does not match"),
        (lambda s: s["detector"].update(mean=[1.0, 2.0]), "does not fit the channels"),
        (lambda s: s.update(recent=s["recent"][:2]), "recent ones"),
        (lambda s: s["recent"][0].__setitem__(0, float("nan")), "finite rows"),
    ],
)
def test_an_inconsistent_state_is_refused_with_what_is_wrong(change, match: str) -> None:
    baseline = CommissioningBaseline(CONFIG)
    for i, row in enumerate(_steps(70)):
        baseline.update(row, T0 + i * NS)
    state = json.loads(json.dumps(baseline.to_state()))
    change(state)
    with pytest.raises(ValueError, match=match):
        CommissioningBaseline.from_state(state, CONFIG)


def test_commissioning_steps_are_saved_packed_and_the_list_form_of_older_files_still_reads() -> None:
    """Steps go to the file as one base64 string of float64s (building and encoding a list of numbers for
    hundreds of machines stalled the agent for seconds); a file written with lists continues the same."""
    baseline = CommissioningBaseline(CONFIG)
    x = _steps(30)
    for i, row in enumerate(x):
        baseline.update(row, T0 + i * NS)
    state = json.loads(json.dumps(baseline.to_state()))
    assert state["train"]["rows"] == 30 and isinstance(state["train"]["f8"], str)
    old_form = {**state, "train": x.tolist()}
    for saved in (state, old_form):
        restored = CommissioningBaseline.from_state(saved, CONFIG)
        assert restored.to_state() == baseline.to_state()  # the same steps, bit for bit
    for broken, match in [({"rows": 7, "f8": state["train"]["f8"]}, "do not make 7 rows"), ("x", "list of rows")]:
        with pytest.raises(ValueError, match=match):
            CommissioningBaseline.from_state({**state, "train": broken}, CONFIG)


# --- the file -------------------------------------------------------------------------------------------------


def test_a_restart_continues_collecting_where_commissioning_was(tmp_path: Path) -> None:
    path = tmp_path / "baselines.json"
    first = _scorer(path)
    x = _steps(80)
    assert [first.score(r) for r in _readings(x[:40], 0)] == [None] * 40
    _save(first)

    metrics = Metrics()
    second = _scorer(path, metrics)
    assert second.restore() == 1
    assert second.phase(SOURCE) == "commissioning"
    assert metrics.get("commissioning.baselines", phase="commissioning") == 1
    scores = [second.score(r) for r in _readings(x[40:], 40)]
    # 20 more steps complete the 60 (not 60 more): the 40 before the restart count.
    assert scores[:19] == [None] * 19 and all(s is not None for s in scores[20:])
    assert second.phase(SOURCE) == "monitoring"


def test_a_new_machine_and_the_end_of_its_commissioning_are_saved_within_a_second_progress_every_interval(
    tmp_path: Path,
) -> None:
    now = [0.0]
    store = BaselineStore(tmp_path / "baselines.json")
    scorer = CommissioningScorer(CONFIG, ["process"], CHANNELS, Metrics(), store, 60.0, clock=lambda: now[0])
    readings = _readings(_steps(62), 0)
    scorer.score(readings[0])
    assert scorer.snapshot() is not None  # a new machine
    for r in readings[1:59]:
        scorer.score(r)
    assert scorer.snapshot() is None  # progress only: at the next interval
    assert scorer.score(readings[59]) is None  # the step that completes commissioning is not scored
    assert scorer.snapshot() is None  # a phase change within a second of the last save: the next second
    now[0] = URGENT_MIN_INTERVAL_S
    document = scorer.snapshot()
    assert document is not None and [b["phase"] for b in document["baselines"]] == ["monitoring"]
    scorer.score(readings[60])
    assert scorer.snapshot() is None
    now[0] = 61.0
    scorer.score(readings[61])
    assert scorer.snapshot() is not None


def test_a_fitted_baseline_keeps_scoring_with_the_same_detector_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "baselines.json"
    first = _saved(path, 100)
    second = _scorer(path)
    second.restore()
    reading = _readings(_steps(1, seed=5), 100)[0]
    a, b = first.score(reading), second.score(reading)
    assert a is not None and a == b


def test_an_overheating_present_at_restart_stays_flagged_and_is_never_learned(tmp_path: Path) -> None:
    """Issue 22 item 3 in one machine: restarted during a fault, the baseline keeps flagging it (no new
    commissioning on the fault), and the normal steps after it are not flagged."""
    path = tmp_path / "baselines.json"
    first = _scorer(path)
    for r in _readings(_steps(100), 0):
        first.score(r)
    fault = _readings(_steps(200, seed=1, offset=8.0), 100)
    during = [first.score(r) for r in fault[:20]]
    assert all(s is not None and s.score > s.threshold for s in during[5:])
    _save(first)

    second = _scorer(path)
    second.restore()
    after = [second.score(r) for r in fault[20:]]
    assert all(s is not None and s.score > s.threshold for s in after), "the fault was learned as normal"
    normal = [second.score(r) for r in _readings(_steps(60, seed=2), 300)]
    flagged = sum(s is not None and s.score > s.threshold for s in normal[5:])
    assert flagged == 0


def test_a_file_of_another_spec_is_not_loaded_but_moved_aside_and_reported(tmp_path: Path, caplog) -> None:
    path = tmp_path / "baselines.json"
    first = _saved(path, 100)

    metrics = Metrics()
    other = CommissioningConfig(commissioning_steps=60, detector=DetectorConfig(smoothing_steps=6))
    second = _scorer(path, metrics, other)
    assert second.restore() == 0
    assert second.phase(SOURCE) is None
    assert metrics.get("commissioning.state_errors", reason="spec_mismatch") == 1
    assert not path.exists()
    [aside] = tmp_path.glob("baselines.json.spec_mismatch-*")
    assert json.loads(aside.read_text())["spec"] == first.version  # kept, whole
    assert f"written for spec '{first.version}'" in caplog.text and "smoothing_steps" in caplog.text


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "unreadable"),
        (json.dumps({"format": "something else"}), "format"),
        (json.dumps({"format": "pdm-agent/commissioning-baselines", "version": FORMAT_VERSION + 1}), "version"),
    ],
)
def test_an_unusable_file_is_moved_aside_with_its_reason_and_commissioning_starts_anew(
    tmp_path: Path, content: str, reason: str
) -> None:
    path = tmp_path / "baselines.json"
    path.write_text(content)
    metrics = Metrics()
    assert _scorer(path, metrics).restore() == 0
    assert metrics.get("commissioning.state_errors", reason=reason) == 1
    assert [p.read_text() for p in tmp_path.glob(f"baselines.json.{reason}-*")] == [content]


def test_a_crash_between_write_and_rename_leaves_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "baselines.json"
    _saved(path, 30)
    before = path.read_bytes()
    # A real process dies (os._exit, no cleanup) at the rename of the next save.
    code = (
        "import os, sys, json; from pathlib import Path; import agent.statefile as s\n"
        "os.replace = lambda *a: os._exit(9)\n"
        "s.write_atomically(Path(sys.argv[1]), json.dumps({'half': 'written'}).encode())\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], check=False)
    assert done.returncode == 9
    assert path.read_bytes() == before
    restored = _scorer(path)
    assert restored.restore() == 1 and restored.phase(SOURCE) == "commissioning"


# --- the scoring worker: saves off its thread, failures, the operator's command --------------------------------


class FullDisk(BaselineStore):
    """A store whose disk is full until ``space`` is set."""

    space = False

    def save(self, state):
        if not self.space:
            raise OSError(errno.ENOSPC, "No space left on device")
        super().save(state)


def _worker(scorer: CommissioningScorer, metrics: Metrics, broker: FakeBroker, commands=None):
    # Unsigned commands (the broker's ACL decides): the signing itself is tested with the other commands.
    config = parse_config({"agent": {"id": "edge-01"}, "alerts": {"commands": {"auth": "none"}}})
    stages = dataclasses.replace(_stages(config, ModelRouter([]), metrics), baseline=scorer)
    engine = AlertEngine(RuleBook(AlertRule(raise_n=3, raise_m=3, clear_after=3)))
    spool = FakeSpool(broker.journal)
    return build_scoring(config, stages, metrics, spool=spool, broker=broker, engine=engine, commands=commands)


def _command(body: dict, mid: int = 1) -> Message:
    return Message(topic="pdm/edge-01/commands", payload=json.dumps(body).encode(), qos=1, mid=mid, received_ns=T0)


def test_a_full_disk_is_counted_scoring_goes_on_and_the_save_succeeds_once_there_is_space(tmp_path: Path) -> None:
    metrics = Metrics()
    store = FullDisk(tmp_path / "baselines.json")
    scorer = CommissioningScorer(CONFIG, ["process"], CHANNELS, metrics, store)
    worker = _worker(scorer, metrics, FakeBroker(Journal()))
    worker.process(_readings(_steps(100), 0))  # a new machine, then its phase change: saves due
    wait_for(lambda: metrics.get("commissioning.state_errors", reason="save") >= 1, "a failed save", 30)
    assert metrics.get("commissioning.steps", phase="monitoring") == 40  # every step scored all the same
    store.space = True
    wait_for(store.path.exists, "the save once there is space", 30)
    worker.finish()
    restored = _scorer(store.path)
    assert restored.restore() == 1 and restored.phase(SOURCE) == "monitoring"


def test_rebaseline_is_the_operators_command_and_is_on_disk_before_it_is_acknowledged(tmp_path: Path) -> None:
    metrics, journal = Metrics(), Journal()
    broker = FakeBroker(journal)
    scorer = _scorer(tmp_path / "baselines.json", metrics)
    commands: queue.Queue[Message] = queue.Queue()
    worker = _worker(scorer, metrics, broker, commands)
    worker.process(_readings(_steps(100), 0))
    assert scorer.phase(SOURCE) == "monitoring"

    for mid, body in enumerate(
        [
            {"command": "rebaseline", "machine": "m09", "by": "olga"},
            {"command": "rebaseline", "by": "olga"},
            {"command": "rebaseline", "machine": "m01", "by": "olga"},
        ]
    ):
        commands.put(_command(body, mid))
    worker.process([])
    replies = [body for topic, body in broker.published if topic == "pdm/edge-01/commands/result"]
    assert [(r["command"], r["accepted"]) for r in replies] == [
        ("rebaseline", False),
        ("rebaseline", False),
        ("rebaseline", True),
    ]
    assert "unknown_machine" in replies[0]["detail"] and "missing_field" in replies[1]["detail"]
    assert metrics.get("commands.accepted", command="rebaseline") == 1
    assert scorer.phase(SOURCE) is None
    # On disk before the acknowledgement: a restart now commissions m01 anew, not with the old detector.
    restored = _scorer(tmp_path / "baselines.json")
    assert restored.restore() == 0 and restored.phase(SOURCE) is None
    worker.process(_readings(_steps(10, seed=3), 100))
    assert scorer.phase(SOURCE) == "commissioning"
    # Acknowledged to the broker only after that.
    assert [e for e in broker.journal.events if e[0] == "ack"] == [("ack", 0), ("ack", 1), ("ack", 2)]
