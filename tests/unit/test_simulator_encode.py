"""``agent.decode.encode`` writes exactly the documented inbound JSON (docs/contracts.md)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

import numpy as np
import pytest

from agent.decode.encode import encode_block, encode_fields, encode_scalar

TS_NS = 1_732_575_600_250_000_001  # not representable as float seconds: must survive exactly


def test_scalar_is_the_documented_json() -> None:
    payload = encode_scalar(61.2, ts_ns=TS_NS, seq=7)
    assert json.loads(payload) == {"v": 1, "ts_ns": TS_NS, "seq": 7, "value": 61.2}
    assert payload == b'{"v":1,"ts_ns":1732575600250000001,"seq":7,"value":61.2}'
    assert json.loads(encode_scalar(3)) == {"v": 1, "value": 3.0}


def test_fields_are_the_documented_json() -> None:
    fields = {"temperature": 61.2, "current": 12.4, "pressure": 3.01}
    decoded = json.loads(encode_fields(fields, ts_ns=TS_NS, seq=0))
    assert decoded == {"v": 1, "ts_ns": TS_NS, "seq": 0, "fields": fields}
    assert type(decoded["ts_ns"]) is int


def test_json_block_round_trips_float32_samples_exactly() -> None:
    samples = np.array([0.1, -0.02, 1e-7, 3.5], dtype=np.float32)
    decoded = json.loads(encode_block(samples, 10240, ts_ns=TS_NS, seq=3, encoding="json"))
    assert decoded.keys() == {"v", "ts_ns", "seq", "rate_hz", "samples"}
    assert decoded["rate_hz"] == 10240.0
    assert np.array_equal(np.array(decoded["samples"], dtype=np.float32), samples)


def test_f32le_block_round_trips_exactly() -> None:
    samples = np.random.default_rng(0).normal(size=2048).astype(np.float32)
    decoded = json.loads(encode_block(samples, 10240.0, ts_ns=TS_NS, seq=9, encoding="f32le", channel="x"))
    assert decoded.keys() == {"v", "ts_ns", "seq", "rate_hz", "channel", "encoding", "data"}
    assert (decoded["encoding"], decoded["channel"], decoded["ts_ns"]) == ("f32le", "x", TS_NS)
    raw = base64.b64decode(decoded["data"], validate=True)
    assert np.array_equal(np.frombuffer(raw, dtype="<f4"), samples)


def test_i16le_block_is_int16_times_scale() -> None:
    samples = np.array([0.0, 0.0123, -1.5, 16.38], dtype=np.float64)
    decoded = json.loads(encode_block(samples, 25600, ts_ns=TS_NS, encoding="i16le", scale=0.0005))
    assert (decoded["encoding"], decoded["scale"]) == ("i16le", 0.0005)
    counts = np.frombuffer(base64.b64decode(decoded["data"]), dtype="<i2")
    assert counts.tolist() == [0, 25, -3000, 32760]
    assert np.all(np.abs(counts * decoded["scale"] - samples) <= 0.0005 / 2)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: encode_scalar(float("nan")), "value: must be finite"),
        (lambda: encode_scalar(True), "value: expected a number"),
        (lambda: encode_scalar(1.0, ts_ns=1.5), "ts_ns: expected an integer"),  # type: ignore[arg-type]
        (lambda: encode_fields({}), "fields: at least one"),
        (lambda: encode_fields({"t": float("inf")}), "fields.t: must be finite"),
        (lambda: encode_block(np.zeros((2, 2)), 100), "samples: expected a non-empty 1-D"),
        (lambda: encode_block(np.array([np.nan]), 100), "samples: values must be finite"),
        (lambda: encode_block(np.zeros(4), 0), "rate_hz: must be > 0"),
        (lambda: encode_block(np.zeros(4), 100, encoding="i16le"), "scale: required"),
        (lambda: encode_block(np.array([40.0]), 100, encoding="i16le", scale=0.001), "does not fit int16"),
        (lambda: encode_block(np.array([1e39]), 100), "overflow float32"),
        (lambda: encode_block(np.zeros(4), 100, encoding="f64"), "encoding: expected one of"),  # type: ignore[arg-type]
    ],
)
def test_invalid_input_is_refused_with_the_field_name(call: Callable[[], bytes], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
