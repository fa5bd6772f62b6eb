"""Arrival records of messages without a device timestamp (``agent.spool.arrivals``): stored with the
readings in one transaction, found again for a redelivery (DUP), pruned by count and age; and the ingest
worker decoding a redelivery with the first arrival time."""

from __future__ import annotations

import queue
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.bootstrap import Models, build_ingest, build_stages
from agent.config import parse_config
from agent.decode.encode import encode_fields
from agent.inference.router import ModelRouter
from agent.metrics import Metrics
from agent.records import Message, Reading, Source
from agent.runtime.ingest import IngestWorker
from agent.spool import arrivals
from agent.spool.codec import Entry, Kind, encode_readings
from agent.spool.sqlite import Spool
from agent.storage.entries import entry_lines

T0 = time.time_ns() // 10**9 * 10**9  # records older than a day are pruned when the spool compacts
TOPIC = "factory/s1/l1/m01/process"


def _message(mid: int, payload: bytes, received_ns: int, dup: bool = False, topic: str = TOPIC) -> Message:
    return Message(topic=topic, payload=payload, qos=1, mid=mid, received_ns=received_ns, dup=dup)


def _arrival_rows(spool: Spool) -> int:
    with sqlite3.connect(spool.path) as conn:
        return int(conn.execute("SELECT count(*) FROM arrival").fetchone()[0])


# -- the store ---------------------------------------------------------------------------------------


def test_the_key_tells_apart_topic_packet_id_and_payload_but_not_the_connection_or_the_arrival() -> None:
    base = _message(7, b'{"value":1}', T0)
    key = arrivals.arrival_key(base)
    assert len(key) == arrivals.KEY_BYTES
    # A redelivery: later, on another connection (Message.mid's high bits), with DUP: the same key.
    assert arrivals.arrival_key(_message(3 << 16 | 7, b'{"value":1}', T0 + 10**9, dup=True)) == key
    assert arrivals.arrival_key(_message(8, b'{"value":1}', T0)) != key
    assert arrivals.arrival_key(_message(7, b'{"value":2}', T0)) != key
    assert arrivals.arrival_key(_message(7, b'{"value":1}', T0, topic=TOPIC + "x")) != key


def test_a_recorded_arrival_is_found_and_is_not_a_row_any_sink_reads(spool: Spool) -> None:
    key = arrivals.arrival_key(_message(1, b"1.5", T0))
    reading = Reading(Source.of(machine="m01", sensor="process"), T0, {"value": 1.5})
    ids = spool.append([encode_readings([reading]), arrivals.encode_arrival(key, T0)])
    assert ids[1] is None  # not an entry
    assert spool.arrival_ns(key) == T0
    assert spool.arrival_ns(bytes(16)) is None
    rows, points, _ = spool.size()
    assert (rows, points) == (1, 1)
    cursor = spool.cursor("local")
    try:
        assert [r.kind for r in cursor.read(100)] == [Kind.READINGS]
    finally:
        cursor.close()


def test_an_arrival_is_recorded_only_if_its_transaction_commits(spool: Spool) -> None:
    key = arrivals.arrival_key(_message(1, b"1.5", T0))
    with sqlite3.connect(spool.path) as conn:  # a write of the message's entry fails after the arrival's
        conn.execute(
            "CREATE TRIGGER fail BEFORE INSERT ON entry WHEN NEW.body = x'dead' BEGIN SELECT RAISE(ABORT, 'full'); END"
        )
    with pytest.raises(sqlite3.IntegrityError, match="full"):
        spool.append([arrivals.encode_arrival(key, T0), Entry(Kind.LINES, b"\xde\xad", 1)])
    assert spool.arrival_ns(key) is None


_KILLED_AFTER_COMMIT = """
import os, signal, sys, time
from agent.spool import arrivals
from agent.spool.codec import encode_lines
from agent.spool.sqlite import Spool
spool = Spool(sys.argv[1], max_bytes=10**9, max_points=10**9)
spool.append([encode_lines(["m v=1 1"]), arrivals.encode_arrival(bytes(range(16)), int(sys.argv[2]))])
os.kill(os.getpid(), signal.SIGKILL)  # right after the commit, as the agent killed before its PUBACK
"""


def test_an_arrival_committed_with_its_readings_survives_a_kill_of_the_process(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_AFTER_COMMIT, str(path), str(T0)], capture_output=True, check=False
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    spool = Spool(path, max_bytes=10**9, max_points=10**9)
    try:
        assert spool.size()[0] == 1
        assert spool.arrival_ns(bytes(range(16))) == T0
    finally:
        spool.close()


def test_prune_keeps_the_newest_max_rows_and_drops_what_is_older_than_max_age(tmp_path: Path) -> None:
    metrics = Metrics()
    spool = Spool(tmp_path / "s.db", 10**9, 10**9, metrics=metrics)
    try:
        keys = [bytes([i]) * 16 for i in range(8)]
        # Arrival times: three older than an hour, then five recent ones.
        times = [T0 - 3600 * 10**9] * 3 + [T0] * 5
        spool.append([arrivals.encode_arrival(k, t) for k, t in zip(keys, times, strict=True)])
        retention = arrivals.ArrivalRetention(60, 5, metrics)
        with sqlite3.connect(spool.path) as conn:
            assert retention.prune(conn, now_ns=T0, force=True) == 3
            assert retention.prune(conn, now_ns=T0, force=True) == 0
            assert retention.prune(conn, now_ns=T0 + 61 * 10**9, force=True) == 5
        assert metrics.get("spool.arrivals_pruned") == 8
    finally:
        spool.close()


def test_the_count_rule_leaves_exactly_max_rows(tmp_path: Path) -> None:
    metrics = Metrics()
    spool = Spool(tmp_path / "s.db", 10**9, 10**9, metrics=metrics)
    try:
        spool.append([arrivals.encode_arrival(i.to_bytes(16, "big"), T0) for i in range(20)])
        with sqlite3.connect(spool.path) as conn:
            assert arrivals.ArrivalRetention(3600, 7, metrics).prune(conn, now_ns=T0, force=True) == 13
        assert _arrival_rows(spool) == 7
        assert spool.arrival_ns((19).to_bytes(16, "big")) == T0  # the newest stay
        assert spool.arrival_ns((12).to_bytes(16, "big")) is None
    finally:
        spool.close()


def test_the_spools_compaction_prunes_the_arrivals(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", 10**9, 10**9, arrivals_max_rows=2)
    try:
        spool.append([arrivals.encode_arrival(i.to_bytes(16, "big"), T0) for i in range(5)])
        spool.compact()
        assert _arrival_rows(spool) == 2
    finally:
        spool.close()


@pytest.mark.parametrize(("age", "rows"), [(0, 10), (60, 0)])
def test_the_retention_refuses_empty_limits(age: float, rows: int) -> None:
    with pytest.raises(ValueError, match="max_age_s > 0 and max_rows >= 1"):
        arrivals.ArrivalRetention(age, rows, Metrics())


# -- the ingest worker ---------------------------------------------------------------------------------


class _Broker:
    def __init__(self) -> None:
        self.acked: list[int] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        raise AssertionError(f"nothing should be dead-lettered: {payload!r}")

    def ack(self, mid: int, qos: int) -> None:
        self.acked.append(mid)

    def ack_batch(self, acks: list[tuple[int, int]]) -> None:
        self.acked.extend(mid for mid, _ in acks)


def _worker(spool: Spool, metrics: Metrics) -> IngestWorker:
    config = parse_config({"agent": {"id": "edge-01"}, "queues": {"put_timeout_s": 0.01}})
    stages = build_stages(config, metrics, Models(ModelRouter([]), classifier=None, registry=None))
    return build_ingest(
        config,
        stages,
        metrics,
        messages=queue.Queue(),
        windows=queue.Queue(),
        spool=spool,
        broker=_Broker(),
        arrivals=spool,
    )


def _stored_times(spool: Spool) -> list[int]:
    """The time of each reading point in the spool, in order."""
    cursor = spool.cursor("local")
    try:
        rows = cursor.read(1000)
        lines = [line for r in rows for line in entry_lines(r.kind, r.body, lambda ids: [])]
    finally:
        cursor.close()
    return [int(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("reading")]


def test_a_redelivered_message_without_ts_is_stored_with_its_first_arrival_time(spool: Spool, metrics: Metrics) -> None:
    worker = _worker(spool, metrics)
    payload = encode_fields({"temperature": 20.5}, seq=1)
    worker.process([_message(5, payload, T0)])
    # The agent was killed before the PUBACK; the broker redelivers on a new connection, DUP set.
    worker.process([_message(2 << 16 | 5, payload, T0 + 7 * 10**9, dup=True)])
    assert _stored_times(spool) == [T0, T0]  # the same point twice: InfluxDB keeps one
    assert metrics.get("ingest.redelivered") == 1
    assert metrics.get("ingest.arrival_restored") == 1
    assert _arrival_rows(spool) == 1


def test_without_dup_an_identical_payload_is_a_new_reading(spool: Spool, metrics: Metrics) -> None:
    worker = _worker(spool, metrics)
    payload = encode_fields({"temperature": 20.5})
    worker.process([_message(5, payload, T0)])
    worker.process([_message(5, payload, T0 + 10**9)])  # the packet id reused after the ack: legitimate
    assert _stored_times(spool) == [T0, T0 + 10**9]
    assert metrics.get("ingest.arrival_restored") == 0


def test_a_redelivery_never_stored_before_gets_a_fresh_time_and_is_recorded(spool: Spool, metrics: Metrics) -> None:
    worker = _worker(spool, metrics)
    payload = encode_fields({"temperature": 20.5})
    worker.process([_message(5, payload, T0)])
    # Killed before its commit: an identical payload on another packet id is not this message's record.
    worker.process([_message(1 << 16 | 6, payload, T0 + 10**9, dup=True)])
    worker.process([_message(2 << 16 | 6, payload, T0 + 2 * 10**9, dup=True)])
    assert _stored_times(spool) == [T0, T0 + 10**9, T0 + 10**9]
    assert metrics.get("ingest.redelivered") == 2
    assert metrics.get("ingest.arrival_restored") == 1


def test_messages_with_a_device_timestamp_leave_no_arrival_record(spool: Spool, metrics: Metrics) -> None:
    worker = _worker(spool, metrics)
    payload = encode_fields({"temperature": 20.5}, ts_ns=T0 - 10**9)
    worker.process([_message(5, payload, T0), _message(5, payload, T0 + 10**9, dup=True)])
    assert _stored_times(spool) == [T0 - 10**9, T0 - 10**9]
    assert _arrival_rows(spool) == 0
    assert metrics.get("ingest.arrival_restored") == 0


def test_a_failing_lookup_decodes_with_a_fresh_time(spool: Spool, metrics: Metrics) -> None:
    worker = _worker(spool, metrics)

    class Broken:
        def arrival_ns(self, key: bytes) -> int | None:
            raise sqlite3.OperationalError("disk I/O error")

    worker._arrivals = Broken()
    worker.process([_message(5, encode_fields({"temperature": 1.0}), T0, dup=True)])
    assert _stored_times(spool) == [T0]


def test_the_encoded_body_round_trips() -> None:
    entry = arrivals.encode_arrival(bytes(range(16)), -5)
    assert entry.kind == Kind.ARRIVAL and entry.points == 0
    with pytest.raises(ValueError, match="16 bytes"):
        arrivals.encode_arrival(b"short", 1)
