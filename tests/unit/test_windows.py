"""Windower: exact window content and timing across blocks, resets on discontinuities, counted skips."""

from __future__ import annotations

import numpy as np
import pytest

from agent.features.extract import extract_matrix
from agent.features.spec import FeatureSpec
from agent.features.windows import Windower
from agent.metrics import Metrics
from agent.records import NS_PER_S, Reading, SampleBlock, Source, Window

RATE = 10240.0
PERIOD_NS = NS_PER_S / RATE
T0 = 1_732_575_600 * NS_PER_S
VIB_SRC = Source.of(site="s", line="l", machine="m1", sensor="vibration")
PROC_SRC = Source.of(site="s", line="l", machine="m1", sensor="process")
VIB = FeatureSpec("vibration", 1000, 400, ("value",), (0, 1000, 5000))
PROC = FeatureSpec("process", 4, 2, ("temperature", "current"))


def spec_for(source: Source) -> FeatureSpec | None:
    return {"vibration": VIB, "process": PROC}.get(source.sensor)


def block(
    samples: np.ndarray, first_index: int, source: Source = VIB_SRC, rate: float = RATE, **kw: object
) -> SampleBlock:
    """A block whose first sample is sample ``first_index`` of a stream starting at T0."""
    return SampleBlock(
        source=source,
        start_ns=T0 + round(first_index * NS_PER_S / rate),
        rate_hz=rate,
        samples=np.asarray(samples, dtype=np.float32),
        **kw,  # type: ignore[arg-type]
    )


def stream(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=n).astype(np.float32)


def feed_in_blocks(windower: Windower, x: np.ndarray, sizes: list[int], offset: int = 0) -> list[Window]:
    out: list[Window] = []
    i = 0
    for size in sizes:
        out += windower.add(block(x[i : i + size], offset + i))
        i += size
    assert i == len(x)
    return out


def reading(t_s: float, source: Source = PROC_SRC, **fields: float) -> Reading:
    return Reading(source=source, time_ns=T0 + round(t_s * NS_PER_S), fields=fields)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def windower(metrics: Metrics) -> Windower:
    return Windower(spec_for, metrics)


# --- vibration -----------------------------------------------------------------------------------


def test_contiguous_blocks_give_windows_every_hop_with_exact_samples(windower: Windower) -> None:
    x = stream(5000)
    sizes = [333, 1024, 7, 1500, 136, 2000]  # boundaries fall inside windows and between hops
    windows = feed_in_blocks(windower, x, sizes)
    starts = list(range(0, 5000 - 1000 + 1, 400))
    assert len(windows) == len(starts) == 11
    for window, start in zip(windows, starts, strict=True):
        assert window.data.dtype == np.float64
        assert window.data.shape == (1, 1000)
        np.testing.assert_array_equal(window.data[0], x[start : start + 1000].astype(np.float64))


def test_each_block_returns_exactly_the_windows_it_completes(windower: Windower) -> None:
    x = stream(3000)
    received = 0
    for i in range(0, 3000, 256):
        got = windower.add(block(x[i : i + 256], i))
        received_now = min(i + 256, 3000)
        expected_total = 0 if received_now < 1000 else (received_now - 1000) // 400 + 1
        assert received + len(got) == expected_total
        received += len(got)


def test_window_times_come_from_the_sample_times(windower: Windower) -> None:
    windows = feed_in_blocks(windower, stream(3000), [700] * 4 + [200])
    for k, window in enumerate(windows):
        first = k * 400
        assert abs(window.start_ns - (T0 + first * PERIOD_NS)) <= 1
        assert abs(window.end_ns - (T0 + (first + 999) * PERIOD_NS)) <= 1
        assert window.rate_hz == RATE
        assert window.kind == "vibration"
        assert window.channels == ("value",)
        assert window.source == VIB_SRC
        np.testing.assert_allclose(window.times_s, np.arange(1000) / RATE)


def test_window_times_follow_each_blocks_own_timestamp() -> None:
    # Blocks stamped by a device clock 0.3 periods late keep continuity; windows use those stamps.
    w = Windower(spec_for, Metrics())
    x = stream(2000)
    late = round(0.3 * PERIOD_NS)
    w.add(block(x[:900], 0))
    second = block(x[900:], 900)
    windows = w.add(SampleBlock(VIB_SRC, second.start_ns + late, RATE, second.samples))
    assert len(windows) == 3
    assert abs(windows[0].start_ns - T0) <= 1  # sample 0 is in the first block
    assert abs(windows[1].start_ns - (T0 + 400 * PERIOD_NS)) <= 1  # sample 400 too
    assert abs(windows[2].start_ns - (T0 + 800 * PERIOD_NS)) <= 1  # sample 800 too
    assert abs(windows[2].end_ns - (T0 + 1799 * PERIOD_NS + late)) <= 1  # sample 1799 in the late one


def test_windows_are_read_only(windower: Windower) -> None:
    window = feed_in_blocks(windower, stream(1000), [1000])[0]
    with pytest.raises(ValueError):
        window.data[0, 0] = 1.0
    with pytest.raises(ValueError):
        window.times_s[0] = 1.0


def test_buffer_memory_stays_bounded(windower: Windower) -> None:
    x = stream(100_000)
    for i in range(0, 100_000, 512):
        windower.add(block(x[i : i + 512], i))
        assert windower.pending(VIB_SRC) < VIB.window_samples + 512


def test_one_large_block_gives_all_its_windows(windower: Windower) -> None:
    x = stream(10_000)
    windows = windower.add(block(x, 0))
    assert len(windows) == (10_000 - 1000) // 400 + 1
    np.testing.assert_array_equal(windows[-1].data[0], x[8800:9800])
    assert windower.pending(VIB_SRC) == 10_000 - 23 * 400  # from the next window start on


def test_hop_equal_to_window_gives_disjoint_windows(metrics: Metrics) -> None:
    spec = FeatureSpec("vibration", 500, 500, ("value",))
    w = Windower(lambda s: spec, metrics)
    x = stream(2100)
    windows = feed_in_blocks(w, x, [300] * 7)
    assert [len(win.data[0]) for win in windows] == [500] * 4
    np.testing.assert_array_equal(np.concatenate([win.data[0] for win in windows]), x[:2000])
    assert w.pending(VIB_SRC) == 100


def test_a_gap_resets_the_buffer_and_is_counted(windower: Windower, metrics: Metrics) -> None:
    x = stream(4000)
    before = windower.add(block(x[:1300], 0))
    assert len(before) == 1
    # Two samples (1300, 1301) never arrive: the next block starts at sample 1302.
    after = windower.add(block(x[1302:2400], 1302))
    assert metrics.get("windows.gaps", reason="gap") == 1
    assert metrics.get("windows.gaps") == 1
    assert windower.pending(VIB_SRC) == 1098 - 400 * 1  # new buffer: one window emitted from it
    assert len(after) == 1
    np.testing.assert_array_equal(after[0].data[0], x[1302:2302])  # no window spans the gap
    assert abs(after[0].start_ns - (T0 + 1302 * PERIOD_NS)) <= 1


def test_a_single_missing_sample_is_a_gap(windower: Windower, metrics: Metrics) -> None:
    x = stream(2000)
    windower.add(block(x[:600], 0))
    windower.add(block(x[601:1200], 601))
    assert metrics.get("windows.gaps", reason="gap") == 1
    assert windower.pending(VIB_SRC) == 599


def test_timestamp_jitter_under_half_a_period_keeps_the_stream(windower: Windower, metrics: Metrics) -> None:
    x = stream(2000)
    windower.add(block(x[:600], 0))
    nxt = block(x[600:1200], 600)
    for shift in (-0.45, 0.45):
        w = Windower(spec_for, metrics)
        w.add(block(x[:600], 0))
        got = w.add(SampleBlock(VIB_SRC, nxt.start_ns + round(shift * PERIOD_NS), RATE, nxt.samples))
        assert len(got) == 1
    assert metrics.get("windows.gaps") == 0


def test_an_overlapping_block_resets_and_is_counted(windower: Windower, metrics: Metrics) -> None:
    x = stream(2000)
    windower.add(block(x[:600], 0))
    windower.add(block(x[590:1200], 590))  # repeats 10 samples and brings new ones
    assert metrics.get("windows.gaps", reason="overlap") == 1
    assert windower.pending(VIB_SRC) == 610


def test_a_rate_change_resets_and_is_counted(windower: Windower, metrics: Metrics) -> None:
    x = stream(2000)
    windower.add(block(x[:600], 0))
    end_ns = T0 + round(599 * PERIOD_NS)
    new_rate = 2 * RATE
    windows = windower.add(SampleBlock(VIB_SRC, end_ns + round(NS_PER_S / new_rate), new_rate, x[600:1800]))
    assert metrics.get("windows.gaps", reason="rate") == 1
    assert len(windows) == 1
    assert windows[0].rate_hz == new_rate
    np.testing.assert_array_equal(windows[0].data[0], x[600:1600])


def test_a_redelivered_block_is_skipped_without_reset(windower: Windower, metrics: Metrics) -> None:
    x = stream(1400)
    first, second = block(x[:500], 0), block(x[500:900], 500)
    windower.add(first)
    windower.add(second)
    assert windower.add(second) == []  # QoS 1 redelivery of the same message
    assert metrics.get("windows.skipped", reason="duplicate") == 1
    windows = windower.add(block(x[900:1400], 900))
    assert metrics.get("windows.gaps") == 0
    assert len(windows) == 2
    np.testing.assert_array_equal(windows[1].data[0], x[400:1400])


def test_blocks_of_another_channel_are_skipped(windower: Windower, metrics: Metrics) -> None:
    x = stream(1000)
    windower.add(block(x[:600], 0))
    assert windower.add(block(x[:600], 0, channel="axial")) == []
    assert metrics.get("windows.skipped", reason="other_channel") == 1
    assert windower.pending(VIB_SRC) == 600
    assert len(windower.add(block(x[600:], 600))) == 1


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        (SampleBlock(VIB_SRC, T0, RATE, np.zeros(0, np.float32)), "empty_block"),
        (SampleBlock(VIB_SRC, T0, 0.0, np.zeros(10, np.float32)), "bad_rate"),
        (SampleBlock(VIB_SRC, T0, RATE, np.array([0.0, np.nan], np.float32)), "non_finite"),
        (SampleBlock(PROC_SRC, T0, RATE, np.zeros(10, np.float32)), "kind_mismatch"),
        (Reading(VIB_SRC, T0, {"value": 1.0}), "kind_mismatch"),
        (Reading(PROC_SRC, T0, {"temperature": float("inf"), "current": 1.0}), "non_finite"),
    ],
)
def test_unusable_items_are_skipped_and_counted(
    windower: Windower, metrics: Metrics, item: Reading | SampleBlock, reason: str
) -> None:
    assert windower.add(item) == []
    assert metrics.get("windows.skipped", reason=reason) == 1
    assert windower.pending(item.source) == 0


def test_sources_are_windowed_independently(windower: Windower) -> None:
    other = Source.of(site="s", line="l", machine="m2", sensor="vibration")
    x, y = stream(1000, seed=1), stream(1000, seed=2)
    got: list[Window] = []
    for i in range(0, 1000, 250):
        got += windower.add(block(x[i : i + 250], i))
        got += windower.add(block(y[i : i + 250], i, source=other))
    assert [w.source for w in got] == [VIB_SRC, other]
    np.testing.assert_array_equal(got[0].data[0], x)
    np.testing.assert_array_equal(got[1].data[0], y)


def test_sources_without_a_spec_are_ignored_and_counted(metrics: Metrics) -> None:
    w = Windower(lambda s: None, metrics)
    assert w.add(block(stream(5000), 0)) == []
    assert w.add(reading(0.0, temperature=1.0, current=2.0)) == []
    assert metrics.get("windows.unassigned") == 2
    assert w.pending(VIB_SRC) == 0


def test_reset_forgets_the_buffer(windower: Windower) -> None:
    x = stream(2000)
    windower.add(block(x[:900], 0))
    windower.reset(VIB_SRC)
    assert windower.pending(VIB_SRC) == 0
    assert windower.add(block(x[900:1800], 900)) == []  # needs a full window of new data
    assert len(windower.add(block(x[1800:], 1800))) == 1


def test_a_changed_spec_restarts_the_buffer(metrics: Metrics) -> None:
    current = {"spec": VIB}
    w = Windower(lambda s: current["spec"], metrics)
    x = stream(3000)
    w.add(block(x[:900], 0))
    current["spec"] = FeatureSpec("vibration", 500, 250, ("value",))
    windows = w.add(block(x[900:1500], 900))
    assert len(windows) == 1
    np.testing.assert_array_equal(windows[0].data[0], x[900:1400])


def test_emitted_windows_are_counted_by_kind(windower: Windower, metrics: Metrics) -> None:
    feed_in_blocks(windower, stream(2000), [1000, 1000])
    assert metrics.get("windows.emitted", kind="vibration") == 3


def test_vibration_windows_feed_extraction(windower: Windower) -> None:
    windows = feed_in_blocks(windower, stream(5000), [512] * 9 + [392])
    matrix = extract_matrix(VIB, windows)
    assert matrix.shape == (len(windows), VIB.n_features)
    assert np.isfinite(matrix).all()


# --- process -------------------------------------------------------------------------------------


def feed_readings(w: Windower, n: int) -> tuple[list[Window], np.ndarray, np.ndarray]:
    t = np.cumsum(np.linspace(1.0, 2.0, n))  # irregular spacing
    temp, cur = 60 + np.arange(n, dtype=float), 10 - 0.5 * np.arange(n)
    windows: list[Window] = []
    for i in range(n):
        # Field order differs from the spec and there is an extra field: neither matters.
        windows += w.add(reading(t[i], current=cur[i], humidity=40.0, temperature=temp[i]))
    return windows, t, np.stack([temp, cur])


def test_process_windows_hold_the_last_readings_every_hop(windower: Windower) -> None:
    windows, t, values = feed_readings(windower, 11)
    assert len(windows) == 4  # after readings 4, 6, 8, 10
    for window, end in zip(windows, [4, 6, 8, 10], strict=True):
        first = end - 4
        assert window.kind == "process"
        assert window.channels == ("temperature", "current")
        assert window.data.shape == (2, 4)
        np.testing.assert_array_equal(window.data, values[:, first:end])
        assert window.start_ns == T0 + round(t[first] * NS_PER_S)
        assert window.end_ns == T0 + round(t[end - 1] * NS_PER_S)
        np.testing.assert_allclose(window.times_s, t[first:end] - t[first], atol=1e-9)
        assert window.times_s[0] == 0.0
        assert window.rate_hz is None
    assert windower.pending(PROC_SRC) == 4


def test_out_of_order_readings_are_skipped_and_counted(windower: Windower, metrics: Metrics) -> None:
    assert windower.add(reading(10.0, temperature=1.0, current=1.0)) == []
    assert windower.add(reading(10.0, temperature=99.0, current=99.0)) == []  # same time
    assert windower.add(reading(5.0, temperature=99.0, current=99.0)) == []  # earlier
    assert metrics.get("windows.skipped", reason="out_of_order") == 2
    windower.add(reading(11.0, temperature=2.0, current=2.0))
    windower.add(reading(12.0, temperature=3.0, current=3.0))
    (window,) = windower.add(reading(13.0, temperature=4.0, current=4.0))
    np.testing.assert_array_equal(window.data[0], [1.0, 2.0, 3.0, 4.0])


def test_readings_missing_a_channel_are_skipped_and_counted(windower: Windower, metrics: Metrics) -> None:
    windower.add(reading(1.0, temperature=1.0, current=1.0))
    assert windower.add(reading(2.0, temperature=99.0)) == []
    assert metrics.get("windows.skipped", reason="missing_channel") == 1
    assert windower.pending(PROC_SRC) == 1
    windower.add(reading(3.0, temperature=2.0, current=2.0))
    windower.add(reading(4.0, temperature=3.0, current=3.0))
    (window,) = windower.add(reading(5.0, temperature=4.0, current=4.0))
    np.testing.assert_array_equal(window.data[0], [1.0, 2.0, 3.0, 4.0])


def test_process_windows_feed_extraction(windower: Windower) -> None:
    windows, t, values = feed_readings(windower, 4)
    (window,) = windows
    row = extract_matrix(PROC, [window])[0]
    named = dict(zip(PROC.feature_names(), row.tolist(), strict=True))
    assert named["temperature_last"] == 63.0
    assert named["current_slope"] == pytest.approx(np.polyfit(t - t[0], values[1], 1)[0], rel=1e-6)
