"""Hostile input: properties of ``json_v1.decode`` over generated and mutated payloads.

For any bytes, ``decode`` either returns valid records (finite values, timestamps within the limits,
a sane shape) or raises ``DecodeError`` with a known code and a bounded message; never another
exception. Valid readings and blocks written by ``agent.decode.encode`` decode to exactly what was
encoded.

The suite runs a bounded number of examples (a few seconds). A longer hunt::

    PDM_FUZZ_EXAMPLES=20000 PDM_FUZZ_MUTATIONS=500000 .venv/bin/pytest -q tests/unit/test_decode_fuzz.py

(``PDM_FUZZ_EXAMPLES``: examples per hypothesis property; ``PDM_FUZZ_MUTATIONS``: iterations of the
mutation loop; ``PDM_FUZZ_SEED``: its seed, default a fixed one, ``random`` for a fresh one that is
printed on failure.)
"""

from __future__ import annotations

import base64
import json
import math
import os
import random
import string
from datetime import timedelta, timezone

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from agent.decode import encode
from agent.decode.base import DecodeLimits
from agent.decode.errors import CODES, DecodeError
from agent.decode.json_v1 import decode
from agent.records import NS_PER_S, Reading, SampleBlock, Source
from agent.schema import name_problem

SOURCE = Source.of(site="s1", line="l1", machine="press-7", sensor="vibration")
ARRIVAL_NS = 1_764_000_000 * NS_PER_S + 123_456_789  # 2025-11-24
LIMITS = DecodeLimits(max_payload_bytes=65_536, max_samples=4_096)
MAX_DETAIL_CHARS = 600  # error messages quote untrusted input shortened, never whole

EXAMPLES = int(os.environ.get("PDM_FUZZ_EXAMPLES", "150"))
MUTATIONS = int(os.environ.get("PDM_FUZZ_MUTATIONS", "20000"))
_seed_env = os.environ.get("PDM_FUZZ_SEED", "20261125")
SEED = random.randrange(2**32) if _seed_env == "random" else int(_seed_env)

fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decode_or_reject(payload: bytes, limits: DecodeLimits = LIMITS) -> list | None:
    """The property: valid records, or a DecodeError with a known code. Anything else fails the test."""
    try:
        records = decode(SOURCE, payload, ARRIVAL_NS, limits)
    except DecodeError as exc:
        assert exc.code in CODES
        assert exc.detail and len(exc.detail) <= MAX_DETAIL_CHARS, exc.detail
        str(exc)  # renders
        return None
    assert isinstance(records, list) and len(records) == 1
    for record in records:
        check_record(record, limits)
    return records


def check_record(record: object, limits: DecodeLimits) -> None:
    latest_ns = ARRIVAL_NS + int(limits.max_future_s * NS_PER_S)
    if isinstance(record, Reading):
        time_ns = record.time_ns
        assert record.fields, "a reading has at least one field"
        for name, value in record.fields.items():
            assert isinstance(name, str) and name and not name.startswith("_")
            assert type(value) is float and math.isfinite(value), (name, value)
    else:
        assert isinstance(record, SampleBlock)
        time_ns = record.start_ns
        samples = record.samples
        assert samples.dtype == np.float32 and samples.ndim == 1
        assert 1 <= samples.size <= limits.max_samples
        assert np.isfinite(samples).all()
        assert not samples.flags.writeable
        assert math.isfinite(record.rate_hz) and record.rate_hz > 0
        assert isinstance(record.channel, str) and record.channel
    assert type(time_ns) is int
    assert time_ns == ARRIVAL_NS or limits.min_time_ns <= time_ns <= latest_ns, time_ns
    assert record.seq is None or (type(record.seq) is int and -(2**63) <= record.seq < 2**63)


# --- any bytes ---------------------------------------------------------------------------------------------


@fuzz
@given(st.binary(max_size=600))
@example(b"")
@example(b"\xff")
@example(b"NaN")
@example(b"-Infinity")
@example(b"1e999")
@example(b"[" * 100_000)
@example(b'{"value":1,"value":2}')
@example(b"1" * 5000)  # beyond Python's int-string limit (4300 digits)
@example(b'{"ts":1' + b"0" * 320 + b',"value":1}')  # seconds so large that ns / 1e9 overflows a float
@example(b'{"ts_ns":-1' + b"0" * 320 + b',"value":1}')
@example(b'{"v":' + b"1" * 4000 + b',"value":1}')  # error messages quote such numbers shortened
@example(b'{"seq":' + b"9" * 4000 + b',"value":1}')
def test_any_bytes_decode_to_valid_records_or_a_decode_error(payload: bytes) -> None:
    decode_or_reject(payload)


# --- any JSON, with the decoder's own keys -----------------------------------------------------------------

KEYS = ["v", "ts", "ts_ns", "seq", "value", "fields", "samples", "data", "encoding", "scale", "rate_hz", "channel"]

numbers = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1e40, max_value=1e40),
    st.sampled_from([0, 1, -1, 1.0, -0.0, 1e-45, 3.4e38, 3.5e38, 2**63, -(2**63) - 1, 10**400]),
    st.integers(min_value=946_684_800, max_value=1_800_000_000),  # plausible epoch seconds
    st.integers(min_value=946_684_800 * NS_PER_S, max_value=1_800_000_000 * NS_PER_S),  # plausible epoch ns
)
texts = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["f32le", "i16le", "f64le", "", "\x00", "_x", "time", "seq", "x" * 200]),
    st.builds(
        lambda d, minutes: d.replace(tzinfo=timezone(timedelta(minutes=minutes))).isoformat(),
        st.datetimes(),
        st.integers(min_value=-1439, max_value=1439),
    ),
    st.datetimes().map(lambda d: d.isoformat()),  # no offset
    st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
    st.text(alphabet=string.ascii_letters + string.digits + "+/=", max_size=24),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.one_of(st.sampled_from(KEYS), texts), children, max_size=5)
    ),
    max_leaves=12,
)
payload_objects = st.dictionaries(
    st.one_of(st.sampled_from(KEYS), st.sampled_from(["valeu", "Value", "ts_ms", ""]), st.text(max_size=6)),
    json_values,
    max_size=7,
)


def dump(doc: object) -> bytes:
    # allow_nan writes NaN/Infinity literals, which real publishers (and Python's json) produce.
    return json.dumps(doc, allow_nan=True).encode()


@fuzz
@given(st.one_of(payload_objects, json_values))
def test_any_json_decodes_to_valid_records_or_a_decode_error(doc: object) -> None:
    decode_or_reject(dump(doc))


block_docs = st.fixed_dictionaries(
    {"data": st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()) | texts},
    optional={
        "encoding": st.sampled_from(["f32le", "i16le", "x"]),
        "scale": numbers,
        "rate_hz": numbers,
        "channel": texts,
        "ts": numbers | texts,
        "ts_ns": numbers,
        "seq": numbers,
        "v": st.sampled_from([1, 2, 1.0, True]),
    },
) | st.fixed_dictionaries(
    {"samples": st.lists(numbers | st.sampled_from([None, True, "1"]), max_size=12)},
    optional={"rate_hz": numbers, "channel": texts, "ts": numbers | texts},
)


@fuzz
@given(block_docs)
def test_sample_blocks_decode_to_valid_records_or_a_decode_error(doc: dict) -> None:
    decode_or_reject(dump(doc))


# --- round trips through the encoder ------------------------------------------------------------------------

times = st.one_of(st.none(), st.integers(min_value=LIMITS.min_time_ns, max_value=ARRIVAL_NS + 86_400 * NS_PER_S))
seqs = st.one_of(st.none(), st.integers(min_value=-(2**63), max_value=2**63 - 1))
finite = st.floats(allow_nan=False, allow_infinity=False)
# Names the decoder accepts (the encoder checks less: see the report).
field_names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"], exclude_characters="\x7f"),
    min_size=1,
    max_size=128,
).filter(
    lambda n: (
        not n.startswith("_")
        and n not in ("time", "seq")
        and not any(ord(c) < 32 for c in n)
        and name_problem(n) is None
    )  # what InfluxDB cannot store is refused (test_decode_names.py)
)


@fuzz
@given(finite, times, seqs)
def test_scalar_round_trip(value: float, ts_ns: int | None, seq: int | None) -> None:
    (reading,) = decode(SOURCE, encode.encode_scalar(value, ts_ns, seq), ARRIVAL_NS, LIMITS)
    assert isinstance(reading, Reading)
    assert dict(reading.fields) == {"value": value}
    assert reading.time_ns == (ARRIVAL_NS if ts_ns is None else ts_ns)
    assert reading.seq == seq


@fuzz
@given(st.dictionaries(field_names, finite, min_size=1, max_size=8), times, seqs)
def test_fields_round_trip(fields: dict[str, float], ts_ns: int | None, seq: int | None) -> None:
    (reading,) = decode(SOURCE, encode.encode_fields(fields, ts_ns, seq), ARRIVAL_NS, LIMITS)
    assert isinstance(reading, Reading)
    assert dict(reading.fields) == fields
    assert reading.time_ns == (ARRIVAL_NS if ts_ns is None else ts_ns)
    assert reading.seq == seq


f32_samples = hnp.arrays(
    np.float32,
    st.integers(min_value=1, max_value=256),
    elements=st.floats(allow_nan=False, allow_infinity=False, width=32),
)
rates = st.floats(min_value=1e-3, max_value=1e6, allow_nan=False)


@fuzz
@given(f32_samples, rates, times, seqs, st.sampled_from(["json", "f32le"]), st.none() | st.sampled_from(["x", "ch 1"]))
def test_float_block_round_trip_is_bit_exact(
    samples: np.ndarray, rate_hz: float, ts_ns: int | None, seq: int | None, encoding: str, channel: str | None
) -> None:
    payload = encode.encode_block(samples, rate_hz, ts_ns, seq, encoding=encoding, channel=channel)  # type: ignore[arg-type]
    (block,) = decode(SOURCE, payload, ARRIVAL_NS, LIMITS)
    assert isinstance(block, SampleBlock)
    assert block.samples.dtype == np.float32
    assert np.array_equal(block.samples.view(np.uint32), samples.view(np.uint32))  # -0.0 and subnormals too
    assert block.rate_hz == rate_hz
    assert block.start_ns == (ARRIVAL_NS if ts_ns is None else ts_ns)
    assert block.seq == seq
    assert block.channel == (channel or "value")


@fuzz
@given(
    hnp.arrays(np.int16, st.integers(min_value=1, max_value=256)),
    st.floats(min_value=1e-9, max_value=1e3, allow_nan=False),
    rates,
)
def test_int16_block_round_trip(counts: np.ndarray, scale: float, rate_hz: float) -> None:
    samples = counts.astype(np.float64) * scale
    (block,) = decode(SOURCE, encode.encode_block(samples, rate_hz, encoding="i16le", scale=scale), ARRIVAL_NS, LIMITS)
    assert isinstance(block, SampleBlock)
    assert np.array_equal(block.samples, samples.astype(np.float32))


# --- mutation fuzzing over valid payloads ---------------------------------------------------------------------


def seed_payloads() -> list[bytes]:
    rng = np.random.default_rng(7)
    wave = (np.sin(np.arange(64) / 3) * 2).astype(np.float32)
    t = ARRIVAL_NS - 5 * NS_PER_S
    return [
        encode.encode_scalar(61.25, t, 7),
        encode.encode_scalar(-0.5),
        encode.encode_fields({"temperature": 61.2, "current": 12.4, "pressure": 3.0}, t, 8),
        encode.encode_block(wave, 10240.0, t, 9, encoding="json", channel="x"),
        encode.encode_block(wave, 10240.0, t, 10, encoding="f32le"),
        encode.encode_block(rng.normal(size=32), 25600.0, t, 11, encoding="i16le", scale=0.001),
        b'{"v":1,"ts":"2025-11-24T15:59:55.250+01:00","value":1}',
        b'{"ts":1764000000.25,"fields":{"a":1,"b":2e10}}',
        b"61.2",
    ]


MUTATION_KEYS = [*KEYS, "valeu", "ts_ms", "_x", "time", "Value", "", "\u00e9", "samples\x00"]
MUTATION_VALUES = [
    b"NaN", b"-Infinity", b"1e999", b"-0", b"true", b"null", b'""', b"[]", b"{}", b"1" * 400, b"1" * 5000,
    b"9223372036854775808", b"-9223372036854775809", b"1e-400", b'"\\ud800"', b"[[[[[[[[1]]]]]]]]",
    b'"2024-02-30T00:00:00Z"', b'"9999-12-31T23:59:59-23:59"', b'"0000-01-01T00:00:00Z"', b"3.5e38",
]  # fmt: skip


def mutate(payload: bytes, rng: random.Random) -> bytes:
    data = bytearray(payload)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(8)
        if not data:
            data = bytearray(rng.choice(MUTATION_VALUES))
        elif op == 0:  # bit flip
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1:  # truncation
            del data[rng.randrange(len(data)) :]
        elif op == 2:  # delete a slice
            i = rng.randrange(len(data))
            del data[i : i + rng.randint(1, 8)]
        elif op == 3:  # insert a random or structural byte
            data.insert(rng.randrange(len(data) + 1), rng.choice([rng.randrange(256), *b'{}[],:"\\']))
        elif op == 4:  # duplicate a slice
            i = rng.randrange(len(data))
            j = min(len(data), i + rng.randint(1, 16))
            data[i:i] = data[i:j]
        elif op in (5, 6):  # rename a key / replace a value (on the JSON text)
            text = data.decode("utf-8", "replace")
            keys = [k for k in KEYS if f'"{k}"' in text]
            if op == 5 and keys:
                text = text.replace(f'"{rng.choice(keys)}"', json.dumps(rng.choice(MUTATION_KEYS)), 1)
                data = bytearray(text.encode("utf-8", "surrogatepass"))
            elif keys and (found := text.find(key := f'"{rng.choice(keys)}":')) >= 0:
                start = found + len(key)
                end = start
                while end < len(text) and text[end] not in ",}":
                    end += 1
                data = bytearray(text[:start].encode() + rng.choice(MUTATION_VALUES) + text[end:].encode())
        else:  # splice with another seed
            other = rng.choice(SEEDS)
            i, j = rng.randrange(len(data) + 1), rng.randrange(len(other) + 1)
            data = data[:i] + other[j:]
    return bytes(data)


SEEDS = seed_payloads()


def test_seed_payloads_are_valid() -> None:
    for payload in SEEDS:
        assert decode_or_reject(payload) is not None, payload


def test_mutated_payloads_decode_to_valid_records_or_a_decode_error() -> None:
    rng = random.Random(SEED)
    outcomes = {"records": 0, "errors": 0}
    for i in range(MUTATIONS):
        payload = mutate(rng.choice(SEEDS), rng)
        try:
            result = decode_or_reject(payload)
        except BaseException as exc:
            raise AssertionError(f"seed {SEED}, iteration {i}: payload {payload[:300]!r}: {exc!r}") from exc
        outcomes["records" if result is not None else "errors"] += 1
    # The mutations must exercise both outcomes, or the loop tests nothing.
    assert outcomes["records"] > MUTATIONS // 50 and outcomes["errors"] > MUTATIONS // 5, outcomes


@pytest.mark.parametrize("payload", [b"[" * 10**6, b'{"fields":' * 50_000])
def test_deeply_nested_json_is_a_decode_error_not_a_crash(payload: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        decode(SOURCE, payload, ARRIVAL_NS, DecodeLimits(max_payload_bytes=2_000_000))
    assert info.value.code == "json"
