"""The inbound payload contract (docs/contracts.md): every shape, every timestamp form, every rejection."""

from __future__ import annotations

import base64
import doctest
import json

import numpy as np
import pytest

import agent.decode.errors
import agent.decode.json_v1
from agent.decode import encode
from agent.decode.base import DecodeLimits
from agent.decode.errors import CODES, DecodeError
from agent.decode.json_v1 import decode
from agent.records import NS_PER_S, Reading, SampleBlock, Source

SOURCE = Source.of(site="s1", line="l1", machine="press-7", sensor="vibration")
T0_S = 1_732_575_600  # 2024-11-25T23:00:00Z
ARRIVAL_NS = T0_S * NS_PER_S + 500_000_000


def one(payload: bytes | str, limits: DecodeLimits | None = None, received_ns: int = ARRIVAL_NS):
    raw = payload.encode() if isinstance(payload, str) else payload
    items = decode(SOURCE, raw, received_ns, limits or DecodeLimits())
    assert len(items) == 1
    return items[0]


def reject(payload: bytes | str, limits: DecodeLimits | None = None) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        one(payload, limits)
    return info.value


def b64(array: np.ndarray) -> str:
    return base64.b64encode(array.tobytes()).decode()


# --- shapes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("payload, value", [("61.2", 61.2), ("-3", -3.0), ("0", 0.0), (" 1e3 ", 1000.0)])
def test_bare_number_is_a_scalar_at_arrival_time(payload: str, value: float) -> None:
    item = one(payload)
    assert item == Reading(SOURCE, ARRIVAL_NS, {"value": value}, None)
    assert type(item.fields["value"]) is float


def test_scalar_object_with_ts_and_seq() -> None:
    item = one('{"v":1,"ts":1732575600.25,"value":61.2,"seq":7}')
    assert item == Reading(SOURCE, T0_S * NS_PER_S + 250_000_000, {"value": 61.2}, 7)


def test_integer_values_become_floats() -> None:
    # InfluxDB refuses a field that changes type between int and float: store every value as a float.
    item = one('{"fields":{"temperature":61,"current":12.4}}')
    assert item.fields == {"temperature": 61.0, "current": 12.4}
    assert all(type(v) is float for v in item.fields.values())


def test_fields_reading() -> None:
    item = one('{"v":1,"ts":1732575600.25,"fields":{"temperature":61.2,"current":12.4,"pressure":3.01}}')
    assert isinstance(item, Reading)
    assert item.time_ns == T0_S * NS_PER_S + 250_000_000
    assert item.fields == {"temperature": 61.2, "current": 12.4, "pressure": 3.01}
    assert item.seq is None


def test_version_may_be_omitted() -> None:
    assert one('{"value":1}') == one('{"v":1,"value":1}')


def test_block_from_list_matches_numpy_float32() -> None:
    samples = [0.01, -0.02, 1e-8, 3, 123456.789]
    payload = json.dumps({"v": 1, "ts": T0_S, "rate_hz": 10240, "samples": samples, "seq": 3})
    item = one(payload)
    assert isinstance(item, SampleBlock)
    assert item.start_ns == T0_S * NS_PER_S
    assert item.rate_hz == 10240.0
    assert item.channel == "value"
    assert item.seq == 3
    assert item.samples.dtype == np.float32
    assert item.samples.shape == (5,)
    np.testing.assert_array_equal(item.samples, np.asarray(samples, dtype=np.float32))


def test_block_from_base64_f32le_matches_numpy() -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal(4096).astype("<f4")
    payload = json.dumps({"ts": T0_S, "rate_hz": 25600.5, "encoding": "f32le", "data": b64(x), "channel": "x"})
    item = one(payload)
    assert isinstance(item, SampleBlock)
    assert item.rate_hz == 25600.5
    assert item.channel == "x"
    assert item.samples.dtype == np.float32
    assert item.samples.dtype.isnative
    np.testing.assert_array_equal(item.samples, x)


def test_block_from_base64_i16le_is_int16_times_scale() -> None:
    counts = np.array([-32768, -1, 0, 1, 1234, 32767], dtype="<i2")
    payload = json.dumps({"ts": T0_S, "rate_hz": 10240, "encoding": "i16le", "scale": 0.001, "data": b64(counts)})
    item = one(payload)
    expected = (counts.astype(np.float64) * 0.001).astype(np.float32)
    np.testing.assert_array_equal(item.samples, expected)
    np.testing.assert_allclose(item.samples, [-32.768, -0.001, 0, 0.001, 1.234, 32.767], rtol=1e-6)


def test_block_samples_are_read_only() -> None:
    for payload in (
        '{"rate_hz":1,"samples":[1,2]}',
        json.dumps({"rate_hz": 1, "encoding": "f32le", "data": b64(np.ones(2, "<f4"))}),
    ):
        item = one(payload)
        with pytest.raises(ValueError):
            item.samples[0] = 5.0


def test_block_end_time_follows_the_rate() -> None:
    item = one(json.dumps({"ts_ns": T0_S * NS_PER_S, "rate_hz": 1000, "samples": [0.0] * 1001}))
    assert item.end_ns == T0_S * NS_PER_S + NS_PER_S


@pytest.mark.parametrize("encoding", ["json", "f32le", "i16le"])
def test_round_trip_with_the_encoder(encoding: str) -> None:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(2048) * 3).astype(np.float32)
    scale = 0.001 if encoding == "i16le" else None
    ts_ns = T0_S * NS_PER_S + 123_456_789
    raw = encode.encode_block(x, 10240.0, ts_ns=ts_ns, seq=9, encoding=encoding, scale=scale, channel="y")  # type: ignore[arg-type]
    item = decode(SOURCE, raw, ARRIVAL_NS)[0]
    assert isinstance(item, SampleBlock)
    assert (item.start_ns, item.rate_hz, item.seq, item.channel) == (ts_ns, 10240.0, 9, "y")
    if encoding == "i16le":
        np.testing.assert_allclose(item.samples, x, atol=0.0005 + 1e-6)
    else:
        np.testing.assert_array_equal(item.samples, x)


def test_round_trip_scalar_and_fields_with_the_encoder() -> None:
    ts_ns = T0_S * NS_PER_S + 1
    assert decode(SOURCE, encode.encode_scalar(61.2, ts_ns=ts_ns, seq=4), ARRIVAL_NS) == [
        Reading(SOURCE, ts_ns, {"value": 61.2}, 4)
    ]
    fields = {"temperature": 61.2, "current": 12.4}
    assert decode(SOURCE, encode.encode_fields(fields), ARRIVAL_NS) == [Reading(SOURCE, ARRIVAL_NS, fields, None)]


# --- timestamps ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ts, expected_ns",
    [
        (T0_S, T0_S * NS_PER_S),
        (1732575600.25, T0_S * NS_PER_S + 250_000_000),
        # the decimal the publisher wrote, not the binary float's ...100000023841858 expansion
        (1732575600.1, T0_S * NS_PER_S + 100_000_000),
        (1732575600.123456, T0_S * NS_PER_S + 123_456_000),
        ('"2024-11-25T23:00:00Z"', T0_S * NS_PER_S),
        ('"2024-11-25T23:00:00.25Z"', T0_S * NS_PER_S + 250_000_000),
        ('"2024-11-26T00:00:00.5+01:00"', T0_S * NS_PER_S + 500_000_000),
        ('"2024-11-25T17:30:00-05:30"', T0_S * NS_PER_S),
        ('"2024-11-25t23:00:00z"', T0_S * NS_PER_S),
        ('"2024-11-25 23:00:00Z"', T0_S * NS_PER_S),
        ('"2024-11-25T23:00:00.123456789Z"', T0_S * NS_PER_S + 123_456_789),
        ('"2024-11-25T23:00:00.1234567891Z"', T0_S * NS_PER_S + 123_456_789),
    ],
)
def test_ts_epoch_seconds_or_rfc3339(ts: object, expected_ns: int) -> None:
    assert one(f'{{"ts":{ts},"value":1}}').time_ns == expected_ns


def test_ts_ns_is_exact() -> None:
    assert one(f'{{"ts_ns":{T0_S * NS_PER_S + 123_456_789},"value":1}}').time_ns == T0_S * NS_PER_S + 123_456_789


def test_missing_timestamp_means_arrival_time() -> None:
    assert one('{"value":1}').time_ns == ARRIVAL_NS
    assert one('{"rate_hz":1,"samples":[1]}').start_ns == ARRIVAL_NS


def test_timestamp_window_is_inclusive() -> None:
    limits = DecodeLimits(min_time_ns=T0_S * NS_PER_S, max_future_s=10)
    assert one(f'{{"ts_ns":{T0_S * NS_PER_S},"value":1}}', limits).time_ns == T0_S * NS_PER_S
    latest = ARRIVAL_NS + 10 * NS_PER_S
    assert one(f'{{"ts_ns":{latest},"value":1}}', limits).time_ns == latest
    err = reject(f'{{"ts_ns":{latest + 1},"value":1}}', limits)
    assert err.code == "timestamp"
    assert "after its arrival (limit 10 s)" in err.detail
    err = reject(f'{{"ts_ns":{T0_S * NS_PER_S - 1},"value":1}}', limits)
    assert err.code == "timestamp"
    assert "is before 2024-11-25T23:00:00Z" in err.detail


# --- rejections ------------------------------------------------------------------------------------------

F32_NAN = b64(np.array([1.0, np.nan], "<f4"))
F32_INF = b64(np.array([np.inf], "<f4"))

REJECTIONS = [
    # (payload, code, fragment of the detail)
    ('{"value":NaN}', "value", "value is NaN"),
    ('{"fields":{"temperature":NaN}}', "value", "field 'temperature' is NaN"),
    ('{"fields":{"temperature":Infinity}}', "value", "field 'temperature' is Infinity"),
    ('{"value":-Infinity}', "value", "value is -Infinity"),
    ('{"value":1e999}', "value", "value is Infinity"),
    ('{"value":true}', "value", "value is a boolean (true), not a number"),
    ('{"fields":{"running":false}}', "value", "field 'running' is a boolean (false)"),
    ('{"value":"61.2"}', "value", "value is a string '61.2', not a number"),
    ('{"value":null}', "value", "value is null, not a number"),
    ('{"value":[1]}', "value", "value is an array, not a number"),
    ("true", "value", "the payload is a boolean (true)"),
    ('{"value":' + "9" * 400 + "}", "value", "integer of 400 digits"),
    ('{"rate_hz":1,"samples":[1,2,"x"]}', "value", "samples[2] is a string 'x', not a number"),
    ('{"rate_hz":1,"samples":[0.5,true]}', "value", "samples[1] is a boolean (true)"),
    ('{"rate_hz":1,"samples":[0,1,null]}', "value", "samples[2] is null"),
    ('{"rate_hz":1,"samples":' + json.dumps([0.0] * 17 + [None]) + "}", "value", "samples[17] is null"),
    ('{"rate_hz":1,"samples":[1,NaN]}', "value", "samples[1] is NaN"),
    ('{"rate_hz":1,"samples":[1,2,1e39]}', "value", "samples[2] = 1e+39 is outside the float32 range"),
    ('{"rate_hz":1,"samples":[' + "9" * 400 + "]}", "value", "samples[0] is an integer of 400 digits"),
    (f'{{"rate_hz":1,"encoding":"f32le","data":"{F32_NAN}"}}', "value", "samples[1] is NaN"),
    (f'{{"rate_hz":1,"encoding":"f32le","data":"{F32_INF}"}}', "value", "samples[0] is Infinity"),
    (
        f'{{"rate_hz":1,"encoding":"i16le","scale":1e36,"data":"{b64(np.array([0, 32767], "<i2"))}"}}',
        "value",
        "samples[1] = 32767 × scale 1e+36 is outside the float32 range",
    ),
    # shape
    ('{"valeu":1}', "shape", "unknown key 'valeu' (did you mean 'value'?); allowed keys: channel, data,"),
    ('{"value":1,"unit":"C"}', "shape", "unknown key 'unit'"),
    ('{"value":1,"fields":{"a":1}}', "shape", "payload has both 'value' and 'fields'"),
    ('{"samples":[1],"data":"AAAAAA==","rate_hz":1}', "shape", "payload has both 'samples' and 'data'"),
    ('{"v":1,"ts":1732575600}', "shape", "payload has none of 'value', 'fields', 'samples', 'data'"),
    ('{"value":1,"rate_hz":10}', "shape", "key 'rate_hz' does not apply to a scalar reading"),
    ('{"fields":{"a":1},"channel":"x"}', "shape", "key 'channel' does not apply to a fields reading"),
    ('{"samples":[1],"rate_hz":1,"scale":2}', "shape", "key 'scale' does not apply to a sample block"),
    ('{"value":1,"value":2}', "shape", "duplicate key 'value'"),
    ('{"fields":{"a":1,"a":2}}', "shape", "duplicate key 'a'"),
    ('{"fields":{}}', "shape", "'fields' is empty"),
    ('{"fields":[1,2]}', "shape", "'fields' must be an object of name: number, got an array"),
    ('{"fields":{"":1}}', "shape", "field name is empty"),
    ('{"fields":{"seq":1}}', "shape", "field name 'seq' is reserved"),
    ('{"fields":{"time":1}}', "shape", "field name 'time' is reserved"),
    ('{"fields":{"_value":1}}', "shape", "starts with '_'"),
    ('{"fields":{"a\\nb":1}}', "shape", "contains a control character"),
    ('{"fields":{"' + "x" * 200 + '":1}}', "shape", "longer than 128 characters"),
    ('{"samples":[],"rate_hz":1}', "shape", "'samples' is empty"),
    ('{"samples":"1,2","rate_hz":1}', "shape", "'samples' must be an array of numbers, got a string"),
    ('{"data":"","encoding":"f32le","rate_hz":1}', "shape", "'data' is empty"),
    ('{"samples":[1],"rate_hz":1,"channel":""}', "shape", "'channel' is empty"),
    ('{"samples":[1],"rate_hz":1,"channel":3}', "shape", "'channel' must be a string, got 3"),
    # name: what InfluxDB's line protocol cannot carry (issue 22: acknowledged, then lost in the writer)
    ('{"fields":{"temp\\\\":1}}', "name", "field name 'temp\\\\' ends with a backslash; InfluxDB cannot store it"),
    ('{"fields":{"a\\\\,b":1}}', "name", "has a backslash before ','"),
    ('{"fields":{"a\\\\ b":1}}', "name", "has a backslash before ' '"),
    ('{"fields":{"a\\\\=b":1}}', "name", "has a backslash before '='"),
    ('{"fields":{"\\ud800x":1}}', "name", "is not valid Unicode (a lone surrogate)"),
    ('{"samples":[1],"rate_hz":1,"channel":"x\\\\"}', "name", "'channel' 'x\\\\' ends with a backslash"),
    # too_many_fields
    (
        '{"fields":{' + ",".join(f'"f{i}":1' for i in range(65)) + "}}",
        "too_many_fields",
        "has 65 fields; the limit is 64",
    ),
    ('{"value":1,"seq":1.5}', "shape", "'seq' must be an integer, got 1.5"),
    ('{"value":1,"seq":"7"}', "shape", "'seq' must be an integer, got a string '7'"),
    ('{"value":1,"seq":true}', "shape", "'seq' must be an integer, got a boolean"),
    ('{"value":1,"seq":9223372036854775808}', "shape", "does not fit a 64-bit integer"),
    # version
    ('{"v":2,"value":1}', "version", "payload version 2 is not supported; this agent reads version 1"),
    ('{"v":0,"value":1}', "version", "payload version 0 is not supported"),
    ('{"v":"1","value":1}', "version", "'v' must be the integer 1, got a string '1'"),
    ('{"v":1.0,"value":1}', "version", "'v' must be the integer 1, got 1.0"),
    ('{"v":true,"value":1}', "version", "got a boolean (true)"),
    ('{"v":2,"whatever":1}', "version", "payload version 2"),  # the version is checked before the keys
    # timestamps
    (
        '{"ts":"1999-01-01T00:00:00Z","value":1}',
        "timestamp",
        "timestamp 1999-01-01T00:00:00Z is before 2000-01-01",
    ),
    ('{"ts":0,"value":1}', "timestamp", "timestamp 1970-01-01T00:00:00Z is before 2000-01-01"),
    ('{"ts":-1e300,"value":1}', "timestamp", "is before 2000-01-01"),
    (
        '{"ts":"2030-01-01T00:00:00Z","value":1}',
        "timestamp",
        "is 160,880,400 s after its arrival (limit 86400 s)",
    ),
    ('{"ts":1e300,"value":1}', "timestamp", "1e+300 s since 1970 is 1e+300 s after its arrival"),
    ('{"ts":1732575600250,"value":1}', "timestamp", "the value looks like epoch milliseconds"),
    (
        '{"ts_ns":1732575600,"value":1}',
        "timestamp",
        "is before 2000-01-01; the value looks like epoch seconds",
    ),
    ('{"ts_ns":1732575600250000,"value":1}', "timestamp", "looks like epoch microseconds"),
    ('{"ts":1732575600,"ts_ns":1732575600000000000,"value":1}', "timestamp", "both 'ts' and 'ts_ns'"),
    ('{"ts":"2024-11-25T23:00:00","value":1}', "timestamp", "has no UTC offset; add 'Z'"),
    ('{"ts":"2024-11-25","value":1}', "timestamp", "is not an RFC 3339 time"),
    ('{"ts":"25/11/2024 23:00","value":1}', "timestamp", "'25/11/2024 23:00' is not an RFC 3339 time"),
    (
        '{"ts":"2024-02-30T00:00:00Z","value":1}',
        "timestamp",
        "is not a valid time: day is out of range for month",
    ),
    ('{"ts":"2024-11-25T23:00:00+25:00","value":1}', "timestamp", "is not a valid time"),
    ('{"ts":"2024-11-25T23:00:60Z","value":1}', "timestamp", "is not a valid time"),
    ('{"ts":null,"value":1}', "timestamp", "'ts' must be epoch seconds or an RFC 3339 string, got null"),
    ('{"ts":true,"value":1}', "timestamp", "got a boolean (true)"),
    ('{"ts":NaN,"value":1}', "timestamp", "'ts' is NaN"),
    (
        '{"ts_ns":1.7e18,"value":1}',
        "timestamp",
        "'ts_ns' must be an integer (epoch nanoseconds), got 1.7e+18",
    ),
    ('{"ts_ns":"1732575600000000000","value":1}', "timestamp", "'ts_ns' must be an integer"),
    # rate
    ('{"samples":[1]}', "rate", "a sample block needs 'rate_hz'"),
    ('{"samples":[1],"rate_hz":0}', "rate", "'rate_hz' must be a positive finite number, got 0"),
    ('{"samples":[1],"rate_hz":-10}', "rate", "got -10"),
    ('{"samples":[1],"rate_hz":Infinity}', "rate", "got Infinity"),
    ('{"samples":[1],"rate_hz":NaN}', "rate", "got NaN"),
    ('{"samples":[1],"rate_hz":1e999}', "rate", "positive finite"),
    ('{"samples":[1],"rate_hz":' + "9" * 400 + "}", "rate", "positive finite"),
    ('{"samples":[1],"rate_hz":true}', "rate", "'rate_hz' must be a number, got a boolean (true)"),
    ('{"samples":[1],"rate_hz":"10240"}', "rate", "got a string '10240'"),
    # encoding
    (
        '{"data":"AAAAAA==","encoding":"f64le","rate_hz":1}',
        "encoding",
        "unknown encoding 'f64le'; known encodings: f32le, i16le",
    ),
    ('{"data":"AAAAAA==","encoding":null,"rate_hz":1}', "encoding", "'encoding' must be a string, got null"),
    ('{"data":"AAAAAA==","rate_hz":1}', "encoding", "'data' needs an 'encoding': one of f32le, i16le"),
    (
        '{"data":[1,2],"encoding":"f32le","rate_hz":1}',
        "encoding",
        "'data' must be a base64 string, got an array",
    ),
    ('{"data":"AAA","encoding":"f32le","rate_hz":1}', "encoding", "'data' is not valid base64"),
    ('{"data":"AA*AAA==","encoding":"f32le","rate_hz":1}', "encoding", "'data' is not valid base64"),
    ('{"data":"AA\\nAAA==","encoding":"f32le","rate_hz":1}', "encoding", "'data' is not valid base64"),
    ('{"data":"AAAA-_==","encoding":"f32le","rate_hz":1}', "encoding", "'data' is not valid base64"),
    ('{"data":"AAAAAA==","encoding":"f32le","rate_hz":1,"x":1}', "shape", "unknown key 'x'"),
    (
        '{"data":"AAAAAAA=","encoding":"f32le","rate_hz":1}',
        "encoding",
        "decodes to 5 bytes, not a multiple of 4 (f32le)",
    ),
    (
        '{"data":"AAAA","encoding":"i16le","scale":1,"rate_hz":1}',
        "encoding",
        "decodes to 3 bytes, not a multiple of 2",
    ),
    ('{"data":"AAAA","encoding":"i16le","rate_hz":1}', "encoding", "encoding 'i16le' needs 'scale'"),
    (
        '{"data":"AAAAAA==","encoding":"f32le","scale":1,"rate_hz":1}',
        "encoding",
        "'scale' applies only to encoding 'i16le'",
    ),
    (
        '{"data":"AAAA","encoding":"i16le","scale":0,"rate_hz":1}',
        "encoding",
        "'scale' must be a positive finite number, got 0",
    ),
    ('{"data":"AAAA","encoding":"i16le","scale":-1,"rate_hz":1}', "encoding", "got -1"),
    ('{"data":"AAAA","encoding":"i16le","scale":"0.1","rate_hz":1}', "encoding", "'scale' must be a number"),
    # JSON, UTF-8, top level
    ("", "json", "payload is empty"),
    ("  \n", "json", "payload is empty"),
    ('{"value":1', "json", "invalid JSON at line 1, column 11"),
    ('{"value":1}\n{"value":2}', "json", "invalid JSON at line 2, column 1: Extra data"),
    ("{'value':1}", "json", "invalid JSON at line 1, column 2"),
    ("\ufeff61.2", "json", "BOM"),
    ("[" * 100_000, "json", "nested too deeply"),
    (b"\xff\xfe1", "not_utf8", "payload is not valid UTF-8: byte 0 (0xff)"),
    (b'{"value":1,"x":"\xc3"}', "not_utf8", "byte 16 (0xc3)"),
    ('"61.2"', "not_object", "payload is a string '61.2'; expected a JSON object or a number"),
    ("[1,2]", "not_object", "payload is an array"),
    ("null", "not_object", "payload is null"),
]


@pytest.mark.parametrize("payload, code, fragment", REJECTIONS)
def test_rejection_has_code_and_specific_detail(payload: str | bytes, code: str, fragment: str) -> None:
    err = reject(payload)
    assert (err.code, fragment in err.detail) == (code, True), err.detail


def test_every_error_code_is_exercised() -> None:
    exercised = {code for _, code, _ in REJECTIONS} | {
        "too_large",
        "topic",
        "field_keys",
    }  # the last three: below, topic tests, test_decode_names.py
    # Sparkplug B's own codes: tests/unit/test_sparkplug_decode.py
    exercised |= {"protobuf", "unsupported", "not_born", "alias"}
    # Camera images' codes: tests/unit/test_camera_decode.py
    exercised |= {"empty", "unsupported_format", "bad_dimensions", "truncated", "corrupt"}
    assert exercised == CODES


def test_payload_larger_than_the_limit() -> None:
    err = reject(b"1" * 2_000_000)
    assert err.code == "too_large"
    assert err.detail == "payload is 2,000,000 bytes, limit 1,048,576"
    assert one(b"1" * 20, DecodeLimits(max_payload_bytes=20)).fields["value"] == 1.1111111111111111e19
    assert reject(b"1" * 21, DecodeLimits(max_payload_bytes=20)).code == "too_large"


def test_too_many_samples() -> None:
    limits = DecodeLimits(max_samples=4)
    assert len(one('{"rate_hz":1,"samples":[1,2,3,4]}', limits).samples) == 4
    err = reject('{"rate_hz":1,"samples":[1,2,3,4,5]}', limits)
    assert (err.code, err.detail) == ("too_large", "'samples' has 5 items, limit 4")
    data = b64(np.zeros(5, "<f4"))
    err = reject(f'{{"rate_hz":1,"encoding":"f32le","data":"{data}"}}', limits)
    assert (err.code, err.detail) == ("too_large", "'data' holds 5 samples, limit 4")


def test_error_messages_do_not_echo_huge_input() -> None:
    err = reject('{"' + "k" * 100_000 + '":1}')
    assert err.code == "shape"
    assert len(err.detail) < 400


def test_decode_error_carries_code_and_detail() -> None:
    err = DecodeError("value", "field 'temperature' is NaN")
    assert (err.code, err.detail, str(err)) == (
        "value",
        "field 'temperature' is NaN",
        "value: field 'temperature' is NaN",
    )
    with pytest.raises(ValueError, match="unknown decode error code"):
        DecodeError("nope", "x")  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["max_payload_bytes", "max_samples", "max_future_s"])
def test_limits_must_be_positive(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        DecodeLimits(**{field: 0})


def test_doctests() -> None:
    for module in (agent.decode.json_v1, agent.decode.errors):
        assert doctest.testmod(module).failed == 0
