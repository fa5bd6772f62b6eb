"""The received-message queue is bounded in messages and in payload bytes (``agent.runtime.worker.MessageQueue``)."""

from __future__ import annotations

import queue
import threading

import pytest

from agent.records import Message
from agent.runtime.worker import MessageQueue, drain


def _message(mid: int, size: int) -> Message:
    return Message(topic="factory/s/l/m1/vibration", payload=b"x" * size, qos=1, mid=mid, received_ns=0)


def test_the_byte_bound_stops_puts_before_the_count_bound() -> None:
    q = MessageQueue(maxsize=100, max_bytes=1000)
    for mid in range(4):
        q.put(_message(mid, 300), timeout=0)
    assert q.payload_bytes == 1200 and q.qsize() == 4
    with pytest.raises(queue.Full):
        q.put(_message(9, 1), timeout=0.01)
    with pytest.raises(queue.Full):
        q.put(_message(9, 1), block=False)
    assert [m.mid for m in drain(q, 0, 10)] == [0, 1, 2, 3]
    assert q.payload_bytes == 0


def test_the_count_bound_still_holds_for_small_messages() -> None:
    q = MessageQueue(maxsize=3, max_bytes=1 << 20)
    for mid in range(3):
        q.put(_message(mid, 1))
    assert q.full()
    with pytest.raises(queue.Full):
        q.put(_message(3, 1), block=False)


def test_a_message_larger_than_the_byte_bound_passes_an_empty_queue() -> None:
    q = MessageQueue(maxsize=10, max_bytes=100)
    q.put(_message(1, 5000), timeout=0)
    assert q.full() and q.get().mid == 1


def test_a_waiting_put_is_woken_by_a_get() -> None:
    q = MessageQueue(maxsize=10, max_bytes=100)
    q.put(_message(1, 100))
    done = threading.Event()

    def producer() -> None:
        q.put(_message(2, 100))  # waits: the byte bound is reached
        done.set()

    thread = threading.Thread(target=producer, daemon=True)
    thread.start()
    assert not done.wait(0.1)
    assert q.get().mid == 1
    assert done.wait(5)
    assert q.get().mid == 2
    thread.join(5)


def test_max_bytes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        MessageQueue(maxsize=10, max_bytes=0)
