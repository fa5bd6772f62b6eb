"""``drain_gathered``: a consumer of windows lets a batch gather once instead of taking each window alone.

The sleep is replaced by one that records its duration and plays the producer: what ingest would have
queued meanwhile.
"""

from __future__ import annotations

import queue
import time
import types
from collections.abc import Callable

import pytest

from agent.runtime import worker
from agent.runtime.worker import drain_gathered


def _queues(q: queue.Queue[int], items: range) -> Callable[[], None]:
    """The producer's part: queue ``items``."""

    def put_all() -> None:
        for item in items:
            q.put(item)

    return put_all


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[[], None]], list[float]]:
    """Give ``agent.runtime.worker`` (only it) a ``time`` whose ``sleep`` runs ``meanwhile`` and records its
    durations; returns the list of durations."""

    def install(meanwhile: Callable[[], None]) -> list[float]:
        slept: list[float] = []

        def fake_sleep(seconds: float) -> None:
            slept.append(seconds)
            meanwhile()

        monkeypatch.setattr(worker, "time", types.SimpleNamespace(sleep=fake_sleep, monotonic=time.monotonic))
        return slept

    return install


def test_windows_queued_while_it_gathers_join_the_batch(sleeps: Callable[[Callable[[], None]], list[float]]) -> None:
    q: queue.Queue[int] = queue.Queue()
    q.put(0)
    slept = sleeps(_queues(q, range(1, 4)))
    assert drain_gathered(q, first_timeout_s=0, limit=10, gather_s=0.005) == [0, 1, 2, 3]
    assert slept == [0.005]  # once, however many came


def test_what_exceeds_the_batch_waits_for_the_next(sleeps: Callable[[Callable[[], None]], list[float]]) -> None:
    q: queue.Queue[int] = queue.Queue()
    q.put(0)
    sleeps(_queues(q, range(1, 8)))
    assert drain_gathered(q, first_timeout_s=0, limit=5, gather_s=0.005) == [0, 1, 2, 3, 4]
    assert [q.get_nowait() for _ in range(q.qsize())] == [5, 6, 7]


def test_a_full_batch_or_an_empty_queue_does_not_wait(sleeps: Callable[[Callable[[], None]], list[float]]) -> None:
    q: queue.Queue[int] = queue.Queue()
    for i in range(5):
        q.put(i)
    slept = sleeps(lambda: None)
    assert drain_gathered(q, first_timeout_s=0, limit=5, gather_s=0.005) == [0, 1, 2, 3, 4]
    assert drain_gathered(queue.Queue(), first_timeout_s=0, limit=5, gather_s=0.005) == []
    assert slept == []


def test_without_gathering_it_is_drain(sleeps: Callable[[Callable[[], None]], list[float]]) -> None:
    q: queue.Queue[int] = queue.Queue()
    q.put(1)
    slept = sleeps(_queues(q, range(2, 3)))
    assert drain_gathered(q, first_timeout_s=0, limit=5, gather_s=0) == [1]
    assert slept == []
