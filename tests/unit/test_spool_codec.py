"""The spool's binary entries: round trips of readings and blocks, and the line protocol made from each kind."""

from __future__ import annotations

import dataclasses
import itertools
import struct

import numpy as np
import pytest

from agent.records import Reading, SampleBlock, Source
from agent.spool import codec
from agent.spool.codec import (
    Entry,
    Kind,
    check_block,
    decode_block,
    decode_raw_blocks,
    decode_raw_ref,
    decode_readings,
    encode_block,
    encode_lines,
    encode_raw_blocks,
    encode_raw_ref,
    encode_readings,
)
from agent.storage.entries import entry_lines
from agent.storage.points import block_lines, reading_lines

SRC = Source.of(site="s1", line="l 1", machine="m1", sensor="vibration")
PROC = Source.of(site="s1", line="l1", machine="m1", sensor="process")
T0 = 1_732_575_600_250_000_000


def _block(n: int = 5, store_seq: int | None = 3, source: Source = SRC, channel: str = "x") -> SampleBlock:
    samples = np.random.default_rng(7).standard_normal(n).astype(np.float32)
    return SampleBlock(source, T0, 10240.0, samples, channel, store_seq)


# -- readings ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seq", [None, 0, 7, -(2**63), 2**63 - 1])
def test_readings_round_trip_with_and_without_seq(seq: int | None) -> None:
    readings = [
        Reading(PROC, T0, {"temperature": 61.2, "current": 12.4, "tiny": 1e-300}, seq),
        Reading(PROC, T0 + 1, {"value": -0.0}, None),
    ]
    entry = encode_readings(readings)
    assert entry.kind == Kind.READINGS
    assert entry.points == 2
    assert not entry.held
    decoded = decode_readings(entry.body)
    assert decoded == readings
    assert [list(r.fields) for r in decoded] == [["temperature", "current", "tiny"], ["value"]]  # order kept
    assert decoded[0].seq == seq


def test_readings_keep_float64_values_exactly() -> None:
    values = {f"f{i}": v for i, v in enumerate([0.1, 1 / 3, 1e308, -5e-324, 123456789.123456789])}
    (decoded,) = decode_readings(encode_readings([Reading(PROC, T0, values)]).body)
    assert dict(decoded.fields) == values


def test_readings_keep_unicode_tags_and_field_names() -> None:
    source = Source.of(site="Zürich", line="東京 1", machine="m,1=x", sensor="process")
    r = Reading(source, T0, {"température": 1.5, "a b": 2.0}, 1)
    (decoded,) = decode_readings(encode_readings([r]).body)
    assert decoded == r
    assert decoded.source.tags == source.tags  # tag order kept


def test_an_empty_message_is_an_entry_of_no_points() -> None:
    entry = encode_readings([])
    assert entry.points == 0
    assert decode_readings(entry.body) == []
    assert entry_lines(entry.kind, entry.body) == []


def test_readings_take_long_names_many_tags_and_many_fields() -> None:
    """The readings' header is JSON: no length limits of its own (the decoder bounds a message's size)."""
    readings = [
        Reading(Source.of(machine="m" * 70_000, sensor="p"), T0, {"value": 1.0}),
        Reading(PROC, T0, {"é" * 40_000: 1.0}),  # 80,000 bytes in UTF-8
        Reading(Source(tuple((f"k{i}", "v") for i in range(300))), T0, {"value": 1.0}),
        Reading(PROC, T0, {f"f{i}": float(i) for i in range(70_000)}),
    ]
    assert decode_readings(encode_readings(readings).body) == readings
    many = [Reading(PROC, T0 + i, {"value": float(i)}, i) for i in range(70_000)]
    entry = encode_readings(many)
    assert entry.points == 70_000
    assert decode_readings(entry.body) == many


@pytest.mark.parametrize(
    "reading",
    [
        Reading(PROC, 2**63, {"value": 1.0}),
        Reading(PROC, -(2**63) - 1, {"value": 1.0}),
        Reading(PROC, T0, {"value": 1.0}, seq=2**63),
        Reading(PROC, T0, {"value": 1.0}, seq=-(2**63) - 1),
        Reading(PROC, T0, {"\ud800": 1.0}),  # a lone surrogate: not UTF-8
    ],
    ids=["time-high", "time-low", "seq-high", "seq-low", "surrogate"],
)
def test_what_the_format_cannot_hold_is_a_value_error(reading: Reading) -> None:
    with pytest.raises(ValueError):
        encode_readings([Reading(PROC, T0, {"value": 0.0}), reading])
    with pytest.raises(ValueError):  # a message of one reading (the usual one) takes a path of its own
        encode_readings([reading])


def test_a_single_reading_is_laid_out_as_in_a_list_of_readings() -> None:
    """One reading (struct) and several (numpy) give the same layout: the body of two equal readings is the
    single one's header doubled, with each array doubled."""
    r = Reading(PROC, T0, {"temperature": 61.2, "count": 3.0, "neg": -0.0}, 9)
    single = encode_readings([r])
    pair = encode_readings([r, r])
    assert decode_readings(single.body) == [r]
    assert decode_readings(pair.body) == [r, r]
    (size,) = struct.unpack_from("<I", single.body)
    header, arrays = single.body[4 : 4 + size], single.body[4 + size :]
    times, seqs, values = arrays[:8], arrays[8:16], arrays[16:]
    assert np.frombuffer(values, "<f8").tolist() == [61.2, 3.0, -0.0]
    (pair_size,) = struct.unpack_from("<I", pair.body)
    assert pair.body[4 + pair_size :] == times * 2 + seqs * 2 + values * 2
    assert pair.body[4 : 4 + pair_size] == b"[" + header[1:-1] + b"," + header[1:-1] + b"]"


# -- blocks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq", [None, 0, 42])
@pytest.mark.parametrize("store_raw", [True, False])
def test_block_round_trips_float32_samples_bit_for_bit(seq: int | None, store_raw: bool) -> None:
    block = _block(n=1000, store_seq=seq)
    block = SampleBlock(
        block.source,
        block.start_ns,
        block.rate_hz,
        np.concatenate([block.samples, np.array([0.1, -0.0, 3.4e38, 1.4e-45], np.float32)]),
        block.channel,
        seq,
    )
    entry = encode_block(block, store_raw)
    assert entry.kind == Kind.BLOCK
    assert entry.points == (len(block.samples) if store_raw else 0)
    decoded, stored = decode_block(entry.body)
    assert stored is store_raw
    assert decoded.samples.dtype == np.float32
    assert decoded.samples.tobytes() == block.samples.tobytes()
    assert (decoded.source, decoded.start_ns, decoded.rate_hz, decoded.channel, decoded.seq) == (
        block.source,
        block.start_ns,
        block.rate_hz,
        block.channel,
        seq,
    )


def test_float64_samples_are_stored_as_float32() -> None:
    samples = np.array([0.1, 0.2, 1 / 3], np.float64)
    block = SampleBlock(SRC, T0, 100.0, samples, "y")
    decoded, _ = decode_block(encode_block(block, True).body)
    assert decoded.samples.tobytes() == samples.astype(np.float32).tobytes()


def test_only_a_block_not_stored_now_can_be_held() -> None:
    block = _block()
    assert encode_block(block, store_raw=False, held=True).held
    assert not encode_block(block, store_raw=True, held=True).held  # stored at once: nothing to release later
    assert not encode_block(block, store_raw=False).held


def test_block_unicode_channel_and_tags_round_trip() -> None:
    block = _block(source=Source.of(machine="Maschine ü", sensor="vib 東"), channel="ä,x")
    decoded, _ = decode_block(encode_block(block, True).body)
    assert decoded.source == block.source
    assert decoded.channel == "ä,x"


def test_blocks_of_one_source_keep_their_own_channel_and_sources_their_own_tags(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A block's encoded names are remembered per source and channel, in a bounded cache (cleared when full)."""
    monkeypatch.setattr(codec, "_BLOCK_NAMES_MAX", 3)
    other = Source.of(site="s2", machine="m2", sensor="vibration")
    for _ in range(2):  # the second pass reads what the first remembered
        for source, channel in itertools.product((SRC, other, PROC), ("x", "y")):
            decoded, _ = decode_block(encode_block(_block(source=source, channel=channel), True).body)
            assert (decoded.source, decoded.channel) == (source, channel)
    assert 0 < len(codec._BLOCK_NAMES) <= 3


def test_a_block_name_of_exactly_65535_bytes_fits() -> None:
    block = SampleBlock(SRC, T0, 10.0, np.zeros(2, np.float32), "c" * 65_535)
    assert decode_block(encode_block(block, True).body)[0].channel == block.channel


@pytest.mark.parametrize(
    "block",
    [
        SampleBlock(SRC, T0, 10.0, np.zeros(2, np.float32), "c" * 65_536),
        SampleBlock(SRC, T0, 10.0, np.zeros(2, np.float32), "é" * 40_000),  # 80,000 bytes in UTF-8
        SampleBlock(Source(tuple((f"k{i}", "v") for i in range(256))), T0, 10.0, np.zeros(2, np.float32)),
        SampleBlock(Source.of(machine="m", sensor="s" * 65_536), T0, 10.0, np.zeros(2, np.float32)),
        SampleBlock(SRC, 2**63, 10.0, np.zeros(2, np.float32)),
    ],
    ids=["long-channel", "long-channel-utf8", "256-tags", "long-tag", "time"],
)
def test_a_block_the_format_cannot_hold_is_a_value_error(block: SampleBlock) -> None:
    for _ in range(2):  # refused again: a refusal is not remembered as names
        with pytest.raises(ValueError):
            encode_block(block, True)


def test_an_empty_block_round_trips() -> None:
    block = SampleBlock(SRC, T0, 10.0, np.zeros(0, np.float32))
    entry = encode_block(block, True)
    assert entry.points == 0
    decoded, _ = decode_block(entry.body)
    assert len(decoded.samples) == 0
    assert entry_lines(entry.kind, entry.body) == []


# -- lines and raw-data releases ---------------------------------------------------------------


def test_lines_round_trip_with_unicode() -> None:
    lines = ['alert,machine=Mühle\\ 1 event_id="ä" 1', "m v=1i 2"]
    entry = encode_lines(lines)
    assert (entry.kind, entry.points) == (Kind.LINES, 2)
    assert entry_lines(entry.kind, entry.body) == lines


def test_no_lines_are_an_empty_entry() -> None:
    entry = encode_lines([])
    assert entry.points == 0
    assert entry_lines(entry.kind, entry.body) == []


def test_a_release_of_blocks_round_trips_them_and_counts_their_samples() -> None:
    blocks = [_block(n=3, channel="x"), _block(n=0, channel="y"), _block(n=5, store_seq=None, channel="z")]
    entry = encode_raw_blocks(blocks)
    assert (entry.kind, entry.points, entry.held) == (Kind.RAW_BLOCKS, 8, False)
    back = decode_raw_blocks(entry.body)
    assert [(b.source, b.channel, b.start_ns, b.seq) for b in back] == [
        (b.source, b.channel, b.start_ns, b.seq) for b in blocks
    ]
    assert all(np.array_equal(a.samples, b.samples) for a, b in zip(back, blocks, strict=True))
    assert entry_lines(entry.kind, entry.body) == [line for b in blocks for line in block_lines(b)]
    assert decode_raw_blocks(encode_raw_blocks([]).body) == []


def test_check_block_refuses_what_encode_block_refuses() -> None:
    check_block(_block())
    with pytest.raises(ValueError, match="too long"):
        check_block(_block(channel="c" * 70_000))
    with pytest.raises(ValueError, match="block start"):
        check_block(dataclasses.replace(_block(), start_ns=2**63))


def test_raw_ref_round_trips_its_ids() -> None:
    entry = encode_raw_ref([3, 1, 2**40])
    assert (entry.kind, entry.points, entry.held) == (Kind.RAW_REF, 0, False)
    assert decode_raw_ref(entry.body) == [3, 1, 2**40]
    assert decode_raw_ref(encode_raw_ref([]).body) == []


# -- entry_lines for every kind ----------------------------------------------------------------


def test_entry_lines_of_readings_are_the_readings_lines() -> None:
    readings = [Reading(PROC, T0, {"temperature": 61.2, "current": 12.4}, 7), Reading(PROC, T0 + 5, {"value": 1.5})]
    entry = encode_readings(readings)
    assert entry_lines(entry.kind, entry.body) == [line for r in readings for line in reading_lines(r)]
    assert entry_lines(entry.kind, entry.body)[0] == (
        f"reading,line=l1,machine=m1,sensor=process,site=s1 temperature=61.2,current=12.4,seq=7i {T0}"
    )


@pytest.mark.parametrize(
    "reading",
    [
        Reading(Source.of(site="", machine="m 1,x=y", sensor="process"), T0, {"a b": 1.0, "c,d=e": -0.0}, 3),
        Reading(Source.of(machine="Mühle", sensor="p"), T0, {"température": 1e-300, "big": 1.7976931348623157e308}),
        Reading(Source.of(zeta="z", alpha="a", machine="m", sensor="p"), -5, {"value": 0.1}, -(2**63)),
        Reading(PROC, T0, {"seq": 5.0, "value": 1.0}, 9),  # a field named like the seq: the general path
        Reading(PROC, T0, {"seq": 5.0}),
    ],
    ids=["escapes-empty-tag", "unicode-extremes", "tag-order-negative", "seq-field-with-seq", "seq-field"],
)
def test_entry_lines_of_readings_match_reading_lines_exactly(reading: Reading) -> None:
    entry = encode_readings([reading, reading])
    assert entry_lines(entry.kind, entry.body) == reading_lines(reading) * 2


def test_entry_lines_of_a_reading_without_fields_is_a_value_error() -> None:
    entry = encode_readings([Reading(PROC, T0, {})])
    with pytest.raises(ValueError, match="at least one field"):
        entry_lines(entry.kind, entry.body)


def test_entry_lines_of_a_stored_block_are_its_sample_lines() -> None:
    block = _block(n=4)
    entry = encode_block(block, store_raw=True)
    lines = entry_lines(entry.kind, entry.body)
    assert lines == block_lines(block)
    assert len(lines) == entry.points == 4


def test_a_held_or_skipped_block_gives_no_lines() -> None:
    entry = encode_block(_block(), store_raw=False, held=True)
    assert entry_lines(entry.kind, entry.body) == []


def test_entry_lines_of_a_raw_ref_are_the_lines_of_the_blocks_resolved() -> None:
    held = {10: encode_block(_block(n=3, channel="x"), False, True), 11: encode_block(_block(n=2, channel="y"), False)}
    asked: list[list[int]] = []

    def resolve(ids: object) -> list[bytes]:
        asked.append(list(ids))  # type: ignore[call-overload]
        return [held[i].body for i in ids if i in held]  # type: ignore[attr-defined]

    ref = encode_raw_ref([10, 11, 99])  # 99: no longer in the spool
    lines = entry_lines(ref.kind, ref.body, resolve)
    assert asked == [[10, 11, 99]]
    assert lines == block_lines(_block(n=3, channel="x")) + block_lines(_block(n=2, channel="y"))
    assert entry_lines(ref.kind, ref.body) == []  # nothing to resolve with: no lines


@pytest.mark.parametrize(
    "entry",
    [
        encode_readings([Reading(PROC, T0, {"value": float("nan")})]),
        encode_readings([Reading(PROC, T0, {"bad\\": 1.0})]),
        encode_readings([Reading(Source.of(machine="m\\", sensor="p"), T0, {"value": 1.0})]),
        encode_block(SampleBlock(SRC, T0, 10.0, np.array([1.0, np.inf], np.float32)), True),
    ],
    ids=["nan-field", "field-ends-with-backslash", "tag-ends-with-backslash", "inf-sample"],
)
def test_entry_lines_refuse_what_influxdb_cannot_hold(entry: Entry) -> None:
    with pytest.raises(ValueError):
        entry_lines(entry.kind, entry.body)


def test_entry_lines_of_an_unknown_kind_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown spool entry kind 9"):
        entry_lines(9, b"")
