"""The alert state is written by a saver thread: the scoring thread only snapshots it."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from agent.alerts.store import AlertStateStore
from agent.metrics import Metrics
from agent.runtime.alerting import StateSaver


class SlowStore:
    """Records what it saves; blocks each save until released, and fails while ``failures`` > 0."""

    def __init__(self, failures: int = 0) -> None:
        self.path = Path("state.json")
        self.saved: list[dict[str, Any]] = []
        self.gate = threading.Event()
        self.failures = failures

    def save(self, state: dict[str, Any]) -> None:
        self.gate.wait(10.0)
        if self.failures:
            self.failures -= 1
            raise OSError(28, "No space left on device")
        self.saved.append(state)


def test_submitting_does_not_wait_for_the_disk_and_only_the_latest_state_is_written_after_a_slow_save() -> None:
    store = SlowStore()
    saver = StateSaver(store, Metrics())  # type: ignore[arg-type]
    saver.submit({"n": 1})
    for n in (2, 3, 4):  # while the first save is stuck on the disk: returns at once
        saver.submit({"n": n})
    assert not saver.flush(0.05)
    store.gate.set()
    assert saver.flush(10.0)
    assert store.saved[-1] == {"n": 4}
    # 2 and 3 were replaced by 4 before they were written (1 too, if the thread had not taken it yet).
    assert store.saved in ([{"n": 1}, {"n": 4}], [{"n": 4}])
    saver.close(10.0)


def test_a_failed_save_is_counted_and_retried_until_it_succeeds() -> None:
    store, metrics = SlowStore(failures=2), Metrics()
    store.gate.set()
    saver = StateSaver(store, metrics)  # type: ignore[arg-type]
    saver.submit({"n": 1})
    assert saver.flush(20.0)
    assert store.saved == [{"n": 1}]
    assert metrics.get("alerts.state_errors", reason="save") == 2
    saver.close(10.0)


def test_close_writes_the_last_state_to_the_real_file(tmp_path: Path) -> None:
    store = AlertStateStore(tmp_path / "alert_state.json")
    saver = StateSaver(store, Metrics())
    saver.submit({"v": 1, "events": []})
    saver.close(10.0)
    assert store.load() == {"v": 1, "events": []}
