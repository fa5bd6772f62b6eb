"""``storage.upstreams``: the config of further sinks, and what the composition root builds from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.bootstrap import LOCAL_SINK, build_spool, build_upstream_writers, build_writer
from agent.config import ConfigError, parse_config
from agent.health.server import run_checks
from agent.metrics import Metrics
from agent.storage.process import WriterProcess
from agent.storage.sinks import SinkWriters, sinks_check
from agent.storage.writer import SinkWriter

UPSTREAM = {"name": "cloud", "url": "http://127.0.0.1:8428", "writer_process": False}


def test_a_config_without_upstreams_is_the_local_sink_alone() -> None:
    config = parse_config({}, environ={})
    assert config.storage.upstreams == []
    assert config.storage.type == "influx_v1"  # the storage section itself stays the local sink


def test_an_upstream_has_v2_defaults_a_backlog_budget_and_a_selection() -> None:
    (up,) = parse_config({"storage": {"upstreams": [UPSTREAM]}}, environ={}).storage.upstreams
    assert (up.type, up.max_backlog_bytes, up.max_backlog_age_s) == ("influx_v2", 3 * 2**29, 7 * 86_400.0)
    assert up.select.readings.mode == "downsample" and up.select.raw_vibration == "around_alerts"
    assert up.rate_limit_points_s == 20_000.0 and up.ready_max_lag_s is None


@pytest.mark.parametrize(
    ("upstreams", "path", "reason"),
    [
        ([{**UPSTREAM, "name": "local"}], "storage.upstreams[0].name", "the storage section's own sink"),
        ([UPSTREAM, UPSTREAM], "storage.upstreams[1].name", "used twice"),
        ([{**UPSTREAM, "name": "Cloud 1"}], "storage.upstreams[0].name", "match"),
        ([{**UPSTREAM, "url": "ftp://x"}], "storage.upstreams[0].url", "http://"),
        ([{**UPSTREAM, "select": {"kinds": ["readings"]}}], "storage.upstreams[0].select.kinds[0]", "one of"),
        ([{**UPSTREAM, "max_backlog_bytes": 0}], "storage.upstreams[0].max_backlog_bytes", "> 0"),
        ([{"name": "cloud"}], "storage.upstreams[0].url", "required"),
    ],
)
def test_bad_upstreams_are_refused_naming_the_key(upstreams: list, path: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"storage": {"upstreams": upstreams}}, environ={})
    assert any(p == path and reason in r for p, r in info.value.errors), info.value.errors


def test_each_upstream_gets_a_cursor_and_a_writer_with_its_selection(tmp_path: Path) -> None:
    config = parse_config(
        {
            "spool": {"path": str(tmp_path / "spool.db")},
            "storage": {"upstreams": [{**UPSTREAM, "select": {"readings": {"mode": "none"}}}]},
        },
        environ={},
    )
    metrics = Metrics()
    spool = build_spool(config, metrics)
    try:
        assert spool.sinks == (LOCAL_SINK, "cloud")
        writers = build_upstream_writers(config, spool, metrics)
        writer = writers["cloud"]
        assert isinstance(writer, SinkWriter) and writer.selector is not None
        assert writer.selector.selection.readings_interval_s is None
        assert writer.budget is not None and writer.budget.max_bytes == 3 * 2**29
        assert not writer.local_metrics
        assert SinkWriters(writers).alive is False  # not started
        writer.cursor.close()
    finally:
        spool.close()


@pytest.mark.parametrize(
    ("raw", "pace"), [({}, 50_000.0), ({"release_points_s": 1234}, 1234.0), ({"release_points_s": None}, None)]
)
def test_the_local_writer_paces_released_raw_blocks_as_configured_and_no_upstream_does(
    tmp_path: Path, raw: dict[str, float | None], pace: float | None
) -> None:
    config = parse_config(
        {
            "spool": {"path": str(tmp_path / "spool.db")},
            "storage": {"raw_vibration": raw, "upstreams": [UPSTREAM]},
        },
        environ={},
    )
    metrics = Metrics()
    spool = build_spool(config, metrics)
    try:
        local = build_writer(config, spool, metrics)  # in its own process, as shipped (not started)
        assert isinstance(local, WriterProcess) and local.settings.raw_release_points_s == pace
        cloud = build_upstream_writers(config, spool, metrics)["cloud"]
        assert isinstance(cloud, SinkWriter) and cloud.raw_release_points_s is None  # it has its own rate limit
        cloud.cursor.close()
    finally:
        spool.close()


def test_readyz_shows_each_sinks_backlog_and_fails_naming_the_one_behind() -> None:
    backlogs = {"local": (0, 0, 0.0, 0), "cloud": (12, 30, 900.0, 5000)}
    ok, states = run_checks({"sinks": sinks_check(lambda: backlogs, {"cloud": None})})
    assert ok and states["sinks"]["sinks"]["cloud"] == {"backlog_rows": 12, "backlog_age_s": 900.0}
    ok, states = run_checks({"sinks": sinks_check(lambda: backlogs, {"cloud": 600.0})})
    assert not ok and "cloud 900 s behind (limit 600 s)" in states["sinks"]["error"]
