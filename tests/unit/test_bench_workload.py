"""The benchmark fleet's schedule: adjacent intervals publish every message exactly once (pure: no services)."""

from __future__ import annotations

import collections
import itertools

import pytest

from benchmarks.workload import Fleet, _first_index


def _messages(fleet: Fleet, bounds: list[float]) -> list[tuple[str, bytes]]:
    return [(e.topic, e.payload) for t0, t1 in itertools.pairwise(bounds) for e in fleet.events(t0, t1)]


def test_ramp_steps_that_once_published_a_reading_twice() -> None:
    # The ramp of a run on 2026-12-04: steps of 8 s at these speeds put a step boundary at
    # 1808.8000000000002 s, just after machine 80's reading at 1808.8 s; both steps published it (the second
    # by a 1e-9 tolerance), InfluxDB kept one point, and the run reported one reading lost.
    fleet = Fleet(100, 2)
    bounds = list(itertools.accumulate([8.0 * s for s in (1, 2, 4, 8, 16, 32, 64, 45.3, 53.8, 49.4)], initial=0.0))
    assert 1808.8 < bounds[-2] < 1808.8 + 1e-9  # the boundary that caught it
    stepped = _messages(fleet, bounds)
    counts = collections.Counter(stepped)
    assert [m for m, n in counts.items() if n > 1] == []
    assert sorted(stepped) == sorted(_messages(fleet, [0.0, bounds[-1]]))
    assert bounds[-1] == pytest.approx(2204.0)
    assert sum(1 for topic, _ in stepped if topic.endswith("/process")) == 100 * 2204  # 100 machines at 1 Hz


@pytest.mark.parametrize("step", [0.1, 0.3, 1 / 3, 0.7])
def test_fine_float_steps_neither_repeat_nor_skip(step: float) -> None:
    fleet = Fleet(10, 1)
    bounds = list(itertools.accumulate([step] * 300, initial=0.0))
    stepped = _messages(fleet, bounds)
    assert len(stepped) == len(set(stepped))
    assert sorted(stepped) == sorted(_messages(fleet, [0.0, bounds[-1]]))


def test_first_index_is_the_first_time_not_before_the_bound() -> None:
    assert _first_index(0.0, 0.0, 1.0) == 0
    assert _first_index(-5.0, 0.3, 1.0) == 0  # never before the schedule starts
    assert _first_index(2.0, 0.0, 1.0) == 2  # a time equal to the bound belongs to the interval it starts
    assert _first_index(2.0000000001, 0.0, 1.0) == 3
    t0 = 1808.8000000000002
    k = _first_index(t0, 0.8, 1.0)
    assert k * 1.0 + 0.8 >= t0 > (k - 1) * 1.0 + 0.8
