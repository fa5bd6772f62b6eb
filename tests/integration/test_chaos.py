"""Chaos tests: nothing the agent accepted is lost when the broker, the database or the agent itself dies.

Real processes only: Mosquitto, InfluxDB 1.6.7, the agent (``python -m agent run``) and the gateway
simulator (``python -m agent simulate``, QoS 1, per-topic ``seq``), each scenario on its own broker and
database. Raw vibration mode is ``all``, so every one of the ~490,000 samples of a run is a point. After
the disruption, every message the simulator published (and the broker acknowledged) is checked in
InfluxDB message by message: each process reading once with its fields, each vibration block with all
its 2,048 samples and their sum (``tests/chaos_support.py``). No timing threshold is asserted; recovery
times are measured and printed (``-s``), and ``scripts/chaos_report.py`` prints them as a table.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import chaos_support as chaos

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.timeout(300)]


def _assert_nothing_lost(result: chaos.ScenarioResult, broker_may_lose: bool = False) -> None:
    """Every message the broker acknowledged is stored once with its content (``broker_may_lose``: except
    those the broker itself lost after acknowledging them, which no subscriber got from it)."""
    print(result.render())
    stats, acc, c = result.stats, result.accounting, result.counters
    assert stats["exit_code"] == 0 and stats["unacked"] == 0 and stats["failed"] == 0, (
        "the simulator did not get every message acknowledged"
    )
    assert acc.published == stats["messages"] > 0
    assert acc.lost - acc.lost_by_broker == 0, f"messages the recorder received are not in InfluxDB:\n{acc.render()}"
    if not broker_may_lose:
        assert acc.lost_by_broker == 0, f"the broker lost messages it acknowledged (see docs/chaos.md):\n{acc.render()}"
    assert acc.duplicates == 0, acc.render()
    assert acc.checksum_mismatches == 0, acc.render()
    assert acc.points_expected == stats["samples"] + stats["readings"], acc.render()
    lost_points = sum(
        (chaos.BLOCK_SAMPLES if row.sensor == "vibration" else 1) * len(row.messages_lost) for row in acc.rows
    )
    assert acc.points_stored == acc.points_expected - lost_points, acc.render()
    assert result.agent_exit_code == 0
    # The heartbeat explains the numbers: nothing rejected, dropped or dead-lettered, and every message
    # the agent received was either acknowledged or recognised as belonging to a dead connection.
    assert c, "no final heartbeat received"
    assert chaos.counter(c, "decode.errors") == 0
    assert chaos.counter(c, "spool.dropped") == 0
    assert chaos.counter(c, "spool.dead_lettered") == 0
    assert chaos.counter(c, "storage.write_failures{kind=rejected}") == 0
    received = chaos.counter(c, "ingest.messages")
    assert received == chaos.counter(c, "mqtt.acks") + chaos.counter(c, "mqtt.acks_stale") + chaos.counter(
        c, "mqtt.ack_errors"
    )


def test_broker_killed_and_restarted_with_persistence_loses_nothing(tmp_path: Path) -> None:
    """The broker dies holding a backlog for the (frozen) agent; its persistence file brings it back.

    The simulator is paused for the last second before the kill so that Mosquitto's autosave, which runs
    after its PUBACK, has caught up: a loss is then the agent's. Without that pause, a message arriving in
    the last milliseconds can be lost by the broker itself (the next test tells those apart; see
    docs/chaos.md).
    """
    result = chaos.run("broker_kill", tmp_path)
    _assert_nothing_lost(result)
    c = result.counters
    assert chaos.counter(c, "mqtt.disconnects") >= 1 and chaos.counter(c, "mqtt.connects") >= 2
    # The broker restored the agent's session from its persistence file.
    assert result.sessions_present[0] is False and all(result.sessions_present[1:]), result.sessions_present
    # One agent process saw the whole run: everything once, plus what the broker redelivered.
    assert chaos.counter(c, "ingest.messages") >= result.stats["messages"]
    assert chaos.counter(c, "ingest.readings") >= result.stats["readings"]
    assert chaos.counter(c, "ingest.samples") >= result.stats["samples"]


def test_broker_killed_while_publishing_loses_nothing_the_broker_kept(tmp_path: Path) -> None:
    """The broker dies while the simulator publishes and holds a backlog for the (frozen) agent.

    Mosquitto acknowledges a PUBLISH before its autosave has written it, so the message of the last
    milliseconds may die with it: acknowledged to the simulator, never delivered to anyone after the
    restart. The witness (a persistent session taken offline with the agent's freeze and back after the
    restart) receives exactly what the broker kept for its sessions: what it has must be stored, what it
    lacks is the broker's loss (printed; docs/chaos.md). The control ``broker_kill_streaming_no_session``
    (``scripts/chaos_report.py``) shows the verdict blaming the agent when it loses what the broker kept.
    """
    result = chaos.run("broker_kill_streaming", tmp_path)
    _assert_nothing_lost(result, broker_may_lose=True)
    acc = result.accounting
    assert result.sessions_present[0] is False and all(result.sessions_present[1:]), result.sessions_present
    # The broker's persistence restored the backlog: only its last autosave window can be missing.
    assert acc.lost_by_broker < result.fault["held"], acc.render()


def test_influxdb_stopped_under_load_gets_every_reading_once_when_back(tmp_path: Path) -> None:
    result = chaos.run("influxdb_stop", tmp_path)
    _assert_database_fault_absorbed(result)


def test_influxdb_killed_under_load_gets_every_reading_once_when_back(tmp_path: Path) -> None:
    """kill -9: writes in flight are cut off (applied or not); InfluxDB's WAL keeps what it acknowledged."""
    result = chaos.run("influxdb_kill", tmp_path)
    _assert_database_fault_absorbed(result)


@pytest.mark.parametrize("end", ["release", "drop"])
def test_influxdb_stalled_under_load_gets_every_reading_once_and_the_writer_recovers(tmp_path: Path, end: str) -> None:
    """InfluxDB applies the writes of the stall but their answers are held, then released late or dropped.

    The writer must time out (``storage.timeout_s``), write the same batches again (stored once: same
    series and timestamps) and carry on by itself, while the agent keeps acknowledging into its spool.
    The control ``influxdb_stall_without_timeout`` (``scripts/chaos_report.py``) shows the verdict failing
    for a writer that waits for ever.
    """
    result = chaos.run(f"influxdb_stall_{end}", tmp_path)
    _assert_database_fault_absorbed(result)
    assert result.fault["requests_in_stall"] >= 1 and result.fault["responses_held"] >= 1, result.fault
    before, during = result.before, result.during
    assert chaos.counter(during, "mqtt.acks") > chaos.counter(before, "mqtt.acks"), "no acknowledgement in the stall"
    assert chaos.counter(during, "spool.depth") > chaos.counter(before, "spool.depth"), "the spool did not absorb it"


def _assert_database_fault_absorbed(result: chaos.ScenarioResult) -> None:
    """Nothing lost, the fault noticed, and broker and agent stayed up: each message received and
    acknowledged exactly once."""
    _assert_nothing_lost(result)
    c = result.counters
    assert chaos.counter(c, "storage.write_failures{kind=retryable}") >= 1, "the outage was not noticed"
    assert chaos.counter(c, "ingest.messages") == chaos.counter(c, "mqtt.acks") == result.stats["messages"]
    assert chaos.counter(c, "ingest.readings") == result.stats["readings"]
    assert chaos.counter(c, "ingest.samples") == result.stats["samples"]
    assert chaos.counter(c, "mqtt.disconnects") == 0


def test_agent_killed_mid_stream_resumes_its_session_and_spool(tmp_path: Path) -> None:
    result = chaos.run("agent_kill", tmp_path)
    _assert_nothing_lost(result)
    before, after = result.before, result.counters
    assert chaos.counter(before, "ingest.messages") > 0, "the agent was killed before it received anything"
    # The restarted process resumed the persistent session: the broker did not resend what the killed
    # process had acknowledged, and together the two processes received everything.
    assert 0 < chaos.counter(after, "ingest.messages") < result.stats["messages"]
    assert chaos.counter(after, "mqtt.connects") == 1
    assert result.sessions_present == [False, True], "the restarted agent did not find its session"


def test_influxdb_down_when_the_agent_starts_gets_every_reading_once_it_is_up(tmp_path: Path) -> None:
    result = chaos.run("influxdb_down_at_agent_start", tmp_path)
    _assert_nothing_lost(result)
