"""Spool + writer + sinks against real databases: InfluxDB 1.6.7 (v1 API) and VictoriaMetrics (v2 API).

Waits have generous deadlines (a slow CI box must not fail them); nothing here measures speed.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import schema
from agent.metrics import Metrics
from agent.records import Reading, SampleBlock, Source
from agent.spool.codec import encode_block, encode_readings
from agent.spool.sqlite import Spool
from agent.storage.base import PermanentWriteError, RetryableWriteError
from agent.storage.influx_v1 import InfluxV1Sink
from agent.storage.influx_v2 import InfluxV2Sink
from agent.storage.line_protocol import format_point
from agent.storage.process import WriterProcess, WriterSettings
from agent.storage.writer import SinkWriter
from pdm_tools.dev import services as devservices
from pdm_tools.dev.services import Service, victoria_metrics_series

pytestmark = pytest.mark.integration

WAIT_S = 60.0
T0 = 1_732_575_600_000_000_000
SRC = Source.of(site="s1", line="l1", machine="press 7", sensor="vibration")
PROC = Source.of(site="s1", line="l1", machine="press 7", sensor="process")


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def spool(tmp_path: Path, metrics: Metrics) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool.db", max_bytes=1 << 30, max_points=1_000_000, metrics=metrics)
    yield s
    s.close()


@pytest.fixture
def v1_sink(influxdb_v1: Service, influx_db_name: str) -> Iterator[InfluxV1Sink]:
    sink = InfluxV1Sink(influxdb_v1.url, influx_db_name, timeout_s=30.0)
    sink.create_database()
    yield sink
    sink.close()


def _writer(spool: Spool, sink: Any, metrics: Metrics, **kwargs: float) -> SinkWriter:
    options: dict[str, float] = {
        "batch_size": 500,
        "flush_interval_s": 0.05,
        "backoff_min_s": 0.01,
        "backoff_max_s": 0.2,
    }
    options.update(kwargs)
    return SinkWriter(spool.cursor("local"), sink, metrics, **options)  # type: ignore[arg-type]


def _count(sink: InfluxV1Sink, measurement: str, field: str) -> int:
    series = sink.query(f'SELECT count("{field}") FROM "{measurement}"')
    return int(series[0]["values"][0][1]) if series else 0


def _block(n: int, start_ns: int = T0) -> SampleBlock:
    samples = np.random.default_rng(0).normal(0.0, 0.3, n).astype(np.float32)
    return SampleBlock(source=SRC, start_ns=start_ns, rate_hz=10240.0, samples=samples, channel="x")


def test_spooled_readings_and_vibration_land_in_influxdb_v1(
    spool: Spool, v1_sink: InfluxV1Sink, metrics: Metrics
) -> None:
    readings = [
        Reading(source=PROC, time_ns=T0 + i * 10**9, fields={"temperature": 60.0 + i, "current": 12.5}, seq=i)
        for i in range(50)
    ]
    spool.append([encode_readings([r]) for r in readings])
    spool.append([encode_block(_block(2048), store_raw=True)])
    writer = _writer(spool, v1_sink, metrics)
    writer.start()
    try:
        assert writer.flush(WAIT_S)
    finally:
        writer.stop()
    assert _count(v1_sink, schema.READING, "temperature") == 50
    assert _count(v1_sink, schema.READING, "seq") == 50
    assert _count(v1_sink, schema.VIBRATION, schema.VIBRATION_FIELD) == 2048
    assert metrics.get("storage.points_written") == 50 + 2048
    (series,) = v1_sink.query(
        f'SELECT last("temperature"), last("seq") FROM "{schema.READING}" GROUP BY "machine", "sensor"'
    )
    assert series["tags"] == {"machine": "press 7", "sensor": "process"}
    assert series["values"][0][1:] == [109.0, 49]


def test_escaped_names_and_values_round_trip_through_influxdb_v1(v1_sink: InfluxV1Sink) -> None:
    tags = {"tag key,=": "va lue,=x", "plain": "ok"}
    fields: dict[str, float | int | bool | str] = {
        "s": 'quote " and backslash \\ here',
        "f,=ld x": 1e-07,
        "i": -42,
        "b": True,
    }
    v1_sink.write([format_point("meas ure,ment", tags, fields, T0)])
    (series,) = v1_sink.query('SELECT * FROM "meas ure,ment"')
    row = dict(zip(series["columns"], series["values"][0], strict=True))
    assert row == {"time": T0, "tag key,=": "va lue,=x", "plain": "ok", **fields}


def test_a_field_type_conflict_is_dead_lettered_while_the_good_lines_land(
    spool: Spool, v1_sink: InfluxV1Sink, metrics: Metrics
) -> None:
    v1_sink.write([f"conflict,machine=m1 value=1.5 {T0}"])  # "value" is a float from now on
    good = [f"conflict,machine=m1 value={i}.25 {T0 + i}" for i in range(1, 40)]
    bad = f"conflict,machine=m1 value=7i {T0 + 1000}"  # an integer: 400 partial write, type conflict
    unparsable = "conflict,machine=m1"  # no fields: 400 unable to parse
    lines = [*good[:10], bad, *good[10:30], unparsable, *good[30:]]
    spool.append_lines(lines)
    writer = _writer(spool, v1_sink, metrics, batch_size=len(lines))
    writer.start()
    try:
        assert writer.flush(WAIT_S)
    finally:
        writer.stop()
    dead = dict(spool.dead_letters())
    assert set(dead) == {bad, unparsable}
    assert "field type conflict" in dead[bad] and "HTTP 400" in dead[bad]
    assert "unable to parse" in dead[unparsable]
    assert _count(v1_sink, "conflict", "value") == 1 + len(good)
    assert metrics.get("storage.write_failures", kind="rejected") >= 1


def test_a_missing_database_keeps_the_data_spooled_until_it_exists(
    spool: Spool, influxdb_v1: Service, influx_db_name: str, metrics: Metrics
) -> None:
    sink = InfluxV1Sink(influxdb_v1.url, influx_db_name, timeout_s=30.0)  # database not created
    with pytest.raises(PermanentWriteError) as info:
        sink.write([f"m v=1 {T0}"])
    assert info.value.status == 404 and not info.value.rejects_data
    spool.append_lines([f"m v={i} {T0 + i}" for i in range(10)])
    writer = _writer(spool, sink, metrics)
    writer.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while metrics.get("storage.write_failures", kind="config") < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert metrics.get("storage.write_failures", kind="config") >= 1
        assert spool.depth() == 10 and spool.dead_letter_depth() == 0
        sink.create_database()
        assert writer.flush(WAIT_S)
    finally:
        writer.stop()
        sink.close()
    assert _count(sink, "m", "v") == 10


def test_nothing_is_lost_while_influxdb_is_stopped_and_restarted(
    spool: Spool, tmp_path: Path, metrics: Metrics
) -> None:
    with devservices.start_influxdb_v1(tmp_path / "influxdb") as influx:
        sink = InfluxV1Sink(influx.url, "chaos", timeout_s=10.0)
        sink.create_database()
        writer = _writer(spool, sink, metrics)
        writer.start()
        try:
            spool.append_lines([f"m,phase=before v={i} {T0 + i}" for i in range(100)])
            assert writer.flush(WAIT_S)
            influx.stop()
            spool.append_lines([f"m,phase=during v={i} {T0 + i}" for i in range(100)])
            deadline = time.monotonic() + WAIT_S
            while metrics.get("storage.write_failures", kind="retryable") < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert metrics.get("storage.write_failures", kind="retryable") >= 2
            assert spool.depth() == 100
            influx.restart()  # same port, same data directory
            assert writer.flush(WAIT_S)
        finally:
            writer.stop()
        series = sink.query('SELECT count(v) FROM m GROUP BY "phase"')
        counts = {s["tags"]["phase"]: s["values"][0][1] for s in series}
        assert counts == {"before": 100, "during": 100}
        sink.close()


def test_the_writer_process_delivers_everything_once_through_a_kill_of_it(
    spool: Spool, influxdb_v1: Service, influx_db_name: str, metrics: Metrics
) -> None:
    """The shipped mode: the writer in its own process. Killed with SIGKILL mid-stream, it is started again
    and continues from its durable cursor: every point lands, none twice (same series and timestamps)."""
    InfluxV1Sink(influxdb_v1.url, influx_db_name).create_database()
    settings = WriterSettings(batch_size=500, flush_interval_s=0.05, backoff_min_s=0.01, backoff_max_s=0.2)
    factory = functools.partial(InfluxV1Sink, influxdb_v1.url, influx_db_name, timeout_s=30.0)
    writer = WriterProcess(spool, "local", factory, settings, metrics)
    writer.start()
    try:
        spool.append([encode_block(_block(2048, T0 + k * 10**9), store_raw=True) for k in range(10)])
        assert writer.flush(WAIT_S)
        first = writer._process
        assert first is not None and first.pid is not None
        spool.append([encode_block(_block(2048, T0 + k * 10**9), store_raw=True) for k in range(10, 40)])
        os.kill(first.pid, signal.SIGKILL)
        deadline = time.monotonic() + WAIT_S
        while writer.restarts < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert writer.restarts == 1 and metrics.get("storage.writer_restarts") == 1
        assert writer.flush(WAIT_S)
    finally:
        writer.stop()
    sink = InfluxV1Sink(influxdb_v1.url, influx_db_name)
    assert _count(sink, schema.VIBRATION, schema.VIBRATION_FIELD) == 40 * 2048
    sink.close()
    # Relayed from the children; what the killed one had counted but not yet relayed (< 0.2 s) is lost.
    assert metrics.get("storage.points_written") > 0
    assert spool.caught_up("local")
    spool.compact()
    assert spool.size() == (0, 0, 0)  # every row confirmed by the only sink: removed


# -- the v2 write API, against VictoriaMetrics ---------------------------------------------------


def test_v2_sink_writes_through_the_spool_to_victoria_metrics(
    spool: Spool, victoria_metrics: Service, metrics: Metrics, request: pytest.FixtureRequest
) -> None:
    machine = f"m-{request.node.name[-20:]}-{time.time_ns()}"
    source = Source.of(site="s1", line="l1", machine=machine, sensor="process")
    now = time.time_ns()
    for i in range(20):
        spool.append(
            [
                encode_readings(
                    [Reading(source=source, time_ns=now + i * 10**7, fields={"temperature": 60.0 + i}, seq=i)]
                )
            ]
        )
    sink = InfluxV2Sink(victoria_metrics.url, org="plant", bucket="pdm", token="not-checked", timeout_s=30.0)
    writer = _writer(spool, sink, metrics)
    writer.start()
    try:
        assert writer.flush(WAIT_S)
    finally:
        writer.stop()
        sink.close()
    # VictoriaMetrics names influx series {measurement}_{field}; tags become labels.
    series = victoria_metrics_series(victoria_metrics, f'{{__name__=~"reading_.*",machine="{machine}"}}', 40)
    by_name = {s["metric"]["__name__"]: s for s in series}
    assert set(by_name) == {"reading_temperature", "reading_seq"}
    temperature = by_name["reading_temperature"]
    assert temperature["metric"] == {
        "__name__": "reading_temperature",
        "site": "s1",
        "line": "l1",
        "machine": machine,
        "sensor": "process",
    }
    assert temperature["values"] == [60.0 + i for i in range(20)]
    assert temperature["timestamps"] == [(now + i * 10**7) // 10**6 for i in range(20)]  # stored in ms
    assert by_name["reading_seq"]["values"] == list(range(20))


def test_v2_write_to_a_stopped_service_is_retryable_and_works_after_restart(tmp_path: Path) -> None:
    with devservices.start_victoria_metrics(tmp_path / "vm") as vm:
        sink = InfluxV2Sink(vm.url, org="plant", bucket="pdm", token="tok", timeout_s=10.0)
        vm.stop()
        with pytest.raises(RetryableWriteError):
            sink.write([f"outage v=1 {time.time_ns()}"])
        vm.restart()
        sink.write([f"outage v=2 {time.time_ns()}"])
        sink.close()
        series = victoria_metrics_series(vm, '{__name__="outage_v"}', 1)
        assert [s["values"] for s in series] == [[2]]
