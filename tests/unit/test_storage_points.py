"""Records to line protocol (schema names, tags, times) and the raw vibration storage policy."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from agent import schema
from agent.records import Alert, FeatureVector, Reading, SampleBlock, Score, Source, Window
from agent.spool.codec import Kind, encode_features
from agent.storage.entries import entry_lines
from agent.storage.line_protocol import format_point
from agent.storage.points import (
    RawVibrationPolicy,
    alert_lines,
    block_lines,
    command_lines,
    feature_lines,
    reading_lines,
    sample_times_ns,
    score_lines,
)

SRC = Source.of(site="s1", line="l 1", machine="m1", sensor="vibration")
PROC = Source.of(site="s1", line="l1", machine="m1", sensor="process")
T0 = 1_732_575_600_250_000_000


def _block(
    source: Source = SRC, n: int = 4, start_ns: int = T0, rate_hz: float = 10240.0, channel: str = "value"
) -> SampleBlock:
    samples = np.linspace(-1.0, 1.0, n, dtype=np.float32)
    return SampleBlock(source=source, start_ns=start_ns, rate_hz=rate_hz, samples=samples, channel=channel)


def test_reading_line_has_source_tags_fields_and_seq() -> None:
    r = Reading(source=PROC, time_ns=T0, fields={"temperature": 61.2, "current": 12.4}, seq=7)
    assert reading_lines(r) == [
        f"reading,line=l1,machine=m1,sensor=process,site=s1 temperature=61.2,current=12.4,seq=7i {T0}"
    ]


def test_reading_without_seq_has_no_seq_field() -> None:
    r = Reading(source=PROC, time_ns=T0, fields={"value": 1.5})
    assert reading_lines(r) == [f"{schema.READING},line=l1,machine=m1,sensor=process,site=s1 value=1.5 {T0}"]


def test_block_gives_one_point_per_sample_with_channel_tag() -> None:
    samples = np.array([0.1, -0.25, 0.0, 3.0], np.float32)
    b = SampleBlock(source=SRC, start_ns=T0, rate_hz=4.0, samples=samples, channel="x")
    assert block_lines(b) == [
        f"vibration,channel=x,line=l\\ 1,machine=m1,sensor=vibration,site=s1 value=0.1 {T0}",
        f"vibration,channel=x,line=l\\ 1,machine=m1,sensor=vibration,site=s1 value=-0.25 {T0 + 250_000_000}",
        f"vibration,channel=x,line=l\\ 1,machine=m1,sensor=vibration,site=s1 value=0.0 {T0 + 500_000_000}",
        f"vibration,channel=x,line=l\\ 1,machine=m1,sensor=vibration,site=s1 value=3.0 {T0 + 750_000_000}",
    ]


def test_block_times_end_at_the_blocks_end_ns_and_values_round_trip() -> None:
    b = SampleBlock(
        source=SRC, start_ns=T0, rate_hz=10240.0, samples=np.random.default_rng(0).normal(size=10240).astype(np.float32)
    )
    lines = block_lines(b)
    assert len(lines) == 10240
    times = [int(line.rsplit(" ", 1)[1]) for line in lines]
    assert times == sample_times_ns(b).tolist()
    assert times[0] == b.start_ns and times[-1] == b.end_ns
    assert all(t1 > t0 for t0, t1 in itertools.pairwise(times))
    values = np.array([float(line.split("value=")[1].split(" ")[0]) for line in lines], dtype=np.float32)
    np.testing.assert_array_equal(values, b.samples)  # shortest float32 repr round-trips exactly


def test_empty_block_gives_no_lines() -> None:
    assert block_lines(_block(n=0)) == []


def test_block_with_non_finite_samples_is_refused() -> None:
    samples = np.array([0.0, np.nan, np.inf], np.float32)
    b = SampleBlock(source=SRC, start_ns=T0, rate_hz=100.0, samples=samples)
    with pytest.raises(ValueError, match="2 non-finite"):
        block_lines(b)


def test_stage_tag_overrides_a_source_tag_of_the_same_name() -> None:
    src = Source.of(machine="m1", sensor="vibration", channel="from-topic")
    (line, *_) = block_lines(_block(source=src, channel="x"))
    assert line.startswith("vibration,channel=x,machine=m1,sensor=vibration value=")


def _window(source: Source = SRC) -> Window:
    return Window(
        source=source,
        kind="vibration",
        start_ns=T0,
        end_ns=T0 + 1000,
        channels=("value",),
        data=np.zeros((1, 4)),
        times_s=np.zeros(4),
        rate_hz=4.0,
    )


def test_feature_line_at_window_end_with_model_tags() -> None:
    values = np.array([0.5, 3.25, 0.1], np.float32)
    fv = FeatureVector(window=_window(), names=("rms", "kurtosis", "band_1"), values=values, spec_hash="abc")
    assert feature_lines(fv, "vib-ae", "1.2.0") == [
        "features,line=l\\ 1,machine=m1,model_id=vib-ae,model_version=1.2.0,sensor=vibration,site=s1 "
        f"rms=0.5,kurtosis=3.25,band_1=0.1 {T0 + 1000}"  # float32 0.1 as "0.1", not 0.10000000149011612
    ]


def test_feature_line_with_non_finite_feature_is_refused() -> None:
    values = np.array([np.nan], np.float32)
    fv = FeatureVector(window=_window(), names=("rms",), values=values, spec_hash="abc")
    with pytest.raises(ValueError, match="rms"):
        feature_lines(fv, "vib-ae", "1")


def test_score_line() -> None:
    s = Score(source=PROC, start_ns=T0, end_ns=T0 + 5, model_id="proc", model_version="3", score=0.75, threshold=0.5)
    assert score_lines(s) == [
        "anomaly_score,line=l1,machine=m1,model_id=proc,model_version=3,sensor=process,site=s1 "
        f"score=0.75,threshold=0.5,anomalous=true,window_start_ns={T0}i {T0 + 5}"
    ]


def _formatted_score(s: Score) -> str:
    """What ``format_point`` makes of a score (``score_lines`` formats a source's head once, then appends)."""
    tags = {**s.source.as_dict(), "model_id": s.model_id, "model_version": s.model_version}
    if s.adapter is not None:
        tags["adapter"] = s.adapter
    fields = {"score": s.score, "threshold": s.threshold, "anomalous": s.is_anomalous, "window_start_ns": s.start_ns}
    return format_point("anomaly_score", tags, fields, s.end_ns)


def test_score_lines_are_format_points_for_every_source_version_and_adapter() -> None:
    """The head remembered per source, model version and adapter never leaks into another's line."""
    sources = [PROC, SRC, Source.of(site="a b", machine="m,2", sensor="x=y")]
    values = [0.0, 0.1, 1e-07, 2.5e20, -3.0, 7.0]
    for (source, version, adapter), (score, threshold) in itertools.product(
        itertools.product(sources, ("1", "2"), (None, "m1@ab12")), itertools.product(values, values[:3])
    ):
        s = Score(source, T0, T0 + 9, "proc", version, score, threshold, adapter)
        assert score_lines(s) == [_formatted_score(s)]
    f32 = Score(PROC, T0, T0 + 9, "proc", "1", np.float32(0.1), np.float64(0.05))  # numpy scalars as ONNX gives
    assert score_lines(f32) == [_formatted_score(f32)]


@pytest.mark.parametrize(
    ("score", "threshold", "start_ns", "message"),
    [
        (float("nan"), 1.0, T0, "'score': non-finite float nan"),
        (1.0, float("inf"), T0, "'threshold': non-finite float inf"),
        (1.0, 1.0, 2**63, "'window_start_ns': integer 9223372036854775808 does not fit in int64"),
    ],
)
def test_a_score_line_refuses_what_line_protocol_cannot_hold(
    score: float, threshold: float, start_ns: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        score_lines(Score(PROC, start_ns, T0, "proc", "1", score, threshold))


def test_alert_line() -> None:
    a = Alert(
        event_id="evt-1",
        seq=2,
        state="update",
        reason="defect",
        alert_type="proc",
        source=PROC,
        severity="major",
        model_id="proc",
        model_version="3",
        score=0.75,
        threshold=0.5,
        peak_score=0.8,
        window_start_ns=T0,
        window_end_ns=T0 + 5,
        first_detected_ns=T0 - 5,
        time_ns=T0 + 9,
        defect={"defect": "outer_race", "probability": 0.9, "probabilities": {}},
        acknowledged_by="maria",
    )
    assert alert_lines(a) == [
        "alert,alert_type=proc,line=l1,machine=m1,model_id=proc,model_version=3,sensor=process,severity=major,"
        f'site=s1,state=update score=0.75,threshold=0.5,event_id="evt-1",seq=2i,active=1i,acknowledged=1i,'
        f'silenced=0i,flapping=0i,defect="outer_race" {T0 + 9}'
    ]
    cleared = dataclasses.replace(a, state="clear", defect=None, acknowledged_by=None, silenced=True)
    assert "active=0i,acknowledged=0i,silenced=1i" in alert_lines(cleared)[0]


def test_command_line() -> None:
    assert command_lines("silence", True, "maria", "machine m02 silenced for 60 s", "m02", T0) == [
        'alert_command,command=silence,machine=m02,result=accepted by="maria",detail="machine m02 silenced for 60 s" '
        f"{T0}"
    ]
    assert command_lines("", False, "", "bad_json: x", None, T0)[0].startswith(
        'alert_command,command=invalid,result=rejected by="unknown"'
    )


# -- raw vibration policy ------------------------------------------------------------------------


def _blocks(k: int, source: Source = SRC, channel: str = "value") -> list[SampleBlock]:
    return [_block(source=source, start_ns=T0 + i * 10**9, channel=channel) for i in range(k)]


def test_policy_all_and_none() -> None:
    b = _block()
    assert RawVibrationPolicy("all").decide(b) == "store"
    assert RawVibrationPolicy("none").decide(b) == "skip"
    assert RawVibrationPolicy("all").on_alert(SRC) == []
    assert RawVibrationPolicy("none").on_alert(SRC) == []


def test_policy_every_n_stores_the_first_and_every_nth_block_per_source() -> None:
    policy = RawVibrationPolicy("every_n", every_n=3)
    other = Source.of(machine="m2", sensor="vibration")
    decisions = [policy.decide(b) for b in _blocks(7)]
    kept_other = [i for i, b in enumerate(_blocks(4, source=other)) if policy.decide(b) == "store"]
    assert [i for i, d in enumerate(decisions) if d == "store"] == [0, 3, 6]
    assert set(decisions) == {"store", "skip"}  # every_n never holds a block
    assert kept_other == [0, 3]
    assert policy.on_alert(SRC) == []


def _hold_all(policy: RawVibrationPolicy, blocks: list[SampleBlock]) -> list[SampleBlock]:
    """What the ingest worker does: each block decided ``hold`` is held (once its batch is durable)."""
    held = []
    for b in blocks:
        if policy.decide(b) == "hold":
            policy.hold(b)
            held.append(b)
    return held


def _same(got: list[SampleBlock], want: list[SampleBlock]) -> bool:
    """The very blocks, in this order: a release hands over references, never copies."""
    return len(got) == len(want) and all(g is w for g, w in zip(got, want, strict=True))


def test_policy_around_alerts_releases_the_ring_and_stores_the_blocks_after_an_alert() -> None:
    policy = RawVibrationPolicy("around_alerts", keep_blocks=2)
    blocks = _blocks(8)
    assert _same(_hold_all(policy, blocks[:4]), blocks[:4])
    assert _same(policy.on_alert(SRC), blocks[2:4])  # the last keep_blocks blocks before the alert, oldest first
    assert policy.decide(blocks[4]) == "store"
    assert policy.decide(blocks[5]) == "store"
    assert policy.decide(blocks[6]) == "hold"  # back to the ring
    policy.hold(blocks[6])
    assert _same(policy.on_alert(SRC), [blocks[6]])  # only what was held since
    assert policy.on_alert(SRC) == []  # released blocks are not released twice


def test_policy_around_alerts_without_held_blocks_releases_nothing_but_still_stores_after() -> None:
    policy = RawVibrationPolicy("around_alerts", keep_blocks=1)
    (b,) = _blocks(1)
    assert policy.decide(b) == "hold"  # decided, but its message was rejected: never held
    assert policy.on_alert(SRC) == []
    assert policy.decide(b) == "store"


def test_policy_around_alerts_is_per_source() -> None:
    policy = RawVibrationPolicy("around_alerts", keep_blocks=1)
    other = Source.of(machine="m2", sensor="vibration")
    (a,) = _blocks(1)
    (b,) = _blocks(1, source=other)
    assert _same(_hold_all(policy, [a]), [a])
    assert _same(_hold_all(policy, [b]), [b])
    assert _same(policy.on_alert(other), [b])
    assert policy.decide(_block(source=SRC)) == "hold"  # the alert of the other source changed nothing here
    assert policy.decide(_block(source=other)) == "store"
    assert _same(policy.on_alert(SRC), [a])


def test_policy_around_alerts_releases_every_channel_of_the_source_in_the_order_held() -> None:
    policy = RawVibrationPolicy("around_alerts", keep_blocks=2)
    x, y = _blocks(2, channel="x"), _blocks(2, channel="y")
    for b in (y[0], x[0], y[1], x[1]):
        policy.hold(b)
    assert _same(policy.on_alert(SRC), [y[0], x[0], y[1], x[1]])
    assert policy.decide(x[0]) == "store"
    assert policy.decide(y[0]) == "store"


def test_policy_around_alerts_ring_keeps_only_the_last_keep_blocks() -> None:
    policy = RawVibrationPolicy("around_alerts", keep_blocks=3)
    blocks = _blocks(10)
    assert _same(_hold_all(policy, blocks), blocks)
    assert policy.held() == (3, 3 * 4 * len(blocks[0].samples))  # float32 bytes of the three kept
    assert _same(policy.on_alert(SRC), blocks[7:])
    assert policy.held() == (0, 0)


def test_policy_around_alerts_gives_up_blocks_older_than_hold_s() -> None:
    now = [1000.0]
    policy = RawVibrationPolicy("around_alerts", keep_blocks=5, hold_s=60.0, clock=lambda: now[0])
    quiet = Source.of(machine="m2", sensor="vibration")
    old, fresh = _blocks(2), _blocks(1, source=quiet)
    policy.hold(old[0])
    policy.hold(fresh[0])
    now[0] += 50.0
    policy.hold(old[1])
    now[0] += 20.0  # old[0] and fresh[0] are 70 s old, old[1] 20 s
    assert _same(policy.on_alert(SRC), [old[1]])  # an alert wants no block older than hold_s ...
    assert policy.held() == (1, 4 * len(fresh[0].samples))
    assert policy.expire() == 1  # ... and a source that went quiet gives its blocks up
    assert policy.held() == (0, 0)
    assert policy.on_alert(quiet) == []


def test_policy_around_alerts_gives_up_the_blocks_held_longest_beyond_max_bytes() -> None:
    one = 4 * len(_block().samples)  # bytes of one block's float32 samples
    policy = RawVibrationPolicy("around_alerts", keep_blocks=3, max_bytes=4 * one)
    sources = [Source.of(machine=f"m{i}", sensor="vibration") for i in range(3)]
    held = [_blocks(2, source=src) for src in sources]  # two blocks each: six in all, room for four
    evicted = [policy.hold(b) for pair in zip(*held, strict=True) for b in pair]  # m0, m1, m2, m0, m1, m2
    assert evicted == [0, 0, 0, 0, 1, 1]
    assert policy.held() == (4, 4 * one)
    assert _same(policy.on_alert(sources[0]), [held[0][1]])  # its first block was the longest held
    assert _same(policy.on_alert(sources[1]), [held[1][1]])
    assert _same(policy.on_alert(sources[2]), held[2])
    assert policy.held() == (0, 0)


def test_policy_keeps_its_byte_count_through_pushed_out_released_and_expired_blocks() -> None:
    now = [0.0]
    one = 4 * len(_block().samples)
    policy = RawVibrationPolicy("around_alerts", keep_blocks=2, hold_s=10.0, max_bytes=3 * one, clock=lambda: now[0])
    quiet = Source.of(machine="m2", sensor="vibration")
    for b in _blocks(5):  # the ring keeps two: three pushed out, never over the cap
        assert policy.hold(b) == 0
    assert policy.hold(_block(source=quiet)) == 0
    assert policy.held() == (3, 3 * one)
    policy.on_alert(SRC)
    assert policy.held() == (1, one)
    for _ in range(3000):  # many holds of blocks long gone: the record of holds does not grow with them
        policy.on_alert(SRC)
        policy.hold(_block())
    assert len(policy._held) == policy.held()[0] == 2  # nothing of the blocks long gone is kept
    now[0] += 11.0
    assert policy.expire() == 2  # the quiet source's block and SRC's last one
    assert policy.held() == (0, 0)


def test_policy_forgets_a_quiet_source_once_it_has_nothing_held_or_to_store() -> None:
    now = [0.0]
    policy = RawVibrationPolicy("around_alerts", keep_blocks=1, hold_s=10.0, clock=lambda: now[0])
    quiet = Source.of(machine="m2", sensor="vibration")
    for src in (SRC, quiet):
        b = _block(source=src)
        assert policy.decide(b) == "hold"
        policy.hold(b)
    policy.on_alert(SRC)  # SRC now has a block to store after its alert: remembered
    now[0] += 11.0
    assert policy.expire() == 1
    assert {key[0] for key in policy._ring} == {SRC}
    assert policy.decide(_block(source=SRC)) == "store"
    assert policy.decide(_block(source=quiet)) == "hold"  # back as a new source


@pytest.mark.parametrize(
    ("mode", "every_n", "keep_blocks", "message"),
    [
        ("sometimes", 1, 0, "not one of"),
        ("every_n", 0, 0, "every_n"),
        ("around_alerts", 1, 0, "keep_blocks"),
        ("all", 1, -1, "keep_blocks"),
    ],
)
def test_policy_refuses_bad_settings(mode: str, every_n: int, keep_blocks: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RawVibrationPolicy(mode, every_n, keep_blocks)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hold_s"):
        RawVibrationPolicy("around_alerts", 1, 1, hold_s=0.0)
    with pytest.raises(ValueError, match="max_bytes"):
        RawVibrationPolicy("around_alerts", 1, 1, max_bytes=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_features_entry_gives_the_lines_feature_lines_gives_one_by_one(dtype: type) -> None:
    """The scoring thread spools a batch's feature vectors as one binary entry and the writer formats them:
    the points must be those of ``feature_lines``, value for value (shortest repr of the values' dtype)."""
    rng = np.random.default_rng(7)
    names = ("rms", "kurtosis", "band 1", "a=b,c")  # names that need escaping
    edge = np.array([0.1, 1e-07, 1e16, 16777216.0, -0.0, 3.4e38, 1.5e-45, 2.0], dtype=dtype)
    values = np.concatenate(
        [rng.normal(scale=1e3, size=(40, 4)), rng.lognormal(sigma=20, size=(40, 4)), edge.reshape(2, 4)]
    ).astype(dtype)
    sources = [SRC, PROC, Source.of(machine="m 2", sensor="x,y")] * 27 + [SRC]
    windows = [dataclasses.replace(_window(), source=src, end_ns=T0 + 1000 * i) for i, src in enumerate(sources)]
    entry = encode_features("vib-ae", "1.2.0", names, sources, [w.end_ns for w in windows], values)
    assert entry.kind == Kind.FEATURES and entry.points == len(windows)
    expected = [
        line
        for w, row in zip(windows, values, strict=True)
        for line in feature_lines(FeatureVector(window=w, names=names, values=row, spec_hash="h"), "vib-ae", "1.2.0")
    ]
    assert entry_lines(entry.kind, entry.body) == expected


def test_a_features_entry_with_a_non_finite_value_is_refused_whole() -> None:
    values = np.array([[1.0, 2.0], [np.inf, 3.0]], np.float32)
    entry = encode_features("m", "1", ("a", "b"), [SRC, PROC], [T0, T0 + 1], values)
    with pytest.raises(ValueError, match="row 1"):
        entry_lines(entry.kind, entry.body)
    with pytest.raises(ValueError, match="2 sources, 2 end times and 3 names"):
        encode_features("m", "1", ("a", "b", "c"), [SRC, PROC], [T0, T0 + 1], values)
