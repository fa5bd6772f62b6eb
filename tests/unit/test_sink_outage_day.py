"""A 24-hour upstream outage at the demo's rate, run fast: the spool with its default caps and an upstream
with its default backlog caps and selection, away for a whole simulated day while the local sink confirms
everything; nothing is dropped, and when the upstream returns it gets exactly its selection of the day.

The demo's rate is what ``benchmarks/spool_outage.py`` measured with the example config and the simulator's
4 machines (``docs/dataplane.md``, 2026-12-02): per minute 1,067 rows, 2,692 points, 0.94 MB of payload
(held raw-vibration blocks apart: they leave the spool ``hold_s`` after they arrive, wherever the cursors
are). This test appends that mix for 1,440 simulated minutes: each minute 240 process readings (4 machines,
1 Hz, 4 fields) and 827 rows of the agent's own points (features and anomaly scores) padded to the
measured bytes. The whole day writes 1.35 GB and takes many minutes on a loaded 2-core box, so the suite
runs the first ``PDM_OUTAGE_MINUTES`` (default 60) of it, with the same checks, and the day is one
environment variable away (``PDM_OUTAGE_MINUTES=1440``, figures in ``docs/edge_cloud.md``). The figures are
printed (``-s``).
"""

from __future__ import annotations

import os
import random
import sqlite3
import time
from pathlib import Path

import pytest

from agent.config.storage import SpoolSection, UpstreamSection
from agent.metrics import Metrics
from agent.records import Reading, Source
from agent.spool import sqlite as sqlite_module
from agent.spool.codec import Entry, encode_lines, encode_readings
from agent.spool.sqlite import ROW_OVERHEAD_BYTES, Spool
from agent.storage.base import RetryableWriteError
from agent.storage.selection import RowSelector, Selection
from agent.storage.writer import BacklogBudget, SinkWriter

MINUTES = int(os.environ.get("PDM_OUTAGE_MINUTES", "60"))
MACHINES = [Source.of(machine=f"m{i:02d}", sensor="process") for i in range(1, 5)]
ROWS_PER_MINUTE, POINTS_PER_MINUTE, BYTES_PER_MINUTE = 1067, 2692, 940_000
LINES_ROWS = ROWS_PER_MINUTE - 60 * len(MACHINES)
T0 = 1_796_256_000 * 10**9  # a whole day


class CountingSink:
    """Accepts or refuses every write and counts the lines (a day's lines would not fit in a list)."""

    def __init__(self, away: bool = False) -> None:
        self.away = away
        self.points = 0
        self.measurements: dict[str, int] = {}

    def write(self, lines: list[str]) -> None:
        if self.away:
            raise RetryableWriteError("upstream away")
        self.points += len(lines)
        for line in lines:
            name = line.split(",", 1)[0]
            self.measurements[name] = self.measurements.get(name, 0) + 1

    def close(self) -> None:
        pass


def _minute(k: int, rng: random.Random) -> list[Entry]:
    """Minute ``k`` of the demo's traffic: the readings, then the agent's own points padded to the measured bytes."""
    entries = []
    for s in range(60):
        t = T0 + (k * 60 + s) * 10**9
        for source in MACHINES:
            fields = {"temperature": 50 + rng.random(), "rpm": 1780 + rng.random(), "current": 12.6, "pressure": 2.9}
            entries.append(encode_readings([Reading(source, t, fields)]))
    readings_bytes = sum(len(e.body) + ROW_OVERHEAD_BYTES for e in entries)
    line_points = POINTS_PER_MINUTE - len(entries)
    per_row = (BYTES_PER_MINUTE - readings_bytes) // LINES_ROWS - ROW_OVERHEAD_BYTES
    t = T0 + k * 60 * 10**9
    for i in range(LINES_ROWS):
        n = line_points // LINES_ROWS + (i < line_points % LINES_ROWS)
        machine = f"m{i % 4 + 1:02d}"
        lines = [f"anomaly_score,machine={machine},model_id=vibration_anomaly score=0.5 {t + i}"]
        lines += [f"features,machine={machine} rms=1.0 {t + i}" for _ in range(n - 1)]
        pad = per_row - len("\n".join(lines)) - 1
        lines[-1] = lines[-1].replace(" rms=1.0", f' rms=1.0,pad="{"x" * max(0, pad - 7)}"', 1) if n > 1 else lines[-1]
        entries.append(encode_lines(lines))
    return entries


@pytest.mark.chaos
@pytest.mark.timeout(1800)
def test_a_day_without_the_upstream_fits_the_default_caps_and_loses_nothing(tmp_path: Path) -> None:
    spool_defaults = SpoolSection()
    upstream = UpstreamSection(name="cloud", url="http://127.0.0.1:1")
    metrics = Metrics()
    spool = Spool(
        tmp_path / "spool.db",
        spool_defaults.max_bytes,
        spool_defaults.max_points,
        spool_defaults.drop_policy,
        metrics=metrics,
        sinks=("local", "cloud"),
    )
    spool.start()
    local, cloud = CountingSink(), CountingSink(away=True)
    selection = Selection(
        readings_interval_s=upstream.select.readings.interval_s, grace_s=upstream.select.readings.grace_s
    )
    writers = [
        SinkWriter(spool.cursor("local"), local, metrics, batch_size=5000, flush_interval_s=0.5),
        SinkWriter(
            spool.cursor("cloud"),
            cloud,
            metrics,
            batch_size=upstream.batch_size,
            flush_interval_s=upstream.flush_interval_s,
            backoff_min_s=0.5,
            backoff_max_s=2.0,
            selector=RowSelector(selection),
            budget=BacklogBudget(upstream.max_backlog_bytes, upstream.max_backlog_age_s),
            rate_points_s=upstream.rate_limit_points_s,
            local_metrics=False,
        ),
    ]
    for w in writers:
        w.start()
    rng = random.Random(7)
    started = time.monotonic()
    try:
        appended_points = appended_bytes = 0
        for k in range(MINUTES):
            entries = _minute(k, rng)
            appended_points += sum(e.points for e in entries)
            appended_bytes += sum(len(e.body) + ROW_OVERHEAD_BYTES for e in entries)
            spool.append(entries)
        fill_s = time.monotonic() - started
        assert writers[0].flush(600)
        spool.compact()
        rows, points, size = spool.size()
        backlog = spool.backlogs()["cloud"]
        print(
            f"{MINUTES} minutes at the demo rate: appended {appended_points} points, {appended_bytes / 1e9:.3f} GB in "
            f"{fill_s:.0f} s; the local sink confirmed {local.points}; the spool holds {rows} rows, {points} points, "
            f"{size / 1e9:.3f} GB for the upstream (caps: spool {spool_defaults.max_bytes / 2**30:.2f} GiB, "
            f"upstream {upstream.max_backlog_bytes / 2**30:.2f} GiB, {upstream.max_backlog_age_s / 86400:.0f} days)"
        )
        assert local.points == appended_points  # the local sink got everything while the upstream was away
        assert (rows, points, size) == (backlog[0], backlog[1], backlog[3])  # all of it is the upstream's
        assert size == appended_bytes and size <= upstream.max_backlog_bytes < spool_defaults.max_bytes
        assert metrics.get("spool.dropped") == 0
        assert metrics.get("sink.backlog_dropped_points", sink="cloud") == 0

        cloud.away = False  # the upstream returns: the day, in time order
        back = time.monotonic()
        assert writers[1].flush(1200)
        catch_up_s = time.monotonic() - back
        per_minute_lines = LINES_ROWS + (POINTS_PER_MINUTE - 60 * len(MACHINES) - LINES_ROWS)
        # Every score and feature point, and one aggregate point per machine and minute but each machine's
        # last minute, still open (no later reading, and the newest reading is not grace_s past its end).
        assert cloud.measurements == {
            "anomaly_score": LINES_ROWS * MINUTES,
            "features": (per_minute_lines - LINES_ROWS) * MINUTES,
            "reading": len(MACHINES) * (MINUTES - 1),
        }
        spool.compact()
        assert spool.size()[0] == 0
        print(
            f"the upstream caught up with {MINUTES} minutes in {catch_up_s:.0f} s: {cloud.points} points "
            f"({cloud.measurements}), {cloud.points / catch_up_s:.0f} points/s "
            f"(its limit: {upstream.rate_limit_points_s})"
        )
    finally:
        for w in writers:
            w.stop(30)
            w.cursor.close()
        spool.close()


def test_compaction_finds_held_rows_through_their_index_not_a_scan_of_the_backlog(tmp_path: Path) -> None:
    """With a day's backlog for an upstream, a compaction pass (every 0.5 s) that scans the table reads 1.35 GB."""
    with Spool(tmp_path / "spool.db", 10**12, 10**9) as spool:
        spool.append([encode_lines([f"m v=1 {i}"]) for i in range(2000)])
        conn = sqlite3.connect(tmp_path / "spool.db")
        conn.execute("ANALYZE")
        for where in (sqlite_module.HELD_EXPIRED, sqlite_module.RELEASED_PASSED):
            plan = " ".join(
                str(row[3]) for row in conn.execute(f"EXPLAIN QUERY PLAN DELETE FROM entry WHERE {where}", (0,))
            )
            assert "USING COVERING INDEX entry_held" in plan or "USING INDEX entry_held" in plan, plan
        conn.close()
