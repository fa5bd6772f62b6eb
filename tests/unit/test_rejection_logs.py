"""A flood of garbage input keeps the log readable: the first rejections are logged one by one, the rest in
summary lines, and every rejection is in exactly one of them (the counters count each)."""

from __future__ import annotations

import logging
import queue
import re

import pytest

from agent.bootstrap import build_ingest
from agent.inference.router import ModelRouter
from agent.metrics import Metrics
from agent.runtime.ingest import REJECTED_LOG_LINES
from tests.unit.test_outbound import WAIT_S, Clock, FakeConnection, _outbound
from tests.unit.test_pipeline import FakeBroker, FakeModel, FakeSpool, Journal, _config, _message, _stages

GARBAGE = 300


def test_a_flood_of_rejections_logs_a_few_lines_then_summaries_that_account_for_every_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    journal, metrics, clock = Journal(), Metrics(), Clock()
    connection = FakeConnection(connected=False)
    outbound = _outbound(connection, metrics, clock)  # the default dead-letter rate: a burst of 100
    config = _config()
    worker = build_ingest(
        config,
        _stages(config, ModelRouter([(("process",), FakeModel())]), metrics),
        metrics,
        messages=queue.Queue(),
        windows=queue.Queue(),
        spool=FakeSpool(journal),
        broker=FakeBroker(journal),
        dead_letters=outbound,
    )
    caplog.set_level(logging.WARNING, logger="agent")
    worker.process([_message(i, b"{garbage") for i in range(1, GARBAGE + 1)])
    worker.finish()  # at stop the log's pending summary is written
    outbound.start()
    connection.connected.set()
    outbound.stop(WAIT_S)  # and the dead-letter summary goes out (and is logged)

    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    single = [w for w in warnings if w.startswith("rejected message on ")]
    summaries = [w for w in warnings if not w.startswith("rejected message on ")]
    assert len(single) == REJECTED_LOG_LINES
    assert len(summaries) == 2, summaries
    not_logged = re.search(
        r"rejected message\(s\) not logged one by one in the last \d+ s: (\d+) \(json (\d+)\)", warnings[-2]
    )
    beyond_rate = re.search(r"(\d+) rejected message\(s\) beyond the dead-letter rate .*: json (\d+)$", warnings[-1])
    assert not_logged is not None and beyond_rate is not None, summaries
    assert len(single) + int(not_logged.group(1)) + int(beyond_rate.group(1)) == GARBAGE
    assert metrics.get("decode.errors", reason="json") == GARBAGE
    assert metrics.get("mqtt.deadletters") + metrics.get("mqtt.deadletters_summarised", reason="json") == GARBAGE
