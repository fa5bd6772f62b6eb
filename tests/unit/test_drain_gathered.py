"""``drain_gathered``: a consumer of windows lets a batch gather once instead of taking each window alone."""

from __future__ import annotations

import queue
import threading

from agent.runtime.worker import drain_gathered


def test_windows_queued_while_it_gathers_join_the_batch() -> None:
    q: queue.Queue[int] = queue.Queue()
    q.put(0)
    producer = threading.Timer(0.01, lambda: [q.put(i) for i in range(1, 4)])
    producer.start()
    try:
        batch = drain_gathered(q, first_timeout_s=1.0, limit=10, gather_s=0.5)
    finally:
        producer.join()
    assert batch == [0, 1, 2, 3]


def test_a_full_batch_or_an_empty_queue_does_not_wait() -> None:
    q: queue.Queue[int] = queue.Queue()
    for i in range(5):
        q.put(i)
    # A whole batch is ready: taken without the gathering sleep (which would let 5..7 in).
    late = threading.Timer(0.05, lambda: [q.put(i) for i in range(5, 8)])
    late.start()
    try:
        assert drain_gathered(q, first_timeout_s=0, limit=5, gather_s=0.5) == [0, 1, 2, 3, 4]
        assert drain_gathered(queue.Queue(), first_timeout_s=0, limit=5, gather_s=0.5) == []
    finally:
        late.join()


def test_without_gathering_it_is_drain() -> None:
    q: queue.Queue[int] = queue.Queue()
    q.put(1)
    late = threading.Timer(0.05, lambda: q.put(2))
    late.start()
    try:
        assert drain_gathered(q, first_timeout_s=0, limit=5, gather_s=0) == [1]
    finally:
        late.join()
