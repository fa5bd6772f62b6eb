"""An upstream's selection: which entries it gets, and readings downsampled exactly and deterministically
(a bucket is emitted once, complete; a restart from the saved state gives the same points)."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

from agent import schema
from agent.records import Reading, SampleBlock, Source
from agent.spool.codec import (
    Entry,
    Kind,
    encode_block,
    encode_features,
    encode_lines,
    encode_raw_blocks,
    encode_raw_ref,
    encode_readings,
)
from agent.storage import selection as selection_module
from agent.storage.selection import Downsampler, RowSelector, Selection

S = 10**9
T0 = 1_732_575_600 * S  # a whole minute
M1 = Source.of(machine="m1", sensor="process")
M2 = Source.of(machine="m2", sensor="process")


def _entry(source: Source, t_s: float, **fields: float) -> Entry:
    return encode_readings([Reading(source, T0 + int(t_s * S), fields)])


def _lines(selector: RowSelector, entries: list[Entry]) -> list[str]:
    return [line for e in entries for line in selector.lines(e.kind, e.body)]


def _readings(n: int) -> list[Entry]:
    """Two machines, one reading a second each, with values that make every aggregate differ."""
    out = []
    for i in range(n):
        out.append(_entry(M1, i, temp=float(i % 7), rpm=1000.0 + i))
        out.append(_entry(M2, i + 0.5, temp=-float(i)))
    return out


def test_module_doctests_pass() -> None:
    assert doctest.testmod(selection_module).failed == 0


def test_only_the_selected_kinds_of_the_agents_points_pass() -> None:
    lines = [
        "features,machine=m1 rms=1 1",
        "anomaly_score,machine=m1 score=1 1",
        "defect,machine=m1 p_normal=1 1",
        "alert,machine=m1 score=1 1",
        'alert_command,machine=m1 by="x" 1',
        "agent,agent_id=a x=1 1",
    ]
    selector = RowSelector(Selection(kinds=frozenset({"scores", "alerts"})))
    entry = encode_lines(lines)
    assert selector.lines(entry.kind, entry.body) == [lines[1], lines[2], lines[3]]


def test_a_features_entry_goes_only_to_a_selection_with_features() -> None:
    entry = encode_features("vib", "1", ("rms",), [M1, M2], [T0, T0 + 1], np.array([[1.5], [2.5]], np.float32))
    assert _lines(RowSelector(Selection(kinds=frozenset({"scores", "alerts"}))), [entry]) == []
    assert _lines(RowSelector(Selection(kinds=frozenset({"features"}))), [entry]) == [
        f"features,machine=m1,model_id=vib,model_version=1,sensor=process rms=1.5 {T0}",
        f"features,machine=m2,model_id=vib,model_version=1,sensor=process rms=2.5 {T0 + 1}",
    ]


def test_readings_none_all_or_downsampled() -> None:
    entries = _readings(3)
    assert _lines(RowSelector(Selection(readings_interval_s=None)), entries) == []
    full = _lines(RowSelector(Selection(readings_interval_s=0)), entries)
    assert len(full) == 6 and all(line.startswith("reading,") for line in full)


def test_a_bucket_is_emitted_once_complete_with_exact_aggregates() -> None:
    selector = RowSelector(Selection(readings_interval_s=60, grace_s=30))
    out = _lines(selector, _readings(60))  # seconds 0..59: the first minute, still open
    assert out == []
    out = _lines(selector, [_entry(M1, 60, temp=3.0, rpm=1.0)])  # m1 enters the next minute
    temps = [float(i % 7) for i in range(60)]
    rpms = [1000.0 + i for i in range(60)]
    assert out == [
        f"reading,machine=m1,sensor=process rpm_mean={sum(rpms) / 60!r},rpm_min=1000.0,rpm_max=1059.0,"
        f"rpm_last=1059.0,temp_mean={sum(temps) / 60!r},temp_min=0.0,temp_max=6.0,temp_last={temps[-1]!r},n=60i {T0}"
    ]
    # m2 never got a reading in a later minute: its bucket goes once the newest time passed its end + grace.
    assert _lines(selector, [_entry(M1, 89, temp=1.0, rpm=1.0)]) == []
    late_close = _lines(selector, [_entry(M1, 90, temp=1.0, rpm=1.0)])
    assert [line.split(" ")[0] for line in late_close] == ["reading,machine=m2,sensor=process"]
    assert late_close[0].endswith(f",n=60i {T0}")


def test_the_same_rows_give_the_same_points_across_any_restart() -> None:
    """Cut the stream anywhere, save the state, resume in a new selector: the points are those of one run."""
    entries = _readings(150)
    selection = Selection(readings_interval_s=60, aggregates=("mean", "last"), grace_s=10)
    reference = _lines(RowSelector(selection), entries)
    assert len(reference) == 4  # minutes 0 and 1 of both machines; minute 2 is still open
    for cut in range(0, len(entries), 37):
        first = RowSelector(selection)
        head = _lines(first, entries[:cut])
        second = RowSelector(selection)
        second.restore(first.state(), "cloud")
        assert head + _lines(second, entries[cut:]) == reference


def test_a_reading_not_newer_than_its_series_newest_is_late_counted_and_not_aggregated() -> None:
    selector = RowSelector(Selection(readings_interval_s=60, grace_s=0))
    _lines(selector, [_entry(M1, 0, temp=1.0), _entry(M1, 61, temp=2.0)])
    assert _lines(selector, [_entry(M1, 30, temp=100.0)]) == []  # for a bucket already written
    assert selector.take_late() == 1
    assert selector.take_late() == 0
    # A redelivered message (same time) in the open bucket is not counted twice.
    _lines(selector, [_entry(M1, 61, temp=2.0), _entry(M1, 62, temp=4.0)])
    assert selector.take_late() == 1
    (line,) = _lines(selector, [_entry(M1, 120, temp=0.0)])
    assert line.endswith(f"temp_mean=3.0,temp_min=2.0,temp_max=4.0,temp_last=4.0,n=2i {T0 + 60 * S}")


def test_a_non_finite_reading_is_refused_before_the_state_changes() -> None:
    selector = RowSelector(Selection(readings_interval_s=60))
    _lines(selector, [_entry(M1, 0, temp=1.0)])
    before = selector.state()
    with pytest.raises(ValueError, match="non-finite"):
        _lines(selector, [_entry(M1, 1, temp=float("nan"))])
    assert selector.state() == before


def test_the_state_of_another_downsampling_is_not_resumed(caplog: pytest.LogCaptureFixture) -> None:
    old = RowSelector(Selection(readings_interval_s=60))
    _lines(old, [_entry(M1, 0, temp=1.0)])
    new = RowSelector(Selection(readings_interval_s=10))
    new.restore(old.state(), "cloud")
    assert "start afresh" in caplog.text
    assert new.downsampler is not None and new.downsampler.state()["open"] == []


def test_raw_vibration_none_around_alerts_or_all() -> None:
    block = SampleBlock(Source.of(machine="m1", sensor="vib"), T0, 1000.0, np.arange(4, dtype=np.float32), "x")
    stored = encode_block(block, store_raw=True)
    held = encode_block(block, store_raw=False, held=True)
    release = encode_raw_ref([7])  # a release by id (spools of earlier builds)
    blocks = encode_raw_blocks([block])  # a release of blocks held in memory

    def resolve(ids: object) -> list[bytes]:
        return [held.body]

    for raw, stored_lines, released_lines in (("none", 0, 0), ("around_alerts", 0, 4), ("all", 4, 4)):
        selector = RowSelector(Selection(raw=raw))  # type: ignore[arg-type]
        assert len(selector.lines(stored.kind, stored.body, resolve)) == stored_lines
        assert len(selector.lines(Kind.RAW_REF, release.body, resolve)) == released_lines
        assert len(selector.lines(Kind.RAW_BLOCKS, blocks.body)) == released_lines
    assert all(
        line.startswith(schema.VIBRATION) for line in RowSelector(Selection(raw="all")).lines(stored.kind, stored.body)
    )


def test_a_selection_refuses_unknown_kinds_and_aggregates() -> None:
    with pytest.raises(ValueError, match="unknown kinds"):
        Selection(kinds=frozenset({"readings"}))
    with pytest.raises(ValueError, match="aggregates"):
        Selection(aggregates=("median",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="interval_s"):
        Downsampler(0, ("mean",), 0)
